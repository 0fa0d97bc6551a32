"""Stages before calibration: resolve the source, sample the calibration set, inspect the model's structure.

Nothing here loads the model's weights: later stages read the source a layer at a time (fusing its norms on the
fly), so the run directory never holds a copy of the source.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import RunDir, digest_of_digests, sha256_bytes
from storage import rundir as layout

from .cache import stage_task
from .common import Probe, logger, manifest_probe, release_memory, run_probed, stage_key

#: small files of a model directory that change what is loaded (besides the weights)
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja")


def source_digest(meta: dict) -> str:
    return digest_of_digests({"weights": meta["weights_sha256"], "files": meta.get("files_sha256", {}),
                              "gguf": meta.get("gguf_file")})


def _resolve(spec: str | None):
    from dotresize.sources import resolve_source

    source = resolve_source(spec)
    meta = source.meta()
    meta["gguf_file"] = source.gguf_file
    if not source.gguf_file:
        meta["files_sha256"] = {name: sha256_bytes((source.directory / name).read_bytes())
                                for name in _SIDE_FILES if (source.directory / name).is_file()}
    meta["digest"] = source_digest(meta)
    meta["files_stat"] = {p.name: _stat(p) for p in source.weight_files}
    return source, meta


def _stat(path: Path) -> list[int]:
    stat = os.stat(path)
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def open_source(source: dict):
    """(ModelSource, config) of a resolved source record (no digest computed again)."""
    from dotresize.sources import load_config, resolve_source

    src = resolve_source(source["spec"])
    return src, load_config(src, source.get("trust_remote_code", False))


def check_source_unchanged(source: dict) -> None:
    """The source's weight files still have the sizes and modification times they had when resolved."""
    from dotresize.errors import SourceNotFoundError
    from dotresize.sources import resolve_source

    src = resolve_source(source["spec"])
    now = {p.name: _stat(p) for p in src.weight_files}
    if source.get("files_stat") and now != source["files_stat"]:
        raise SourceNotFoundError(f"the model at {source['spec']} changed while the run was going on: "
                                  "rerun the command")


@task(name="resolve-source", cache_policy=NO_CACHE, persist_result=False)
def resolve_source_task(spec: str | None, calib_data: str, trust_remote_code: bool = False) -> dict:
    """Source id, path and sha256 of every weight file, its architecture (checked against the supported
    families before any weight is loaded), and the calibration text's id and sha256. Writes nothing."""
    from dotresize.adapters import adapter_class_for_config
    from dotresize.data import load_text
    from dotresize.sources import load_config

    started = time.time()
    source, meta = _resolve(spec)
    meta["trust_remote_code"] = bool(trust_remote_code)
    config = load_config(source, trust_remote_code)
    adapter = adapter_class_for_config(config)
    architecture = {"family": adapter.family, "model_type": config.model_type,
                    "hidden_size": int(config.hidden_size), "num_layers": int(config.num_hidden_layers)}
    text = load_text(calib_data).meta()
    return {"stage": "resolve", "source": meta, "architecture": architecture, "calibration_text": text,
            "seconds": round(time.time() - started, 6)}


def check_source(spec: str | None, expected: dict):
    """The source resolved again, its full digest recomputed and compared with ``expected``."""
    source, meta = _resolve(spec)
    if meta["digest"] != expected["digest"]:
        from dotresize.errors import SourceNotFoundError

        raise SourceNotFoundError(f"the model at {spec} changed while the run was going on: rerun the command")
    return source, meta


def calibration_probe(run_url: str, source: dict, calib: dict, **_) -> Probe:
    key = stage_key("calibration", source=source["digest"], text=calib["text_sha256"], data=calib["data"],
                    samples=calib["samples"], seqlen=calib["seqlen"], seed=calib["seed"])
    return manifest_probe(RunDir(run_url), "calibration", None, key)


@stage_task(calibration_probe, name="calibration")
def calibration_task(run_url: str, source: dict, calib: dict, inspect: dict, hidden_size: int | None = None) -> dict:
    """Tokenise and sample the calibration windows with the source's tokenizer (as the inspect stage stored it:
    a GGUF tokenizer is converted once per run); store the ids and calibration.json (a set of fewer tokens than
    ``hidden_size`` is recorded and logged with a warning)."""
    probe = calibration_probe(run_url, source, calib)
    run = probe.run

    def compute() -> dict:
        from dotresize.data import calibration_set

        _, _, tokenizer = load_inspected(run, inspect)
        calibration = calibration_set(tokenizer, calib["data"], samples=calib["samples"], seqlen=calib["seqlen"],
                                      seed=calib["seed"])
        meta = calibration.meta()
        if hidden_size is not None:
            from dotresize.api import check_calibration

            warning = check_calibration(calibration.input_ids, hidden_size)
            if warning:
                logger().warning(warning)
                meta["warning"] = warning
        ids_sha = run.save_tensors(layout.CALIBRATION_IDS,
                                   {"input_ids": calibration.input_ids.to(torch.int64).contiguous()})
        meta_sha = run.write_json(layout.CALIBRATION, meta)
        return {"files": {layout.CALIBRATION_IDS: ids_sha, layout.CALIBRATION: meta_sha},
                "digest": meta["input_ids_sha256"], "tokens": meta["tokens"],
                "shapes": {"input_ids": list(calibration.input_ids.shape)}, "meta": meta}

    return run_probed(probe, compute)


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
    key = stage_key("inspect", source=source["digest"], trust_remote_code=trust_remote_code)
    return manifest_probe(RunDir(run_url), "inspect", None, key)


@stage_task(inspect_probe, name="inspect")
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


@task(name="plan-widths", cache_policy=NO_CACHE, persist_result=False)
def plan_task(inspect: dict, recipe: dict) -> list[int]:
    """Width of every slice point (``dotresize.api.plan_widths`` on the source's dimensions)."""
    from dotresize.api import plan_widths

    from .common import config_of

    shape = SimpleNamespace(hidden_size=inspect["hidden_size"], num_points=inspect["num_points"],
                            num_attention_heads=inspect["num_attention_heads"], family=inspect.get("family"))
    return plan_widths(shape, config_of(recipe))


def plan_mlp_task(run: RunDir, inspect: dict, recipe: dict) -> list[int]:
    """Kept intermediate neurons of every layer (``dotresize.mlp.model.plan_mlp_widths``)."""
    from dotresize.mlp.model import plan_mlp_widths

    from .common import config_of

    size = inspect.get("intermediate_size")
    if size is None:  # an inspect stage of an earlier version: its stored config has it
        from dotresize.adapters import intermediate_size_of

        size = intermediate_size_of(load_inspected(run, inspect)[0])
    if not size:
        from dotresize.errors import InvalidConfigError

        raise InvalidConfigError(f"this {inspect.get('family', '')} model's config has no intermediate_size: the MLP "
                                 "axis (mlp_ratio / mlp_widths) needs one; compress without it")
    return plan_mlp_widths(config_of(recipe), int(size), int(inspect["num_layers"]))


def load_inspected(run: RunDir, inspect: dict):
    """(config, generation config, tokenizer) of the source as stored by the inspect stage."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    with run.local_copy(layout.INSPECT) as directory:
        config = AutoConfig.from_pretrained(directory)
        generation = GenerationConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return config, generation, tokenizer


__all__ = ["resolve_source_task", "calibration_task", "inspect_task", "plan_task", "plan_mlp_task", "source_digest", "open_source",
           "check_source", "check_source_unchanged", "load_inspected"]
