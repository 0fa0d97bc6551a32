"""The export stage: the compressed Hugging Face directory under ``model/``.

The absorbed layer files are its shards (hard-linked where the filesystem allows: nothing is stored twice); the
embeddings and head are written a block of rows at a time as one more shard; then the shard index, config,
tokenizer and modeling code, and the first lineage.json (the lineage stage completes it after the evaluations).
"""

from __future__ import annotations

import math
import platform
from importlib.metadata import PackageNotFoundError, version

from dotresize import surgery
from storage import RunDir
from storage import rundir as layout
from storage.errors import CorruptArtifactError
from storage.records import Lineage

from .absorb import stored_bases
from .cache import stage_task
from .common import (Probe, compute_device, config_of, export_dtype, manifest_probe, run_probed, stage_key,
                     streamed_model)
from .inspect import load_inspected

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "export"

#: packages whose versions go into lineage.json
VERSIONED = ("dotresize", "torch", "transformers", "safetensors", "POT", "numpy", "prefect", "prefect-dask", "dask",
             "distributed", "zarr", "fsspec", "mlflow", "accelerate", "tokenizers", "lm-eval")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def export_key(inspect: dict, recipe: dict, widths: list[int], ends: list[dict], absorbs: list[dict],
               dtype: str) -> str:
    return stage_key(NAME, inspect=inspect["key"], config=recipe["config"], widths=list(widths),
                     ends=[b["key"] for b in ends], layers=[a["key"] for a in absorbs], dtype=dtype)


def _ends_of(bases: list[dict], layout_name: str) -> list[dict]:
    """The solves the embeddings and head are absorbed with: the first and last point's, or the global one."""
    if not bases:
        return []
    return [bases[0]] if layout_name == "global" else [bases[0], bases[-1]]


def export_probe(run_url: str, recipe: dict, inspect: dict, widths: list[int], bases: list[dict],
                 absorbs: list[dict], dtype: str | None = None, **_) -> Probe:
    from dotresize.api import export_layout

    ends = _ends_of(bases, export_layout(config_of(recipe)))
    key = export_key(inspect, recipe, widths, ends, absorbs, str(export_dtype(dtype, inspect)))
    return manifest_probe(RunDir(run_url), NAME, None, key)


@stage_task(export_probe, name=NAME)
def export_task(run_url: str, run_key: str, recipe: dict, source: dict, calibration: dict, inspect: dict,
                widths: list[int], captures: list[dict], bases: list[dict], absorbs: list[dict],
                dtype: str | None = None, device: str | None = None, mlps: list[dict] | None = None) -> dict:
    """The compressed model under model/: the layer files as shards, the ends as one more, the index, config,
    tokenizer and modeling code; and lineage.json. ``mlps``: the layers' MLP reductions (MLP axis)."""
    from dotresize.api import compressed_config, export_layout, is_stock

    from dotresize.shards import weights_file, write_index, write_model_files

    probe = export_probe(run_url, recipe, inspect, widths, bases, absorbs, dtype)
    run, key = probe.run, probe.key
    config = config_of(recipe)
    device = compute_device(device)
    out_dtype = export_dtype(dtype, inspect)
    layout_name = export_layout(config)
    mlps = sorted(mlps or [], key=lambda m: m["layer"])
    mlp_widths = [int(m["width"]) for m in mlps] or None
    ends = _ends_of(bases, layout_name)

    def compute() -> dict:
        import torch

        model = streamed_model(source, inspect, device)
        parts = surgery.ends(model, stored_bases(run, ends, inspect), layout_name, out_dtype,
                             keep_tied=is_stock(layout_name, mlp_widths))
        with torch.no_grad():  # embeddings and head streamed to disk a block of rows at a time
            ends_sha = run.save_tensor_stream(layout.ENDS, parts, metadata={"format": "pt"})
        ends_params = sum(math.prod(p.shape) for p in parts)
        layers = sorted(absorbs, key=lambda a: a["layer"])
        for absorb in layers:  # the layer files are this export's shards: check them before linking
            rel = layout.layer_file(absorb["layer"])
            ok, why = run.check_file(rel, absorb["files"][rel])
            if not ok:
                raise CorruptArtifactError(f"{run.uri(rel)}: {why}; rerun the command")
        total = len(layers) + 1
        hf_config, generation, tokenizer = load_inspected(run, inspect)
        tied = not any(p.name == model.layout.weight(model.layout.lm_head) for p in parts)
        compressed = compressed_config(model, list(widths), layout_name, mlp_widths, tied)
        compressed.dtype = out_dtype
        parameters_after = ends_params + sum(_numel(a) for a in layers)
        report = {
            "family": inspect["family"], "hidden_size": inspect["hidden_size"], "widths": list(widths),
            "layout": layout_name, "mode": config.mode, "parameters_before": inspect["parameters_before"],
            "parameters_after": int(parameters_after), "calibration_tokens": calibration["tokens"],
            "points": [_point_info(run, b) for b in bases], "config": config.to_dict(), "dtype": str(out_dtype),
        }
        report["parameter_ratio"] = report["parameters_after"] / report["parameters_before"]
        if mlps:
            report["mlp"] = {"intermediate_size": model.layout.intermediate_size_of(model.config),
                             "widths": mlp_widths, "method": config.mlp.method,
                             "layers": [{"layer": m["layer"], "width": m["width"], **m.get("info", {})}
                                        for m in mlps]}
        with run.staged_dir(layout.MODEL) as directory:
            shards = [layout.shard_name(1, total)]
            run.link_into(layout.ENDS, directory / shards[0])
            for number, absorb in enumerate(layers, start=2):
                shards.append(layout.shard_name(number, total))
                run.link_into(layout.layer_file(absorb["layer"]), directory / shards[-1])
            write_index(directory, shards)
            write_model_files(directory, config=compressed, generation_config=generation, tokenizer=tokenizer,
                              per_point=not is_stock(layout_name, mlp_widths), widths=list(widths),
                              compression=config.to_dict(),
                              extra_json={"compression_report.json": report, layout.SOURCE: source,
                                          layout.CALIBRATION: calibration.get("meta", {})})
            weights = weights_file(directory)
        model_files = run.file_digests(layout.MODEL)
        lineage = Lineage.from_export(
            run_key=run_key,
            recipe=recipe,
            source=source,
            calibration=calibration.get("meta", {}),
            stages={
                "calibration": {"key": calibration["key"], "digest": calibration["digest"]},
                "inspect": {"key": inspect["key"], "digest": inspect["digest"]},
                "capture": [{"stage": c["stage"], "key": c["key"], "name": c.get("name"), "points": c.get("points")}
                            for c in captures],
                "bases": {str(b["point"]): {"key": b["key"], "sha256": b["sha256"]} for b in bases},
                "layers": {str(a["layer"]): {"key": a["key"], "sha256": a["files"][layout.layer_file(a["layer"])]}
                           for a in absorbs},
                **({"mlp": {str(m["layer"]): {"key": m["key"], "sha256": m["files"][layout.mlp_file(m["layer"])]}
                            for m in mlps}} if mlps else {}),
                "ends": {"sha256": ends_sha},
                "export": {"key": key},
            },
            model=model_files,
            weights_file=weights,
            versions=versions(),
        ).to_dict()
        files = {f"{layout.MODEL}/{name}": sha for name, sha in model_files.items()}
        files[layout.ENDS] = ends_sha
        # lineage.json (both copies) is not a stage output: tasks/lineage.py rewrites it after the evaluations
        run.write_json(f"{layout.MODEL}/{layout.LINEAGE}", lineage)
        run.write_json(layout.LINEAGE, lineage)
        return {"files": files, "lineage": lineage, "model_dir": run.uri(layout.MODEL),
                "model_sha256": model_files[weights], "weights_file": weights,
                "parameters_before": report["parameters_before"], "parameters_after": report["parameters_after"],
                "parameter_ratio": report["parameter_ratio"], "widths": list(widths), "dtype": str(out_dtype),
                "shards": total}

    return run_probed(probe, compute)


def _numel(absorb: dict) -> int:
    total = 0
    for shape in absorb["shapes"].values():
        count = 1
        for d in shape:
            count *= int(d)
        total += count
    return total


def _point_info(run: RunDir, solve: dict) -> dict:
    record = run.read_json(layout.basis_meta_file(solve["point"])) or {}
    info = dict(record.get("info", {}))
    info.pop("targets", None)
    info.pop("seconds", None)
    info.pop("device", None)
    return info



__all__ = ["export_task", "export_key", "versions"]
