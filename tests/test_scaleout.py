"""Issue 15: the same compression against real shared services, all started here on loopback and stopped after.

* an S3-compatible object store: moto's standalone server (``moto_server``), bucket ``dotresize``;
* ``mlflow server`` whose artifacts go to that store (``--artifacts-destination s3://dotresize/mlartifacts``);
* ``prefect server start`` (the pipeline finds it through ``PREFECT_API_URL``);
* ``dask scheduler`` and two ``dask worker`` processes, each in its own working directory, that share nothing
  with the submitting process but the run directory's URL and the settings in their environment;
* ``dotresize serve`` of the watch deployment on a 60 s interval schedule, watching ``s3://dotresize/watched``.

A tiny-model compression with ``--run-dir s3://dotresize/run`` is killed (SIGKILL) while its solves run, resumed
on the Dask workers, and must give the same model bytes as a run on the local disk; MLflow, Prefect,
``dotresize verify`` and ``dotresize lineage`` are checked against what the services hold; the resumed run's
reused stages are Cached task runs in Prefect. A checkpoint uploaded to the watched prefix is compressed by the
first scheduled watch run and left alone by the next. Nothing is mocked: a service that does not start fails the
module with its log, it does not skip. See docs/scale-out.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import kill_when_paused, write_model_dir

BIN = Path(sys.executable).parent
BUCKET = "dotresize"
RUN_URL = f"s3://{BUCKET}/run"
ARGS = ["--ratio", "0.25", "--method", "dot", "--calib-samples", "16", "--calib-seqlen", "32", "--seed", "7"]
REGISTERED = "tiny-scaleout"
START_TIMEOUT = 120.0


# --- services --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class Services:
    root: Path
    env: dict                       # what every client (the CLI, the workers) gets
    s3_url: str = ""
    mlflow_url: str = ""
    prefect_url: str = ""
    dask_address: str = ""
    worker_dirs: list = field(default_factory=list)
    started: list = field(default_factory=list)  # Service, in start order

    def start(self, name: str, argv: list[str], *, env: dict | None = None, cwd: Path | None = None) -> Service:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if not Path(argv[0]).is_file():
            pytest.fail(f"{argv[0]} is not installed: `make setup` (pip install -c constraints.txt -e '.[all]') "
                        f"installs it, so that {name} can be started", pytrace=False)
        with open(log, "wb") as handle:  # its own session: the whole process group is stopped at the end
            process = subprocess.Popen(argv, env=env or self.env, cwd=cwd or self.root, stdin=subprocess.DEVNULL,
                                       stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        service = Service(name, process, log)
        self.started.append(service)
        return service

    def wait_http(self, service: Service, url: str, timeout: float = START_TIMEOUT) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if service.process.poll() is not None:
                    pytest.fail(f"{service.name} exited with {service.process.returncode} before answering {url}:\n"
                                f"{service.tail()}", pytrace=False)
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                time.sleep(0.25)
        pytest.fail(f"{service.name} did not answer {url} within {timeout:.0f} s:\n{service.tail()}", pytrace=False)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every process group (last started first), SIGKILL to what is left after ``grace``."""
        for service in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for service in reversed(self.started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for service in self.started:  # the group outlives its leader (mlflow's uvicorn, the Prefect services)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=10)

    def leftovers(self) -> list[str]:
        """Live (non-zombie) processes of any started process group."""
        import psutil

        groups = {s.process.pid for s in self.started}
        out = []
        for process in psutil.process_iter(["pid", "status", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                    out.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:120]}")
        return out


def _client_env(root: Path, data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_API", "DASK_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env.update({
        # the object store: the usual AWS settings, nothing else (s3fs, boto3 and MLflow all read them)
        "AWS_ACCESS_KEY_ID": "scaleout-test", "AWS_SECRET_ACCESS_KEY": "scaleout-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(root / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-creds"),
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "DOTRESIZE_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root / "prefect-client"),
        "DOTRESIZE_HOME": str(root / "home"),  # only used were MLFLOW_TRACKING_URI unset: it is set below
    })
    env.pop("DOTRESIZE_TEST_PAUSE_AT", None)
    return env


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_data_dir):
    root = tmp_path_factory.mktemp("scaleout")
    svc = Services(root=root, env=_client_env(root, tiny_data_dir))
    try:
        s3_port, mlflow_port, prefect_port, dask_port = (_free_port() for _ in range(4))
        svc.s3_url = f"http://127.0.0.1:{s3_port}"
        svc.mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        svc.prefect_url = f"http://127.0.0.1:{prefect_port}/api"
        svc.dask_address = f"tcp://127.0.0.1:{dask_port}"
        svc.env.update(AWS_ENDPOINT_URL=svc.s3_url, MLFLOW_S3_ENDPOINT_URL=svc.s3_url)
        # all four start at once (each takes seconds); readiness is awaited below
        moto = svc.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)])
        mlflow = svc.start("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow-server' / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
            env={**svc.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=_mkdir(root / "mlflow-server"))
        prefect = svc.start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                        str(prefect_port)],
                            env={**svc.env, "PREFECT_HOME": str(root / "prefect-server"), "PREFECT_UI_ENABLED": "false"},
                            cwd=_mkdir(root / "prefect-server"))
        scheduler = svc.start("dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                                 str(dask_port), "--dashboard-address", "127.0.0.1:0"],
                              cwd=_mkdir(root / "dask-scheduler"))
        svc.wait_http(moto, f"{svc.s3_url}/")
        _make_bucket(svc)
        svc.wait_http(prefect, f"{svc.prefect_url}/health")
        svc.env["PREFECT_API_URL"] = svc.prefect_url
        svc.env["MLFLOW_TRACKING_URI"] = svc.mlflow_url
        for name in ("a", "b"):  # different working directories: nothing relative to a cwd may matter
            cwd = _mkdir(root / f"worker-{name}")
            svc.worker_dirs.append(cwd)
            svc.start(f"dask-worker-{name}", [
                str(BIN / "dask"), "worker", svc.dask_address, "--nthreads", "1", "--no-nanny", "--host",
                "127.0.0.1", "--dashboard-address", "127.0.0.1:0", "--local-directory", str(cwd / "dask-scratch"),
                "--name", f"worker-{name}"], cwd=cwd)
        _wait_workers(svc, scheduler, 2)
        svc.wait_http(mlflow, f"{svc.mlflow_url}/health")
        yield svc
    finally:
        svc.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _s3(svc: Services):
    import s3fs

    return s3fs.S3FileSystem(key=svc.env["AWS_ACCESS_KEY_ID"], secret=svc.env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=svc.s3_url, use_listings_cache=False, skip_instance_cache=True)


def _make_bucket(svc: Services) -> None:
    _s3(svc).mkdir(BUCKET)


def _wait_workers(svc: Services, scheduler: Service, count: int) -> None:
    from distributed import Client

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if scheduler.process.poll() is not None:
            pytest.fail(f"the Dask scheduler exited:\n{scheduler.tail()}", pytrace=False)
        with contextlib.suppress(OSError, TimeoutError):
            with Client(svc.dask_address, timeout=5) as client:
                client.wait_for_workers(count, timeout=max(1, deadline - time.monotonic()))
                return
        time.sleep(0.5)
    tails = "\n".join(f"--- {s.name}\n{s.tail()}" for s in svc.started if s.name.startswith("dask"))
    pytest.fail(f"{count} Dask workers did not join {svc.dask_address} within {START_TIMEOUT:.0f} s:\n{tails}",
                pytrace=False)


# --- the command line ------------------------------------------------------------------------------------------
def _cli(svc: Services, *args: str, pause: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
    env = dict(svc.env)
    if pause:
        env["DOTRESIZE_TEST_PAUSE_AT"] = pause
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "-q", *args], env=env, cwd=cwd or svc.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"{process.args} did not finish within {timeout} s:\n{err[-3000:]}") from None
    return out, err


def _compress(svc: Services, run_dir: str, *extra: str, pause: str | None = None) -> subprocess.Popen:
    return _cli(svc, "compress", "--model", str(svc.root / "src"), *ARGS, "--run-dir", run_dir, "--json", *extra,
                pause=pause)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def state(services) -> dict:
    """What the tests of this module hand on to each other (they run in file order)."""
    write_model_dir(services.root / "src", family="llama-tied", seed=3)
    return {}


# --- 1. kill -9 during the solves on s3://, resume on the remote workers, byte-identical to a local run ----------
def test_killed_on_s3_during_the_solves_resumes_on_remote_workers_byte_identical_to_a_local_run(services, state):
    svc = services
    fs = _s3(svc)
    local_run = svc.root / "local-run"
    reference = _compress(svc, str(local_run), "--no-mlflow")  # on the local disk, the in-process cluster

    paused = _compress(svc, RUN_URL, pause="solve")  # the in-process cluster: the pause hook runs in this process
    marker = f"{BUCKET}/run/.paused-solve"
    kill_when_paused(paused, lambda: fs.exists(marker), timeout=240)
    fs.rm_file(marker)
    # killed mid-solve: a Zarr store with complete points on the same URL, no solve 2, no model, a dead lease
    attrs = json.loads(fs.cat_file(f"{BUCKET}/run/activations.zarr/point_0/zarr.json"))["attributes"]
    assert attrs["complete"] is True and attrs["tokens"] == 16 * 32
    assert fs.find(f"{BUCKET}/run/activations.zarr/point_0/acts/c"), "no activation chunk objects"
    assert not fs.exists(f"{BUCKET}/run/stages/solve/2.json")
    assert not fs.exists(f"{BUCKET}/run/model")
    assert fs.find(f"{BUCKET}/run/.lease"), "the killed run held no lease in the store"

    out, err = _finish(reference)
    assert reference.returncode == 0, err[-3000:]
    local = json.loads(out)

    resumed = _compress(svc, RUN_URL, "--dask-address", svc.dask_address, "--register-name", REGISTERED)
    out, err = _finish(resumed)
    assert resumed.returncode == 0, err[-3000:]
    result = json.loads(out)
    state["result"] = result
    stages = result["stages"]
    assert "calibration" in stages["calibration"]["reused"] and "inspect" in stages["inspect"]["reused"], stages
    assert "0" in stages["capture"]["reused"], stages  # layer 0 was captured before the kill
    assert "2" in stages["solve"]["computed"], stages  # the solve it was killed in
    assert len(stages["solve"]["computed"]) + len(stages["solve"]["reused"]) == 7

    # byte identity: the model's digest, and every weight file and the index, object against local file
    assert result["model_dir"] == f"{RUN_URL}/model"
    assert result["model_sha256"] == local["model_sha256"]
    local_model = local_run / "model"
    names = sorted(p.name for p in local_model.iterdir() if p.name.endswith((".safetensors", ".index.json")))
    assert len(names) == 5, names
    for name in names:
        assert _sha(fs.cat_file(f"{BUCKET}/run/model/{name}")) == _sha((local_model / name).read_bytes()), name
    assert _sha(fs.cat_file(f"{BUCKET}/run/model/model.safetensors.index.json")) == result["model_sha256"]
    assert not [p for p in fs.find(f"{BUCKET}/run") if ".tmp-" in p], "temporary objects left in the store"

    # the tasks ran on the two workers, each in its own working directory, which got none of the run's files
    from distributed import Client

    with Client(svc.dask_address, timeout=10) as client:
        seen = client.run(lambda dask_worker: (os.getcwd(), dask_worker.state.executed_count))
    cwds = sorted(cwd for cwd, _ in seen.values())
    assert cwds == sorted(str(d) for d in svc.worker_dirs), seen
    assert sum(count for _, count in seen.values()) >= len(stages["solve"]["computed"]), seen
    for directory in svc.worker_dirs:
        assert not (directory / "runs").exists() and not list(directory.rglob("*.safetensors")), directory


# --- 2. MLflow: the tracking server holds the record, the object store holds the artifacts ---------------------
def test_mlflow_server_shows_params_metrics_artifacts_and_the_registered_version(services, state):
    from mlflow import MlflowClient

    result = state.get("result") or pytest.fail("the compression of test 1 did not finish", pytrace=False)
    assert result["mlflow_tracking_uri"] == services.mlflow_url
    client = MlflowClient(services.mlflow_url, registry_uri=services.mlflow_url)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["method"] == "dot" and params["ratio"] == "0.25" and params["source.digest"]
    assert all(f"point_{p:03d}/reconstruction_error" in run.data.metrics for p in range(7)), run.data.metrics
    assert run.data.tags["dotresize.run_dir"] == RUN_URL
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "lineage.json", "bases_summary.json", "model"} <= artifacts, artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors.index.json" in model_files, model_files
    # the server proxies them into the object store
    stored = _s3(services).find(f"{BUCKET}/mlartifacts")
    assert any(run.info.run_id in p and p.endswith("model/model.safetensors.index.json") for p in stored), stored
    version = client.get_model_version(REGISTERED, str(result["model_version"]))
    assert version.run_id == run.info.run_id and version.tags["model_sha256"] == result["model_sha256"]
    assert version.tags["dotresize.lineage_sha256"] == result["lineage_sha256"]
    assert client.get_model_version_by_alias(REGISTERED, "current").version == version.version


# --- 3. verify and lineage on the model in the object store ----------------------------------------------------
def test_verify_and_lineage_read_the_model_in_the_object_store(services, state):
    result = state.get("result") or pytest.fail("the compression of test 1 did not finish", pytrace=False)
    out, err = _finish(_cli(services, "verify", RUN_URL, "--require-mlflow", "--json"), timeout=120)
    report = json.loads(out)
    assert report["ok"] is True, (report, err[-2000:])
    checks = " | ".join(c["check"] for c in report["checks"])
    assert "match lineage.json" in checks and "registered version" in checks and "stage output" in checks, checks

    out, err = _finish(_cli(services, "lineage", f"{RUN_URL}/model", "--json"), timeout=120)
    lineage = json.loads(out)
    assert lineage["lineage_sha256"] == result["lineage_sha256"], err[-2000:]
    assert lineage["mlflow"]["run_id"] == result["mlflow_run_id"]
    assert lineage["lineage"]["run_key"] == result["run_key"]

    # a flipped byte in a stored shard is found and named
    fs = _s3(services)
    shard = f"{BUCKET}/run/model/model-00002-of-00004.safetensors"
    good = fs.cat_file(shard)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    fs.pipe_file(shard, bytes(bad))
    try:
        process = _cli(services, "verify", RUN_URL, "--no-mlflow")
        out, err = _finish(process, timeout=120)
        assert process.returncode == 1 and "model-00002-of-00004.safetensors" in out + err, (out, err[-2000:])
    finally:
        fs.pipe_file(shard, good)


# --- 4. Prefect: the separately started server has the flow runs and the task runs of the workers ---------------
def test_prefect_server_holds_the_flow_runs_and_the_remote_task_runs(services, state):
    import httpx

    result = state.get("result") or pytest.fail("the compression of test 1 did not finish", pytrace=False)
    with httpx.Client(base_url=services.prefect_url, timeout=30, trust_env=False) as client:
        flow_run = client.get(f"/flow_runs/{result['flow_run_id']}").json()
        assert flow_run["state_type"] == "COMPLETED", flow_run
        runs = client.post("/flow_runs/filter", json={"limit": 50}).json()
        states = sorted(r["state_type"] for r in runs)
        # the local reference, the killed run (never told it ended: still RUNNING), the resumed one
        assert states.count("COMPLETED") >= 2 and "RUNNING" in states, states
        tasks = client.post("/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [result["flow_run_id"]]}}, "limit": 200}).json()
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}
    assert {"capture", "solve", "absorb", "export"} <= names, names
    assert all(t["state_type"] == "COMPLETED" for t in tasks), [(t["name"], t["state_type"]) for t in tasks]
    # Prefect's own cache machinery shows the reuse (tasks/cache.py): a stage the resumed run reused is a Cached
    # task run, one it computed is not; the records behind it are plain JSON in the run directory, in the store
    states = {t["name"]: t["state_name"] for t in tasks}
    expected = {}
    for stage, info in result["stages"].items():
        for kind in ("reused", "computed"):
            for name in info[kind]:
                task_name = f"{stage}-{name}" if stage in ("capture", "solve", "absorb") else stage
                expected[task_name] = "Cached" if kind == "reused" else "Completed"
    seen = {name if name.rsplit("-", 1)[0] in ("capture", "solve", "absorb") else name.rsplit("-", 1)[0]: state
            for name, state in states.items()}
    assert {name: seen.get(name) for name in expected} == expected, states
    assert "Cached" in expected.values() and "Completed" in expected.values(), expected
    fs = _s3(services)
    records = [p for p in fs.find(f"{BUCKET}/run/.prefect") if p.endswith(".json")]
    assert len(records) >= len(expected), records
    record = json.loads(fs.cat_file(records[0]))
    assert record["metadata"]["serializer"]["type"] == "json", record["metadata"]


# --- 5. the watch deployment, served against the Prefect server on a one-minute interval schedule, compresses a
#        checkpoint that appears in a watched s3:// prefix, once -----------------------------------------------------
WATCHED = f"s3://{BUCKET}/watched"
WATCH_RECIPE = {"method": "dot", "ratio": 0.25, "calibration": {"samples": 8, "seqlen": 32, "seed": 3},
                "evaluation": {"ppl": False}}
FIRST_FIRING = 35.0  # seconds after `dotresize serve` starts: it registers the deployment well before that


def _watch_deployments(svc: Services) -> Path:
    """deployments/prefect.yaml with the watch deployment's schedule made a 60 s interval whose first firing is
    FIRST_FIRING seconds from now (two firings fit the module's time budget)."""
    import datetime

    import yaml

    from flows.serve import default_file

    data = yaml.safe_load(default_file().read_text())
    [watch] = [d for d in data["deployments"] if d["name"] == "watch-checkpoints"]
    anchor = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=FIRST_FIRING)
    watch["schedules"] = [{"interval": 60, "anchor_date": anchor.isoformat(), "timezone": "UTC", "active": True}]
    data["deployments"] = [watch]
    path = svc.root / "watch-deployments.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stop_serving(service: Service) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGINT)  # serve, and any flow run it started (same group)
    try:
        service.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=10)


def test_served_watch_deployment_compresses_a_checkpoint_in_an_s3_prefix_once(services, state):
    import httpx
    import yaml
    from mlflow import MlflowClient

    svc = services
    fs = _s3(svc)
    recipe = svc.root / "watch-recipe.yaml"
    recipe.write_text(yaml.safe_dump(WATCH_RECIPE))
    serve = svc.start("serve", [
        sys.executable, "-m", "flows.cli", "serve", "--file", str(_watch_deployments(svc)),
        "--name", "watch-checkpoints", "--param", f"source={WATCHED}", "--param", f"recipe={recipe}",
        "--param", "settle_seconds=1", "--param", "register_name=tiny-watched"],
        env={**svc.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, cwd=_mkdir(svc.root / "serve"))
    try:
        with httpx.Client(base_url=svc.prefect_url, timeout=30, trust_env=False) as client:
            deadline = time.monotonic() + FIRST_FIRING
            while (found := client.get("/deployments/name/dotresize-watch/watch-checkpoints")).status_code != 200:
                if serve.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the watch deployment was not served within {FIRST_FIRING:.0f} s:\n{serve.tail(40)}",
                                pytrace=False)
                time.sleep(1)
            deployment = found.json()
            assert deployment["schedules"][0]["schedule"]["interval"] == 60, deployment["schedules"]
            # a checkpoint appears in the watched prefix (objects uploaded one by one, as a trainer's sync does)
            local = write_model_dir(svc.root / "trained" / "checkpoint-1", seed=11)
            for path in sorted(local.iterdir()):
                fs.put_file(str(path), f"{BUCKET}/watched/checkpoint-1/{path.name}")

            # the first firing compresses it, the next one (60 s later) finds it done
            deadline = time.monotonic() + FIRST_FIRING + 60 + 150
            while True:
                runs = client.post("/flow_runs/filter", json={
                    "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}},
                    "sort": "EXPECTED_START_TIME_ASC", "limit": 20}).json()
                finished = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
                if len(finished) >= 2:
                    break
                if serve.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"two scheduled watch runs did not finish: {[(r['name'], r['state_name']) for r in runs]}"
                                f"\n{serve.tail(60)}", pytrace=False)
                time.sleep(2)
            first, second = finished[:2]

            def run_logs(run: dict) -> str:
                return " | ".join(entry["message"] for entry in client.post("/logs/filter", json={
                    "logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}).json())

            # a run's logs reach the API in batches after its state does: wait for its summary line
            logs = {}
            for run in (first, second):
                settle = time.monotonic() + 60
                logs[run["id"]] = run_logs(run)
                while f"watch {WATCHED}:" not in logs[run["id"]] and time.monotonic() < settle:
                    time.sleep(1)
                    logs[run["id"]] = run_logs(run)
    finally:
        _stop_serving(serve)
    assert [r["state_name"] for r in (first, second)] == ["Completed", "Completed"], (logs, serve.tail(60))
    assert first["auto_scheduled"] and second["auto_scheduled"], "not fired by the schedule"
    assert first["parameters"]["source"] == WATCHED
    assert f"watch {WATCHED}: 1 compressed, 0 already done" in logs[first["id"]], logs[first["id"]][-3000:]
    assert f"watch {WATCHED}: 0 compressed, 1 already done" in logs[second["id"]], logs[second["id"]][-3000:]

    # registered once on the tracking server, from the checkpoint in the store; the model is in its run directory
    client = MlflowClient(svc.mlflow_url, registry_uri=svc.mlflow_url)
    [version] = client.search_model_versions("name = 'tiny-watched'")
    assert version.tags["dotresize.checkpoint"] == "checkpoint-1"
    assert version.tags["dotresize.checkpoint_url"] == f"{WATCHED}/checkpoint-1"
    run_dir = Path(client.get_run(version.run_id).data.tags["dotresize.run_dir"])
    assert (run_dir / "model" / "model.safetensors.index.json").is_file()
    assert run_dir.parent == svc.root / "home" / "runs" and len(list(run_dir.parent.iterdir())) == 1


# --- 6. everything stops, nothing is left behind ---------------------------------------------------------------
def test_every_service_stops_and_no_process_is_left(services):
    services.stop()
    deadline = time.monotonic() + 15
    while services.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert services.leftovers() == []
    assert all(s.process.poll() is not None for s in services.started)
