"""Activation capture into the Zarr store, a decoder layer at a time.

``capture_task`` (parallel mode) is one task per layer l: it takes the layer's input (the embedding output for
layer 0, else point 2l as the previous task stored it), reads layer l from the source, fuses and runs it, and
stores points 2l+1 and 2l+2 (and point 0 for l = 0). The hidden states go through the store from task to task,
so a killed capture resumes at the first layer whose points are not complete, and (on a Dask scheduler) solves
of earlier points run beside the capture of later layers. ``sequential_capture_task`` (sequential mode)
recomputes one point through the already compressed layers.

What is stored per point is what a later stage reads, in the smaller form: the signal of every layer input
(even points: the next layer's input, or a sequential point's), and a point's statistics (Gram matrix, sums,
outlier exclusion, the reservoir sample of an L1 cost) instead of its signal when they are smaller (more tokens
than twice the width); otherwise the solve stage accumulates them from the stored signal. Both ways run the
in-memory API's accumulator over the same batches in the same order: the statistics are bitwise the same.
"""

from __future__ import annotations

import contextlib
import time

import torch
from dotresize.calibration import embed_batches, rebase, run_layer, sequential_signals
from storage import ActivationStore, RunDir, load_basis
from storage import rundir as layout

from .cache import stage_task
from .common import (
    Probe,
    basis_from,
    calibration_batches,
    capture_parts,
    computing,
    config_of,
    finish_manifest,
    logger,
    pause_point,
    release_memory,
    keeps_signal,
    reused,
    stage_key,
    statistics_parts,
    stats_arrays,
    stats_at_capture,
    stored_or,
    streamed_model,
)
from .mlp import load_reduction, mlp_capture_parts, mlp_stats_arrays


#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "capture"

class _PointRecorder:
    """One point on its way into the store, batch by batch (checked finite): its signal where a later stage
    reads it (:func:`keeps_signal`), its statistics where they are smaller than the signal
    (:func:`stats_at_capture`; accumulated exactly as the in-memory API does, so the solve stage need not read
    the signal back)."""

    def __init__(self, store: ActivationStore, point: int, *, key: str, tokens: int, dim: int, mode: str, config):
        from dotresize.statistics import StatsAccumulator

        self.store, self.point, self.key, self.mode = store, point, key, mode
        self.tokens, self.dim = tokens, dim
        self.writer = (store.create_point(point, key=key, tokens=tokens, dim=dim, attrs={"mode": mode})
                       if keeps_signal(point) or not stats_at_capture(tokens, dim) else None)
        self.accumulator = None
        if stats_at_capture(tokens, dim):
            parts = statistics_parts(config)
            self.accumulator = StatsAccumulator(dim, point=point, sample_tokens=parts["sample_tokens"],
                                                outlier_tokens=parts["outlier_tokens"], seed=parts["seed"])

    def add(self, hidden: torch.Tensor) -> None:
        rows = hidden.detach().reshape(-1, hidden.shape[-1]).to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(rows).all():
            from dotresize.errors import NonFiniteActivationError

            raise NonFiniteActivationError(f"NaN or Inf in the activations at slice point {self.point}: check the "
                                           "model's weights and dtype")
        if self.accumulator is not None:
            self.accumulator.add(rows)
        if self.writer is not None:
            self.writer.append(rows.numpy())

    def finish(self) -> None:
        arrays, attrs = {}, {}
        if self.accumulator is not None:
            arrays, attrs = stats_arrays(self.accumulator.finalize(), self.accumulator.excluded)
        if self.writer is not None:
            self.writer.finish(arrays, attrs)
        else:
            self.store.create_stats_group(self.point, key=self.key, stats=arrays,
                                          attrs={**attrs, "mode": self.mode, "tokens": self.tokens, "dim": self.dim})


@contextlib.contextmanager
def _mlp_statistics(model, module, layer: int, active: bool):
    """The accumulator of layer ``layer``'s MLP intermediate statistics while it runs (None without the MLP axis)."""
    if not active:
        yield None
        return
    from dotresize.mlp.model import capturing_mlp

    with capturing_mlp(model.layout, module, layer, model.device) as accumulator:
        yield accumulator


def _layer_points(layer: int) -> list[int]:
    return ([0] if layer == 0 else []) + [2 * layer + 1, 2 * layer + 2]


def capture_key(inspect: dict, calibration: dict, recipe: dict, layer: int, previous: str | None,
                device: str) -> str:
    config = config_of(recipe)
    return stage_key(NAME, mode="parallel", layer=layer, inspect=inspect["key"],
                     calibration=calibration["digest"], previous=previous, device=device,
                     statistics=statistics_parts(config), **capture_parts(config), **mlp_capture_parts(config))


def _batch_rows(store: ActivationStore, point: int, batches: list, index: int, dim: int, device) -> torch.Tensor:
    """Point ``point``'s stored rows of calibration batch ``index``, in the batch's shape."""
    start = sum(b.numel() for b in batches[:index])
    batch = batches[index]
    rows = store.read_rows(point, start, start + batch.numel())
    return torch.from_numpy(rows).reshape(*batch.shape, dim).to(device)


def _hidden_batches(store: ActivationStore, point: int, batches: list, dim: int, device) -> list[torch.Tensor]:
    """Point ``point``'s stored rows cut back into the calibration batches."""
    return [_batch_rows(store, point, batches, index, dim, device) for index in range(len(batches))]


def capture_probe(run_url: str, layer: int, inspect: dict, calibration: dict, recipe: dict,
                  previous: dict | None = None, device: str | None = None, verify: bool = True, **_) -> Probe:
    """Layer ``layer``'s capture: complete when every point it stores (and its MLP statistics) is."""
    from .common import compute_device

    run = RunDir(run_url)
    config = config_of(recipe)
    name = str(layer)
    key = capture_key(inspect, calibration, recipe, layer, previous["key"] if previous else None,
                      compute_device(device))
    store = ActivationStore(run)
    points = _layer_points(layer)
    groups = points + ([layout.mlp_stats_name(layer)] if config.mlp_active else [])
    status = {p: store.status(p, key, verify=verify) for p in groups}
    if not all(ok for ok, _ in status.values()):
        return Probe(run, NAME, name, key, False, "; ".join(sorted({w for ok, w in status.values() if not ok})))
    fallback = {"stage": NAME, "name": name, "key": key, "uri": run.uri(), "seconds": 0.0}
    return Probe(run, NAME, name, key, True, manifest={
        **stored_or(run, NAME, name, key, fallback), "layer": layer,
        "points": {str(p): store.digest(p) for p in points}})


def _start(probe: Probe, recipe: dict, source: dict, inspect: dict, calibration: dict, device: str | None):
    """(config, store, streamed source, calibration batches, tokens): what a capture that computes works on
    (logged as ``computing capture[...]``)."""
    from .common import compute_device

    config = config_of(recipe)
    computing(NAME, probe.name, probe.key, probe.why)
    model = streamed_model(source, inspect, compute_device(device))
    ids, batches = calibration_batches(probe.run, calibration, config)
    return config, ActivationStore(probe.run), model, batches, int(ids.numel())


@stage_task(capture_probe, name=NAME, task_run_name="capture-{layer}")
def capture_task(run_url: str, layer: int, source: dict, inspect: dict, calibration: dict, recipe: dict,
                 previous: dict | None = None, device: str | None = None, verify: bool = True) -> dict:
    """Points 2l+1 and 2l+2 (and 0 for layer 0) from layer ``layer`` of the uncompressed model."""
    probe = capture_probe(run_url, layer, inspect, calibration, recipe, previous, device, verify)
    if probe.ok:
        return reused(NAME, probe.name, probe.key, probe.manifest)
    run, name, key, started = probe.run, probe.name, probe.key, time.time()
    config, store, model, batches, tokens = _start(probe, recipe, source, inspect, calibration, device)
    dim = model.hidden_size
    points = _layer_points(layer)
    recorders = {p: _PointRecorder(store, p, key=key, tokens=tokens, dim=dim, mode="parallel", config=config)
                 for p in points}
    embedded = embed_batches(model, batches) if layer == 0 else None
    sink = lambda p, h: recorders[p].add(h)  # noqa: E731
    with model.layer(layer) as module, _mlp_statistics(model, module, layer, config.mlp_active) as mlp_stats:
        for index, batch in enumerate(batches):  # one batch of hidden states in memory at a time
            if embedded is not None:
                hidden = embedded[index]
                recorders[0].add(hidden)
            else:
                hidden = _batch_rows(store, 2 * layer, batches, index, dim, model.device)
            run_layer(model, module, layer, [hidden], [model.layer_kwargs(hidden)], sink)
    del embedded
    if mlp_stats is not None:
        arrays, attrs = mlp_stats_arrays(mlp_stats.finalize())
        store.create_stats_group(layout.mlp_stats_name(layer), key=key, stats=arrays, attrs=attrs)
    for index, point in enumerate(points):
        recorders[point].finish()
        if layer == 2 and index == 0:
            pause_point(run, "capture")
    release_memory()
    return finish_manifest(run, NAME, name, key, started,
                           {"layer": layer, "points": {str(p): store.digest(p) for p in points}})


def sequential_capture_key(inspect: dict, calibration: dict, recipe: dict, point: int, inputs: list[str],
                           device: str) -> str:
    """Key of a sequential point: it depends on the keys of the bases and signal it was computed through."""
    return stage_key(NAME, mode="sequential", point=point, inspect=inspect["key"],
                     calibration=calibration["digest"], inputs=inputs, device=device,
                     statistics=statistics_parts(config_of(recipe)), **capture_parts(config_of(recipe)))


def _sequential_inputs(previous: dict | None, bases: list[dict] | None, mlp: dict | None) -> list[str]:
    return ([previous["key"]] if previous else []) + [b["key"] for b in bases or []] + ([mlp["key"]] if mlp else [])


def sequential_capture_probe(run_url: str, point: int, inspect: dict, calibration: dict, recipe: dict,
                             previous: dict | None = None, bases: list[dict] | None = None,
                             device: str | None = None, verify: bool = True, mlp: dict | None = None,
                             **_) -> Probe:
    from .common import compute_device

    run = RunDir(run_url)
    name = str(point)
    key = sequential_capture_key(inspect, calibration, recipe, point, _sequential_inputs(previous, bases, mlp),
                                 compute_device(device))
    store = ActivationStore(run)
    ok, why = store.status(point, key, verify=verify)
    if not ok:
        return Probe(run, NAME, name, key, False, why)
    fallback = {"stage": NAME, "name": name, "key": key, "uri": run.uri(), "point": point, "seconds": 0.0}
    return Probe(run, NAME, name, key, True, manifest={**stored_or(run, NAME, name, key, fallback),
                                                           "points": {name: store.digest(point)}})


@stage_task(sequential_capture_probe, name=NAME, task_run_name="capture-{point}")
def sequential_capture_task(run_url: str, point: int, source: dict, inspect: dict, calibration: dict, recipe: dict,
                            previous: dict | None = None, bases: list[dict] | None = None,
                            device: str | None = None, verify: bool = True, mlp: dict | None = None) -> dict:
    """The signal at ``point`` through the compressed layers before it (sequential mode).

    ``previous`` is the capture manifest of the layer input point 2l (for points 2l+1 and 2l+2), ``bases`` the
    solve manifests of points 2l (and 2l+1 for point 2l+2), ``mlp`` the MLP reduction of layer l (MLP axis).
    """
    probe = sequential_capture_probe(run_url, point, inspect, calibration, recipe, previous, bases, device, verify,
                                     mlp)
    if probe.ok:
        return reused(NAME, probe.name, probe.key, probe.manifest)
    run, name, key, started = probe.run, probe.name, probe.key, time.time()
    config, store, model, batches, tokens = _start(probe, recipe, source, inspect, calibration, device)
    dim = model.hidden_size
    recorder = _PointRecorder(store, point, key=key, tokens=tokens, dim=dim, mode="sequential", config=config)
    if point == 0:
        for h in embed_batches(model, batches):
            recorder.add(h)
    else:
        index = (point - 1) // 2
        b_in = basis_from(*load_basis(run, 2 * index))
        b_attn = basis_from(*load_basis(run, 2 * index + 1)) if point % 2 == 0 else None
        hidden = _hidden_batches(store, 2 * index, batches, dim, model.device)
        kwargs = [model.layer_kwargs(h) for h in hidden]
        xs = [rebase(h, b_in) for h in hidden]
        del hidden
        with model.layer(index) as module:
            if mlp is not None:
                from dotresize.mlp.model import with_reduced_mlp

                module = with_reduced_mlp(model.layout, module, load_reduction(run, mlp))
            for signal in sequential_signals(model, index, module, xs, kwargs, b_in, b_attn):
                recorder.add(signal)
    recorder.finish()
    release_memory()
    logger().debug("captured point %d", point)
    return finish_manifest(run, NAME, name, key, started, {"point": point, "points": {name: store.digest(point)}})


__all__ = ["capture_task", "sequential_capture_task", "capture_key", "sequential_capture_key"]
