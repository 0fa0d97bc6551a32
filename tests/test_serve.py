"""Issue 4, done-when 2: ``dotresize serve`` serves deployments/prefect.yaml against a Prefect server; the
deployment shows in ``prefect deployment ls`` and a manual ``prefect deployment run`` compresses a new checkpoint.
``prefect deploy`` registers the same file's deployments for a work pool.

These start subprocesses (the serve process, the Prefect CLI, the flow run the runner starts): about two minutes
on a small machine. They use the session's Prefect server (``prefect_api``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_model_dir

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
RECIPE = {"method": "dot", "ratio": 0.25, "calibration": {"samples": 8, "seqlen": 32, "seed": 3},
          "evaluation": {"ppl": False}}


def _env(prefect_api: str, **extra) -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_api, "COLUMNS": "250", "PYTHONPATH": str(ROOT),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_CLI_PROMPT": "false", **extra}


def _prefect(env: dict, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env=env, cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_deployments_file_builds_served_deployments(monkeypatch):
    from flows.serve import DeploymentError, build_deployments, load_deployments, project_root

    monkeypatch.chdir(project_root())
    specs = load_deployments()
    assert {s["entrypoint"] for s in specs} == {"flows/watch.py:watch_flow", "flows/compress.py:compress_flow"}
    [watch] = build_deployments(specs, names=["watch-checkpoints"], parameters={"source": "/data/run", "ratio": 0.3})
    assert watch.flow_name == "dotresize-watch" and watch.entrypoint == "flows/watch.py:watch_flow"
    assert watch.parameters["source"] == "/data/run" and "ratio" not in watch.parameters  # not a watch parameter
    assert watch.parameters["recipe"] == "recipes/dot-20.yaml" and (ROOT / "recipes" / "dot-20.yaml").is_file()
    assert watch.schedules[0].schedule.cron == "*/15 * * * *"
    with pytest.raises(DeploymentError, match="no deployment named 'nope'"):
        build_deployments(specs, names=["nope"])


def test_serve_then_deployment_ls_and_run_compresses_a_new_checkpoint(pipeline_env, prefect_api, tmp_path):
    import yaml
    from mlflow import MlflowClient

    checkpoints = pipeline_env / "train-run"
    write_model_dir(checkpoints / "checkpoint-1", seed=11)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = _env(prefect_api)
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--name", "watch-checkpoints", "--no-schedule",
         "--param", f"source={checkpoints}", "--param", f"recipe={recipe}", "--param", "settle_seconds=0",
         "--param", "register_name=tiny-served"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            listed = _prefect(env, "deployment", "ls")
            if "dotresize-watch/watch-checkpoints" in listed.stdout:
                break
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        run = _prefect(env, "deployment", "run", "dotresize-watch/watch-checkpoints", "--watch",
                       "--watch-timeout", "500", "--watch-interval", "2", timeout=560)
        served_log = (tmp_path / "serve.log").read_text()
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + served_log[-4000:]
        assert "Completed" in run.stdout, run.stdout[-2000:]
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # the serve process and the flow runs it started
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()
    uri = f"sqlite:///{pipeline_env / 'home' / 'mlflow.db'}"
    [version] = MlflowClient(uri).search_model_versions("name = 'tiny-served'")
    assert version.tags["dotresize.checkpoint"] == "checkpoint-1"
    assert (pipeline_env / "home" / "runs").is_dir() and not (ROOT / "mlruns").exists()


def test_prefect_deploy_registers_the_same_deployments(prefect_api, tmp_path):
    env = _env(prefect_api)
    pool = _prefect(env, "work-pool", "create", "dotresize", "--type", "process", "--overwrite")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    before = set(os.listdir(ROOT))
    deployed = _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert set(os.listdir(ROOT)) == before  # deploying leaves the checkout as it was
    listed = _prefect(env, "deployment", "inspect", "dotresize-watch/watch-checkpoints")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "'work_pool_name': 'dotresize'" in listed.stdout and "flows/watch.py:watch_flow" in listed.stdout
    assert "*/15 * * * *" in listed.stdout
    assert "dotresize-compress/compress" in _prefect(env, "deployment", "ls").stdout


def _stop(serve: subprocess.Popen) -> None:
    os.killpg(serve.pid, signal.SIGINT)  # the serve process, its Prefect server and the flow runs it started
    try:
        serve.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()


def _db_rows(database: Path, query: str, *args) -> list:
    """Rows of Prefect's SQLite database, read-only (no server needed, whichever server wrote them)."""
    import sqlite3

    if not database.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
            return list(db.execute(query, args))
    except sqlite3.OperationalError:  # not migrated yet, or busy
        return []


def test_served_watch_run_completes_without_prefect_api_url(pipeline_env, tmp_path):
    """Issue 12, item 6: with no PREFECT_API_URL, a run of the watch deployment (concurrency_limit 1) used to end
    Cancelled ("Deployment concurrency slot lost during provisioning"): the serve process and the flow-run
    subprocess each started their own ephemeral Prefect server, whose deployment-concurrency leases live in
    memory, so the flow run's server could not renew the lease the serve process's server had granted. `serve`
    now starts one local server for itself and its flow runs, and stops it when it stops."""
    import httpx
    import yaml
    from mlflow import MlflowClient

    checkpoints = pipeline_env / "train-run"
    write_model_dir(checkpoints / "checkpoint-1", seed=12)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {k: v for k, v in _env("").items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh Prefect database, no server anywhere
    database = tmp_path / "prefect-home" / "prefect.db"
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--name", "watch-checkpoints", "--no-schedule",
         "--param", f"source={checkpoints}", "--param", f"recipe={recipe}", "--param", "settle_seconds=0",
         "--param", "register_name=tiny-ephemeral"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not _db_rows(database, "select id from deployment where name = 'watch-checkpoints'"):
            assert serve.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(2)
        # triggered as a user without PREFECT_API_URL would (the CLI's own ephemeral API on the same database)
        run = _prefect(env, "deployment", "run", "dotresize-watch/watch-checkpoints")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", run.stdout).group(1)
        deadline = time.time() + 500
        while True:
            rows = _db_rows(database, "select state_type, state_name from flow_run where id = ?", flow_run_id)
            if rows and rows[0][0] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
                break
            assert serve.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
            time.sleep(2)
        served_log = log_path.read_text()
        assert rows[0] == ("COMPLETED", "Completed"), f"{rows[0]}\n" + served_log[-4000:]
        assert "slot lost" not in served_log
    finally:
        _stop(serve)
        log.close()
    found = re.search(r"local Prefect server at (http://127\.0\.0\.1:\d+/api)", log_path.read_text())
    assert found, log_path.read_text()[:2000]
    with pytest.raises(httpx.HTTPError):  # the server went with the serve process
        httpx.get(f"{found.group(1)}/health", timeout=5)
    uri = f"sqlite:///{pipeline_env / 'home' / 'mlflow.db'}"
    [version] = MlflowClient(uri).search_model_versions("name = 'tiny-ephemeral'")
    assert version.tags["dotresize.checkpoint"] == "checkpoint-1"
