"""The inspect stage: the source's structure without its weights, and its config, generation config and
tokenizer stored under ``inspect/`` for the export. Nothing loads the model's weights: later stages read the source
a layer at a time (fusing its norms on the fly), so the run directory never holds a copy of the source.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from storage import RunDir, digest_of_digests
from storage import rundir as layout

from .cache import stage_task
from .common import Probe, manifest_probe, release_memory, run_probed, stage_key
from .source import check_source_unchanged, open_source

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "inspect"


def _save_inspect_files(run: RunDir, src, config, trust_remote_code: bool) -> dict[str, str]:
    """The source's config, generation config and tokenizer written to ``inspect/``; {path: sha256}. Its own
    function so that the tokenizer (and a GGUF file's parsed metadata) is garbage once it returns."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(src.directory, trust_remote_code=trust_remote_code,
                                              **src.load_kwargs())
    try:
        generation = GenerationConfig.from_pretrained(src.directory, **src.load_kwargs())
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(config)
    files = {}
    with tempfile.TemporaryDirectory(prefix="dotresize-inspect-") as tmp:
        directory = Path(tmp)
        config.save_pretrained(directory)
        generation.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        for path in sorted(directory.iterdir()):
            rel = f"{layout.INSPECT}/{path.name}"
            files[rel] = run.write_bytes(rel, path.read_bytes())
    return files


def inspect_probe(run_url: str, source: dict, trust_remote_code: bool = False, **_) -> Probe:
    key = stage_key(NAME, source=source["digest"], trust_remote_code=trust_remote_code)
    return manifest_probe(RunDir(run_url), NAME, None, key)


@stage_task(inspect_probe, name=NAME)
def inspect_task(run_url: str, source: dict, trust_remote_code: bool = False) -> dict:
    """The source's structure without its weights: family, widths, layers, dtype at rest, parameter count and
    attention implementation; its config, generation config and tokenizer go to ``inspect/`` (for the export)."""
    probe = inspect_probe(run_url, source, trust_remote_code)
    run = probe.run

    def compute() -> dict:
        from dotresize.checkpoint import open_reader
        from dotresize.layerwise import StreamedModel

        check_source_unchanged(source)
        src, config = open_source(source)
        reader = open_reader(src.directory, src.gguf_file, config, src.weight_files)
        model = StreamedModel(reader, config)
        missing = [n for i in range(model.num_layers) for n in [model.layout.layer_prefix(i)]
                   if not model.layer_names(i)]
        if missing:
            from dotresize.errors import SourceNotFoundError

            raise SourceNotFoundError(f"the model at {source['spec']} has no weights for {missing[0]}*: "
                                      "the checkpoint is incomplete")
        files = _save_inspect_files(run, src, config, trust_remote_code)
        release_memory()  # a GGUF tokenizer's parse leaves ~150 MB of freed fragments (SmolLM2) otherwise
        return {
            "files": files,
            "digest": digest_of_digests(files),
            "family": model.adapter_cls.family,
            "model_class": model.model_class.__name__,
            "dtype": str(model.dtype).replace("torch.", ""),
            "attn_implementation": model.attn_implementation,
            "hidden_size": model.hidden_size,
            "num_layers": model.num_layers,
            "num_points": model.num_points,
            "num_attention_heads": model.num_attention_heads,
            "intermediate_size": model.layout.intermediate_size_of(config),
            "vocab_size": model.vocab_size,
            "parameters_before": int(model.parameter_count()),
            "tensors": len(reader.names()),
        }

    return run_probed(probe, compute)


def load_inspected(run: RunDir, inspect: dict):
    """(config, generation config, tokenizer) of the source as stored by the inspect stage."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    with run.local_copy(layout.INSPECT) as directory:
        config = AutoConfig.from_pretrained(directory)
        generation = GenerationConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return config, generation, tokenizer


__all__ = ["inspect_task", "load_inspected"]
