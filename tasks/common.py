"""What every task shares: code versions, the reuse-or-compute rule, the fused-model cache, small loaders."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from storage import ActivationStore, RunDir, content_key, manifest_status, write_manifest
from storage import rundir as layout

#: per-stage code versions: bump one when that stage's output for the same inputs changes
CODE_VERSIONS = {
    "calibration": "1",
    "fuse": "1",
    "capture": "1",
    "pool": "1",
    "cost": "1",
    "solve": "1",
    "absorb": "1",
    "export": "1",
    "evaluate": "1",
}

#: the env var a test sets to stop a task at a named place (it writes a marker file and sleeps)
PAUSE_ENV = "DOTRESIZE_TEST_PAUSE_AT"

log = logging.getLogger("dotresize.pipeline")


def logger():
    """Prefect's run logger inside a task or flow run, else the module logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def stage_key(stage: str, **parts: Any) -> str:
    from dotresize import __version__

    return content_key(stage, f"{CODE_VERSIONS[stage]}/dotresize-{__version__}", **parts)


def label(stage: str, name: str | None) -> str:
    return stage if name is None else f"{stage}[{name}]"


def reused(stage: str, name: str | None, key: str, manifest: dict) -> dict:
    logger().info("reused %s %s", label(stage, name), key[:12])
    return {**manifest, "reused": True}


def computing(stage: str, name: str | None, key: str, why: str) -> None:
    logger().info("computing %s %s (%s)", label(stage, name), key[:12], why)


def run_stage(run: RunDir, stage: str, name: str | None, key: str, compute: Callable[[], dict],
              verify: bool = True) -> dict:
    """Reuse the stage's output when its manifest has ``key`` and every file verifies; else compute it.

    ``compute()`` writes the outputs and returns the manifest's body (``files``: {path: sha256}, shapes, ...);
    the manifest is written last, with the key, the timing and the stage's uri.
    """
    ok, why, manifest = manifest_status(run, stage, name, key, verify=verify)
    if ok:
        return reused(stage, name, key, manifest)
    computing(stage, name, key, why)
    started = time.time()
    body = compute()
    finished = time.time()
    manifest = {"stage": stage, "name": name, "key": key, "uri": run.uri(), **body,
                "started": started, "finished": finished, "seconds": round(finished - started, 6)}
    return {**write_manifest(run, manifest), "reused": False}


def stored_or(run: RunDir, stage: str, name: str | None, key: str, fallback: dict) -> dict:
    """The stored manifest of a reused stage when it has ``key`` (it keeps the original timings), else ``fallback``."""
    from storage import read_manifest

    stored = read_manifest(run, stage, name)
    if stored is not None and stored.get("key") == key and stored.get("complete"):
        return stored
    return fallback


def finish_manifest(run: RunDir, stage: str, name: str | None, key: str, started: float, body: dict) -> dict:
    finished = time.time()
    manifest = {"stage": stage, "name": name, "key": key, "uri": run.uri(), **body,
                "started": started, "finished": finished, "seconds": round(finished - started, 6)}
    return {**write_manifest(run, manifest), "reused": False}


def pause_point(run: RunDir, where: str) -> None:
    """Test hook: when ``$DOTRESIZE_TEST_PAUSE_AT == where``, write ``<run>/.paused-<where>`` and sleep.

    Lets a test SIGKILL the pipeline at a known place (mid-capture, mid-solves); a no-op otherwise.
    """
    if os.environ.get(PAUSE_ENV) != where:
        return
    run.write_text(f".paused-{where}", str(os.getpid()))
    time.sleep(3600)


# --- the recipe -------------------------------------------------------------------------------------------------
def config_of(recipe: dict):
    from dotresize import CompressionConfig

    return CompressionConfig.from_dict(recipe["config"])


def capture_parts(config) -> dict:
    """The part of the config that determines the captured statistics."""
    return {
        "batch_size": config.batch_size,
        "outlier_tokens": config.outlier_tokens,
        "sample_tokens": sample_tokens(config),
        "seed": config.seed,
    }


def sample_tokens(config) -> int:
    """Raw rows kept per point for costs that need them (as ``dotresize.api.compute_bases`` does)."""
    return config.dot.sample_tokens if (config.method == "dot" and config.dot.cost == "l1") else 0


def keep_set(config, point: int) -> list[int] | None:
    if config.keep_sets is None:
        return None
    return sorted(int(i) for i in config.keep_sets[point])


def basis_parts(config, point: int, width: int, device: str) -> dict:
    """The part of the config that determines one point's basis."""
    parts = {"method": config.method, "point": point, "width": int(width), "keep": keep_set(config, point),
             "device": device}
    if config.method == "dot":
        parts["dot"] = config.to_dict()["dot"]
    elif config.method == "pca":
        parts["pca_damping"] = config.pca_damping
    elif config.method == "prune":
        parts["targets"] = config.dot.targets
    elif config.method == "random":
        parts["seed"] = config.seed
    return parts


def solver_device(requested: str | None = None) -> str:
    """Where Sinkhorn runs: the requested device, else CUDA when present, else the CPU."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- loaders ----------------------------------------------------------------------------------------------------
_FUSED: dict[tuple[str, str], Any] = {}
_FUSED_LOCK = threading.Lock()


def load_fused(run: RunDir, fuse: dict):
    """The fused model's adapter, loaded once per process from ``fused/`` (verified against its digest)."""
    cache_key = (run.url, fuse["key"])
    with _FUSED_LOCK:
        if cache_key not in _FUSED:
            _FUSED.clear()  # one fused model per process
            _FUSED[cache_key] = _load_fused(run, fuse)
        return _FUSED[cache_key]


def _load_fused(run: RunDir, fuse: dict):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from dotresize.adapters import get_adapter
    from dotresize.fusion import fuse_norms

    weights = f"{layout.FUSED}/model.safetensors"
    state = run.load_tensors(weights, fuse["files"][weights])
    with run.local_copy(layout.FUSED) as directory:
        config = AutoConfig.from_pretrained(directory)
        generation = None
        if (directory / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, fuse["dtype"]),
                                                 attn_implementation=fuse["attn_implementation"])
    adapter = get_adapter(model)
    fuse_norms(adapter)  # the same module structure as the fused source (weight-free norms, untied head)
    model.load_state_dict(state, strict=True, assign=True)
    if generation is not None:
        model.generation_config = generation
    model.eval()
    return adapter


def load_tokenizer(run: RunDir):
    from transformers import AutoTokenizer

    with run.local_copy(layout.FUSED) as directory:
        return AutoTokenizer.from_pretrained(directory)


def load_calibration(run: RunDir, calibration: dict) -> torch.Tensor:
    tensors = run.load_tensors(layout.CALIBRATION_IDS, calibration["files"][layout.CALIBRATION_IDS])
    return tensors["input_ids"]


def load_point_stats(store: ActivationStore, point: int | str):
    """A :class:`dotresize.statistics.PointStats` from a stored point (bitwise what was accumulated)."""
    from dotresize.statistics import PointStats

    stats = store.load_stats(point)
    sample = None if stats["sample"] is None else torch.from_numpy(stats["sample"])
    return PointStats(torch.from_numpy(stats["gram"]), torch.from_numpy(stats["abs_sum"]),
                      torch.from_numpy(stats["sum"]), stats["count"], sample)


def stats_arrays(stats, excluded: int = 0) -> tuple[dict, dict]:
    """(arrays, attrs) to store a :class:`PointStats`."""
    count = int(stats.count)
    arrays = {
        "gram": stats.gram.cpu().numpy(),
        "abs_sum": stats.abs_sum.cpu().numpy(),
        "sum": stats.sum.cpu().numpy(),
        "mean": (stats.sum / max(count, 1)).cpu().numpy(),
        "sample": None if stats.sample is None else stats.sample.cpu().numpy(),
    }
    return arrays, {"count": count, "excluded": int(excluded)}


def basis_from(tensors: dict, record: dict):
    from dotresize.bases import Basis

    return Basis(Q=tensors["Q"], U=tensors.get("U"), info=dict(record.get("info", {})))
