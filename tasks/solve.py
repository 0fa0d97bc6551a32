"""Per-point stages: the cost matrix (Dask over the Zarr store) and the basis (Sinkhorn + QR, or PCA, ...).

The solve stage calls ``dotresize.api.make_basis_fn`` on statistics rebuilt from the store, so a basis is
bitwise the one ``dotresize.compress`` computes. The cost stage computes the same cost matrix the dot basis
uses, out of core with ``dask.array`` (L2 from the Gram matrix, L1 as a reduction over every chunk of raw
activations), stores it in ``costs.zarr`` and records how far it is from the solver's own cost (0 for L2; for
L1 the error of the solver's reservoir sample against all tokens).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import ActivationStore, RunDir, basis_status, save_basis
from storage.rundir import COSTS

from .common import (
    basis_parts,
    computing,
    config_of,
    finish_manifest,
    keep_set,
    load_point_stats,
    pause_point,
    reused,
    solver_device,
    stage_key,
    stats_arrays,
    stored_or,
)


def _point_label(point: int | str) -> str:
    return str(point)


def _stats_point(point: int | str) -> int | str:
    """Where a point's statistics live: ``point_<p>``, or ``pooled`` for the global basis."""
    return "pooled" if point == "global" else point


def _basis_index(point: int | str) -> int:
    """The ``point`` argument dotresize gives the basis function (-1 for the global basis)."""
    return -1 if point == "global" else int(point)


# --- pooling (global layout) ----------------------------------------------------------------------------------
@task(name="pool", cache_policy=NO_CACHE, persist_result=False)
def pool_task(run_url: str, captures: list[dict], recipe: dict, num_points: int, verify: bool = True) -> dict:
    """Pool every point's statistics into one (``dotresize.statistics.pool_stats``) for the global basis."""
    from dotresize.statistics import pool_stats

    run = RunDir(run_url)
    config = config_of(recipe)
    key = stage_key("pool", captures=sorted({c["key"] for c in captures}), pooling=config.global_pooling)
    store = ActivationStore(run)
    ok, why = store.status("pooled", key, verify=verify)
    if ok:
        fallback = {"stage": "pool", "name": None, "key": key, "uri": run.uri(), "seconds": 0.0}
        return reused("pool", None, key, {**stored_or(run, "pool", None, key, fallback),
                                          "digest": store.digest("pooled")})
    computing("pool", None, key, why)
    started = time.time()
    pooled = pool_stats([load_point_stats(store, p) for p in range(num_points)], config.global_pooling)
    arrays, attrs = stats_arrays(pooled)
    store.create_stats_group("pooled", key=key, stats=arrays, attrs=attrs)
    return finish_manifest(run, "pool", None, key, started, {"digest": store.digest("pooled")})


# --- cost -----------------------------------------------------------------------------------------------------
def _targets(stats, config, point: int | str, width: int) -> torch.Tensor:
    from dotresize.bases.common import target_scores, top_indices

    keep = keep_set(config, _basis_index(point))
    if keep is not None:
        return torch.tensor(keep, dtype=torch.long)
    return top_indices(target_scores(stats, config.dot.targets), width)


def _l2_cost_dask(store: ActivationStore, point: int | str, targets: np.ndarray, count: int):
    import dask.array as da

    gram = da.from_zarr(store.array(point, "gram"))
    diag = da.diagonal(gram)
    squared = diag[:, None] + diag[targets][None, :] - 2.0 * gram[:, targets]
    return da.sqrt(da.clip(squared, 0.0, None) / max(count, 1))


def _l1_block(block: np.ndarray, targets: np.ndarray, rows: int = 64) -> np.ndarray:
    """Σ_t |x_ti − x_t,targets_j| over the rows of one chunk (float64), in row slices to bound memory."""
    x = block.astype(np.float64)
    out = np.zeros((x.shape[1], targets.size), dtype=np.float64)
    for start in range(0, x.shape[0], rows):
        part = x[start:start + rows]
        out += np.abs(part[:, :, None] - part[:, None, targets]).sum(axis=0)
    return out[None]


def _l1_cost_dask(store: ActivationStore, point: int | str, targets: np.ndarray, rows_name: str):
    import dask.array as da

    acts = da.from_zarr(store.array(point, rows_name))
    dim, width = acts.shape[1], targets.size
    partial = acts.map_blocks(_l1_block, targets, dtype=np.float64, new_axis=2,
                              chunks=((1,) * acts.numblocks[0], (dim,), (width,)))
    return partial.sum(axis=0, split_every=8) / acts.shape[0]


@task(name="cost", task_run_name="cost-{point}", cache_policy=NO_CACHE, persist_result=False)
def cost_task(run_url: str, point: int | str, capture: dict, width: int, recipe: dict, verify: bool = True) -> dict:
    """The cost matrix between every neuron and the targets of one point (dot bases only)."""
    run = RunDir(run_url)
    config = config_of(recipe)
    name = _point_label(point)
    if config.method != "dot":
        return {"stage": "cost", "name": name, "key": None, "skipped": f"method {config.method} has no cost",
                "reused": False, "seconds": 0.0}
    key = stage_key("cost", capture=capture["key"], point=point, width=int(width), targets=config.dot.targets,
                    keep=keep_set(config, _basis_index(point)), cost=config.dot.cost)
    costs = ActivationStore(run, COSTS)
    ok, why = costs.status(point, key, verify=verify)
    if ok:
        attrs = costs.attrs(point)
        fallback = {"stage": "cost", "name": name, "key": key, "uri": run.uri(), "seconds": 0.0}
        return reused("cost", name, key, {**stored_or(run, "cost", name, key, fallback),
                                          "digest": costs.digest(point), "summary": attrs.get("summary", {})})
    computing("cost", name, key, why)
    started = time.time()
    import dask

    from dotresize.bases.dot import l1_cost, l2_cost

    store = ActivationStore(run)
    source = _stats_point(point)
    stats = load_point_stats(store, source)
    targets = _targets(stats, config, point, width)
    index = targets.numpy()
    if config.dot.cost == "l2":
        lazy = _l2_cost_dask(store, source, index, stats.count)
        solver_cost = l2_cost(stats, targets).numpy()
    else:
        rows_name = "acts" if store.has(source, "acts") else "sample"
        lazy = _l1_cost_dask(store, source, index, rows_name)
        solver_cost = l1_cost(stats, targets).numpy() if stats.sample is not None else None
    with dask.config.set(scheduler="synchronous"):  # inside a worker: no nested scheduling, fixed reduction tree
        cost = np.ascontiguousarray(lazy.compute(), dtype=np.float64)
    positive = cost[cost > 0]
    summary = {
        "kind": config.dot.cost,
        "shape": list(cost.shape),
        "min": float(cost.min()) if cost.size else 0.0,
        "max": float(cost.max()) if cost.size else 0.0,
        "mean": float(cost.mean()) if cost.size else 0.0,
        "median_positive": float(np.median(positive)) if positive.size else 0.0,
    }
    if solver_cost is not None:
        diff = float(np.abs(cost - solver_cost).max()) if cost.size else 0.0
        summary["max_abs_diff_vs_solver"] = diff
        summary["rel_diff_vs_solver"] = diff / max(summary["max"], 1e-300)
    costs.create_stats_group(point, key=key, stats={"cost": cost, "targets": index.astype(np.int64)},
                             attrs={"summary": summary})
    return finish_manifest(run, "cost", name, key, started, {"digest": costs.digest(point), "summary": summary})


# --- solve ----------------------------------------------------------------------------------------------------
def solve_key(capture_key: str, recipe: dict, point: int | str, width: int, device: str) -> str:
    return stage_key("solve", capture=capture_key, **basis_parts(config_of(recipe), _basis_index(point), width, device))


_INFO_METRICS = ("reconstruction_error", "transport_cost", "sinkhorn_iterations", "cond_r", "effective_rank",
                 "marginal_error", "cost_mean", "seconds", "tokens", "width")


@task(name="solve", task_run_name="solve-{point}", cache_policy=NO_CACHE, persist_result=False)
def solve_task(run_url: str, point: int | str, capture: dict, width: int, recipe: dict, cost: dict | None = None,
               device: str | None = None, verify: bool = True) -> dict:
    """The basis of one point (Sinkhorn + QR on CUDA when present, else the CPU), stored under bases/."""
    from dotresize.api import make_basis_fn

    run = RunDir(run_url)
    config = config_of(recipe)
    device = solver_device(device)
    name = _point_label(point)
    key = solve_key(capture["key"], recipe, point, width, device)
    ok, why, record = basis_status(run, point, key, verify=verify)
    if ok:
        manifest = {"stage": "solve", "name": name, "key": key, "uri": run.uri(), "point": point,
                    "width": record["info"].get("width", width), "sha256": record["sha256"],
                    "metrics": _metrics(record["info"]), "seconds": record.get("seconds", 0.0),
                    "started": record.get("started"), "finished": record.get("finished")}
        return reused("solve", name, key, manifest)
    computing("solve", name, key, why)
    if point == 2:
        pause_point(run, "solve")
    started = time.time()
    torch.manual_seed(config.seed)
    stats = load_point_stats(ActivationStore(run), _stats_point(point))
    basis = make_basis_fn(config, None if device == "cpu" else device)(stats, int(width), _basis_index(point))
    tensors = {"Q": basis.Q.detach().cpu().contiguous()}
    if basis.U is not None:
        tensors["U"] = basis.U.detach().cpu().contiguous()
    info = dict(basis.info)
    if cost is not None and cost.get("summary"):
        info["cost"] = cost["summary"]
    info["device"] = device
    finished = time.time()
    record = save_basis(run, point, tensors, key=key, info=info,
                        extra={"started": started, "finished": finished, "seconds": round(finished - started, 6)})
    return {"stage": "solve", "name": name, "key": key, "uri": run.uri(), "point": point, "width": basis.width,
            "sha256": record["sha256"], "metrics": _metrics(info), "seconds": round(finished - started, 6),
            "started": started, "finished": finished, "reused": False}


def _metrics(info: dict) -> dict:
    out = {k: float(info[k]) for k in _INFO_METRICS if isinstance(info.get(k), (int, float))}
    if isinstance(info.get("cost"), dict) and "mean" in info["cost"]:
        out["raw_cost_mean"] = float(info["cost"]["mean"])
    return out
