"""The orchestrated compression: a Prefect flow over the stage tasks, resumable stage by stage.

``compress_flow`` resolves the source, samples the calibration set, inspects the model's structure (no weights
are loaded: every stage reads the source a layer at a time, fusing its norms on the fly) and then fans out, with
Prefect's ``DaskTaskRunner``:

* ``parallel`` mode: capture layer 0, 1, ... (each task runs one layer over the calibration hidden states and
  stores its slice points in Zarr) -> per point, as soon as its layer is captured, solve (its statistics streamed
  from the store out of core, then Sinkhorn + QR) -> per layer, as soon as its three bases exist, absorb (the
  layer's compressed weights, which are a shard of the export) -> export (the ends, the index, the metadata);
* ``sequential`` mode: per point, capture through the already compressed layers -> solve, with the absorption
  of layer l running while layer l+1 is calibrated;
* ``global`` layout: pooled statistics -> one basis -> per-layer absorption -> a stock model.

Memory is a function of one layer: at most two decoder layers are materialised at once per process.

Every stage has a content key and reuses a complete, verified output with that key: rerunning the same
command resumes a killed run and recomputes only what is missing, stale or corrupted. Prefect's cache machinery
reports it (:mod:`tasks.cache`): a reused stage's task run is Cached.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from dotresize.api import export_layout
from dotresize.errors import DotResizeError
from storage import RunDir, content_key

from .runlock import hold_run
from .settings import apply_offline_defaults
from storage import rundir as paths
from tasks import (
    absorb_task,
    mlp_sequential_task,
    mlp_task,
    plan_mlp_task,
    calibration_task,
    capture_task,
    evaluate_task,
    export_task,
    inspect_task,
    plan_task,
    pool_task,
    resolve_source_task,
    sequential_capture_task,
    solve_task,
    zero_shot_task,
)

RECIPE_VERSION = 1
RUN_KEY_VERSION = "1"


# --- configuration ----------------------------------------------------------------------------------------------
def build_config(*, ratio: float, method: str, mode: str, layout_name: str, seed: int,
                 overrides: dict | None = None):
    """The CompressionConfig of a run: the named arguments plus ``overrides`` (nested ``dot`` allowed)."""
    from dotresize import CompressionConfig

    data = CompressionConfig(method=method, ratio=ratio, mode=mode, layout=layout_name, seed=seed).to_dict()
    for key, value in (overrides or {}).items():
        if key == "dot" and isinstance(value, dict):
            data["dot"] = {**data["dot"], **value}
        elif key.startswith("dot."):
            data["dot"][key[4:]] = value
        else:
            data[key] = value
    return CompressionConfig.from_dict(data).validate()


def make_recipe(config, source: dict, calib: dict) -> dict:
    return {"recipe_version": RECIPE_VERSION, "config": config.to_dict(),
            "source": {"spec": source["spec"], "digest": source["digest"]}, "calibration": calib}


def run_key_of(recipe: dict) -> str:
    return content_key("run", RUN_KEY_VERSION, source=recipe["source"]["digest"], calibration=recipe["calibration"],
                       config=recipe["config"])


def slug(spec: str) -> str:
    name = Path(str(spec).rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "model"


def default_run_dir(recipe: dict, run_key: str) -> str:
    config = recipe["config"]
    name = f"{slug(recipe['source']['spec'])}-{config['method']}-{run_key[:12]}"
    return str(Path.cwd() / "runs" / name)


def make_task_runner(dask_address: str | None = None, n_workers: int | None = None):
    """Prefect's DaskTaskRunner: an existing scheduler, or an in-process LocalCluster of threads."""
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    threads = n_workers or max(2, min(4, os.cpu_count() or 1))
    # the scheduler's and worker's HTTP servers always start: bind them to loopback, on any free port
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"processes": False, "n_workers": 1, "threads_per_worker": threads,
                                          "dashboard_address": "127.0.0.1:0",
                                          "worker_dashboard_address": "127.0.0.1:0",
                                          "silence_logs": logging.WARNING})


def quiet_dask_logs() -> None:
    """distributed logs every connection at INFO; keep its warnings only (after its own logging set-up)."""
    import distributed  # noqa: F401  (configures its loggers on import)

    for name in ("distributed", "distributed.scheduler", "distributed.worker", "distributed.core",
                 "distributed.nanny", "distributed.http.proxy", "distributed.deploy", "prefect.task_runner.dask"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def _progress(futures: list, desc: str, enabled: bool) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=desc, unit="point", disable=not enabled) as bar:
        for _ in as_completed(futures):
            bar.update(1)


# --- the flow ---------------------------------------------------------------------------------------------------
@flow(name="dotresize-compress", persist_result=False, log_prints=False)
def compress_flow(model: str | None = None, ratio: float = 0.2, method: str = "dot", mode: str = "parallel",
                  layout: str = "per-point", calib_data: str = "wikitext2", calib_samples: int = 64,
                  calib_seqlen: int = 256, seed: int = 42, run_dir: str | None = None,
                  config_overrides: dict | None = None, dask_address: str | None = None,
                  n_workers: int | None = None, mlflow: bool = True, register_name: str | None = None,
                  progress: bool = True, ppl: bool = False, ppl_ctx: int = 256, ppl_max_windows: int = 100,
                  ppl_source: bool = False, device: str | None = None, verify: bool = True,
                  trust_remote_code: bool = False, tags: dict | None = None,
                  expect_source_digest: str | None = None, tasks: list[str] | None = None, limit: int | None = None,
                  tasks_source: bool = False, eval_dtype: str = "float32", export_dtype: str | None = None,
                  signing_key: str | None = None, out: str | None = None, overwrite: bool = False) -> dict:
    """Compress ``model`` into ``run_dir`` (default ``./runs/<model>-<method>-<key>``); returns a small manifest:
    run_dir, model_dir, model_sha256, widths, parameter counts, which stages were reused, MLflow run and version.

    ``config_overrides`` sets any other CompressionConfig field (``{"dot": {"epsilon": 0.2}, "batch_size": 4}``);
    ``dask_address`` (``tcp://host:port``) runs the tasks on an existing Dask scheduler; ``n_workers`` threads
    otherwise. ``device`` is where Sinkhorn runs (default CUDA when present). ``verify=False`` trusts markers
    without re-reading digests. ``ppl`` evaluates the compressed model (and ``ppl_source`` the source) on
    WikiText-2; ``tasks`` (``["piqa", "arc_easy"]``, first ``limit`` examples each) runs the zero-shot tasks on
    the compressed model (and ``tasks_source`` on the source) into ``eval/lm_eval*.json``; every evaluation is
    logged as metrics of the compression's MLflow run. ``eval_dtype`` is the evaluations' precision
    (:mod:`dotresize.evaluation.precision`). ``export_dtype`` (``float32``, ``bfloat16``, ``float16``) is the
    exported weights' dtype, by default the source's dtype at rest (float32 for quantised GGUF). ``signing_key``
    (a private key file) signs the model directory, lineage.json included (``model.sig``, OpenSSF model signing)
    before it is registered. ``out`` (checked beforehand, see :mod:`flows.preflight`) gets a copy of the model
    directory, also before registration (a copy that fails registers nothing). A user-facing error
    (:class:`dotresize.DotResizeError`) in a run directory this call created removes it again; an existing run
    directory is never removed.
    """
    started = time.time()
    logger = get_run_logger()
    quiet_dask_logs()
    config = build_config(ratio=ratio, method=method, mode=mode, layout_name=layout, seed=seed,
                          overrides=config_overrides)
    resolved = resolve_source_task(model, calib_data, trust_remote_code)
    source = resolved["source"]
    if expect_source_digest and source["digest"] != expect_source_digest:
        from dotresize.errors import SourceNotFoundError

        raise SourceNotFoundError(f"the model at {model} changed (digest {source['digest'][:12]}, expected "
                                  f"{expect_source_digest[:12]}): compress it again")
    calib = {"data": calib_data, "text_sha256": resolved["calibration_text"]["sha256"], "samples": calib_samples,
             "seqlen": calib_seqlen, "seed": seed}
    recipe = make_recipe(config, source, calib)
    run_key = run_key_of(recipe)
    run = RunDir(run_dir or default_run_dir(recipe, run_key))
    logger.info("run %s (key %s): %s, %s, %s layout, ratio %s", run.uri(), run_key[:12], config.method, config.mode,
                config.layout, config.ratio)
    fresh = not run.exists("")
    run.makedirs()
    # one process at a time in a run directory, for the whole run (evaluations and MLflow included); a failed
    # fresh run is removed while the lease is still held (flows/runlock.py, storage/lease.py)
    with hold_run(run) as lease:
        try:
            return _run_stages(run, config, recipe, run_key, source, calib, resolved["architecture"], started,
                               dask_address=dask_address, n_workers=n_workers, mlflow=mlflow,
                               register_name=register_name, progress=progress, ppl=ppl, ppl_ctx=ppl_ctx,
                               ppl_max_windows=ppl_max_windows, ppl_source=ppl_source, device=device, verify=verify,
                               trust_remote_code=trust_remote_code, tags=tags, tasks=list(tasks or []), limit=limit,
                               tasks_source=tasks_source, eval_dtype=eval_dtype, export_dtype=export_dtype,
                               signing_key=signing_key, out=out, overwrite=overwrite)
        except DotResizeError:
            if fresh and not lease.waited:  # a run another process created while this one waited is not ours
                logger.info("removing %s: the run failed before producing anything reusable", run.uri())
                run.remove("")
            raise


def _run_stages(run: RunDir, config, recipe: dict, run_key: str, source: dict, calib: dict, architecture: dict,
                started: float, *, dask_address, n_workers, mlflow, register_name, progress, ppl, ppl_ctx,
                ppl_max_windows, ppl_source, device, verify, trust_remote_code, tags=None, tasks, limit, tasks_source,
                eval_dtype="float32", export_dtype=None, signing_key=None, out=None, overwrite=False) -> dict:
    logger = get_run_logger()
    run.write_text(paths.RECIPE, _yaml(recipe))
    run.write_json(paths.SOURCE, source)
    run_url = run.url
    common = {"run_url": run_url}
    with make_task_runner(dask_address, n_workers) as runner:
        quiet_dask_logs()
        inspect = manifest_of(runner.submit(inspect_task, {**common, "source": source,
                                                           "trust_remote_code": trust_remote_code}))
        calibration = manifest_of(runner.submit(calibration_task, {
            **common, "source": source, "calib": calib, "inspect": inspect,
            "hidden_size": architecture["hidden_size"]}))
        layers = inspect["num_layers"]
        residual = config.residual_active
        widths = plan_task(inspect, recipe) if residual else [inspect["hidden_size"]] * inspect["num_points"]
        layout_name = export_layout(config)
        streamed = {**common, "source": source, "inspect": inspect, "device": device}
        solve_args = {**common, "recipe": recipe, "calibration": calibration, "verify": verify, "device": device}
        mlp_widths = plan_mlp_task(run, inspect, recipe) if config.mlp_active else None
        mlps: list = []
        if config.mode == "parallel":
            captures, solves = _parallel_graph(runner, streamed, calibration, recipe, widths, layers, solve_args,
                                               layout_name, verify, residual)
            if mlp_widths:
                mlps = [runner.submit(mlp_task, {**streamed, "layer": layer, "capture": captures[layer],
                                                 "width": mlp_widths[layer], "recipe": recipe, "verify": verify})
                        for layer in range(layers)]
        else:
            if mlp_widths:
                mlps = _mlp_sequential_graph(runner, streamed, calibration, recipe, mlp_widths, layers, verify)
            captures, solves = (_sequential_graph(runner, streamed, calibration, recipe, widths, layers, solve_args,
                                                  verify, mlps) if residual else ([], []))
        absorbs = [runner.submit(absorb_task, {**streamed, "layer": layer, "layout_name": layout_name,
                                               "dtype": export_dtype, "mlp": mlps[layer] if mlps else None,
                                               "bases": solves if layout_name == "global"
                                               else solves[2 * layer:2 * layer + 3]})
                   for layer in range(layers)]
        _progress(solves or mlps, "bases" if config.mode == "parallel" else "sequential", progress)
        captures_m = [manifest_of(c) for c in captures]
        mlps_m = [manifest_of(m) for m in mlps]
        solves_m = [manifest_of(s) for s in solves]
        absorbs_m = [manifest_of(a) for a in absorbs]
        export = manifest_of(runner.submit(export_task, {
            **common, "run_key": run_key, "recipe": recipe, "source": source, "calibration": calibration,
            "inspect": inspect, "widths": widths, "captures": captures_m, "bases": solves_m, "absorbs": absorbs_m,
            "dtype": export_dtype, "device": device, "mlps": mlps_m}))
        evaluation = evaluation_source = None
        eval_args = {**common, "ctx": ppl_ctx, "max_windows": ppl_max_windows, "progress": progress,
                     "dtype": eval_dtype}
        if ppl_source:
            evaluation_source = manifest_of(runner.submit(evaluate_task, {**eval_args, "source": source,
                                                                          "target": "source"}))
        if ppl:
            evaluation = manifest_of(runner.submit(evaluate_task, {**eval_args, "export": export, "target": "model"}))
        zero_shot = zero_shot_source = None
        zs_args = {**common, "tasks": tasks, "limit": limit, "progress": progress, "dtype": eval_dtype}
        if tasks and tasks_source:
            zero_shot_source = manifest_of(runner.submit(zero_shot_task, {**zs_args, "source": source,
                                                                          "target": "source"}))
        if tasks:
            zero_shot = manifest_of(runner.submit(zero_shot_task, {**zs_args, "export": export, "target": "model"}))
    manifests = [calibration, inspect, *captures_m, *mlps_m, *solves_m, *absorbs_m, export]
    manifests += [m for m in (evaluation_source, evaluation, zero_shot_source, zero_shot) if m is not None]
    stages = _stage_summary(manifests)
    stage_seconds = {stage: round(info["seconds"], 6) for stage, info in stages.items()}
    for stage, info in stages.items():
        logger.info("%s: computed %d, reused %d (%.1f s)", stage, len(info["computed"]), len(info["reused"]),
                    info["seconds"], extra={"console": True})  # the console's one line per stage (flows/logs.py)
    run.write_json(paths.TIMINGS, {"stages": stage_seconds,
                                    "intervals": {_label(m): [m.get("started"), m.get("finished")]
                                                  for m in manifests if m.get("started")}})
    result = {
        "run_dir": run.uri(), "run_key": run_key, "source": source, "calibration": calibration.get("meta", {}),
        "model_dir": export["model_dir"],
        "model_sha256": export["model_sha256"], "widths": widths, "mlp_widths": mlp_widths,
        "parameters_before": export["parameters_before"],
        "parameters_after": export["parameters_after"], "parameter_ratio": export["parameter_ratio"],
        "stages": {s: {"computed": i["computed"], "reused": i["reused"]} for s, i in stages.items()},
        "stage_seconds": stage_seconds, "mlflow_run_id": None, "model_version": None, "registered_model": None,
    }
    if evaluation is not None:
        result["ppl"] = evaluation["ppl"]
    if evaluation_source is not None:
        result["ppl_source"] = evaluation_source["ppl"]
    if zero_shot is not None:
        result["zero_shot"] = zero_shot["zero_shot"]
    if zero_shot_source is not None:
        result["zero_shot_source"] = zero_shot_source["zero_shot"]
    try:
        from prefect.runtime import flow_run

        result["flow_run_id"] = str(flow_run.id)
    except Exception as error:  # outside a flow run (flow.fn in a test): no id to record
        logger.debug("no Prefect flow run id: %s", error)
    from tasks.lineage import lineage_task

    lineage = lineage_task(run_url, export, tags)  # + evaluations, stage digests, code version, tags
    result["lineage_sha256"] = lineage["sha256"]
    if signing_key:  # before registration, so the signature is logged with the model and tagged
        from storage.signing import sign_run_model

        result["signature"] = sign_run_model(run, signing_key)
        logger.info("signed %s", result["signature"])
    if out:  # before registration: a failed copy (a full disk) leaves no registered version behind
        from .outputs import copy_model

        with run.local_copy(paths.MODEL) as model_dir:
            result["out"] = str(copy_model(model_dir, Path(out), overwrite))
    if mlflow:
        from .mlflow_logging import register_task

        bundle = {"recipe": recipe, "source": source, "calibration": calibration, "run_key": run_key,
                  "solves": solves_m, "export": export, "evaluate": evaluation, "stage_seconds": stage_seconds,
                  "default_register_name": f"dotresize-{slug(source['spec'])}",
                  "run_name": Path(run.path()).name, "tags": dict(tags or {}), "lineage_sha256": lineage["sha256"]}
        registered = register_task(run_url, bundle, register_name)
        result.update(mlflow_run_id=registered["run_id"], model_version=registered["version"],
                      registered_model=registered["registered_model"], mlflow_tracking_uri=registered["tracking_uri"])
        if any(m is not None for m in (evaluation, evaluation_source, zero_shot, zero_shot_source)):
            from .eval_logging import log_run_evaluation

            log_run_evaluation(run.path() if run.is_local else None, run_id=registered["run_id"],
                               tracking_uri=registered["tracking_uri"], ppl=result.get("ppl"),
                               zero_shot=result.get("zero_shot"),
                               source_ppl=result.get("ppl_source"), source_zero_shot=result.get("zero_shot_source"))
    result["seconds"] = round(time.time() - started, 3)
    logger.info("model %s (sha256 %s) in %.1f s", result["model_dir"], result["model_sha256"][:12], result["seconds"])
    return result


def _parallel_graph(runner, streamed: dict, calibration: dict, recipe: dict, widths: list[int], layers: int,
                    solve_args: dict, layout_name: str, verify: bool, residual: bool = True) -> tuple[list, list]:
    """Capture one layer after another (each task hands its output point to the next through the store); each
    point's solve starts as soon as the layer producing it is captured; the global layout pools them first.
    Without residual slicing (the MLP axis alone) there is nothing to solve."""
    captures, previous = [], None
    for layer in range(layers):
        previous = runner.submit(capture_task, {**streamed, "layer": layer, "calibration": calibration,
                                                "recipe": recipe, "previous": previous, "verify": verify})
        captures.append(previous)
    if not residual:
        return captures, []
    if layout_name == "global":
        pool = runner.submit(pool_task, {"run_url": streamed["run_url"], "captures": captures, "recipe": recipe,
                                         "calibration": calibration, "num_points": 2 * layers + 1,
                                         "verify": verify})
        return captures + [pool], [runner.submit(solve_task, {**solve_args, "point": "global", "capture": pool,
                                                               "width": widths[0]})]
    solves = [runner.submit(solve_task, {**solve_args, "point": p, "capture": captures[max(0, (p - 1) // 2)],
                                         "width": widths[p]})
              for p in range(2 * layers + 1)]
    return captures, solves


def _mlp_sequential_graph(runner, streamed: dict, calibration: dict, recipe: dict, mlp_widths: list[int],
                          layers: int, verify: bool) -> list:
    """The MLP axis in sequential mode: layer l's MLP reduced from its input through the reduced layers before."""
    mlps, previous = [], None
    for layer in range(layers):
        previous = runner.submit(mlp_sequential_task, {**streamed, "layer": layer, "calibration": calibration,
                                                       "width": mlp_widths[layer], "recipe": recipe,
                                                       "previous": previous, "verify": verify})
        mlps.append(previous)
    return mlps


def _sequential_graph(runner, streamed: dict, calibration: dict, recipe: dict, widths: list[int], layers: int,
                      solve_args: dict, verify: bool, mlps: list | None = None) -> tuple[list, list]:
    """SliceGPT's order: point p is captured through the layers compressed with the bases before it (and their
    reduced MLPs, with the MLP axis)."""
    captures, solves = [], []
    for p in range(2 * layers + 1):
        if p == 0:
            previous, bases, index = None, [], None
        else:
            index = (p - 1) // 2
            previous = captures[2 * index]
            bases = [solves[2 * index]] + ([solves[2 * index + 1]] if p % 2 == 0 else [])
        capture = runner.submit(sequential_capture_task, {**streamed, "point": p, "calibration": calibration,
                                                          "recipe": recipe, "previous": previous, "bases": bases,
                                                          "verify": verify,
                                                          "mlp": mlps[index] if mlps and index is not None
                                                          else None})
        captures.append(capture)
        solves.append(runner.submit(solve_task, {**solve_args, "point": p, "capture": capture, "width": widths[p]}))
    return captures, solves


def manifest_of(future) -> dict:
    """A stage task's manifest; a task run Prefect reports as Cached (its outputs complete and verified, the task
    body not run: tasks/cache.py) is a reused stage."""
    manifest = future.result()
    if future.state.name == "Cached":
        manifest = {**manifest, "reused": True}
    return manifest


def _label(manifest: dict) -> str:
    name = manifest.get("name")
    return manifest["stage"] if name is None else f"{manifest['stage']}[{name}]"


def _stage_summary(manifests: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for manifest in manifests:
        if manifest.get("skipped"):
            continue
        info = out.setdefault(manifest["stage"], {"computed": [], "reused": [], "seconds": 0.0})
        name = manifest.get("name") if manifest.get("name") is not None else manifest["stage"]
        (info["reused"] if manifest.get("reused") else info["computed"]).append(name)
        info["seconds"] += float(manifest.get("seconds") or 0.0)  # compute time, also of reused outputs
    return out


# --- plain entry point for the CLI --------------------------------------------------------------------------------
def run_compress(**kwargs: Any) -> dict:
    """Run :func:`compress_flow` with offline defaults; the CLI calls this.

    Without ``PREFECT_API_URL`` a local Prefect server is started for the run (:mod:`flows.local_server`: its own
    session, stopped at the end, on Ctrl-C/SIGTERM through :mod:`flows.interrupts`, and by the kernel if this
    process dies), rather than Prefect's ephemeral one, which a terminal's Ctrl-C kills mid-run. Remote Dask
    workers (``dask_address``) report to it as well.
    """
    apply_offline_defaults()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from .local_server import prefect_api

    with prefect_api():
        return compress_flow(**kwargs)


__all__ = ["compress_flow", "run_compress", "build_config", "make_task_runner", "default_run_dir"]
