"""Issue 15: Prefect's own cache machinery shows the reuse of stages (tasks/cache.py).

A rerun's reused stages are task runs in state Cached in Prefect's API, while correctness stays with the run
directory's completion markers: a stage whose output was deleted is computed again (not Cached), and a result
record that is not plain JSON is never read. Tiny in-code model, the session's Prefect server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import write_model_dir

ARGS = dict(ratio=0.25, calib_samples=16, calib_seqlen=32, seed=7, method="dot", mlflow=False, progress=False,
            ppl=True, ppl_ctx=32, ppl_max_windows=4)
STAGE_TASKS = ("calibration", "inspect", "capture", "solve", "absorb", "export", "evaluate")


def _flow(src: Path, run: Path) -> dict:
    from flows.compress import compress_flow

    return compress_flow(model=str(src), run_dir=str(run), **ARGS)


def _task_states(flow_run_id: str) -> dict[str, str]:
    """{task run name: state name} of one flow run, from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def _stage_states(states: dict[str, str]) -> dict[str, str]:
    """The stage tasks' states (capture-0, solve-3, calibration, ...: random name suffixes dropped)."""
    out = {}
    for name, state in states.items():
        base, _, suffix = name.rpartition("-")
        if base in ("capture", "solve", "absorb"):
            out[name] = state
        elif base in STAGE_TASKS:
            out[base] = state
    return out


@pytest.fixture
def run(pipeline_env) -> tuple[Path, Path, dict]:
    src = write_model_dir(pipeline_env / "src", family="llama-tied", seed=3)
    run = pipeline_env / "run"
    return src, run, _flow(src, run)


def test_a_rerun_reports_every_reused_stage_as_cached(run, caplog):
    src, run_dir, first = run
    states = _stage_states(_task_states(first["flow_run_id"]))
    assert len(states) == 2 + 3 + 7 + 3 + 1 + 1, states  # calibration, inspect, 3 captures, 7 solves, 3 absorbs,
    # export, evaluate (perplexity)
    assert set(states.values()) == {"Completed"}, states

    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = _flow(src, run_dir)
    err = caplog.text
    states = _stage_states(_task_states(second["flow_run_id"]))
    assert set(states.values()) == {"Cached"}, states
    assert all(info["computed"] == [] for info in second["stages"].values()), second["stages"]
    assert "reused calibration" in err and "reused capture[2]" in err and "reused export" in err
    assert second["model_sha256"] == first["model_sha256"] and second["ppl"] == first["ppl"]
    # the tasks that are not stages (no content key, nothing stored) still run
    others = {n.rpartition("-")[0]: s for n, s in _task_states(second["flow_run_id"]).items()}
    assert others["source"] == others["lineage"] == "Completed"

    # one record per stage output, plain JSON, in the run directory (hidden: digests and copies skip it)
    records = sorted((run_dir / ".prefect").rglob("*.json"))
    assert len(records) == len(states)
    for path in records:
        record = json.loads(path.read_text())
        assert record["metadata"]["serializer"]["type"] == "json"
        assert record["metadata"]["serializer"]["object_decoder"] is None
        assert json.loads(record["result"])["key"] == path.stem


def test_a_deleted_stage_output_is_computed_again_not_cached(run, caplog):
    src, run_dir, first = run
    (run_dir / "bases" / "point_3.safetensors").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = _flow(src, run_dir)
    err = caplog.text
    states = _stage_states(_task_states(second["flow_run_id"]))
    assert states.pop("solve-3") == "Completed", states
    assert set(states.values()) == {"Cached"}, states
    assert "computing solve[3]" in err and "point_3.safetensors is missing" in err, err[-3000:]
    assert second["stages"]["solve"]["computed"] == ["3"]
    assert second["model_sha256"] == first["model_sha256"]
    assert (run_dir / "bases" / "point_3.safetensors").is_file()

    third = _flow(src, run_dir)  # and recorded again: the next run is Cached throughout
    assert set(_stage_states(_task_states(third["flow_run_id"])).values()) == {"Cached"}


def test_a_record_that_does_not_match_the_outputs_or_is_not_json_is_not_used(run):
    from tasks.cache import RunDirRecords, plain_json_record

    src, run_dir, first = run
    [inspect_record] = (run_dir / ".prefect" / "inspect").glob("*.json")
    record = json.loads(inspect_record.read_text())
    # a record of another computation of the same key (the outputs were made again outside Prefect's cache)
    result = json.loads(record["result"])
    result["finished"] -= 1
    inspect_record.write_text(json.dumps({**record, "result": json.dumps(result)}))
    [calibration_record] = (run_dir / ".prefect" / "calibration").glob("*.json")
    # a pickle record planted in the run directory: refused before Prefect could deserialise it
    pickled = {"metadata": {**record["metadata"], "serializer": {"type": "pickle", "picklelib": "cloudpickle"}},
               "result": "gAR9lC4="}
    calibration_record.write_text(json.dumps(pickled))
    with pytest.raises(ValueError, match="not a plain-JSON result record"):
        RunDirRecords().read_path(str(calibration_record))
    with pytest.raises(ValueError):
        plain_json_record(json.dumps(pickled).encode())

    second = _flow(src, run_dir)
    states = _stage_states(_task_states(second["flow_run_id"]))
    # the task ran (its own check reused the outputs) and recorded them; nothing was recomputed
    assert states.pop("inspect") == states.pop("calibration") == "Completed", states
    assert set(states.values()) == {"Cached"}, states
    assert all(info["computed"] == [] for info in second["stages"].values()), second["stages"]
    assert plain_json_record(calibration_record.read_bytes())
    assert json.loads(json.loads(inspect_record.read_text())["result"])["finished"] == result["finished"] + 1
