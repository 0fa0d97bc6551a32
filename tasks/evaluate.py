"""The evaluate stage: WikiText-2 perplexity, lm-eval zero-shot accuracy and measured speed, of the exported
model or of its source. Each result is keyed by what it was measured on (the model's sha256, the protocol, the
precision) and stored under ``eval/``; the three tasks of one model share one loaded copy per process.
"""

from __future__ import annotations

import json
import platform
import threading
from types import SimpleNamespace

from dotresize.evaluation.precision import DEFAULT_EVAL_DTYPE, precision_label
from storage import RunDir
from storage import rundir as layout

from .cache import stage_task
from .common import Probe, manifest_probe, run_probed, stage_key

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "evaluate"


def _precision_key(label: str) -> dict:
    """Key part for an evaluation precision label; empty for float32 so earlier float32 results stay valid."""
    return {} if label == DEFAULT_EVAL_DTYPE else {"dtype": label}


def _eval_digest(target: str, export: dict | None, source: dict | None) -> str:
    return export["model_sha256"] if target == "model" else source["digest"]


def _ppl_key(target: str, digest: str, ctx: int, max_windows: int | None, text_sha256: str, label: str) -> str:
    return stage_key(NAME, target=target, model=digest, ctx=ctx, max_windows=max_windows, text=text_sha256,
                     **_precision_key(label))


def evaluate_probe(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
                   ctx: int = 256, max_windows: int | None = 100, dtype: str = "float32", float32_head: bool = False,
                   **_) -> Probe:
    from dotresize.data import load_text

    key = _ppl_key(target, _eval_digest(target, export, source), ctx, max_windows, load_text("wikitext2-test").sha256,
                   precision_label(dtype, float32_head))
    return manifest_probe(RunDir(run_url), NAME, target, key)


@stage_task(evaluate_probe, name=NAME, task_run_name="evaluate-{target}")
def evaluate_task(run_url: str, export: dict | None = None, source: dict | None = None, target: str = "model",
                  ctx: int = 256, max_windows: int | None = 100, batch_size: int = 4, progress: bool = True,
                  dtype: str = "float32", float32_head: bool = False) -> dict:
    """WikiText-2 test perplexity of the exported model (``target="model"``, stored in ``eval/ppl.json``) or of
    the source model (``target="source"``, ``eval/ppl_source.json``), with the same protocol; ``dtype`` is the
    evaluation precision (:mod:`dotresize.evaluation.precision`), part of the key when not float32."""
    from dotresize.data import load_text

    run = RunDir(run_url)
    text = load_text("wikitext2-test")
    digest = _eval_digest(target, export, source)
    label = precision_label(dtype, float32_head)
    probe = manifest_probe(run, NAME, target, _ppl_key(target, digest, ctx, max_windows, text.sha256, label))
    rel = layout.eval_file("ppl", target)

    def compute() -> dict:
        from dotresize.evaluation.perplexity import wikitext2_perplexity

        model, tokenizer = eval_model(run, target, source, digest, dtype, float32_head)
        result = wikitext2_perplexity(model, tokenizer, ctx=ctx, max_windows=max_windows, batch_size=batch_size,
                                      progress=progress, text=text)  # the text the key names
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
    task_keys = {n: stage_key(NAME, kind="lm_eval_task", target=target, model=digest, task=n,
                              task_config_hash=task_hashes[n], limit=limit, lm_eval=lm_version,
                              num_fewshot=zeroshot.NUM_FEWSHOT, **_precision_key(label))
                 for n in names}
    key = stage_key(NAME, kind="lm_eval", target=target, tasks=sorted(task_keys.values()))
    name = "lm_eval" if target == "model" else "lm_eval_source"
    return SimpleNamespace(digest=digest, names=names, root=root, lm_version=lm_version, task_hashes=task_hashes,
                           label=label, task_keys=task_keys,
                           probe=manifest_probe(RunDir(run_url), NAME, name, key))


def zero_shot_probe(run_url: str, tasks: list[str], export: dict | None = None, source: dict | None = None,
                    target: str = "model", limit: int | None = None, data_dir: str | None = None,
                    dtype: str = "float32", float32_head: bool = False, **_) -> Probe:
    return _zero_shot_plan(run_url, tasks, export, source, target, limit, data_dir, dtype, float32_head).probe


@stage_task(zero_shot_probe, name=NAME, task_run_name="zero-shot-{target}")
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
    rel = layout.eval_file("lm_eval", target)

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

    key = stage_key(NAME, kind="speed", target=target, model=_eval_digest(target, export, source), batch=batch,
                    ctx=ctx, repeats=repeats, prompt=prompt, new_tokens=new_tokens,
                    threads=threads or torch.get_num_threads(), torch=torch.__version__, host=platform.node(),
                    cpu=platform.processor())
    return manifest_probe(RunDir(run_url), NAME, "speed" if target == "model" else "speed_source", key)


@stage_task(speed_probe, name=NAME, task_run_name="speed-{target}")
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
    rel = layout.eval_file("speed", target)

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
        from .source import check_source

        src, _ = check_source(source["spec"], source)
        return load_model(src, check_architecture=False)
    if run.is_local:  # read in place: a model larger than memory is evaluated with its layers offloaded
        return load_model(resolve_source(str(run.local_path(layout.MODEL))), check_architecture=False)
    with run.local_copy(layout.MODEL) as directory:
        return load_compressed(directory), AutoTokenizer.from_pretrained(directory)


__all__ = ["evaluate_task", "zero_shot_task", "speed_task", "eval_model", "release_eval_model"]
