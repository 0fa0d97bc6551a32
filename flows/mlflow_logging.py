"""MLflow logging of one compression: params, per-point metrics, artifacts, inputs, a registered model version.

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set (any server), else ``sqlite:///<home>/mlflow.db`` with the
artifacts under ``<home>/mlartifacts``; ``<home>`` is ``$DOTRESIZE_HOME`` or the directory holding the run
directory (``./runs`` by default). One MLflow run per compression; ``mlflow.json`` in the run directory
remembers it, so a rerun of a finished compression reuses it instead of logging a duplicate.

Registry aliases: every new version gets ``current-<recipe>`` (the latest compression *with that recipe*: a watch
recipe's name, plus the ratio when the recipe has several; for ``dotresize compress`` ``<method>-<percent>-<hash>``
of the config and calibration settings) and ``current`` (the latest compression of any recipe). The base name
``current`` is ``$DOTRESIZE_REGISTRY_ALIAS`` when set. A signed model (``model.sig``) gets the tags
``dotresize.signature_sha256`` and ``dotresize.signing_key`` (the public key's fingerprint; never key material).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from storage import RunDir
from storage import rundir as layout

EXPERIMENT = "dotresize"
#: the MLflow artifact folder of the compressed model (runs:/<id>/model); not a run-directory path
MODEL_ARTIFACT = "model"
#: the registry alias base: ``current`` (any recipe) and ``current-<recipe>`` (per recipe)
ALIAS = "current"
ALIAS_ENV = "DOTRESIZE_REGISTRY_ALIAS"
#: run/version tag a caller (the watch flow) sets to name the recipe in the per-recipe alias
TAG_RECIPE_LABEL = "dotresize.recipe_label"
TAG_SIGNATURE = "dotresize.signature_sha256"
TAG_SIGNING_KEY = "dotresize.signing_key"

log = logging.getLogger("dotresize")


def alias_base() -> str:
    """``$DOTRESIZE_REGISTRY_ALIAS`` or ``current``."""
    return os.environ.get(ALIAS_ENV) or ALIAS


def _alias_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-").lower() or "recipe"


def recipe_alias(bundle: dict) -> str:
    """``<base>-<recipe>``: the alias that follows the latest version compressed with this recipe."""
    from storage import digest_of_digests

    label = (bundle.get("tags") or {}).get(TAG_RECIPE_LABEL)
    if not label:
        recipe = bundle["recipe"]
        config = recipe["config"]
        calibration = {k: v for k, v in (recipe.get("calibration") or {}).items() if k != "data"}  # a path: not
        digest = digest_of_digests({"config": config, "calibration": calibration})  # its text's sha256 counts
        label = f"{config['method']}-{float(config['ratio']) * 100:g}-{digest[:8]}"
    return f"{alias_base()}-{_alias_slug(label)}"


def _signature_tags(run: RunDir) -> dict[str, str]:
    """The signature's sha256 and key fingerprint when the run's model is signed (nothing secret)."""
    from storage.signing import signature_info

    if not run.is_local:
        return {}
    info = signature_info(run.local_path(layout.MODEL))
    if info is None:
        return {}
    tags = {TAG_SIGNATURE: info["sha256"]}
    who = info.get("key_fingerprint") or info.get("certificate_subject")
    if who:
        tags[TAG_SIGNING_KEY] = str(who)[:250]
    return tags


def mlflow_home(run: RunDir) -> Path:
    if os.environ.get("DOTRESIZE_HOME"):
        return Path(os.environ["DOTRESIZE_HOME"]).expanduser().resolve()
    if run.is_local:
        return run.local_path().parent
    return Path.home() / ".dotresize"


def tracking_uri(run: RunDir) -> str:
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    home = mlflow_home(run)
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def tracking_client(uri: str):
    """An MlflowClient of ``uri`` (tracking and registry). A local SQLite database is created and migrated
    under a file lock beside it: two processes creating the same database at once race in its migrations."""
    from mlflow import MlflowClient

    from storage.locks import FileLock

    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri, registry_uri=uri)
    database = Path(uri[len("sqlite:///"):])
    with FileLock(database.parent / "locks" / "mlflow-db.lock"):  # the stores may migrate on construction
        client = MlflowClient(uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return client


def _experiment_id(client, uri: str, run: RunDir) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    # the default database gets its artifacts beside it (not ./mlruns of the working directory); note that
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so the environment cannot tell the default apart
    if uri == f"sqlite:///{mlflow_home(run) / 'mlflow.db'}":
        artifact_location = (mlflow_home(run) / "mlartifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    except MlflowException as error:  # created concurrently
        log.debug("experiment %s not created (%s): using the existing one", EXPERIMENT, error)
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"dot": {"epsilon": 0.05}} -> {"dot.epsilon": "0.05"}; long values are replaced by their sha256."""
    import hashlib

    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(data, sort_keys=True) if isinstance(data, (list, tuple)) else str(data)
    if len(text) > 250:
        text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    out[prefix.rstrip(".")] = text
    return out


def _metrics(bundle: dict) -> list[tuple[str, float, int]]:
    """(key, value, step): per-point metrics twice (``<name>`` at step p, and ``point_<p>/<name>``)."""
    out: list[tuple[str, float, int]] = []
    for solve in bundle["solves"]:
        point = solve["point"]
        step = -1 if point == "global" else int(point)
        tag = "global" if point == "global" else f"point_{int(point):03d}"
        for name, value in solve.get("metrics", {}).items():
            out.append((name, float(value), max(step, 0)))
            out.append((f"{tag}/{name}", float(value), 0))
    export = bundle["export"]
    for name in ("parameters_before", "parameters_after", "parameter_ratio"):
        out.append((name, float(export[name]), 0))
    for stage, seconds in bundle.get("stage_seconds", {}).items():
        out.append((f"seconds/{stage}", float(seconds), 0))
    evaluation = bundle.get("evaluate")
    if evaluation and evaluation.get("ppl"):
        out.append(("ppl", float(evaluation["ppl"]["ppl"]), 0))
        out.append(("nll", float(evaluation["ppl"]["nll"]), 0))
    return out


def _log_inputs(mlflow, run: RunDir, bundle: dict) -> None:
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    source = bundle["source"]
    calibration = bundle["calibration"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        where = source.get("path") or source["spec"]
        uri = Path(where).resolve().as_uri() if Path(where).exists() else str(where)
        try:
            model_source = resolve_dataset_source(uri)
        except MlflowException as error:  # no dataset source type takes this URI (a hub id): record the spec
            from mlflow.data.code_dataset_source import CodeDatasetSource

            log.debug("no MLflow dataset source for %s (%s): recording the spec", uri, error)
            model_source = CodeDatasetSource(tags={"spec": source["spec"]})
        mlflow.log_input(MetaDataset(source=model_source, name=f"source-model:{source['spec']}",
                                     digest=source["digest"][:16]), context="source-model")
        ids = run.load_tensors(layout.CALIBRATION_IDS)["input_ids"].numpy().astype(np.int64)
        meta = calibration.get("meta", {})
        text_path = meta.get("path")
        calib_source = text_path if text_path and Path(text_path).exists() else run.uri(layout.CALIBRATION_IDS)
        dataset = mlflow.data.from_numpy(ids, source=calib_source, name=f"calibration:{meta.get('id', 'text')}",
                                         digest=calibration["digest"][:16])
        mlflow.log_input(dataset, context="calibration")


_PLOTTED = (("reconstruction_error", "reconstruction error", False), ("cond_r", "cond(R)", True),
            ("sinkhorn_iterations", "Sinkhorn iterations", False), ("seconds", "basis seconds", False))


def per_point_plot(solves: list[dict], path: Path) -> Path | None:
    """One panel per diagnostic (reconstruction error, cond(R), Sinkhorn iterations, seconds) against the slice
    point; None when matplotlib is missing or there is a single (global) basis."""
    points = sorted((int(s["point"]), s.get("metrics", {})) for s in solves if s["point"] != "global")
    if len(points) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(key, title, log) for key, title, log in _PLOTTED if any(key in m for _, m in points)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title, log) in zip(axes[:, 0], panels):
        xs = [p for p, m in points if key in m]
        ax.plot(xs, [m[key] for p, m in points if key in m], marker=".", linewidth=1)
        ax.set_ylabel(title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("slice point (0 = embeddings, 2l+1 after attention, 2l+2 after the MLP of layer l)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_artifacts(mlflow, run: RunDir, bundle: dict) -> None:
    bases_summary = {str(s["point"]): {"key": s["key"], "sha256": s["sha256"], "width": s.get("width"),
                                      **s.get("metrics", {})} for s in bundle["solves"]}
    with tempfile.TemporaryDirectory(prefix="dotresize-mlflow-") as tmp:
        summary = Path(tmp) / "bases_summary.json"
        summary.write_text(json.dumps(bases_summary, indent=2, sort_keys=True))
        mlflow.log_artifact(str(summary))
        plot = per_point_plot(bundle["solves"], Path(tmp) / "per_point.png")
        if plot is not None:
            mlflow.log_artifact(str(plot), artifact_path="plots")
    # the run's log (the CLI writes every task's lines there) as it stands at registration
    for rel in (layout.RECIPE, layout.LINEAGE, layout.SOURCE, layout.CALIBRATION, layout.TIMINGS, layout.CONSOLE_LOG):
        if run.exists(rel):
            with run.local_copy(rel) as path:
                mlflow.log_artifact(str(path))
    for rel, target in ((layout.BASES, "bases"), (layout.EVAL, "eval"), (layout.STAGES, "stages")):
        if run.exists(rel):
            with run.local_copy(rel) as path:
                for file in sorted(path.rglob("*.json")):
                    sub = file.parent.relative_to(path).as_posix()
                    mlflow.log_artifact(str(file), artifact_path=target if sub == "." else f"{target}/{sub}")


def _mlmodel(run_id: str, bundle: dict) -> str:
    export = bundle["export"]
    recipe = bundle["recipe"]["config"]
    lines = [
        f"artifact_path: {MODEL_ARTIFACT}",
        "flavors:",
        "  dotresize:",
        "    loader: dotresize.load_compressed",
        f"    layout: {recipe['layout']}",
        f"    model_sha256: {export['model_sha256']}",
        f"run_id: {run_id}",
    ]
    return "\n".join(lines) + "\n"


def log_compression(run_url: str, bundle: dict, register_name: str | None = None) -> dict:
    """Log one compression to MLflow and register its model; reuses the run of an identical earlier call.

    ``bundle["tags"]`` (optional) are set on the run and the model version (the version is created with them,
    atomically); ``bundle["lineage_sha256"]`` is recorded as the tag ``dotresize.lineage_sha256``. A run whose
    version was registered before a crash gets that version back, never a second one.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _log_compression(run_url, bundle, register_name)
    finally:  # mlflow.set_tracking_uri exports the URI: do not let it leak into later runs of this process
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _log_compression(run_url: str, bundle: dict, register_name: str | None = None) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.common import logger

    run = RunDir(run_url)
    uri = tracking_uri(run)
    mlflow.set_tracking_uri(uri)
    client = tracking_client(uri)
    export = bundle["export"]
    name = register_name or bundle["default_register_name"]
    previous = run.read_json(layout.MLFLOW) or {}
    signature_tags = _signature_tags(run)
    if (previous.get("tracking_uri") == uri and previous.get("model_sha256") == export["model_sha256"]
            and previous.get("registered_model") == name and previous.get("complete")
            and previous.get("lineage_sha256") == bundle.get("lineage_sha256")
            and previous.get("signature_sha256") == signature_tags.get(TAG_SIGNATURE)):
        try:
            if client.get_run(previous["run_id"]).info.status == "FINISHED" and \
                    client.get_model_version(name, str(previous["version"])).run_id == previous["run_id"]:
                logger().info("reused register %s (MLflow run %s, %s v%s)", export["model_sha256"][:12],
                              previous["run_id"], name, previous["version"])
                return {**previous, "reused": True}
        except Exception as error:  # the run or version is gone or unreadable: register again
            logger().debug("previous MLflow registration not reusable: %s", error)
    resume = previous.get("run_id") if (previous.get("tracking_uri") == uri and
                                        previous.get("model_sha256") == export["model_sha256"]) else None
    if resume:
        try:
            client.get_run(resume)
        except MlflowException as error:
            logger().debug("MLflow run %s not resumable (%s): starting a new one", resume, error)
            resume = None
    logger().info("computing register %s (MLflow %s)", export["model_sha256"][:12], uri)
    experiment_id = _experiment_id(client, uri, run)
    with mlflow.start_run(run_id=resume, experiment_id=None if resume else experiment_id,
                          run_name=bundle.get("run_name")) as active:
        run_id = active.info.run_id
        run.write_json(layout.MLFLOW, {"tracking_uri": uri, "run_id": run_id, "model_sha256": export["model_sha256"],
                                       "registered_model": name, "complete": False})
        from mlflow.entities import Metric, Param, RunTag

        params = {**flatten(bundle["recipe"]["config"]), **flatten(bundle["recipe"]["calibration"], "calibration."),
                  "source.spec": str(bundle["source"]["spec"]), "source.digest": bundle["source"]["digest"],
                  "run_key": bundle["run_key"]}
        existing = client.get_run(run_id).data.params
        params = {k: v for k, v in params.items() if k not in existing}
        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start:start + 100])
        import time as _time

        now = int(_time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in _metrics(bundle)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        tags = {"dotresize.run_dir": run.uri(), "dotresize.run_key": bundle["run_key"],
                "dotresize.model_sha256": export["model_sha256"], "dotresize.mode": bundle["recipe"]["config"]["mode"],
                "dotresize.layout": bundle["recipe"]["config"]["layout"]}
        extra_tags = {str(k): str(v) for k, v in (bundle.get("tags") or {}).items()}
        if bundle.get("lineage_sha256"):
            extra_tags["dotresize.lineage_sha256"] = bundle["lineage_sha256"]
        extra_tags.update(signature_tags)
        tags.update(extra_tags)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        _log_inputs(mlflow, run, bundle)
        _log_artifacts(mlflow, run, bundle)
        with run.local_copy(layout.MODEL) as model_dir:
            mlflow.log_artifacts(str(model_dir), artifact_path=MODEL_ARTIFACT)
        mlflow.log_text(_mlmodel(run_id, bundle), f"{MODEL_ARTIFACT}/MLmodel")
        version_tags = {"model_sha256": export["model_sha256"], "run_key": bundle["run_key"], **extra_tags}
        registered = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") \
            if "'" not in name else []
        if registered:  # registered before a crash: that version, never a second one
            version = min(registered, key=lambda v: int(v.version))
            for key, value in version_tags.items():
                client.set_model_version_tag(name, version.version, key, value)
        else:
            version = mlflow.register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", name, tags=version_tags)
        aliases = []
        for alias in (recipe_alias(bundle), alias_base()):  # this recipe's latest, and the latest of any recipe
            try:
                client.set_registered_model_alias(name, alias, version.version)
                aliases.append(alias)
            except Exception as error:  # e.g. a $DOTRESIZE_REGISTRY_ALIAS MLflow reserves ("latest", "v1")
                log.warning("registry alias %r not set on %s v%s: %s", alias, name, version.version,
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
    record = {"tracking_uri": uri, "run_id": run_id, "model_sha256": export["model_sha256"],
              "registered_model": name, "version": int(version.version), "source": version.source, "complete": True,
              "lineage_sha256": bundle.get("lineage_sha256"), "aliases": aliases,
              "signature_sha256": signature_tags.get(TAG_SIGNATURE)}
    run.write_json(layout.MLFLOW, record)
    return {**record, "reused": False}

