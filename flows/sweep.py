"""``dotresize sweep``: compress and evaluate a grid of methods x ratios through the pipeline, then report.

Every cell is one run of :func:`flows.compress.run_compress` in its own run directory
(``<sweep>/runs/<method>-<ratio>/``), with the pipeline's evaluate stage (WikiText-2 perplexity, optional zero-shot
tasks) and a measured speed (``eval/speed.json``): a repeated sweep reuses every completed stage, evaluation and
measurement, and a killed one resumes. The dense baseline is the source model evaluated with the same protocol
(``<sweep>/dense/eval/``). The report (``report.md``: a Markdown table and PNG plots, one line per method, plus
``table.json``) is logged as the artifacts of one MLflow run of the sweep, with every number as a metric
(``ppl/dot/0.2``, ``acc/piqa/pca/0.1``, ``tokens_per_second/dense``, ...); each cell also has its own compression
run with its registered model version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dotresize.evaluation.protocol import MeasurementProtocol
from storage import rundir as layout

log = logging.getLogger("dotresize")

SWEEP_RECORD = "sweep.json"


@dataclass(frozen=True)
class SweepSpec(MeasurementProtocol):
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    methods: tuple[str, ...] = ("dot", "pca", "prune")
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    calib_data: str = "wikitext2"
    speed: bool = True
    speed_batch: int = 8
    speed_ctx: int | None = None          # default: ctx
    speed_repeats: int = 3
    mode: str = "parallel"
    layout: str = "per-point"
    overrides: dict = field(default_factory=dict)
    mlflow: bool = True
    workers: int | None = None
    eval_dtype: str = "float32"           # precision of perplexity and zero-shot (speed is timed in float32)
    mlp_ratios: tuple[float, ...] = (0.0,)  # the MLP axis: every residual cell at every MLP ratio
    mlp_method: str | None = None         # None: the config's default (lsq)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ratios"], data["methods"], data["tasks"] = list(self.ratios), list(self.methods), list(self.tasks)
        data["mlp_ratios"] = list(self.mlp_ratios)
        if self.mlp_ratios == (0.0,) and self.mlp_method is None:  # a sweep without the axis keeps its old record
            data.pop("mlp_ratios")
            data.pop("mlp_method")
        return data

    def cells(self) -> list[tuple[str, float, float]]:
        """(method, ratio, mlp ratio) of every cell; ratio 0 (the residual stream untouched) is one ``mlp`` cell
        per MLP ratio, whatever the methods."""
        out = []
        for mlp_ratio in self.mlp_ratios:
            for method in self.methods:
                for ratio in self.ratios:
                    if ratio == 0 and (mlp_ratio == 0 or ("mlp", 0.0, mlp_ratio) in out):
                        continue
                    out.append(("mlp" if ratio == 0 else method, ratio, mlp_ratio))
        return out


def cell_name(method: str, ratio: float, mlp_ratio: float = 0.0) -> str:
    return f"{method}-{ratio:g}" + (f"-mlp{mlp_ratio:g}" if mlp_ratio else "")


def metric_suffix(cell: dict) -> str:
    """``dot/0.2`` (``dot/0.2/mlp0.3``) for a compressed cell, ``dense`` for the baseline."""
    if cell["method"] == "dense":
        return "dense"
    mlp = cell.get("mlp_ratio") or 0.0
    return f"{cell['method']}/{cell['ratio']:g}" + (f"/mlp{mlp:g}" if mlp else "")


def _speed(run_dir: Path, spec: SweepSpec, *, export: dict | None = None, source: dict | None = None,
           target: str = "model") -> dict:
    from tasks.evaluate import speed_task

    manifest = speed_task.fn(str(run_dir), export=export, source=source, target=target, batch=spec.speed_batch,
                             ctx=spec.speed_ctx or spec.ctx, repeats=spec.speed_repeats)
    return manifest["speed"]


def _cell_overrides(spec: SweepSpec, mlp_ratio: float) -> dict:
    overrides = dict(spec.overrides)
    if mlp_ratio:
        overrides["mlp_ratio"] = mlp_ratio
        if spec.mlp_method:
            overrides["mlp"] = {**overrides.get("mlp", {}), "method": spec.mlp_method}
    return overrides


def _compress_cell(spec: SweepSpec, out: Path, method: str, ratio: float, progress: bool,
                   mlp_ratio: float = 0.0) -> dict:
    from tasks.evaluate import release_eval_model

    from .compress import run_compress

    run_dir = out / "runs" / cell_name(method, ratio, mlp_ratio)
    log.info("sweep cell %s at %g (MLP ratio %g): %s", method, ratio, mlp_ratio, run_dir)
    result = run_compress(
        model=spec.model, ratio=ratio, method=spec.methods[0] if method == "mlp" else method, mode=spec.mode,
        layout=spec.layout, calib_data=spec.calib_data,
        calib_samples=spec.calib_samples, calib_seqlen=spec.calib_seqlen, seed=spec.seed, run_dir=str(run_dir),
        config_overrides=_cell_overrides(spec, mlp_ratio), n_workers=spec.workers, mlflow=spec.mlflow,
        progress=progress,
        ppl=True, ppl_ctx=spec.ctx, ppl_max_windows=spec.max_windows, tasks=list(spec.tasks), limit=spec.limit,
        eval_dtype=spec.eval_dtype)
    stages = result["stages"]
    cell = {
        "method": method, "ratio": ratio, "mlp_ratio": mlp_ratio,
        "mlp_width": min(result["mlp_widths"]) if result.get("mlp_widths") else None,
        "width": min(result["widths"]), "widths": result["widths"],
        "parameters": result["parameters_after"], "parameters_before": result["parameters_before"],
        "ppl": result["ppl"]["ppl"], "ppl_result": result["ppl"], "zero_shot": result.get("zero_shot"),
        "compress_seconds": round(sum(v for k, v in result["stage_seconds"].items() if k != "evaluate"), 1),
        "run_dir": result["run_dir"], "model_sha256": result["model_sha256"], "source": result["source"],
        "mlflow_run_id": result.get("mlflow_run_id"), "registered_model": result.get("registered_model"),
        "model_version": result.get("model_version"),
        "stages_computed": sum(len(v["computed"]) for v in stages.values()),
        "stages_reused": sum(len(v["reused"]) for v in stages.values()),
    }
    if spec.speed:
        speed = _speed(run_dir, spec, export={"model_sha256": result["model_sha256"]})
        cell.update(tokens_per_second=speed["tokens_per_second"], ms_per_token=speed["ms_per_token"])
        if spec.mlflow and result.get("mlflow_run_id"):
            from .eval_logging import log_run_evaluation

            log_run_evaluation(run_dir, run_id=result["mlflow_run_id"], tracking_uri=result["mlflow_tracking_uri"],
                               speed=speed)
    release_eval_model()
    return cell


def _dense_cell(spec: SweepSpec, out: Path, source: dict, first: dict, progress: bool) -> dict:
    """The source model with the same protocol, stored (and reused) under ``<sweep>/dense/eval/``."""
    from tasks.evaluate import evaluate_task, release_eval_model, zero_shot_task

    dense_dir = out / "dense"
    dense_dir.mkdir(parents=True, exist_ok=True)
    report = json.loads((Path(first["run_dir"]) / layout.MODEL / "compression_report.json").read_text())
    try:
        ppl = evaluate_task.fn(str(dense_dir), source=source, target="source", ctx=spec.ctx,
                               max_windows=spec.max_windows, progress=progress, dtype=spec.eval_dtype)["ppl"]
        cell = {"method": "dense", "ratio": 0.0, "width": int(report["hidden_size"]),
                "parameters": first["parameters_before"], "ppl": ppl["ppl"], "ppl_result": ppl,
                "compress_seconds": 0.0, "run_dir": str(dense_dir), "zero_shot": None}
        if spec.tasks:
            cell["zero_shot"] = zero_shot_task.fn(str(dense_dir), list(spec.tasks), source=source, target="source",
                                                  limit=spec.limit, progress=progress,
                                                  dtype=spec.eval_dtype)["zero_shot"]
        if spec.speed:
            speed = _speed(dense_dir, spec, source=source, target="source")
            cell.update(tokens_per_second=speed["tokens_per_second"], ms_per_token=speed["ms_per_token"])
    finally:
        release_eval_model()
    return cell


def sweep_metrics(cells: list[dict], tasks: list[str]) -> dict[str, float]:
    """Every number of the table as an MLflow metric: ``<what>/<method>/<ratio>`` (``<what>/dense``)."""
    from .report import accuracy, mean_accuracy

    out: dict[str, float] = {}
    for cell in cells:
        suffix = metric_suffix(cell)
        for name in ("ppl", "width", "parameters", "tokens_per_second", "ms_per_token", "compress_seconds"):
            if cell.get(name) is not None:
                out[f"{name}/{suffix}"] = float(cell[name])
        for task in tasks:
            for metric in ("acc", "acc_norm"):
                value = accuracy(cell, task, metric)
                if value is not None:
                    out[f"{metric}/{task}/{suffix}"] = float(value)
        mean = mean_accuracy(cell, tasks)
        if mean is not None:
            out[f"mean_acc/{suffix}"] = float(mean)
    return out


def _log_sweep(spec: SweepSpec, out: Path, cells: list[dict], files: list[Path]) -> dict:
    """One MLflow run for the sweep (reused by a rerun): params, every number as a metric, the report."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from storage import RunDir

    from .eval_logging import log_evaluation
    from .mlflow_logging import _experiment_id, flatten, tracking_uri

    first = next(c for c in cells if c["method"] != "dense")
    cell_run = RunDir(first["run_dir"])
    uri = tracking_uri(cell_run)
    client = MlflowClient(uri)
    record_path = out / SWEEP_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    run_id = record.get("run_id") if record.get("tracking_uri") == uri else None
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException as error:  # deleted, or a store that was reset: the sweep gets a new run
            log.info("sweep: MLflow run %s is gone (%s): logging to a new run", run_id, str(error).splitlines()[0])
            run_id = None
    if run_id is None:
        mlflow.set_tracking_uri(uri)
        experiment_id = _experiment_id(client, uri, cell_run)
        run_id = client.create_run(experiment_id, run_name=f"sweep-{out.name}",
                                   tags={"dotresize.kind": "sweep", "dotresize.sweep_dir": str(out)}).info.run_id
        from mlflow.entities import Param

        params = flatten(spec.to_dict())
        client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(params.items())])
        record_path.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}, indent=2))
    metrics = sweep_metrics(cells, list(spec.tasks))
    tags = {f"cell.{cell_name(c['method'], c['ratio'], c.get('mlp_ratio') or 0.0)}.mlflow_run_id": c["mlflow_run_id"]
            for c in cells if c.get("mlflow_run_id")}
    logged = log_evaluation(uri, run_id, metrics, tags=tags, files=files, artifact_path="report")
    client.set_terminated(run_id, "FINISHED")
    return {**logged, "metric_keys": sorted(metrics)}


@contextlib.contextmanager
def _prefect_api(startup_timeout: int = 300):
    """``$PREFECT_API_URL`` when set, else one local Prefect server for every cell of the sweep, given time to
    start on a loaded machine (Prefect's own ephemeral start gives up after 20 s)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=startup_timeout)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def run_sweep(spec: SweepSpec, out: Path, *, progress: bool = True) -> dict:
    """Every cell through the pipeline (completed work reused), the dense baseline, then the report and MLflow."""
    from .report import write_report

    started = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _prefect_api():
        cells = [_compress_cell(spec, out, m, r, progress, q) for m, r, q in spec.cells()]
    first = cells[0]
    cells.insert(0, _dense_cell(spec, out, first["source"], first, progress))
    source = first["source"]
    header = (f"# Sweep of {source['spec']}\n\n"
              f"WikiText-2 test perplexity (ctx {spec.ctx}, first {spec.max_windows or 'all'} windows); calibration "
              f"{spec.calib_samples} x {spec.calib_seqlen} tokens of {spec.calib_data} (seed {spec.seed}); "
              f"{spec.mode} mode, {spec.layout} layout; zero-shot tasks: {', '.join(spec.tasks) or 'none'}"
              f"{f' (first {spec.limit} examples each)' if spec.limit and spec.tasks else ''}"
              f"{f'; evaluated in {spec.eval_dtype} (log-softmax float32)' if spec.eval_dtype != 'float32' else ''}"
              + (f"; speed: forward of {spec.speed_batch} x {spec.speed_ctx or spec.ctx} tokens and greedy decoding "
                 f"with a KV cache, medians of {spec.speed_repeats}, each cell timed when it ran (on a shared "
                 f"machine compare speeds with `dotresize bench` or the speed benchmark, which time the models "
                 f"side by side in one process)" if spec.speed else "")
              + f". Width d: the compressed residual width (the source has {cells[0]['width']})"
              + (f"; MLP ratios {', '.join(f'{q:g}' for q in spec.mlp_ratios)} ({spec.mlp_method or 'lsq'}), m the "
                 "kept intermediate width" if spec.mlp_ratios != (0.0,) else "") + ".")
    from .report import SLICEGPT_SMOLLM2

    references = SLICEGPT_SMOLLM2 if "smollm2-135m" in str(source["spec"]).lower() else ()
    files = write_report(cells, list(spec.tasks), out, header, references)
    table = out / "table.json"
    table.write_text(json.dumps({"spec": spec.to_dict(), "cells": [_public(c) for c in cells]}, indent=2,
                                sort_keys=True, default=str))
    files.append(table)
    result = {"out": str(out), "cells": [_public(c) for c in cells], "files": [str(f) for f in files],
              "mlflow": None}
    if spec.mlflow:
        result["mlflow"] = _log_sweep(spec, out, cells, files)
    result["seconds"] = round(time.time() - started, 1)
    return result


def _public(cell: dict) -> dict:
    """A cell without its bulky parts (the source record, the full perplexity protocol)."""
    return {k: v for k, v in cell.items() if k not in ("source", "ppl_result")}


__all__ = ["SweepSpec", "run_sweep", "sweep_metrics", "cell_name"]
