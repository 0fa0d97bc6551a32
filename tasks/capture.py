"""Activation capture into the Zarr store.

``capture_task`` (parallel mode): one forward pass of the fused, uncompressed model; every slice point's rows
stream into its pre-created Zarr array while :class:`dotresize.statistics.StatsAccumulator` accumulates the
float64 statistics exactly as ``dotresize.calibration.capture_point_stats`` does (same batches, same order),
so the stored statistics are bitwise the in-memory ones. Only points that are missing, incomplete, stale or
corrupted are written again.

``sequential_capture_task`` (sequential mode): the signal of one point recomputed through the already
compressed layers (``dotresize.calibration.sequential_bases``, one point at a time), read back from and
written to the same store, so every point is a checkpoint.
"""

from __future__ import annotations

import time

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from dotresize.calibration import post_attention_signal, rebase, sequential_layer
from storage import ActivationStore, RunDir, load_basis

from .common import (
    basis_from,
    capture_parts,
    computing,
    config_of,
    finish_manifest,
    load_calibration,
    load_fused,
    logger,
    pause_point,
    reused,
    stage_key,
    stats_arrays,
    stored_or,
)


def _batches(run: RunDir, calibration: dict, config, hidden_size: int):
    from dotresize.api import check_calibration
    from dotresize.calibration import iter_batches

    ids = load_calibration(run, calibration)
    check_calibration(ids, hidden_size)
    return ids, iter_batches(ids, config.batch_size)


def _accumulator(config, dim: int, point: int):
    from dotresize.statistics import StatsAccumulator

    parts = capture_parts(config)
    return StatsAccumulator(dim, point=point, sample_tokens=parts["sample_tokens"],
                            outlier_tokens=parts["outlier_tokens"], seed=parts["seed"])


def _rows(hidden: torch.Tensor) -> "torch.Tensor":
    return hidden.detach().reshape(-1, hidden.shape[-1]).to(device="cpu", dtype=torch.float32).numpy()


def capture_key(fuse: dict, calibration: dict, recipe: dict) -> str:
    return stage_key("capture", mode="parallel", fuse=fuse["key"], calibration=calibration["digest"],
                     **capture_parts(config_of(recipe)))


@task(name="capture", cache_policy=NO_CACHE, persist_result=False)
def capture_task(run_url: str, fuse: dict, calibration: dict, recipe: dict, progress: bool = True,
                 verify: bool = True) -> dict:
    """Capture every slice point in one forward pass (parallel mode); returns a manifest of per-point digests."""
    from dotresize.calibration import run_with_point_hooks

    run = RunDir(run_url)
    config = config_of(recipe)
    key = capture_key(fuse, calibration, recipe)
    store = ActivationStore(run)
    points = list(range(fuse["num_points"]))
    status = {p: store.status(p, key, verify=verify) for p in points}
    todo = [p for p in points if not status[p][0]]
    body = {"mode": "parallel", "points": {}, "tokens": calibration["tokens"], "dim": fuse["hidden_size"]}
    if not todo:
        manifest = {"stage": "capture", "name": None, "key": key, "uri": run.uri(), **body, "seconds": 0.0,
                    "points": {str(p): store.digest(p) for p in points}, "computed_points": []}
        stored = stored_or(run, "capture", None, key, manifest)
        return reused("capture", None, key, {**stored, "points": manifest["points"]})
    why = "; ".join(sorted({status[p][1].split(" ", 1)[1] if " " in status[p][1] else status[p][1] for p in todo}))
    computing("capture", None, key, f"points {_ranges(todo)} of {len(points)}: {why}")
    started = time.time()
    adapter = load_fused(run, fuse)
    ids, batches = _batches(run, calibration, config, adapter.hidden_size)
    dim, tokens = adapter.hidden_size, int(ids.numel())
    writers = {p: store.create_point(p, key=key, tokens=tokens, dim=dim, attrs={"mode": "parallel"}) for p in todo}
    accumulators = {p: _accumulator(config, dim, p) for p in todo}

    def sink(point: int, hidden: torch.Tensor) -> None:
        if point in writers:
            accumulators[point].add(hidden)
            writers[point].append(_rows(hidden))

    run_with_point_hooks(adapter, batches, sink, progress=progress)
    for index, p in enumerate(todo):
        acc = accumulators.pop(p)
        arrays, attrs = stats_arrays(acc.finalize(), acc.excluded)
        writers.pop(p).finish(arrays, attrs)
        if index == 0:
            pause_point(run, "capture")
    body["points"] = {str(p): store.digest(p) for p in points}
    body["computed_points"] = todo
    return finish_manifest(run, "capture", None, key, started, body)


def sequential_capture_key(fuse: dict, calibration: dict, recipe: dict, point: int, inputs: list[str]) -> str:
    """Key of a sequential point: it depends on the keys of the bases and signal it was computed through."""
    return stage_key("capture", mode="sequential", point=point, fuse=fuse["key"], calibration=calibration["digest"],
                     inputs=inputs, **capture_parts(config_of(recipe)))


@task(name="capture-sequential", task_run_name="capture-{point}", cache_policy=NO_CACHE, persist_result=False)
def sequential_capture_task(run_url: str, point: int, fuse: dict, calibration: dict, recipe: dict,
                            previous: dict | None = None, bases: list[dict] | None = None,
                            verify: bool = True) -> dict:
    """The signal at ``point`` through the compressed layers before it (sequential mode).

    ``previous`` is the capture manifest of the layer input point 2l (for points 2l+1 and 2l+2), ``bases`` the
    solve manifests of points 2l (and 2l+1 for point 2l+2).
    """
    from dotresize.calibration import capture_layer_inputs

    run = RunDir(run_url)
    config = config_of(recipe)
    bases = bases or []
    inputs = ([previous["key"]] if previous else []) + [b["key"] for b in bases]
    key = sequential_capture_key(fuse, calibration, recipe, point, inputs)
    store = ActivationStore(run)
    ok, why = store.status(point, key, verify=verify)
    if ok:
        manifest = {"stage": "capture", "name": str(point), "key": key, "uri": run.uri(), "point": point,
                    "digest": store.digest(point), "seconds": 0.0}
        stored = stored_or(run, "capture", str(point), key, manifest)
        return reused("capture", str(point), key, {**stored, "digest": manifest["digest"]})
    computing("capture", str(point), key, why)
    started = time.time()
    adapter = load_fused(run, fuse)
    ids, batches = _batches(run, calibration, config, adapter.hidden_size)
    dim, tokens = adapter.hidden_size, int(ids.numel())
    dtype = next(adapter.model.parameters()).dtype
    layer = None
    if point > 0:
        index = (point - 1) // 2
        b_in = basis_from(*load_basis(run, 2 * index))
        b_attn = basis_from(*load_basis(run, 2 * index + 1)) if point % 2 == 0 else None
        layer = sequential_layer(adapter, index, b_in, b_attn)
    writer = store.create_point(point, key=key, tokens=tokens, dim=dim, attrs={"mode": "sequential"})
    acc = _accumulator(config, dim, point)
    row = 0
    for batch in batches:
        layer_inputs, kwargs = capture_layer_inputs(adapter, [batch])
        if point == 0:
            signal = layer_inputs[0]
        else:
            n = batch.numel()
            x = torch.from_numpy(store.read_rows(2 * index, row, row + n)).to(dtype).reshape(*batch.shape, dim)
            x = rebase(x, b_in)
            if point % 2 == 1:
                signal = post_attention_signal(layer, x, kwargs[0])
            else:
                with torch.no_grad():
                    signal = layer(x, **kwargs[0])
        row += batch.numel()
        acc.add(signal)
        writer.append(_rows(signal))
    arrays, attrs = stats_arrays(acc.finalize(), acc.excluded)
    writer.finish(arrays, attrs)
    logger().debug("captured point %d", point)
    return finish_manifest(run, "capture", str(point), key, started, {"point": point, "digest": store.digest(point)})


def _ranges(points: list[int]) -> str:
    """'0-3,7' for [0, 1, 2, 3, 7]."""
    out, start, prev = [], None, None
    for p in points + [None]:
        if start is None:
            start = prev = p
        elif p is not None and p == prev + 1:
            prev = p
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = p
    return ",".join(out)
