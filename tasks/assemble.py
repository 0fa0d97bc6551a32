"""Absorb the bases into the weights (one layer per task), export the HF directory, evaluate it."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prefect import task
from prefect.cache_policies import NO_CACHE

from dotresize import surgery
from dotresize.api import assemble_model
from storage import RunDir, load_basis
from storage import rundir as layout
from storage.errors import CorruptArtifactError

from .common import basis_from, config_of, load_fused, load_tokenizer, run_stage, stage_key

#: packages whose versions go into lineage.json
VERSIONED = ("dotresize", "torch", "transformers", "safetensors", "POT", "numpy", "prefect", "prefect-dask", "dask",
             "distributed", "zarr", "fsspec", "mlflow", "accelerate", "tokenizers")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _load(run: RunDir, solve: dict):
    tensors, record = load_basis(run, solve["point"])
    if record["key"] != solve["key"]:
        raise CorruptArtifactError(f"basis {solve['point']} changed under the run (key {record['key'][:12]}, "
                                   f"expected {solve['key'][:12]}): rerun the command")
    return basis_from(tensors, record)


@task(name="absorb", task_run_name="absorb-{layer}", cache_policy=NO_CACHE, persist_result=False)
def absorb_task(run_url: str, layer: int, fuse: dict, bases: list[dict], layout_name: str) -> dict:
    """The compressed tensors of one layer: per-point bases (2l, 2l+1, 2l+2) or the global basis."""
    run = RunDir(run_url)
    key = stage_key("absorb", fuse=fuse["key"], layer=layer, bases=[b["key"] for b in bases], layout=layout_name)

    def compute() -> dict:
        adapter = load_fused(run, fuse)
        loaded = [_load(run, b) for b in bases]
        if layout_name == "global":
            state = surgery.global_layer_state(adapter, layer, loaded[0])
        else:
            state = surgery.per_point_layer_state(adapter, layer, *loaded)
        rel = layout.layer_file(layer)
        sha = run.save_tensors(rel, state)
        return {"layer": layer, "files": {rel: sha}, "shapes": {k: list(v.shape) for k, v in state.items()}}

    return run_stage(run, "absorb", str(layer), key, compute)


def export_key(fuse: dict, recipe: dict, widths: list[int], ends: list[dict], absorbs: list[dict]) -> str:
    return stage_key("export", fuse=fuse["key"], config=recipe["config"], widths=list(widths),
                     ends=[b["key"] for b in ends], layers=[a["key"] for a in absorbs])


@task(name="export", cache_policy=NO_CACHE, persist_result=False)
def export_task(run_url: str, run_key: str, recipe: dict, source: dict, calibration: dict, fuse: dict,
                widths: list[int], captures: list[dict], bases: list[dict], absorbs: list[dict]) -> dict:
    """Assemble the compressed model from the layer files, save it under model/ and write lineage.json."""
    from dotresize import count_parameters, save_compressed

    run = RunDir(run_url)
    config = config_of(recipe)
    ends = [bases[0]] if config.layout == "global" else [bases[0], bases[-1]]
    key = export_key(fuse, recipe, widths, ends, absorbs)

    def compute() -> dict:
        adapter = load_fused(run, fuse)
        state: dict = {}
        for absorb in sorted(absorbs, key=lambda a: a["layer"]):
            rel = layout.layer_file(absorb["layer"])
            state.update(run.load_tensors(rel, absorb["files"][rel]))
        if config.layout == "global":
            state.update(surgery.global_ends_state(adapter, _load(run, bases[0])))
        else:
            state.update(surgery.per_point_ends_state(adapter, _load(run, bases[0]), _load(run, bases[-1])))
        model = assemble_model(adapter, list(widths), config.layout, state)
        points = [_point_info(run, b) for b in bases]
        report = {
            "family": fuse["family"], "hidden_size": fuse["hidden_size"], "widths": list(widths),
            "layout": config.layout, "mode": config.mode, "parameters_before": fuse["parameters_before"],
            "parameters_after": count_parameters(model), "calibration_tokens": calibration["tokens"],
            "points": points, "config": config.to_dict(),
        }
        report["parameter_ratio"] = report["parameters_after"] / report["parameters_before"]
        with run.staged_dir(layout.MODEL) as directory:
            save_compressed(model, directory, tokenizer=load_tokenizer(run), compression=config.to_dict(),
                            overwrite=True, extra_json={"compression_report.json": report,
                                                        "source.json": source,
                                                        "calibration.json": calibration.get("meta", {})})
        model_files = run.file_digests(layout.MODEL)
        lineage = {
            "lineage_version": 1,
            "run_key": run_key,
            "recipe": recipe,
            "source": source,
            "calibration": calibration.get("meta", {}),
            "stages": {
                "calibration": {"key": calibration["key"], "digest": calibration["digest"]},
                "fuse": {"key": fuse["key"], "digest": fuse["digest"]},
                "capture": [{"stage": c["stage"], "key": c["key"], "name": c.get("name"),
                             "points": c.get("points") or {str(c.get("name") or c["stage"]): c.get("digest")}}
                            for c in captures],
                "bases": {str(b["point"]): {"key": b["key"], "sha256": b["sha256"]} for b in bases},
                "layers": {str(a["layer"]): {"key": a["key"], "sha256": a["files"][layout.layer_file(a["layer"])]}
                           for a in absorbs},
                "export": {"key": key},
            },
            "model": model_files,
            "versions": versions(),
        }
        files = {f"{layout.MODEL}/{name}": sha for name, sha in model_files.items()}
        files[f"{layout.MODEL}/{layout.LINEAGE}"] = run.write_json(f"{layout.MODEL}/{layout.LINEAGE}", lineage)
        files[layout.LINEAGE] = run.write_json(layout.LINEAGE, lineage)
        return {"files": files, "model_dir": run.uri(layout.MODEL), "model_sha256": model_files["model.safetensors"],
                "parameters_before": report["parameters_before"], "parameters_after": report["parameters_after"],
                "parameter_ratio": report["parameter_ratio"], "widths": list(widths)}

    return run_stage(run, "export", None, key, compute)


def _point_info(run: RunDir, solve: dict) -> dict:
    record = run.read_json(layout.basis_meta_file(solve["point"])) or {}
    info = dict(record.get("info", {}))
    info.pop("targets", None)
    info.pop("seconds", None)
    info.pop("device", None)
    return info


@task(name="evaluate", task_run_name="evaluate-{target}", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
                  ctx: int = 256, max_windows: int | None = 100, batch_size: int = 4, progress: bool = True) -> dict:
    """WikiText-2 test perplexity of the exported model (``target="model"``, stored in ``eval/ppl.json``) or of
    the source model (``target="source"``, ``eval/ppl_source.json``), with the same protocol."""
    from dotresize.data import load_text, tokenize

    run = RunDir(run_url)
    text = load_text("wikitext2-test")
    digest = export["model_sha256"] if target == "model" else source["digest"]
    key = stage_key("evaluate", target=target, model=digest, ctx=ctx, max_windows=max_windows, text=text.sha256)
    rel = f"{layout.EVAL}/ppl.json" if target == "model" else f"{layout.EVAL}/ppl_source.json"

    def compute() -> dict:
        from dotresize.evaluation.perplexity import perplexity

        model, tokenizer = _load_for_eval(run, target, source)
        result = perplexity(model, tokenize(tokenizer, text.text), ctx=ctx, max_windows=max_windows or None,
                            batch_size=batch_size, progress=progress)
        result["dataset"] = text.meta()
        result["model_digest"] = digest
        return {"files": {rel: run.write_json(rel, result)}, "ppl": result}

    return run_stage(run, "evaluate", target, key, compute)


def _load_for_eval(run: RunDir, target: str, source: dict | None):
    from transformers import AutoTokenizer

    from dotresize import load_compressed
    from dotresize.sources import load_model

    if target == "source":
        from .prepare import check_source

        src, _ = check_source(source["spec"], source)
        return load_model(src, check_architecture=False)
    with run.local_copy(layout.MODEL) as directory:
        return load_compressed(directory), AutoTokenizer.from_pretrained(directory)


__all__ = ["absorb_task", "export_task", "evaluate_task", "versions"]
