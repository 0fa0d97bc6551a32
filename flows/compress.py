"""The orchestrated compression: a Prefect flow over the stage tasks, resumable stage by stage.

``compress_flow`` resolves the source, samples the calibration set, inspects the model's structure (no weights
are loaded: every stage reads the source a layer at a time, fusing its norms on the fly) and then fans out, with
Prefect's thread pool task runner (or ``DaskTaskRunner`` on an existing scheduler):

* ``parallel`` mode: capture layer 0, 1, ... (each task runs one layer over the calibration hidden states and
  stores its slice points in Zarr) -> per point, once its layer is captured, solve (its statistics streamed
  from the store out of core, then Sinkhorn + QR) -> per layer, once its three bases exist, absorb (the
  layer's compressed weights, which are a shard of the export) -> export (the ends, the index, the metadata);
* ``sequential`` mode: per point, capture through the already compressed layers -> solve, then the absorptions;
* ``global`` layout: pooled statistics -> one basis -> per-layer absorption -> a stock model.

Locally the tasks run in that order on a few threads (see :func:`make_task_runner`); on a Dask scheduler, each as
soon as its inputs exist. Memory is a function of one layer: at most two decoder layers are materialised at once
per process.

Every stage has a content key and reuses a complete, verified output with that key: rerunning the same
command resumes a killed run and recomputes only what is missing, stale or corrupted. Prefect's cache machinery
reports it (:mod:`tasks.cache`): a reused stage's task run is Cached.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from dotresize.api import export_layout
from dotresize.errors import DotResizeError
from storage import RunDir, content_key

from .logs import CONSOLE
from .runlock import hold_run
from .settings import apply_offline_defaults
from storage import rundir as paths
from storage.records import RUN_KEY_VERSION, RunRecipe
from tasks import (
    absorb_task,
    calibration_task,
    capture_task,
    evaluate_task,
    export_task,
    inspect_task,
    lineage_task,
    mlp_sequential_task,
    mlp_task,
    plan_mlp_task,
    plan_task,
    pool_task,
    register_task,
    resolve_source_task,
    sequential_capture_task,
    solve_task,
    zero_shot_task,
)


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
    """The run record (:class:`storage.records.RunRecipe`) as the run key and recipe.yaml take it."""
    return RunRecipe.make(config, source, calib).to_dict()


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
    """Prefect's DaskTaskRunner on an existing scheduler (``dask_address``), else Prefect's ThreadPoolTaskRunner:
    the tasks as threads of this process.

    The thread pool starts tasks in the order they are submitted, a thread waiting until a task's inputs exist:
    locally the capture chain runs layer after layer with the machine's cores to itself, and the solves and
    absorbs, ``n_workers`` at a time, after it (the last ones beside the chain's end). A local Dask cluster of
    threads ran the solves beside every capture instead, which on a few cores only slowed the chain (each task
    already uses every core through torch), and added ~0.15 s of scheduling per task. SmolLM2 at 20 % on 2 cores,
    same model bytes: 86 s wall with a 1-thread local Dask cluster, 81 s with 2 threads, 73 s with this pool.
    """
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=local_workers(n_workers))


def local_workers(n_workers: int | None = None) -> int:
    """Task threads of a local run: ``n_workers``, else 2-4 by the machine's cores (at most two of them hold a
    decoder layer at once: :data:`dotresize.layerwise.MAX_LIVE_LAYERS`)."""
    return n_workers or max(2, min(4, os.cpu_count() or 1))


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


# --- options ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecutionOptions:
    """Where and how the stage tasks run."""

    dask_address: str | None = None
    n_workers: int | None = None
    device: str | None = None
    verify: bool = True
    trust_remote_code: bool = False
    export_dtype: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class EvaluationOptions:
    """Which evaluations follow the export (each a task of the evaluate stage)."""

    ppl: bool = False
    ppl_ctx: int = 256
    ppl_max_windows: int = 100
    ppl_source: bool = False
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    tasks_source: bool = False
    dtype: str = "float32"


@dataclass(frozen=True)
class DeliveryOptions:
    """What happens to the exported model: signed, copied out, registered in MLflow, tagged."""

    mlflow: bool = True
    register_name: str | None = None
    tags: dict = field(default_factory=dict)
    signing_key: str | None = None
    out: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class RunInputs:
    """What every stage of one run is computed from (the resolved source, the recipe and its stage manifests)."""

    run_url: str
    recipe: dict
    source: dict
    inspect: dict
    calibration: dict
    execution: ExecutionOptions

    @property
    def streamed(self) -> dict:
        """Arguments of the tasks that read the source a layer at a time."""
        return {"run_url": self.run_url, "source": self.source, "inspect": self.inspect,
                "device": self.execution.device}

    @property
    def solve(self) -> dict:
        return {"run_url": self.run_url, "recipe": self.recipe, "calibration": self.calibration,
                "verify": self.execution.verify, "device": self.execution.device}

    @property
    def layers(self) -> int:
        return int(self.inspect["num_layers"])


@dataclass
class Graph:
    """The futures of one run's per-layer and per-point tasks."""

    captures: list = field(default_factory=list)
    mlps: list = field(default_factory=list)
    solves: list = field(default_factory=list)
    absorbs: list = field(default_factory=list)


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

    The parameters are the flow's (a deployment sets them as JSON); they travel on as typed options.
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
    if dask_address:
        quiet_dask_logs()
    # the ~500k objects alive now (the imported libraries) are never scanned again by the interpreter's automatic
    # full collections (each ~0.3 s with the GIL held, stalling every task thread); they are freed by reference
    # counting as before
    gc.freeze()
    config = build_config(ratio=ratio, method=method, mode=mode, layout_name=layout, seed=seed,
                          overrides=config_overrides)
    execution = ExecutionOptions(dask_address=dask_address, n_workers=n_workers, device=device, verify=verify,
                                 trust_remote_code=trust_remote_code, export_dtype=export_dtype, progress=progress)
    evaluation = EvaluationOptions(ppl=ppl, ppl_ctx=ppl_ctx, ppl_max_windows=ppl_max_windows, ppl_source=ppl_source,
                                   tasks=tuple(tasks or ()), limit=limit, tasks_source=tasks_source, dtype=eval_dtype)
    delivery = DeliveryOptions(mlflow=mlflow, register_name=register_name, tags=dict(tags or {}),
                               signing_key=signing_key, out=out, overwrite=overwrite)
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
                config.layout, config.ratio, extra={"run_dir": run.uri()})  # where the run's log goes (flows/logs.py)
    fresh = not run.exists("")
    run.makedirs()
    # one process at a time in a run directory, for the whole run (evaluations and MLflow included); a failed
    # fresh run is removed while the lease is still held (flows/runlock.py, storage/lease.py)
    with hold_run(run) as lease:
        try:
            result, outputs = _run_stages(run, config, recipe, run_key, calib, resolved["architecture"], source,
                                          execution, evaluation)
            result = _deliver(run, result, outputs, recipe, delivery)
        except DotResizeError:
            if fresh and not lease.waited:  # a run another process created while this one waited is not ours
                logger.info("removing %s: the run failed before producing anything reusable", run.uri())
                run.remove("")
            raise
    result["seconds"] = round(time.time() - started, 3)
    logger.info("model %s (sha256 %s) in %.1f s", result["model_dir"], result["model_sha256"][:12], result["seconds"])
    return result


def _run_stages(run: RunDir, config, recipe: dict, run_key: str, calib: dict, architecture: dict, source: dict,
                execution: ExecutionOptions, evaluation: EvaluationOptions) -> tuple[dict, dict]:
    """Every stage up to the evaluations, on one task runner: the run's result without lineage and delivery, and
    the manifests its registration logs (export, calibration, solves, the model's perplexity)."""
    run.write_text(paths.RECIPE, _yaml(recipe))
    run.write_json(paths.SOURCE, source)
    with make_task_runner(execution.dask_address, execution.n_workers) as runner:
        if execution.dask_address:
            quiet_dask_logs()
        inputs = _prepare(runner, run.url, recipe, source, calib, architecture, execution)
        _log_stages([inputs.calibration, inputs.inspect])
        widths = (plan_task(inputs.inspect, recipe) if config.residual_active
                  else [inputs.inspect["hidden_size"]] * inputs.inspect["num_points"])
        mlp_widths = plan_mlp_task(run, inputs.inspect, recipe) if config.mlp_active else None
        graph = _graph(runner, inputs, config, widths, mlp_widths)
        _progress(graph.solves or graph.mlps, "bases" if config.mode == "parallel" else "sequential",
                  execution.progress)
        done = {part: [manifest_of(f) for f in getattr(graph, part)] for part in ("captures", "mlps", "solves",
                                                                                   "absorbs")}
        _log_stages([m for part in ("captures", "mlps", "solves", "absorbs") for m in done[part]])
        export = manifest_of(runner.submit(export_task, {
            "run_url": run.url, "run_key": run_key, "recipe": recipe, "source": source,
            "calibration": inputs.calibration, "inspect": inputs.inspect, "widths": widths,
            "captures": done["captures"], "bases": done["solves"], "absorbs": done["absorbs"],
            "dtype": execution.export_dtype, "device": execution.device, "mlps": done["mlps"]}))
        _log_stages([export])
        evaluations = _evaluate(runner, run.url, source, export, evaluation, execution.progress)
        _log_stages(list(evaluations.values()))
    manifests = [inputs.calibration, inputs.inspect, *done["captures"], *done["mlps"], *done["solves"],
                 *done["absorbs"], export, *evaluations.values()]
    stages = _stage_summary(manifests)
    stage_seconds = {stage: round(info["seconds"], 6) for stage, info in stages.items()}
    run.write_json(paths.TIMINGS, {"stages": stage_seconds,
                                    "intervals": {_label(m): [m.get("started"), m.get("finished")]
                                                  for m in manifests if m.get("started")}})
    result = {
        "run_dir": run.uri(), "run_key": run_key, "source": source,
        "calibration": inputs.calibration.get("meta", {}), "model_dir": export["model_dir"],
        "model_sha256": export["model_sha256"], "widths": widths, "mlp_widths": mlp_widths,
        "parameters_before": export["parameters_before"],
        "parameters_after": export["parameters_after"], "parameter_ratio": export["parameter_ratio"],
        "stages": {s: {"computed": i["computed"], "reused": i["reused"]} for s, i in stages.items()},
        "stage_seconds": stage_seconds, "mlflow_run_id": None, "model_version": None, "registered_model": None,
    }
    for name in ("ppl", "ppl_source", "zero_shot", "zero_shot_source"):
        if name in evaluations:
            result[name] = evaluations[name][name.removesuffix("_source")]
    return result, {"export": export, "calibration": inputs.calibration, "solves": done["solves"],
                    "evaluate": evaluations.get("ppl")}


def _log_stages(manifests: list[dict]) -> None:
    """The console's line per stage, as soon as the stage's outputs are done: how many were computed and reused,
    and their compute time."""
    logger = get_run_logger()
    for stage, info in _stage_summary(manifests).items():
        logger.info("%s: computed %d, reused %d (%.1f s)", stage, len(info["computed"]), len(info["reused"]),
                    info["seconds"], extra=CONSOLE)  # the console's one line per stage


def _prepare(runner, run_url: str, recipe: dict, source: dict, calib: dict, architecture: dict,
             execution: ExecutionOptions) -> RunInputs:
    """Inspect the source and sample the calibration set: what every later stage is computed from."""
    inspect = manifest_of(runner.submit(inspect_task, {"run_url": run_url, "source": source,
                                                       "trust_remote_code": execution.trust_remote_code}))
    calibration = manifest_of(runner.submit(calibration_task, {
        "run_url": run_url, "source": source, "calib": calib, "inspect": inspect,
        "hidden_size": architecture["hidden_size"]}))
    return RunInputs(run_url, recipe, source, inspect, calibration, execution)


def _graph(runner, inputs: RunInputs, config, widths: list[int], mlp_widths: list[int] | None) -> Graph:
    """The per-layer and per-point tasks of the run's mode and layout, absorption included."""
    layout_name = export_layout(config)
    if config.mode == "parallel":
        graph = _parallel_graph(runner, inputs, widths, layout_name, config.residual_active)
        if mlp_widths:
            graph.mlps = [runner.submit(mlp_task, {**inputs.streamed, "layer": layer, "capture": graph.captures[layer],
                                                   "width": mlp_widths[layer], "recipe": inputs.recipe,
                                                   "verify": inputs.execution.verify})
                          for layer in range(inputs.layers)]
    else:
        mlps = _mlp_sequential_graph(runner, inputs, mlp_widths) if mlp_widths else []
        graph = (_sequential_graph(runner, inputs, widths, mlps) if config.residual_active else Graph())
        graph.mlps = mlps
    graph.absorbs = [runner.submit(absorb_task, {**inputs.streamed, "layer": layer, "layout_name": layout_name,
                                                 "dtype": inputs.execution.export_dtype,
                                                 "mlp": graph.mlps[layer] if graph.mlps else None,
                                                 "bases": graph.solves if layout_name == "global"
                                                 else graph.solves[2 * layer:2 * layer + 3]})
                     for layer in range(inputs.layers)]
    return graph


def _evaluate(runner, run_url: str, source: dict, export: dict, options: EvaluationOptions,
              progress: bool) -> dict[str, dict]:
    """The evaluations asked for, by their name in the run's result (``ppl``, ``ppl_source``, ``zero_shot``,
    ``zero_shot_source``: the manifest's field of that name without ``_source`` holds it), the source's first."""
    ppl_args = {"run_url": run_url, "ctx": options.ppl_ctx, "max_windows": options.ppl_max_windows,
                "progress": progress, "dtype": options.dtype}
    zs_args = {"run_url": run_url, "tasks": list(options.tasks), "limit": options.limit, "progress": progress,
               "dtype": options.dtype}
    wanted = (("ppl_source", options.ppl_source, evaluate_task, ppl_args, "source"),
              ("ppl", options.ppl, evaluate_task, ppl_args, "model"),
              ("zero_shot_source", bool(options.tasks) and options.tasks_source, zero_shot_task, zs_args, "source"),
              ("zero_shot", bool(options.tasks), zero_shot_task, zs_args, "model"))
    out = {}
    for name, asked, task_fn, args, target in wanted:
        if asked:
            subject = {"source": source} if target == "source" else {"export": export}
            out[name] = manifest_of(runner.submit(task_fn, {**args, **subject, "target": target}))
    return out


def _deliver(run: RunDir, result: dict, outputs: dict, recipe: dict, delivery: DeliveryOptions) -> dict:
    """The final lineage, then the signature, the copy to ``out`` and the MLflow registration (in that order: a
    signature is logged with the model, and a failed copy registers nothing)."""
    logger = get_run_logger()
    export = outputs["export"]
    try:
        from prefect.runtime import flow_run

        result["flow_run_id"] = str(flow_run.id)
    except Exception as error:  # outside a flow run (flow.fn in a test): no id to record
        logger.debug("no Prefect flow run id: %s", error)
    lineage = lineage_task(run.url, export, delivery.tags)  # + evaluations, stage digests, code version, tags
    result["lineage_sha256"] = lineage["sha256"]
    if delivery.signing_key:
        from storage.signing import sign_run_model

        result["signature"] = sign_run_model(run, delivery.signing_key)
        logger.info("signed %s", result["signature"])
    if delivery.out:
        from .outputs import copy_model

        with run.local_copy(paths.MODEL) as model_dir:
            result["out"] = str(copy_model(model_dir, Path(delivery.out), delivery.overwrite))
    if delivery.mlflow:
        _register(run, result, recipe, outputs, delivery)
    return result


def _register(run: RunDir, result: dict, recipe: dict, outputs: dict, delivery: DeliveryOptions) -> None:
    source = result["source"]
    bundle = {"recipe": recipe, "source": source, "calibration": outputs["calibration"],
              "run_key": result["run_key"], "solves": outputs["solves"], "export": outputs["export"],
              "evaluate": outputs["evaluate"],
              "stage_seconds": result["stage_seconds"],
              "default_register_name": f"dotresize-{slug(source['spec'])}",
              "run_name": Path(run.path()).name, "tags": dict(delivery.tags),
              "lineage_sha256": result["lineage_sha256"]}
    registered = register_task(run.url, bundle, delivery.register_name)
    result.update(mlflow_run_id=registered["run_id"], model_version=registered["version"],
                  registered_model=registered["registered_model"], mlflow_tracking_uri=registered["tracking_uri"])
    if any(k in result for k in ("ppl", "ppl_source", "zero_shot", "zero_shot_source")):
        from .eval_logging import log_run_evaluation

        log_run_evaluation(run.path() if run.is_local else None, run_id=registered["run_id"],
                           tracking_uri=registered["tracking_uri"], ppl=result.get("ppl"),
                           zero_shot=result.get("zero_shot"),
                           source_ppl=result.get("ppl_source"), source_zero_shot=result.get("zero_shot_source"))


def _parallel_graph(runner, inputs: RunInputs, widths: list[int], layout_name: str, residual: bool) -> Graph:
    """Capture one layer after another (each task hands its output point to the next through the store); each
    point's solve starts as soon as the layer producing it is captured; the global layout pools them first.
    Without residual slicing (the MLP axis alone) there is nothing to solve."""
    captures, previous = [], None
    for layer in range(inputs.layers):
        previous = runner.submit(capture_task, {**inputs.streamed, "layer": layer, "calibration": inputs.calibration,
                                                "recipe": inputs.recipe, "previous": previous,
                                                "verify": inputs.execution.verify})
        captures.append(previous)
    if not residual:
        return Graph(captures=captures)
    if layout_name == "global":
        pool = runner.submit(pool_task, {"run_url": inputs.run_url, "captures": captures, "recipe": inputs.recipe,
                                         "calibration": inputs.calibration, "num_points": 2 * inputs.layers + 1,
                                         "verify": inputs.execution.verify})
        return Graph(captures=captures + [pool], solves=[runner.submit(solve_task, {
            **inputs.solve, "point": "global", "capture": pool, "width": widths[0]})])
    solves = [runner.submit(solve_task, {**inputs.solve, "point": p, "capture": captures[max(0, (p - 1) // 2)],
                                         "width": widths[p]})
              for p in range(2 * inputs.layers + 1)]
    return Graph(captures=captures, solves=solves)


def _mlp_sequential_graph(runner, inputs: RunInputs, mlp_widths: list[int]) -> list:
    """The MLP axis in sequential mode: layer l's MLP reduced from its input through the reduced layers before."""
    mlps, previous = [], None
    for layer in range(inputs.layers):
        previous = runner.submit(mlp_sequential_task, {**inputs.streamed, "layer": layer,
                                                       "calibration": inputs.calibration,
                                                       "width": mlp_widths[layer], "recipe": inputs.recipe,
                                                       "previous": previous, "verify": inputs.execution.verify})
        mlps.append(previous)
    return mlps


def _sequential_graph(runner, inputs: RunInputs, widths: list[int], mlps: list) -> Graph:
    """SliceGPT's order: point p is captured through the layers compressed with the bases before it (and their
    reduced MLPs, with the MLP axis)."""
    captures, solves = [], []
    for p in range(2 * inputs.layers + 1):
        if p == 0:
            previous, bases, index = None, [], None
        else:
            index = (p - 1) // 2
            previous = captures[2 * index]
            bases = [solves[2 * index]] + ([solves[2 * index + 1]] if p % 2 == 0 else [])
        capture = runner.submit(sequential_capture_task, {
            **inputs.streamed, "point": p, "calibration": inputs.calibration, "recipe": inputs.recipe,
            "previous": previous, "bases": bases, "verify": inputs.execution.verify,
            "mlp": mlps[index] if mlps and index is not None else None})
        captures.append(capture)
        solves.append(runner.submit(solve_task, {**inputs.solve, "point": p, "capture": capture, "width": widths[p]}))
    return Graph(captures=captures, solves=solves)


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
