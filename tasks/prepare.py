"""Stages before calibration: resolve the source, sample the calibration set, load and fuse the model."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import RunDir, digest_of_digests, sha256_bytes
from storage import rundir as layout

from .common import finish_manifest, load_fused, logger, run_stage, stage_key

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
    return source, meta


@task(name="resolve-source", cache_policy=NO_CACHE, persist_result=False)
def resolve_source_task(spec: str | None, calib_data: str, trust_remote_code: bool = False) -> dict:
    """Source id, path and sha256 of every weight file, its architecture (checked against the supported
    families before any weight is loaded), and the calibration text's id and sha256. Writes nothing."""
    from dotresize.adapters import adapter_class_for_config
    from dotresize.data import load_text
    from dotresize.sources import load_config

    started = time.time()
    source, meta = _resolve(spec)
    config = load_config(source, trust_remote_code)
    adapter = adapter_class_for_config(config)
    architecture = {"family": adapter.family, "model_type": config.model_type,
                    "hidden_size": int(config.hidden_size), "num_layers": int(config.num_hidden_layers)}
    text = load_text(calib_data).meta()
    return {"stage": "resolve", "source": meta, "architecture": architecture, "calibration_text": text,
            "seconds": round(time.time() - started, 6)}


def check_source(spec: str | None, expected: dict):
    source, meta = _resolve(spec)
    if meta["digest"] != expected["digest"]:
        from dotresize.errors import SourceNotFoundError

        raise SourceNotFoundError(f"the model at {spec} changed while the run was going on: rerun the command")
    return source, meta


@task(name="calibration", cache_policy=NO_CACHE, persist_result=False)
def calibration_task(run_url: str, source: dict, calib: dict, hidden_size: int | None = None) -> dict:
    """Tokenise and sample the calibration windows; store the ids and calibration.json.

    A set of fewer tokens than ``hidden_size`` is refused before anything is written."""
    run = RunDir(run_url)
    key = stage_key("calibration", source=source["digest"], text=calib["text_sha256"], data=calib["data"],
                    samples=calib["samples"], seqlen=calib["seqlen"], seed=calib["seed"])

    def compute() -> dict:
        from transformers import AutoTokenizer

        from dotresize.data import calibration_set

        src, _ = check_source(source["spec"], source)
        tokenizer = AutoTokenizer.from_pretrained(src.directory, **src.load_kwargs())
        calibration = calibration_set(tokenizer, calib["data"], samples=calib["samples"], seqlen=calib["seqlen"],
                                      seed=calib["seed"])
        if hidden_size is not None:
            from dotresize.api import check_calibration

            check_calibration(calibration.input_ids, hidden_size)
        meta = calibration.meta()
        ids_sha = run.save_tensors(layout.CALIBRATION_IDS,
                                   {"input_ids": calibration.input_ids.to(torch.int64).contiguous()})
        meta_sha = run.write_json(layout.CALIBRATION, meta)
        return {"files": {layout.CALIBRATION_IDS: ids_sha, layout.CALIBRATION: meta_sha},
                "digest": meta["input_ids_sha256"], "tokens": meta["tokens"],
                "shapes": {"input_ids": list(calibration.input_ids.shape)}, "meta": meta}

    return run_stage(run, "calibration", None, key, compute)


@task(name="load-fuse", cache_policy=NO_CACHE, persist_result=False)
def fuse_task(run_url: str, source: dict, trust_remote_code: bool = False) -> dict:
    """Load the source model, fuse its norms and store the fused weights, config and tokenizer under fused/."""
    run = RunDir(run_url)
    key = stage_key("fuse", source=source["digest"], dtype="float32", trust_remote_code=trust_remote_code)

    def compute() -> dict:
        from dotresize import count_parameters
        from dotresize.adapters import get_adapter
        from dotresize.fusion import fuse_norms
        from dotresize.sources import load_model

        src, _ = check_source(source["spec"], source)
        model, tokenizer = load_model(src, trust_remote_code=trust_remote_code)
        adapter = get_adapter(model)
        parameters_before = count_parameters(model)
        model.eval()
        fuse_norms(adapter)
        weights = f"{layout.FUSED}/model.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        files = {weights: run.save_tensors(weights, state, metadata={"format": "pt"})}
        with tempfile.TemporaryDirectory(prefix="dotresize-fused-") as tmp:
            directory = Path(tmp)
            model.config.save_pretrained(directory)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            for path in sorted(directory.iterdir()):  # config and tokenizer files beside the weights
                files[f"{layout.FUSED}/{path.name}"] = run.write_bytes(f"{layout.FUSED}/{path.name}",
                                                                       path.read_bytes())
        config = model.config
        return {
            "files": files,
            "digest": files[weights],
            "family": type(adapter).family,
            "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": config._attn_implementation,
            "hidden_size": adapter.hidden_size,
            "num_layers": adapter.num_layers,
            "num_points": adapter.num_points,
            "num_attention_heads": adapter.num_attention_heads,
            "vocab_size": int(config.vocab_size),
            "parameters_before": int(parameters_before),
            "shapes": {"model.safetensors": len(state)},
        }

    return run_stage(run, "fuse", None, key, compute)


@task(name="plan-widths", cache_policy=NO_CACHE, persist_result=False)
def plan_task(fuse: dict, recipe: dict) -> list[int]:
    """Width of every slice point (``dotresize.api.plan_widths`` on the fused model's dimensions)."""
    from dotresize.api import plan_widths

    from .common import config_of

    shape = SimpleNamespace(hidden_size=fuse["hidden_size"], num_points=fuse["num_points"],
                            num_attention_heads=fuse["num_attention_heads"])
    return plan_widths(shape, config_of(recipe))


def warm_fused(run_url: str, fuse: dict) -> None:
    """Load the fused model into this process's cache (used before fan-outs in one process)."""
    load_fused(RunDir(run_url), fuse)
    logger().debug("fused model loaded")


__all__ = ["resolve_source_task", "calibration_task", "fuse_task", "plan_task", "source_digest",
           "finish_manifest"]
