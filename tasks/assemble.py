"""Absorb the bases into the weights (one layer per task), export the HF directory, evaluate it.

Each absorb task reads one layer of the source, fuses it, absorbs its bases and writes the compressed layer,
in the export's dtype and with its final names, as ``layers/layer_<l>.safetensors``: that file is a shard of the
exported model. The export writes the embeddings and head (a chunk of rows at a time) as one more shard, links
the layer files into the model directory (a hard link on local disks: nothing is stored twice), and writes the
shard index, config, tokenizer and modeling code.
"""

from __future__ import annotations

import json
import math
import platform
import threading
from importlib.metadata import PackageNotFoundError, version
from types import SimpleNamespace

from dotresize import surgery
from dotresize.mlp.model import with_reduced_mlp
from dotresize.evaluation.precision import DEFAULT_EVAL_DTYPE, precision_label
from storage import RunDir, load_basis
from storage import rundir as layout
from storage.errors import CorruptArtifactError

from .cache import stage_task
from .common import (Probe, basis_from, config_of, export_dtype, manifest_probe, pause_point, release_memory,
                     run_probed, stage_key, streamed_model)
from .mlp import load_reduction

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


def _bases(run: RunDir, solves: list[dict], inspect: dict) -> list:
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
    from .common import compute_device

    key = stage_key("absorb", inspect=inspect["key"], layer=layer, bases=[b["key"] for b in bases],
                    layout=layout_name, dtype=str(export_dtype(dtype, inspect)), device=compute_device(device),
                    **({"mlp": mlp["key"]} if mlp else {}))
    return manifest_probe(RunDir(run_url), "absorb", str(layer), key)


@stage_task(absorb_probe, name="absorb", task_run_name="absorb-{layer}")
def absorb_task(run_url: str, layer: int, source: dict, inspect: dict, bases: list[dict], layout_name: str,
                dtype: str | None = None, device: str | None = None, mlp: dict | None = None) -> dict:
    """The compressed tensors of one layer: per-point bases (2l, 2l+1, 2l+2) or the global basis (none: the
    residual stream is left as it is), after the layer's MLP reduction ``mlp`` (MLP axis)."""
    from .common import compute_device

    probe = absorb_probe(run_url, layer, inspect, bases, layout_name, dtype, device, mlp)
    run = probe.run
    device = compute_device(device)
    out_dtype = export_dtype(dtype, inspect)

    def compute() -> dict:
        model = streamed_model(source, inspect, device)
        loaded = _bases(run, bases, inspect)
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


def export_key(inspect: dict, recipe: dict, widths: list[int], ends: list[dict], absorbs: list[dict],
               dtype: str) -> str:
    return stage_key("export", inspect=inspect["key"], config=recipe["config"], widths=list(widths),
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
    return manifest_probe(RunDir(run_url), "export", None, key)


@stage_task(export_probe, name="export")
def export_task(run_url: str, run_key: str, recipe: dict, source: dict, calibration: dict, inspect: dict,
                widths: list[int], captures: list[dict], bases: list[dict], absorbs: list[dict],
                dtype: str | None = None, device: str | None = None, mlps: list[dict] | None = None) -> dict:
    """The compressed model under model/: the layer files as shards, the ends as one more, the index, config,
    tokenizer and modeling code; and lineage.json. ``mlps``: the layers' MLP reductions (MLP axis)."""
    from dotresize.api import compressed_config, export_layout, is_stock

    from dotresize.shards import weights_file, write_index, write_model_files

    from .common import compute_device
    from .prepare import load_inspected

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
        parts = surgery.ends(model, _bases(run, ends, inspect), layout_name, out_dtype,
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
                              extra_json={"compression_report.json": report, "source.json": source,
                                          "calibration.json": calibration.get("meta", {})})
            weights = weights_file(directory)
        model_files = run.file_digests(layout.MODEL)
        lineage = {
            "lineage_version": 1,
            "run_key": run_key,
            "recipe": recipe,
            "source": source,
            "calibration": calibration.get("meta", {}),
            "stages": {
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
            "model": model_files,
            "weights_file": weights,
            "versions": versions(),
        }
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



def eval_file(kind: str, target: str = "model") -> str:
    """``eval/ppl.json``, ``eval/lm_eval_source.json``, ...: where an evaluation of ``target`` is stored."""
    return layout.eval_file(kind, target)


def _precision_key(label: str) -> dict:
    """Key part for an evaluation precision label; empty for float32 so earlier float32 results stay valid."""
    return {} if label == DEFAULT_EVAL_DTYPE else {"dtype": label}


def _eval_digest(target: str, export: dict | None, source: dict | None) -> str:
    return export["model_sha256"] if target == "model" else source["digest"]


def _ppl_key(target: str, digest: str, ctx: int, max_windows: int | None, text_sha256: str, label: str) -> str:
    return stage_key("evaluate", target=target, model=digest, ctx=ctx, max_windows=max_windows, text=text_sha256,
                     **_precision_key(label))


def evaluate_probe(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
                   ctx: int = 256, max_windows: int | None = 100, dtype: str = "float32", float32_head: bool = False,
                   **_) -> Probe:
    from dotresize.data import load_text

    key = _ppl_key(target, _eval_digest(target, export, source), ctx, max_windows, load_text("wikitext2-test").sha256,
                   precision_label(dtype, float32_head))
    return manifest_probe(RunDir(run_url), "evaluate", target, key)


@stage_task(evaluate_probe, name="evaluate", task_run_name="evaluate-{target}")
def evaluate_task(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
                  ctx: int = 256, max_windows: int | None = 100, batch_size: int = 4, progress: bool = True,
                  dtype: str = "float32", float32_head: bool = False) -> dict:
    """WikiText-2 test perplexity of the exported model (``target="model"``, stored in ``eval/ppl.json``) or of
    the source model (``target="source"``, ``eval/ppl_source.json``), with the same protocol; ``dtype`` is the
    evaluation precision (:mod:`dotresize.evaluation.precision`), part of the key when not float32."""
    from dotresize.data import load_text, tokenize

    run = RunDir(run_url)
    text = load_text("wikitext2-test")
    digest = _eval_digest(target, export, source)
    label = precision_label(dtype, float32_head)
    probe = manifest_probe(run, "evaluate", target, _ppl_key(target, digest, ctx, max_windows, text.sha256, label))
    rel = eval_file("ppl", target)

    def compute() -> dict:
        from dotresize.evaluation.perplexity import perplexity

        model, tokenizer = eval_model(run, target, source, digest, dtype, float32_head)
        result = perplexity(model, tokenize(tokenizer, text.text), ctx=ctx, max_windows=max_windows or None,
                            batch_size=batch_size, progress=progress)
        result["dataset"] = text.meta()
        result["model_digest"] = digest
        result["dtype"] = label
        return {"files": {rel: run.write_json(rel, result)}, "ppl": result}

    return run_probed(probe, compute)


def _zero_shot_plan(run_url: str, tasks: list[str], export: dict | None, source: dict | None, target: str,
                    limit: int | None, data_dir: str | None, dtype: str, float32_head: bool) -> SimpleNamespace:
    """What a zero-shot evaluation's key is made of: every task's key (the model's sha256, the task, its config
    hash, ``limit``, the lm-eval version, the precision), and the stage's probe."""
    from dotresize.evaluation import zeroshot

    digest = _eval_digest(target, export, source)
    names = list(dict.fromkeys(tasks))
    local = [n for n in names if n in zeroshot.LOCAL_TASKS]
    root = data_dir or (str(zeroshot.default_data_dir()) if local else None)
    lm_version = zeroshot.lm_eval_version()
    task_hashes = {n: zeroshot.task_config_hash([n], root) for n in names}
    label = precision_label(dtype, float32_head)
    task_keys = {n: stage_key("evaluate", kind="lm_eval_task", target=target, model=digest, task=n,
                              task_config_hash=task_hashes[n], limit=limit, lm_eval=lm_version,
                              num_fewshot=zeroshot.NUM_FEWSHOT, **_precision_key(label))
                 for n in names}
    key = stage_key("evaluate", kind="lm_eval", target=target, tasks=sorted(task_keys.values()))
    name = "lm_eval" if target == "model" else "lm_eval_source"
    return SimpleNamespace(digest=digest, names=names, root=root, lm_version=lm_version, task_hashes=task_hashes,
                           label=label, task_keys=task_keys,
                           probe=manifest_probe(RunDir(run_url), "evaluate", name, key))


def zero_shot_probe(run_url: str, tasks: list[str], export: dict | None = None, source: dict | None = None,
                    target: str = "model", limit: int | None = None, data_dir: str | None = None,
                    dtype: str = "float32", float32_head: bool = False, **_) -> Probe:
    return _zero_shot_plan(run_url, tasks, export, source, target, limit, data_dir, dtype, float32_head).probe


@stage_task(zero_shot_probe, name="evaluate-zero-shot", task_run_name="zero-shot-{target}")
def zero_shot_task(run_url: str, tasks: list[str], export: dict | None = None, source: dict | None = None,
                   target: str = "model", limit: int | None = None, batch_size: int = 4,
                   data_dir: str | None = None, progress: bool = True, dtype: str = "float32",
                   float32_head: bool = False) -> dict:
    """Zero-shot accuracy (lm-eval ``simple_evaluate`` on an in-memory model, the project's offline task
    definitions) of the exported model (``eval/lm_eval.json``) or of the source (``eval/lm_eval_source.json``).

    Every task's result is keyed by the model's sha256, the task, its config hash (definitions + its data files),
    ``limit`` and the lm-eval version, and the file accumulates tasks: a task already there with its key is read
    back, the others are evaluated and merged in (so tasks can be run one at a time, and a killed evaluation
    keeps the tasks it finished). Returns the results of ``tasks`` only."""
    from dotresize.evaluation import zeroshot

    plan = _zero_shot_plan(run_url, tasks, export, source, target, limit, data_dir, dtype, float32_head)
    probe = plan.probe
    run, digest, names, root, lm_version = probe.run, plan.digest, plan.names, plan.root, plan.lm_version
    task_hashes, label, task_keys = plan.task_hashes, plan.label, plan.task_keys
    rel = eval_file("lm_eval", target)

    def compute() -> dict:
        import time

        stored = run.read_json(rel) or {}
        entries = dict(stored.get("tasks", {})) if stored.get("model_digest") == digest else {}
        todo = [n for n in names if entries.get(n, {}).get("key") != task_keys[n]]
        started = time.perf_counter()
        if todo:
            model, tokenizer = eval_model(run, target, source, digest, dtype, float32_head)
            fresh = zeroshot.evaluate_zero_shot(model, tokenizer, todo, limit=limit, batch_size=batch_size,
                                                data_dir=root, progress=progress)
            seconds = round(time.perf_counter() - started, 3)
            for n in todo:
                entries[n] = {**fresh["tasks"][n], "key": task_keys[n], "limit": limit,
                              "task_config_hash": task_hashes[n], "lm_eval_version": fresh["lm_eval_version"],
                              "seconds_of_run": seconds, "batch_size": batch_size,
                              "dtype": label}
        limits = {json.dumps(e.get("limit")) for e in entries.values()}
        whole = {"tasks": entries, "model_digest": digest, "data_dir": root, "num_fewshot": zeroshot.NUM_FEWSHOT,
                 "lm_eval_version": lm_version, "limit": limit if len(limits) == 1 else "per task",
                 "task_config_hash": zeroshot.task_config_hash(list(entries), root)}
        result = {"tasks": {n: entries[n] for n in names}, "lm_eval_version": lm_version, "limit": limit,
                  "task_config_hash": zeroshot.task_config_hash(names, root), "num_fewshot": zeroshot.NUM_FEWSHOT,
                  "model_digest": digest, "data_dir": root, "batch_size": batch_size, "evaluated": todo,
                  "dtype": label,
                  "read_back": [n for n in names if n not in todo],
                  "seconds": round(time.perf_counter() - started, 3)}
        return {"files": {rel: run.write_json(rel, whole)}, "zero_shot": result}

    return run_probed(probe, compute)


def speed_probe(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
                batch: int = 8, ctx: int = 256, repeats: int = 3, prompt: int = 64, new_tokens: int = 32,
                threads: int | None = None, **_) -> Probe:
    import torch

    key = stage_key("evaluate", kind="speed", target=target, model=_eval_digest(target, export, source), batch=batch,
                    ctx=ctx, repeats=repeats, prompt=prompt, new_tokens=new_tokens,
                    threads=threads or torch.get_num_threads(), torch=torch.__version__, host=platform.node(),
                    cpu=platform.processor())
    return manifest_probe(RunDir(run_url), "evaluate", "speed" if target == "model" else "speed_source", key)


@stage_task(speed_probe, name="evaluate-speed", task_run_name="speed-{target}")
def speed_task(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
               batch: int = 8, ctx: int = 256, repeats: int = 3, prompt: int = 64, new_tokens: int = 32,
               threads: int | None = None) -> dict:
    """Measured batched-forward tokens/s and per-token generation latency (``eval/speed.json``), keyed by the
    model, the shapes, the thread count and the torch version (a repeated sweep reuses its measurement)."""
    import torch

    from dotresize import count_parameters
    from dotresize.evaluation.speed import forward_throughput, generation_latency

    threads = threads or torch.get_num_threads()
    probe = speed_probe(run_url, export, source, target, batch, ctx, repeats, prompt, new_tokens, threads)
    run = probe.run
    digest = _eval_digest(target, export, source)
    rel = eval_file("speed", target)

    def compute() -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model, _ = eval_model(run, target, source, digest)
            result = {
                "parameters": count_parameters(model),
                "forward": forward_throughput(model, batch=batch, ctx=ctx, repeats=repeats),
                "generation": generation_latency(model, prompt=prompt, new_tokens=new_tokens,
                                                 repeats=max(1, repeats // 2)),
                "threads": threads, "device": str(next(model.parameters()).device), "model_digest": digest,
            }
        finally:
            torch.set_num_threads(before)
        result["tokens_per_second"] = result["forward"]["tokens_per_second"]
        result["ms_per_token"] = 1000 * result["generation"]["seconds_per_token"]
        return {"files": {rel: run.write_json(rel, result)}, "speed": result}

    return run_probed(probe, compute)


# one evaluated model per process: the perplexity, zero-shot and speed tasks of one model share it
_EVAL_MODEL: dict[tuple, tuple] = {}
_EVAL_LOCK = threading.Lock()


def eval_model(run: RunDir, target: str, source: dict | None, digest: str, dtype: str = "float32",
               float32_head: bool = False):
    """(model, tokenizer) of ``target`` in the evaluation precision ``dtype``, loaded once per process and kept
    until another model (or precision) is asked for."""
    from dotresize.evaluation.precision import set_evaluation_precision

    cache_key = (run.url, target, digest, precision_label(dtype, float32_head))
    with _EVAL_LOCK:
        if cache_key not in _EVAL_MODEL:
            _EVAL_MODEL.clear()
            model, tokenizer = _load_for_eval(run, target, source)
            set_evaluation_precision(model, dtype, float32_head)
            _EVAL_MODEL[cache_key] = (model, tokenizer)
        return _EVAL_MODEL[cache_key]


def release_eval_model() -> None:
    """Drop the cached evaluation model (its memory is freed once no caller holds it)."""
    with _EVAL_LOCK:
        _EVAL_MODEL.clear()


def _load_for_eval(run: RunDir, target: str, source: dict | None):
    from transformers import AutoTokenizer

    from dotresize import load_compressed
    from dotresize.sources import load_model, resolve_source

    if target == "source":
        from .prepare import check_source

        src, _ = check_source(source["spec"], source)
        return load_model(src, check_architecture=False)
    if run.is_local:  # read in place: a model larger than memory is evaluated with its layers offloaded
        return load_model(resolve_source(str(run.local_path(layout.MODEL))), check_architecture=False)
    with run.local_copy(layout.MODEL) as directory:
        return load_compressed(directory), AutoTokenizer.from_pretrained(directory)


__all__ = ["absorb_task", "export_task", "evaluate_task", "zero_shot_task", "speed_task", "eval_file", "eval_model",
           "release_eval_model", "versions"]
