"""The orchestrated pipeline (issue 6): layout, equality with the in-memory API, determinism, reuse, resume
after ``kill -9``, corruption detection, an external Dask scheduler, and the MLflow record."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import kill_when_paused, write_model_dir

ARGS = dict(ratio=0.25, calib_samples=16, calib_seqlen=32, seed=7)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _weights_sha(model_dir: Path) -> str:
    """The model digest: the shard index's sha256 (the index lists every shard's sha256)."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    for shard, sha in index["metadata"]["shard_sha256"].items():
        assert _sha(model_dir / shard) == sha, shard
    return _sha(model_dir / "model.safetensors.index.json")


def _flow(model_dir: Path, run_dir: Path, **kwargs) -> dict:
    from flows.compress import compress_flow

    params = {**ARGS, "method": "dot", "mlflow": False, "progress": False, **kwargs}
    return compress_flow(model=str(model_dir), run_dir=str(run_dir), **params)


def _computed(result: dict) -> dict[str, list]:
    return {stage: info["computed"] for stage, info in result["stages"].items() if info["computed"]}


@pytest.fixture
def src(pipeline_env) -> Path:
    return write_model_dir(pipeline_env / "src", family="llama-tied", seed=3)


def _in_memory(model_dir: Path, method: str, mode: str, layout: str):
    """The in-memory API's model for the same source, calibration and config as the pipeline run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotresize import CompressionConfig, compress
    from dotresize.data import calibration_set

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = calibration_set(tokenizer, "wikitext2", samples=ARGS["calib_samples"],
                                  seqlen=ARGS["calib_seqlen"], seed=ARGS["seed"])
    config = CompressionConfig(method=method, ratio=ARGS["ratio"], mode=mode, layout=layout, seed=ARGS["seed"])
    compressed, _ = compress(model, calibration.input_ids, config, progress=False)
    return compressed


@pytest.mark.parametrize("method,mode,layout", [
    ("dot", "parallel", "per-point"),
    ("pca", "sequential", "per-point"),
    ("dot", "parallel", "global"),
])
def test_pipeline_equals_in_memory_and_has_the_run_layout(src, pipeline_env, method, mode, layout):
    from dotresize import load_compressed

    run = pipeline_env / "run"
    result = _flow(src, run, method=method, mode=mode, layout=layout)
    points = 7  # 3 layers -> 2L+1 slice points
    expected = ["recipe.yaml", "source.json", "calibration.json", "lineage.json",
                "model/model.safetensors.index.json", "model/config.json", "model/lineage.json",
                "activations.zarr/zarr.json", "timings.json", "inspect/config.json"]
    # the layer inputs' signals (the next capture reads them); every point's statistics, stored at capture as
    # they are smaller than a signal here (16 x 32 tokens, width 64)
    expected += [f"activations.zarr/point_{p}/acts/zarr.json" for p in range(0, points, 2)]
    expected += [f"activations.zarr/point_{p}/gram/zarr.json" for p in range(points)]
    expected += [f"layers/layer_{layer}.safetensors" for layer in range(3)]
    expected += [f"model/model-0000{n}-of-00004.safetensors" for n in range(1, 5)]
    if layout == "per-point":
        expected += [f"bases/point_{p}.safetensors" for p in range(points)]
        expected += [f"bases/point_{p}.json" for p in range(points)]
    else:
        expected += ["bases/global.safetensors", "bases/global.json", "activations.zarr/pooled/gram/zarr.json"]
    missing = [rel for rel in expected if not (run / rel).exists()]
    assert not missing, missing
    assert not (run / "fused").exists() and not (run / "activations.zarr" / "point_1" / "acts").exists()
    # the layer files are the export's shards, stored once (hard links)
    assert os.path.samefile(run / "layers" / "layer_0.safetensors", run / "model" / "model-00002-of-00004.safetensors")
    assert result["model_sha256"] == _weights_sha(run / "model")
    point_attrs = json.loads((run / "activations.zarr" / "point_1" / "zarr.json").read_text())["attributes"]
    assert point_attrs["complete"] is True and point_attrs["tokens"] == 16 * 32

    reference = _in_memory(src, method, mode, layout)
    exported = load_compressed(run / "model")
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (exported(ids).logits - reference(ids).logits).abs().max().item()
    assert difference <= 1e-5


def test_second_run_reuses_every_stage_and_a_fresh_run_is_byte_identical(src, pipeline_env):
    first = _flow(src, pipeline_env / "a")
    again = _flow(src, pipeline_env / "a")
    assert _computed(again) == {}, again["stages"]
    assert again["model_sha256"] == first["model_sha256"]
    fresh = _flow(src, pipeline_env / "b")
    assert _computed(fresh)["solve"] == [str(p) for p in range(7)]
    for name in sorted(p.name for p in (pipeline_env / "a" / "model").glob("*.safetensors*")):
        assert (pipeline_env / "a" / "model" / name).read_bytes() == (pipeline_env / "b" / "model" / name).read_bytes()


def test_corrupted_chunk_and_deleted_basis_are_recomputed(src, pipeline_env):
    run = pipeline_env / "run"
    first = _flow(src, run)
    chunk = next((run / "activations.zarr" / "point_4" / "acts" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (run / "bases" / "point_5.safetensors").unlink()
    again = _flow(src, run)
    computed = _computed(again)
    # point 4 is an output of layer 1: that layer is captured again (same bytes, so nothing after it changes)
    assert computed["capture"] == ["1"] and computed["solve"] == ["5"], again["stages"]
    assert again["model_sha256"] == first["model_sha256"]


def test_a_partial_point_is_never_used(src, pipeline_env):
    """A point whose complete marker is missing (a capture killed mid-way) is recomputed."""
    run = pipeline_env / "run"
    first = _flow(src, run)
    meta = run / "activations.zarr" / "point_2" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    again = _flow(src, run)
    assert _computed(again)["capture"] == ["0"], again["stages"]  # layer 0 produces points 0, 1 and 2
    assert again["model_sha256"] == first["model_sha256"]


# --- kill -9 and resume, through the command line -------------------------------------------------------------
def _cli(src: Path, run: Path, env: dict, pause: str | None = None) -> subprocess.Popen:
    env = dict(env)
    if pause:
        env["DOTRESIZE_TEST_PAUSE_AT"] = pause
    else:
        env.pop("DOTRESIZE_TEST_PAUSE_AT", None)
    # -v: the stage tasks' lines ("reused capture[0]") on the console as well as in the run's log
    argv = [sys.executable, "-m", "flows.cli", "-q", "-v", "compress", "--model", str(src), "--ratio",
            str(ARGS["ratio"]), "--method", "dot", "--calib-samples", str(ARGS["calib_samples"]), "--calib-seqlen",
            str(ARGS["calib_seqlen"]), "--seed", str(ARGS["seed"]), "--run-dir", str(run), "--no-mlflow", "--json"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill_when_paused(process: subprocess.Popen, marker: Path, timeout: float = 180) -> str:
    err = kill_when_paused(process, marker.exists, timeout)
    marker.unlink()
    return err


def _subprocess_env(pipeline_env: Path, prefect_api: str) -> dict:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=prefect_api, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return env


def test_kill_during_capture_then_during_absorb_then_resume(src, pipeline_env, prefect_api):
    reference = _flow(src, pipeline_env / "reference")
    run = pipeline_env / "run"
    env = _subprocess_env(pipeline_env, prefect_api)

    _kill_when_paused(_cli(src, run, env, pause="capture"), run / ".paused-capture")
    complete = []
    for p in range(7):
        meta = run / "activations.zarr" / f"point_{p}" / "zarr.json"
        complete.append(meta.exists() and json.loads(meta.read_text())["attributes"]["complete"])
    assert complete == [True] * 6 + [False]  # killed in layer 2, after its first point's marker

    err = _kill_when_paused(_cli(src, run, env, pause="absorb"), run / ".paused-absorb")
    assert "reused calibration" in err and "reused inspect" in err, err
    assert "reused capture[0]" in err and "reused capture[1]" in err, err  # resumed at layer 2
    assert "computing capture[2]" in err, err
    assert (run / "stages" / "capture" / "2.json").exists() and not (run / "model").exists()
    absorbed = [layer for layer in range(3) if (run / "stages" / "absorb" / f"{layer}.json").exists()]
    assert 2 not in absorbed  # paused in the last layer's absorb

    finished = _cli(src, run, env)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    result = json.loads(out)
    assert "reused capture[2]" in err and "computing absorb[2]" in err, err
    assert all(f"reused absorb[{layer}]" in err for layer in absorbed), (absorbed, err)
    assert "capture" not in _computed(result) and "solve" not in _computed(result)
    assert result["model_sha256"] == reference["model_sha256"] == _weights_sha(run / "model")


# --- an external Dask scheduler on loopback -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_runs_on_a_separately_started_dask_scheduler_and_worker(src, pipeline_env, prefect_api):
    port = _free_port()
    env = _subprocess_env(pipeline_env, prefect_api)
    bindir = Path(sys.executable).parent
    scheduler = subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", "127.0.0.1:0"], env=env, cwd=pipeline_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        _wait_for_port(port)
        worker = subprocess.Popen([str(bindir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "2",
                                   "--nworkers", "1", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
                                  env=env, cwd=pipeline_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        remote = _flow(src, pipeline_env / "remote", dask_address=f"tcp://127.0.0.1:{port}")
    finally:
        for process in (worker, scheduler):
            if process is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    local = _flow(src, pipeline_env / "local")
    assert remote["model_sha256"] == local["model_sha256"]


# --- MLflow ----------------------------------------------------------------------------------------------------
def test_mlflow_run_holds_params_metrics_artifacts_inputs_and_a_model_version(src, pipeline_env):
    from mlflow import MlflowClient

    result = _flow(src, pipeline_env / "runs" / "tracked", mlflow=True, register_name="tiny-dot")
    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    params = run.data.params
    assert params["method"] == "dot" and params["ratio"] == "0.25" and params["dot.epsilon"]
    assert params["source.digest"] == result["source"]["digest"]
    for point in range(7):
        assert f"point_{point:03d}/reconstruction_error" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "reconstruction_error")
    assert sorted(m.step for m in history) == list(range(7))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "lineage.json", "bases_summary.json", "model", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/per_point.png"]
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["calibration", "source-model"]
    version = client.get_model_version("tiny-dot", str(result["model_version"]))
    assert version.run_id == run.info.run_id
    assert version.tags["model_sha256"] == result["model_sha256"]
    again = _flow(src, pipeline_env / "runs" / "tracked", mlflow=True, register_name="tiny-dot")
    assert again["model_version"] == result["model_version"]  # a rerun does not register a duplicate
    assert len(client.search_model_versions("name='tiny-dot'")) == 1
