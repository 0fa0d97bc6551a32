"""The absorb stage: one task per layer writes that layer's compressed weights, a shard of the export.

Each task reads one layer of the source, fuses it, absorbs its bases (after its MLP reduction, on the MLP axis)
and writes the compressed layer, in the export's dtype and with its final names, as
``layers/layer_<l>.safetensors``.
"""

from __future__ import annotations

from dotresize import surgery
from dotresize.mlp.model import with_reduced_mlp
from storage import RunDir, load_basis
from storage import rundir as layout
from storage.errors import CorruptArtifactError

from .cache import stage_task
from .common import (Probe, basis_from, compute_device, export_dtype, manifest_probe, pause_point, release_memory,
                     run_probed, stage_key, streamed_model)
from .mlp import load_reduction

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "absorb"


def stored_bases(run: RunDir, solves: list[dict], inspect: dict) -> list:
    """The stored bases the manifests name; none: the identity (only the MLPs are reduced)."""
    if not solves:
        from dotresize.api import identity_basis

        return [identity_basis(int(inspect["hidden_size"]))]
    return [_load(run, b) for b in solves]


def _load(run: RunDir, solve: dict):
    tensors, record = load_basis(run, solve["point"])
    if record["key"] != solve["key"]:
        raise CorruptArtifactError(f"basis {solve['point']} changed under the run (key {record['key'][:12]}, "
                                   f"expected {solve['key'][:12]}): rerun the command")
    return basis_from(tensors, record)


def absorb_probe(run_url: str, layer: int, inspect: dict, bases: list[dict], layout_name: str,
                 dtype: str | None = None, device: str | None = None, mlp: dict | None = None, **_) -> Probe:
    key = stage_key(NAME, inspect=inspect["key"], layer=layer, bases=[b["key"] for b in bases],
                    layout=layout_name, dtype=str(export_dtype(dtype, inspect)), device=compute_device(device),
                    **({"mlp": mlp["key"]} if mlp else {}))
    return manifest_probe(RunDir(run_url), NAME, str(layer), key)


@stage_task(absorb_probe, name=NAME, task_run_name="absorb-{layer}")
def absorb_task(run_url: str, layer: int, source: dict, inspect: dict, bases: list[dict], layout_name: str,
                dtype: str | None = None, device: str | None = None, mlp: dict | None = None) -> dict:
    """The compressed tensors of one layer: per-point bases (2l, 2l+1, 2l+2) or the global basis (none: the
    residual stream is left as it is), after the layer's MLP reduction ``mlp`` (MLP axis)."""
    probe = absorb_probe(run_url, layer, inspect, bases, layout_name, dtype, device, mlp)
    run = probe.run
    device = compute_device(device)
    out_dtype = export_dtype(dtype, inspect)

    def compute() -> dict:
        model = streamed_model(source, inspect, device)
        loaded = stored_bases(run, bases, inspect)
        with model.layer(layer) as module:
            if mlp is not None:
                module = with_reduced_mlp(model.layout, module, load_reduction(run, mlp))
            state = surgery.layer_state(model, layer, module, loaded, layout_name, out_dtype)
        if layer == inspect["num_layers"] - 1:
            pause_point(run, "absorb")
        rel = layout.layer_file(layer)
        sha = run.save_tensors(rel, {k: v.cpu() for k, v in state.items()}, metadata={"format": "pt"})
        shapes = {k: list(v.shape) for k, v in state.items()}
        nbytes = int(sum(v.numel() * v.element_size() for v in state.values()))
        del state
        release_memory()
        return {"layer": layer, "files": {rel: sha}, "shapes": shapes, "bytes": nbytes}

    return run_probed(probe, compute)


__all__ = ["absorb_task", "stored_bases"]
