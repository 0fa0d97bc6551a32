"""``dotresize evaluate``: perplexity and zero-shot accuracy of any model, stored in its run when it has one.

A run directory (or its ``model/`` directory) is evaluated through the pipeline's evaluate stage
(:func:`tasks.evaluate.evaluate_task` / :func:`tasks.evaluate.zero_shot_task`, called in this process): the results
go to ``<run>/eval/ppl.json`` and ``<run>/eval/lm_eval.json`` under content keys (a repeated evaluation is read
back), and to the MLflow run of the compression (``--mlflow-run ID``, default the run in ``<run>/mlflow.json``),
which links them to the registered model version. Any other source (the packaged model, a GGUF file, a plain HF
directory) is evaluated in memory with the same protocol; ``--mlflow-run`` logs it to that run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from storage import rundir as layout
from storage.rundir import run_dir_of  # the run directory of a path (or of the model/ inside one), else None

log = logging.getLogger("dotresize")


def _export_manifest(run_dir: Path) -> dict:
    """The export stage's manifest (its ``model_sha256`` keys the evaluations), else the weights' digest."""
    from storage import RunDir, read_manifest

    run = RunDir(str(run_dir))
    export = read_manifest(run, "export")
    if export and export.get("model_sha256") and export.get("complete", True):
        return export
    from dotresize.shards import model_digest, weights_file

    model_dir = run.local_path(layout.MODEL)
    return {"model_sha256": model_digest(model_dir), "weights_file": weights_file(model_dir)}


def _precision_args(args) -> dict:
    """``dtype`` / ``float32_head`` of the evaluate arguments (float32 when absent)."""
    dtype = getattr(args, "dtype", None) or "float32"
    head = bool(getattr(args, "float32_head", False))
    if head and dtype == "float32":
        raise ValueError("--float32-head only applies with --dtype bfloat16 or float16")
    return {"dtype": dtype, "float32_head": head}


def _tasks(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def evaluate_command(args, usage_error: type[Exception]) -> dict:
    """The ``evaluate`` subcommand (arguments from :mod:`flows.cli`)."""
    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise usage_error(f"--data-dir {args.data_dir} is not a directory: pass the directory holding "
                              "wikitext-2/ and tasks/")
        os.environ["DOTRESIZE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    tasks = _tasks(args.tasks)
    run_dir = run_dir_of(args.model)
    try:
        if run_dir is not None:
            result = _evaluate_run(run_dir, args, tasks)
        else:
            result = _evaluate_source(args, tasks)
    except (ValueError, FileNotFoundError) as error:
        from dotresize.errors import DotResizeError

        if isinstance(error, DotResizeError):
            raise
        raise usage_error(str(error).splitlines()[0]) from None
    result["mlflow"] = None if args.no_mlflow else _log(result, run_dir, args.mlflow_run)
    if not args.json:
        print_evaluation(result)
    return result


def _evaluate_run(run_dir: Path, args, tasks: list[str]) -> dict:
    from tasks.evaluate import evaluate_task, release_eval_model, zero_shot_task

    export = _export_manifest(run_dir)
    progress = not args.quiet
    from dotresize.shards import SINGLE_FILE

    result: dict = {"model": str(layout.at(run_dir, layout.MODEL)), "run_dir": str(run_dir),
                    "weights_sha256": {export.get("weights_file", SINGLE_FILE): export["model_sha256"]},
                    "reused": {}}
    precision = _precision_args(args)
    try:
        if args.ppl or not tasks:
            manifest = evaluate_task.fn(str(run_dir), export=export, ctx=args.ctx,
                                        max_windows=args.max_windows, batch_size=args.batch_size, progress=progress,
                                        **precision)
            result["ppl"], result["reused"]["ppl"] = manifest["ppl"], manifest["reused"]
        if tasks:
            manifest = zero_shot_task.fn(str(run_dir), tasks, export=export, limit=args.limit,
                                         batch_size=args.batch_size, progress=progress, **precision)
            result["zero_shot"], result["reused"]["zero_shot"] = manifest["zero_shot"], manifest["reused"]
    finally:
        release_eval_model()
    result["eval_files"] = sorted(str(p) for p in layout.at(run_dir, layout.EVAL).glob("*.json"))
    return result


def _evaluate_source(args, tasks: list[str]) -> dict:
    from dotresize.evaluation.perplexity import wikitext2_perplexity
    from dotresize.evaluation.precision import set_evaluation_precision
    from dotresize.sources import load_model, resolve_source

    source = resolve_source(args.model)
    model, tokenizer = load_model(source, check_architecture=False)
    precision = set_evaluation_precision(model, **_precision_args(args))
    result: dict = {"model": args.model or source.spec, "weights_sha256": source.digests(), "dtype": precision}
    if args.ppl or not tasks:
        ppl = wikitext2_perplexity(model, tokenizer, ctx=args.ctx, max_windows=args.max_windows,
                                   batch_size=args.batch_size, progress=not args.quiet)
        result["ppl"] = {**ppl, "dtype": precision}
    if tasks:
        from dotresize.evaluation.zeroshot import evaluate_zero_shot

        result["zero_shot"] = evaluate_zero_shot(model, tokenizer, tasks, limit=args.limit,
                                                 batch_size=args.batch_size, progress=not args.quiet)
        result["zero_shot"]["dtype"] = precision
    return result


def _log(result: dict, run_dir: Path | None, run_id: str | None) -> dict | None:
    """Log to MLflow: the run's own MLflow run (or ``run_id``); a source outside a run only with ``run_id``."""
    from .eval_logging import log_run_evaluation, recorded_run

    if run_dir is None and not run_id:
        return None
    if run_dir is not None and not run_id and recorded_run(run_dir) is None:
        log.info("%s has no %s: nothing logged to MLflow (pass --mlflow-run ID)", run_dir, layout.MLFLOW)
        return None
    logged = log_run_evaluation(run_dir, run_id=run_id, ppl=result.get("ppl"), zero_shot=result.get("zero_shot"))
    if logged:
        log.info("logged %d metrics to MLflow run %s (%s)", logged["metrics"], logged["run_id"],
                 logged["tracking_uri"])
    return logged


def _precision_note(result: dict) -> str:
    """``", in bfloat16"`` for a reduced-precision result, nothing for float32."""
    label = result.get("dtype") or "float32"
    return "" if label == "float32" else f", in {label}"


def print_evaluation(result: dict) -> None:
    name = result["model"]
    if "ppl" in result:
        r = result["ppl"]
        print(f"{name}: WikiText-2 perplexity {r['ppl']:.3f} (ctx {r['ctx']}, {r['windows']} windows, "
              f"{r['tokens']} tokens{_precision_note(r)})")
    zero_shot = result.get("zero_shot")
    if zero_shot:
        limit = f"first {zero_shot['limit']} examples" if zero_shot.get("limit") else "full sets"
        print(f"{name}: zero-shot ({limit}; lm-eval {zero_shot['lm_eval_version']}, task config "
              f"{zero_shot['task_config_hash'][:16]}{_precision_note(zero_shot)})")
        for task, metrics in zero_shot["tasks"].items():
            shown = []
            for key in ("acc", "acc_norm", "perplexity"):
                value = metrics.get(key)
                if value is None:
                    continue
                stderr = metrics.get(f"{key}_stderr")
                shown.append(f"{key} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
            print(f"  {task:<14} {', '.join(shown)} (n={metrics.get('n')})")
    if result.get("run_dir"):
        print(f"  results in {layout.at(result['run_dir'], layout.EVAL)}/")
    if result.get("mlflow"):
        print(f"  logged to MLflow run {result['mlflow']['run_id']} ({result['mlflow']['tracking_uri']})")


def record_bench(model: str, result: dict) -> dict | None:
    """``bench`` on a run's model: write ``eval/bench.json`` into the run and log it to its MLflow run."""
    run_dir = run_dir_of(model)
    if run_dir is None:
        return None
    from storage import RunDir

    from .eval_logging import log_run_evaluation

    RunDir(str(run_dir)).write_json(layout.eval_file("bench"), result)
    return log_run_evaluation(run_dir, bench=result)


__all__ = ["evaluate_command", "run_dir_of", "print_evaluation", "record_bench"]
