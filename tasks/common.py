"""What every task shares: content keys, the reuse-or-compute rule, the streamed source model, small loaders."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from storage import RunDir, content_key, finish_stage, manifest_status
from storage import rundir as layout

#: the env var a test sets to stop a task at a named place (it writes a marker file and sleeps)
PAUSE_ENV = "DOTRESIZE_TEST_PAUSE_AT"

log = logging.getLogger("dotresize.pipeline")


def logger():
    """Prefect's run logger inside a task or flow run, else the module logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow or task run (a test calling the task's function)
        return log


def stage_key(stage: str, **parts: Any) -> str:
    from dotresize import __version__

    from .stages import code_version

    return content_key(stage, f"{code_version(stage)}/dotresize-{__version__}", **parts)


def label(stage: str, name: str | None) -> str:
    return stage if name is None else f"{stage}[{name}]"


def reused(stage: str, name: str | None, key: str, manifest: dict) -> dict:
    logger().info("reused %s %s", label(stage, name), key[:12])
    return {**manifest, "reused": True}


def computing(stage: str, name: str | None, key: str, why: str) -> None:
    logger().info("computing %s %s (%s)", label(stage, name), key[:12], why)


@dataclass
class Probe:
    """A stage output's key and state, as a task sees them before it reuses or computes (also what the task's
    Prefect cache policy checks: tasks/cache.py)."""

    run: RunDir
    stage: str
    name: str | None
    key: str
    ok: bool                       # complete, with this key, and (when verifying) every digest matches
    why: str = "ok"                # why not: the ``computing ... (why)`` line
    manifest: dict | None = None   # what reusing returns (ok only)

    @property
    def label(self) -> str:
        return label(self.stage, self.name)

    @property
    def record_file(self) -> str:
        """Where the Prefect result record of this output and key lives in the run directory."""
        return layout.task_record_file(self.stage, self.name, self.key)

    @property
    def finished(self) -> Any:
        """When the outputs were computed (their completion marker's time): which computation a record is of."""
        return (self.manifest or {}).get("finished")


def manifest_probe(run: RunDir, stage: str, name: str | None, key: str, verify: bool = True) -> Probe:
    """The probe of a stage whose completion marker is its manifest (``stages/<stage>[/<name>].json``)."""
    ok, why, manifest = manifest_status(run, stage, name, key, verify=verify)
    return Probe(run, stage, name, key, ok, why, manifest if ok else None)


def run_probed(probe: Probe, compute: Callable[[], dict]) -> dict:
    """Reuse the probed output when it is complete (the stored manifest), else ``compute()`` it.

    ``compute()`` writes the outputs and returns the manifest's body (``files``: {path: sha256}, shapes, ...);
    the manifest is written last, with the key, the timing and the stage's uri.
    """
    if probe.ok:
        return reused(probe.stage, probe.name, probe.key, probe.manifest)
    computing(probe.stage, probe.name, probe.key, probe.why)
    started = time.time()
    return finish_manifest(probe.run, probe.stage, probe.name, probe.key, started, compute())


def release_memory() -> None:
    """Hand freed heap memory back to the OS after a layer's or point's work (glibc keeps it per thread arena
    otherwise: the resident set of a long run would creep up by the size of every layer's temporaries).

    No garbage collection here: a layer's weights are released explicitly when its ``layer()`` context exits
    (:mod:`dotresize.layerwise`), everything else by reference counting, and a full collection per task (121
    tasks for SmolLM2) held the GIL for ~45 ms each, stalling the capture chain (SmolLM2 at 20 %: 92 -> 81 s wall,
    peak resident set unchanged)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` from the process's own symbols, or None (not glibc). Looked up once, and not by
    ``ctypes.util.find_library``, which runs ``ldconfig`` in a subprocess (a fork of this process) per call."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def stored_or(run: RunDir, stage: str, name: str | None, key: str, fallback: dict) -> dict:
    """The stored manifest of a reused stage when it has ``key`` (it keeps the original timings), else ``fallback``."""
    from storage import read_manifest

    stored = read_manifest(run, stage, name)
    if stored is not None and stored.get("key") == key and stored.get("complete"):
        return stored
    return fallback


def finish_manifest(run: RunDir, stage: str, name: str | None, key: str, started: float, body: dict) -> dict:
    return {**finish_stage(run, stage, name, key, started, body), "reused": False}


def pause_point(run: RunDir, where: str) -> None:
    """Test hook: when ``$DOTRESIZE_TEST_PAUSE_AT == where``, write ``<run>/.paused-<where>`` and sleep.

    Lets a test SIGKILL the pipeline at a known place (mid-capture, mid-solves, mid-absorb); a no-op otherwise.
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
    """The part of the config that determines the captured signals (the calibration batches they run in)."""
    return {"batch_size": config.batch_size}


def statistics_parts(config) -> dict:
    """The part of the config that determines a point's statistics from its signal."""
    from dotresize.api import sample_tokens

    return {"batch_size": config.batch_size, "outlier_tokens": config.outlier_tokens,
            "sample_tokens": sample_tokens(config), "seed": config.seed}


def keep_set(config, point: int) -> list[int] | None:
    if config.keep_sets is None:
        return None
    return sorted(int(i) for i in config.keep_sets[point])


def basis_parts(config, point: int, width: int, device: str) -> dict:
    """The part of the config that determines one point's basis."""
    from dotresize.bases import basis_key_options

    return {"method": config.method, "point": point, "width": int(width), "keep": keep_set(config, point),
            "device": device, **basis_key_options(config)}


def compute_device(requested: str | None = None) -> str:
    """Where layers and solvers run: the requested device, else CUDA when present, else the CPU."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


solver_device = compute_device


# --- the source, a layer at a time ------------------------------------------------------------------------------
_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def streamed_model(source: dict, inspect: dict, device: str | None = None):
    """The source as a :class:`dotresize.layerwise.StreamedModel` on ``device``, opened once per process.

    Before a layer is read the weight files are checked against the sizes and modification times recorded when
    the run resolved them (their sha256 was taken then): a source changed under a run is an error, never mixed in.
    """
    from dotresize.layerwise import StreamedModel

    from .source import check_source_unchanged, open_source

    device = compute_device(device)
    cache_key = (source["digest"], device)
    with _MODELS_LOCK:
        if cache_key not in _MODELS:
            check_source_unchanged(source)
            src, config = open_source(source)
            from dotresize.checkpoint import open_reader

            reader = open_reader(src.directory, src.gguf_file, config, src.weight_files)
            _MODELS.clear()  # one source per process
            _MODELS[cache_key] = StreamedModel(reader, config, device=device,
                                               attn_implementation=inspect["attn_implementation"])
        return _MODELS[cache_key]


def load_calibration(run: RunDir, calibration: dict) -> torch.Tensor:
    tensors = run.load_tensors(layout.CALIBRATION_IDS, calibration["files"][layout.CALIBRATION_IDS])
    return tensors["input_ids"]


def calibration_batches(run: RunDir, calibration: dict, config) -> tuple[torch.Tensor, list]:
    """The calibration ids (checked by the calibration stage) and their batches."""
    from dotresize.calibration import iter_batches

    ids = load_calibration(run, calibration)
    return ids, iter_batches(ids, config.batch_size)


def batch_rows(calibration: dict, config) -> list[int]:
    """Rows of every calibration batch, in order (the blocks statistics are accumulated in)."""
    samples, seqlen = calibration["shapes"]["input_ids"]
    return [min(config.batch_size, samples - start) * seqlen for start in range(0, samples, config.batch_size)]


def keeps_signal(point: int) -> bool:
    """Whether a point's signal is stored: the layer inputs (even points) are read by the next capture."""
    return point % 2 == 0


def stats_at_capture(tokens: int, dim: int) -> bool:
    """Whether a point's statistics are accumulated while it is captured and stored: when its D x D float64 Gram
    matrix is smaller than its tokens x D float32 signal."""
    return tokens > 2 * dim


def point_stats(store, point: int, calibration: dict, config):
    """The :class:`dotresize.statistics.PointStats` of a stored point: as stored at capture, or streamed from its
    stored signal a calibration batch at a time through the in-memory API's accumulator (same blocks, same order:
    bitwise its statistics either way)."""
    from dotresize.statistics import accumulate

    if store.has(point, "gram"):
        return stored_stats(store, point)
    parts = statistics_parts(config)
    blocks = (torch.from_numpy(rows) for rows in store.iter_rows(point, batch_rows(calibration, config)))
    return accumulate(blocks, point=point, sample_tokens=parts["sample_tokens"],
                      outlier_tokens=parts["outlier_tokens"], seed=parts["seed"])


def stored_stats(store, point: int | str):
    """A :class:`dotresize.statistics.PointStats` stored whole (the pooled statistics of the global layout)."""
    from dotresize.statistics import PointStats

    stats = store.load_stats(point)
    sample = None if stats["sample"] is None else torch.from_numpy(stats["sample"])
    return PointStats(torch.from_numpy(stats["gram"]), torch.from_numpy(stats["abs_sum"]),
                      torch.from_numpy(stats["sum"]), stats["count"], sample)


def stats_arrays(stats, excluded: int = 0) -> tuple[dict, dict]:
    """(arrays, attrs) to store a :class:`PointStats` whole."""
    count = int(stats.count)
    arrays = {
        "gram": stats.gram.cpu().numpy(),
        "abs_sum": stats.abs_sum.cpu().numpy(),
        "sum": stats.sum.cpu().numpy(),
        "sample": None if stats.sample is None else stats.sample.cpu().numpy(),
    }
    return arrays, {"count": count, "excluded": int(excluded)}


def basis_from(tensors: dict, record: dict):
    """The :class:`dotresize.bases.Basis` of a stored basis (an identity is stored as a flag, not a matrix)."""
    from dotresize.bases import Basis

    info = dict(record.get("info", {}))
    Q = torch.eye(int(info["dim"]), dtype=torch.float64) if info.get("identity") else tensors["Q"]
    return Basis(Q=Q, U=tensors.get("U"), info=info)


def export_dtype(name: str | None, inspect: dict) -> torch.dtype:
    """The export's dtype: the one asked for, else the source's weights' dtype at rest."""
    return getattr(torch, name or inspect["dtype"])
