"""MLflow logging of evaluations: perplexity, zero-shot accuracies and speed as metrics of a run.

Used by the compression flow (its evaluate stage), by ``dotresize evaluate`` / ``dotresize bench`` on a run
directory (``--mlflow-run ID``, default the run recorded in ``<run>/mlflow.json``) and by the sweep. Metric names:

* ``ppl``, ``nll``: WikiText-2 test perplexity of the model (``source/ppl`` ... for the source model);
* ``zeroshot/<task>/acc``, ``zeroshot/<task>/acc_norm`` (where lm-eval defines it), ``.../perplexity``
  (lambada), their ``_stderr`` values and ``zeroshot/mean_acc``;
* ``speed/tokens_per_second``, ``speed/ms_per_token`` and, from ``bench``, ``speed/ratio/<what>``.

Results evaluated in a reduced precision (``--dtype``) carry it as a prefix (``bfloat16/ppl``,
``bfloat16-head32/zeroshot/piqa/acc``), so they never overwrite the float32 numbers.

The lm-eval version, the task config hash and the limit become run tags; the headline numbers are also set as
tags (``eval.<metric>``) on the registered model version the run produced, so they show beside the version.
Logging is idempotent: a metric already logged with the same value is not logged again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

ZERO_SHOT_METRICS = ("acc", "acc_norm", "perplexity", "acc_stderr", "acc_norm_stderr", "perplexity_stderr")
#: metrics that also become tags of the registered model version
HEADLINE = ("ppl", "zeroshot/mean_acc", "speed/tokens_per_second", "speed/ms_per_token")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def precision_prefix(result: dict | None) -> str:
    """``""`` for a float32 result, else its precision as a metric-name prefix (``"bfloat16/"``)."""
    from dotresize.evaluation.precision import precision_slug

    slug = precision_slug(str((result or {}).get("dtype") or "float32"))
    return f"{slug}/" if slug else ""


def eval_metrics(*, ppl: dict | None = None, zero_shot: dict | None = None, speed: dict | None = None,
                 bench: dict | None = None, prefix: str = "") -> dict[str, float]:
    """Flat ``{name: value}`` of the evaluation results (``prefix`` ``"source/"`` for the source model)."""
    out: dict[str, float] = {}
    if ppl:
        for name in ("ppl", "nll"):
            if _number(ppl.get(name)) is not None:
                out[f"{prefix}{precision_prefix(ppl)}{name}"] = float(ppl[name])
    if zero_shot:
        prefix_zs = prefix + precision_prefix(zero_shot)
        accs = []
        for task, metrics in zero_shot.get("tasks", {}).items():
            for name in ZERO_SHOT_METRICS:
                value = _number(metrics.get(name))
                if value is not None:
                    out[f"{prefix_zs}zeroshot/{task}/{name}"] = value
            if _number(metrics.get("acc")) is not None:
                accs.append(float(metrics["acc"]))
        if accs:
            out[f"{prefix_zs}zeroshot/mean_acc"] = sum(accs) / len(accs)
    if speed:
        for name in ("tokens_per_second", "ms_per_token", "parameters"):
            if _number(speed.get(name)) is not None:
                out[f"{prefix}speed/{name}"] = float(speed[name])
    if bench:
        rows = bench["rows"]
        for label in ("original", "compressed"):
            row = rows[label]
            out[f"{prefix}bench/{label}/tokens_per_second"] = float(row["forward"]["tokens_per_second"])
            out[f"{prefix}bench/{label}/ms_per_token"] = 1000.0 * float(row["generation"]["seconds_per_token"])
            out[f"{prefix}bench/{label}/parameters"] = float(row["parameters"])
        for name, value in bench["ratios"].items():
            out[f"{prefix}bench/ratio/{name}"] = float(value)
    return out


def eval_tags(zero_shot: dict | None = None, ppl: dict | None = None) -> dict[str, str]:
    """Run tags that say how the numbers were obtained."""
    tags: dict[str, str] = {}
    if zero_shot:
        tags.update({"lm_eval.version": str(zero_shot.get("lm_eval_version")),
                     "lm_eval.task_config_hash": str(zero_shot.get("task_config_hash")),
                     "lm_eval.limit": str(zero_shot.get("limit")),
                     "lm_eval.tasks": ",".join(zero_shot.get("tasks", {}))})
    if ppl:
        tags.update({"ppl.protocol": f"wikitext2-test ctx={ppl.get('ctx')} windows={ppl.get('windows')}",
                     "ppl.text_sha256": str((ppl.get("dataset") or {}).get("sha256"))})
    return tags


def log_evaluation(tracking_uri: str, run_id: str, metrics: dict[str, float], *, tags: dict[str, str] | None = None,
                   files: list[Path] | None = None, artifact_path: str | None = None,
                   model_version: tuple[str, str | int] | None = None) -> dict:
    """Log ``metrics`` (those not already logged with the same value), ``tags`` and ``files`` to ``run_id``;
    set the headline metrics as tags of ``model_version`` (name, version); ``files`` go to ``artifact_path``
    (default the run directory's evaluation folder, ``eval``). Returns what was logged."""
    from mlflow import MlflowClient

    from storage.rundir import EVAL
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri)
    existing = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    fresh = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if existing.get(k) != float(v)]
    for start in range(0, len(fresh), 1000):
        client.log_batch(run_id, metrics=fresh[start:start + 1000])
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])
    for path in files or []:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path or EVAL)
    version_tags = {}
    if model_version is not None:
        name, version = model_version
        for key, value in metrics.items():
            if key in HEADLINE or key.endswith(("/acc", "/acc_norm")):
                version_tags[f"eval.{key.replace('/', '.')}"] = f"{value:.6g}"
        for key, value in version_tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    return {"tracking_uri": tracking_uri, "run_id": run_id, "metrics": len(metrics), "new_metrics": len(fresh),
            "model_version_tags": len(version_tags)}


def recorded_run(run_dir: str | Path | None) -> dict | None:
    """The MLflow record (``mlflow.json``: tracking_uri, run_id, registered_model, version) of a run directory."""
    from storage.rundir import read_mlflow_record

    record = read_mlflow_record(run_dir)
    return record if record and record.get("run_id") else None


def default_tracking_uri(run_dir: str | Path | None = None) -> str:
    """The tracking URI dotresize uses for a run directory (``$MLFLOW_TRACKING_URI``, else the local store)."""
    from storage import RunDir

    from .mlflow_logging import tracking_uri

    return tracking_uri(RunDir(str(run_dir or Path.cwd() / "runs" / "_")))


def log_run_evaluation(run_dir: str | Path | None, *, run_id: str | None = None, tracking_uri: str | None = None,
                       ppl: dict | None = None, zero_shot: dict | None = None, speed: dict | None = None,
                       bench: dict | None = None, source_ppl: dict | None = None,
                       source_zero_shot: dict | None = None, source_speed: dict | None = None) -> dict | None:
    """Log a run directory's evaluation to MLflow: to ``run_id`` when given, else to the run in ``mlflow.json``
    (with the model version it registered); ``run_dir`` None (a remote run) logs no files. Returns None when
    there is no run to log to."""
    record = recorded_run(run_dir) or {}
    run_id = run_id or record.get("run_id")
    if not run_id:
        return None
    uri = tracking_uri or (record.get("tracking_uri") if record.get("run_id") == run_id else None) \
        or default_tracking_uri(run_dir)
    metrics = {**eval_metrics(ppl=ppl, zero_shot=zero_shot, speed=speed, bench=bench),
               **eval_metrics(ppl=source_ppl, zero_shot=source_zero_shot, speed=source_speed, prefix="source/")}
    tags = {**eval_tags(zero_shot or source_zero_shot, ppl or source_ppl)}
    from storage.rundir import EVAL, at

    eval_dir = at(run_dir, EVAL) if run_dir is not None else None
    files = sorted(eval_dir.glob("*.json")) if eval_dir is not None and eval_dir.is_dir() else []
    version = None
    if record.get("run_id") == run_id and record.get("registered_model") and record.get("version"):
        version = (record["registered_model"], record["version"])
    return log_evaluation(uri, run_id, metrics, tags=tags, files=files, model_version=version)


__all__ = ["eval_metrics", "eval_tags", "precision_prefix", "log_evaluation", "log_run_evaluation", "recorded_run"]
