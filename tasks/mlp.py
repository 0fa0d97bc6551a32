"""The MLP axis (issue 16): one task per decoder layer reduces its MLP's intermediate width.

``mlp_task`` (parallel mode) reads layer l's intermediate statistics, which the capture task stored in the same
pass as the residual points (the uncompressed model's), and the layer's down projection, and stores the reduction
(kept and removed neurons, the map A) under ``mlp/``. ``mlp_sequential_task`` (sequential mode) is a chain: layer
l's statistics from its input through the already-reduced layers before it (stored by task l-1), the reduction,
and layer l+1's input through the reduced layer. The absorb task applies a layer's reduction before absorbing the
residual bases (:func:`dotresize.mlp.model.with_reduced_mlp`); the sequential residual capture runs through it.
"""

from __future__ import annotations

import time

import torch

from storage import ActivationStore, RunDir
from storage import rundir as layout
from storage.errors import CorruptArtifactError

from .cache import stage_task
from .common import (Probe, calibration_batches, capture_parts, computing, config_of, finish_manifest, manifest_probe,
                     release_memory, reused, run_probed, stage_key, stored_or, streamed_model)


#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "mlp"

def mlp_parts(config) -> dict:
    """The part of the config that determines a layer's MLP reduction from its statistics."""
    import dataclasses

    return {"mlp": dataclasses.asdict(config.mlp)}


def layer_keep_parts(config, layer: int) -> dict:
    """What a layer's MLP key gains from an explicit keep-set (nothing without one: keys stay as they were)."""
    from dotresize.mlp.model import layer_keep_set

    keep = layer_keep_set(config, layer)
    return {} if keep is None else {"keep": keep}


def mlp_capture_parts(config) -> dict:
    """What a capture key gains when the capture also records the MLP statistics (nothing otherwise: the keys of
    runs without the MLP axis are unchanged)."""
    return {"mlp_statistics": True} if config.mlp_active else {}


def load_mlp_stats(store: ActivationStore, layer: int):
    from dotresize.mlp import MlpStats

    stats = store.load_stats(layout.mlp_stats_name(layer))
    return MlpStats(torch.from_numpy(stats["gram"]), torch.from_numpy(stats["sum"]),
                    torch.from_numpy(stats["abs_sum"]), stats["count"])


def mlp_stats_arrays(stats) -> tuple[dict, dict]:
    """(arrays, attrs) to store a layer's :class:`dotresize.mlp.MlpStats`."""
    return ({"gram": stats.gram.cpu().numpy(), "abs_sum": stats.abs_sum.cpu().numpy(),
             "sum": stats.sum.cpu().numpy()}, {"count": int(stats.count)})


def load_reduction(run: RunDir, manifest: dict):
    """The :class:`dotresize.mlp.MlpReduction` an ``mlp`` manifest names (checked against its digest)."""
    from dotresize.mlp import MlpReduction

    rel = layout.mlp_file(manifest["layer"])
    ok, why = run.check_file(rel, manifest["files"][rel])
    if not ok:
        raise CorruptArtifactError(f"{run.uri(rel)}: {why}; rerun the command")
    return MlpReduction.from_tensors(run.load_tensors(rel), manifest.get("info"))


def _save(run: RunDir, layer: int, reduction) -> dict:
    rel = layout.mlp_file(layer)
    sha = run.save_tensors(rel, reduction.tensors(), metadata={"format": "pt"})
    return {"layer": layer, "width": reduction.width, "files": {rel: sha}, "info": reduction.scalar_info()}


def mlp_probe(run_url: str, layer: int, capture: dict, width: int, recipe: dict, verify: bool = True,
              **_) -> Probe:
    config = config_of(recipe)
    key = stage_key(NAME, mode="parallel", layer=layer, capture=capture["key"], width=int(width),
                    **mlp_parts(config), **layer_keep_parts(config, layer))
    return manifest_probe(RunDir(run_url), NAME, str(layer), key, verify)


@stage_task(mlp_probe, name=NAME, task_run_name="mlp-{layer}")
def mlp_task(run_url: str, layer: int, source: dict, inspect: dict, capture: dict, width: int, recipe: dict,
             device: str | None = None, verify: bool = True) -> dict:
    """Layer ``layer``'s MLP reduced to ``width`` neurons from the statistics its capture stored (parallel mode)."""
    from dotresize.mlp.model import layer_keep_set, reduce_layer_mlp

    probe = mlp_probe(run_url, layer, capture, width, recipe, verify)
    run = probe.run
    config = config_of(recipe)

    def compute() -> dict:
        stats = load_mlp_stats(ActivationStore(run), layer)
        model = streamed_model(source, inspect, device)
        with model.layer(layer) as module:
            reduction = reduce_layer_mlp(model.layout, module, stats, int(width), config.mlp,
                                         layer_keep_set(config, layer))
        del stats
        release_memory()
        return _save(run, layer, reduction)

    return run_probed(probe, compute)


def _signal_rows(store: ActivationStore, name: str, batches: list, dim: int, device):
    """The stored signal ``name`` cut back into the calibration batches, one batch at a time."""
    for rows, batch in zip(store.iter_rows(name, [b.numel() for b in batches]), batches):
        yield torch.from_numpy(rows).reshape(*batch.shape, dim).to(device)


def mlp_sequential_probe(run_url: str, layer: int, inspect: dict, calibration: dict, width: int, recipe: dict,
                         previous: dict | None = None, device: str | None = None, verify: bool = True,
                         **_) -> Probe:
    """Complete when the layer's reduction is and, but for the last layer, the next layer's input through it."""
    from .common import compute_device

    run = RunDir(run_url)
    config = config_of(recipe)
    name = str(layer)
    key = stage_key(NAME, mode="sequential", layer=layer, inspect=inspect["key"], calibration=calibration["digest"],
                    previous=previous["key"] if previous else None, width=int(width), device=compute_device(device),
                    **capture_parts(config), **mlp_parts(config), **layer_keep_parts(config, layer))
    probe = manifest_probe(run, NAME, name, key, verify)
    if probe.ok and layer != inspect["num_layers"] - 1:
        ok, why = ActivationStore(run).status(layout.mlp_input_name(layer + 1), key, verify=verify)
        if not ok:
            return Probe(run, NAME, name, key, False, why)
    if probe.ok:
        probe.manifest = stored_or(run, NAME, name, key, probe.manifest)
    return probe


@stage_task(mlp_sequential_probe, name=NAME, task_run_name="mlp-{layer}")
def mlp_sequential_task(run_url: str, layer: int, source: dict, inspect: dict, calibration: dict, width: int,
                        recipe: dict, previous: dict | None = None, device: str | None = None,
                        verify: bool = True) -> dict:
    """Layer ``layer``'s MLP reduced from its input through the already-reduced layers (task ``layer - 1``'s
    output, the embeddings for layer 0); stores the reduction and the next layer's input."""
    from dotresize.calibration import embed_batches, run_layer
    from dotresize.mlp.model import layer_keep_set, layer_mlp_stats, reduce_layer_mlp, with_reduced_mlp

    from .common import compute_device

    probe = mlp_sequential_probe(run_url, layer, inspect, calibration, width, recipe, previous, device, verify)
    if probe.ok:
        return reused(NAME, probe.name, probe.key, probe.manifest)
    run, name, key, why = probe.run, probe.name, probe.key, probe.why
    config = config_of(recipe)
    device = compute_device(device)
    store = ActivationStore(run)
    last = layer == inspect["num_layers"] - 1
    computing(NAME, name, key, why)
    started = time.time()
    model = streamed_model(source, inspect, device)
    ids, batches = calibration_batches(run, calibration, config)
    tokens, dim = int(ids.numel()), model.hidden_size
    if layer == 0:
        embedded = embed_batches(model, batches)
        inputs = lambda: iter(embedded)  # noqa: E731
    else:
        inputs = lambda: _signal_rows(store, layout.mlp_input_name(layer), batches, dim, model.device)  # noqa: E731
    with model.layer(layer) as module:
        stats = layer_mlp_stats(model, module, layer, ((h, model.layer_kwargs(h)) for h in inputs()))
        reduction = reduce_layer_mlp(model.layout, module, stats, int(width), config.mlp,
                                     layer_keep_set(config, layer))
        del stats
        if not last:  # the next layer's input, through this layer with its reduced MLP, a batch at a time
            reduced = with_reduced_mlp(model.layout, module, reduction)
            writer = store.create_point(layout.mlp_input_name(layer + 1), key=key, tokens=tokens, dim=dim,
                                        attrs={"mode": "sequential"})
            for h in inputs():
                out = run_layer(model, reduced, layer, [h], [model.layer_kwargs(h)])[0]
                writer.append(out.detach().reshape(-1, dim).to(device="cpu", dtype=torch.float32).numpy())
            writer.finish({})
    body = _save(run, layer, reduction)
    release_memory()
    return finish_manifest(run, NAME, name, key, started, body)


__all__ = ["mlp_task", "mlp_sequential_task", "load_reduction", "load_mlp_stats", "mlp_stats_arrays",
           "mlp_capture_parts", "mlp_parts", "layer_keep_parts"]
