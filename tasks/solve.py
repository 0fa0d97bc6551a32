"""The solve stage: per-point bases. The point's statistics are streamed from its stored signal a calibration
batch at a time (the Gram matrix, sums, outlier exclusion and reservoir sample of
:class:`dotresize.statistics.StatsAccumulator`, in the in-memory API's order, so bitwise its statistics), then the
basis (Sinkhorn + QR, PCA, pruning). One source of truth: the cost and everything else the solver uses come from those statistics; nothing else is computed.

An unsliced point whose basis is the identity (``dot`` and ``prune`` at full width) stores no matrix.
"""

from __future__ import annotations

import time

import torch
from storage import ActivationStore, RunDir, basis_status, save_basis

from .cache import stage_task
from .common import (
    Probe,
    basis_parts,
    computing,
    config_of,
    pause_point,
    point_stats,
    release_memory,
    reused,
    solver_device,
    stage_key,
    statistics_parts,
    stored_stats,
)

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "solve"


def _basis_index(point: int | str) -> int:
    """The ``point`` argument dotresize gives the basis function (-1 for the global basis)."""
    return -1 if point == "global" else int(point)


def solve_key(capture_key: str, recipe: dict, point: int | str, width: int, device: str) -> str:
    config = config_of(recipe)
    return stage_key(NAME, capture=capture_key, statistics=statistics_parts(config),
                     **basis_parts(config, _basis_index(point), width, device))


_INFO_METRICS = ("reconstruction_error", "transport_cost", "sinkhorn_iterations", "cond_r", "effective_rank",
                 "marginal_error", "cost_mean", "seconds", "tokens", "width", "statistics_seconds")


def _is_identity(Q: torch.Tensor) -> bool:
    return Q.shape[0] == Q.shape[1] and bool(torch.equal(Q, torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)))


def solve_probe(run_url: str, point: int | str, capture: dict, width: int, recipe: dict,
                device: str | None = None, verify: bool = True, **_) -> Probe:
    run = RunDir(run_url)
    device = solver_device(device)
    name = str(point)
    key = solve_key(capture["key"], recipe, point, width, device)
    ok, why, record = basis_status(run, point, key, verify=verify)
    if not ok:
        return Probe(run, NAME, name, key, False, why)
    return Probe(run, NAME, name, key, True, manifest={
        "stage": NAME, "name": name, "key": key, "uri": run.uri(), "point": point,
        "width": record["info"].get("width", width), "sha256": record["sha256"], "metrics": _metrics(record["info"]),
        "seconds": record.get("seconds", 0.0), "started": record.get("started"), "finished": record.get("finished")})


@stage_task(solve_probe, name=NAME, task_run_name="solve-{point}")
def solve_task(run_url: str, point: int | str, capture: dict, calibration: dict, width: int, recipe: dict,
               device: str | None = None, verify: bool = True) -> dict:
    """The basis of one point, stored under bases/: its statistics streamed from the store, then the solver
    (Sinkhorn + QR on CUDA when present, else the CPU)."""
    from dotresize.api import make_basis_fn

    probe = solve_probe(run_url, point, capture, width, recipe, device, verify)
    if probe.ok:
        return reused(NAME, probe.name, probe.key, probe.manifest)
    run, name, key, why = probe.run, probe.name, probe.key, probe.why
    config = config_of(recipe)
    device = solver_device(device)
    computing(NAME, name, key, why)
    if point == 2:
        pause_point(run, "solve")
    started = time.time()
    torch.manual_seed(config.seed)
    store = ActivationStore(run)
    stats = stored_stats(store, "pooled") if point == "global" else point_stats(store, point, calibration, config)
    reduced = time.time()
    basis = make_basis_fn(config, None if device == "cpu" else device)(stats, int(width), _basis_index(point))
    Q = basis.Q.detach().cpu().contiguous()
    identity = basis.U is None and _is_identity(Q)
    tensors = {"Q": torch.zeros(0, dtype=Q.dtype) if identity else Q}
    if basis.U is not None:
        tensors["U"] = basis.U.detach().cpu().contiguous()
    info = {**basis.info, "device": device, "identity": identity, "dim": int(Q.shape[0]),
            "statistics_seconds": round(reduced - started, 6)}
    del stats
    release_memory()
    finished = time.time()
    record = save_basis(run, point, tensors, key=key, info=info,
                        extra={"started": started, "finished": finished, "seconds": round(finished - started, 6)})
    return {"stage": NAME, "name": name, "key": key, "uri": run.uri(), "point": point, "width": basis.width,
            "sha256": record["sha256"], "metrics": _metrics(info), "seconds": round(finished - started, 6),
            "started": started, "finished": finished, "reused": False}


def _metrics(info: dict) -> dict:
    return {k: float(info[k]) for k in _INFO_METRICS if isinstance(info.get(k), (int, float))
            and not isinstance(info.get(k), bool)}


__all__ = ["solve_task", "solve_key"]
