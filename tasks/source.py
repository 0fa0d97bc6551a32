"""The source stage: resolve the model (its files' sha256, its family checked before any weight is loaded) and
the calibration text. Writes nothing; the helpers here reopen and recheck the source for later stages.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import digest_of_digests, sha256_bytes

#: the stage (its log label and Prefect task name; tasks/stages.py)
NAME = "source"

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


@task(name=NAME, cache_policy=NO_CACHE, persist_result=False)
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


__all__ = ["resolve_source_task", "source_digest", "open_source", "check_source", "check_source_unchanged"]
