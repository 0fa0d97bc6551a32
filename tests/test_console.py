"""Issue 14, item 1: a compression's console is one line per stage, its progress bars and the summary; every
task's lines go to the run directory's log file, and ``-v`` shows them on the console as well. Item 2: a usage
error is one line."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_model_dir
from flows.cli import main
from storage.rundir import CONSOLE_LOG

ROOT = Path(__file__).resolve().parents[1]
#: the issue's budget for a default `make demo` (a progress bar's redraws count once: they end in \r, not \n)
MAX_LINES = 25
STAGES = ("inspect", "calibration", "capture", "solve", "absorb", "export", "evaluate")


def _cli(*argv: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The command in a fresh process, its output as written: a progress bar's \\r stays a \\r (not a new line)."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


@pytest.fixture
def no_prefect_console(monkeypatch):
    """In pytest Prefect's own console handler sits on the root logger (the command line, set up first, keeps it
    off): without it, stderr holds what the command line itself prints."""
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not isinstance(h, PrefectConsoleHandler)])


def test_default_console_is_a_line_per_stage_and_the_log_file_has_the_rest(pipeline_env, prefect_api, capsys,
                                                                           no_prefect_console):
    src = write_model_dir(pipeline_env / "src")
    run = pipeline_env / "run"
    argv = ["compress", "--model", str(src), "--ratio", "0.25", "--calib-samples", "8", "--calib-seqlen", "32",
            "--run-dir", str(run), "--ppl", "--ctx", "32"]
    result = _cli(*argv, env={"PREFECT_API_URL": prefect_api}, cwd=pipeline_env)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert console.count("\n") <= MAX_LINES, console
    assert "computing " not in console and "Finished in state" not in console, console
    assert "Loading weights" not in console and "INFO mlflow" not in console, console
    for stage in STAGES:  # one line each: "capture: computed 2, reused 0 (0.4 s)"
        assert len(re.findall(rf"^{stage}: computed \d+, reused \d+ \(\d+\.\d s\)$", result.stderr, re.M)) == 1, \
            (stage, result.stderr)
    assert "bases: 100%" in result.stderr  # the progress bar of the fan-out
    assert "WikiText-2 perplexity" in result.stdout and f"{run}/{CONSOLE_LOG}" in result.stdout
    log = (run / CONSOLE_LOG).read_text()
    assert "computing capture[0]" in log and "Finished in state Completed()" in log
    assert re.search(r"dotresize\[capture-0\]: ", log) and "capture: computed" in log

    # -v: the same lines on the console too (the rerun reuses every stage: Cached states, reused stages)
    code = main(["-v", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)  # the run's log is an artifact of its MLflow run too (as it stood at registration)
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(record["mlflow_tracking_uri"]).list_artifacts(record["mlflow_run_id"])}
    assert CONSOLE_LOG in artifacts, artifacts
    assert re.search(r"dotresize\[capture-0\]: Finished in state Cached", err), err[-3000:]
    assert re.search(r"capture: computed 0, reused \d+", err)
    assert (run / CONSOLE_LOG).read_text().startswith(log)  # appended


def test_verbose_after_the_subcommand_is_accepted():
    from flows.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["compress", "-v", "--ratio", "0.2"]).verbose is True
    assert parser.parse_args(["-v", "compress", "--ratio", "0.2"]).verbose is True
    assert parser.parse_args(["compress", "--ratio", "0.2"]).verbose is False
    assert parser.parse_args(["-q", "evaluate", "m"]).quiet is True


@pytest.mark.parametrize("argv,names", [
    (["compress", "--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["compress", "--ratio", "0.2", "--bogus"], "unrecognized arguments: --bogus"),
    (["compress"], "required: --ratio"),
    (["evaluate"], "required: model"),
    (["verify", "x", "--public-key"], "expected one argument"),
])
def test_a_usage_error_is_one_line(argv, names):
    result = _cli(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("dotresize: error: ") and names in line, line
    assert line.endswith(f"(see `dotresize {argv[0]} --help`)"), line


def _record(name: str, msg: str, *args, level: int = logging.INFO, **attrs) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    record.__dict__.update(attrs)
    return record


def test_the_default_console_keeps_stage_lines_warnings_and_the_commands_own_voice():
    from flows.logs import ConsoleFilter, ConsoleFormatter

    shown = ConsoleFilter().filter
    assert not shown(_record("prefect.task_runs", "computing capture[3] 6182899c5d54", task_run_name="capture-3"))
    assert not shown(_record("prefect.flow_runs", "Beginning flow run", flow_run_name="paper-shrimp"))
    assert not shown(_record("dotresize.storage", "a detail", task_run_name="capture-3"))
    assert not shown(_record("mlflow.store.db.utils", "Creating initial MLflow database tables..."))
    stage = _record("prefect.flow_runs", "%s: computed %d, reused %d (%.1f s)", "capture", 30, 0, 41.2,
                    flow_run_name="paper-shrimp", console=True)
    assert shown(stage) and ConsoleFormatter().format(stage) == "capture: computed 30, reused 0 (41.2 s)"
    assert shown(_record("prefect.task_runs", "odd", level=logging.WARNING, task_run_name="solve-1"))
    # the command's own voice, inside a flow too: waiting for a busy run directory, a sweep's cells
    assert shown(_record("dotresize", "run %s is in use by %s: waiting for it to finish", "r", "h"))
    assert shown(_record("dotresize.sources", "loading a model"))  # the library, outside a run (--in-memory)


def test_the_run_log_waits_for_the_run_directory_and_follows_each_announced_run(tmp_path):
    from flows.logs import RunLogHandler

    first, second = tmp_path / "one", tmp_path / "two"
    handler = RunLogHandler()
    handler.handle(_record("prefect.flow_runs", "Beginning flow run", flow_run_name="f"))
    handler.handle(_record("prefect.flow_runs", "run %s (key %s): dot", str(first), "abc", flow_run_name="f"))
    assert not first.exists()  # never created by the log: a failed fresh run removes the flow's directory
    first.mkdir()
    handler.handle(_record("prefect.task_runs", "computing capture[0]", task_run_name="capture-0"))
    handler.handle(_record("prefect.flow_runs", "detail", flow_run_name="g", run_dir=str(second)))
    second.mkdir()
    handler.handle(_record("prefect.task_runs", "computing solve[0]", task_run_name="solve-0"))
    handler.handle(_record("prefect.task_runs", "remote", task_run_name="x", run_dir="memory://console-test/run"))
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.makedirs("/console-test/run", exist_ok=True)
    handler.close()
    one = (first / CONSOLE_LOG).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in one] == [
        "dotresize[f]: Beginning flow run", f"dotresize[f]: run {first} (key abc): dot",
        "dotresize[capture-0]: computing capture[0]"]
    assert (second / CONSOLE_LOG).read_text().splitlines()[-1].endswith("dotresize[solve-0]: computing solve[0]")
    assert fs.cat_file(f"/console-test/run/{CONSOLE_LOG}").decode().endswith("dotresize[x]: remote\n")


def test_after_a_user_error_the_tasks_cancelled_because_of_it_say_nothing(monkeypatch):
    """A stage's user error (one line) stops the run; the task runner then cancels the tasks waiting on it, and
    Prefect reports each as crashed: those records must not reach the console (the timing decides whether any
    task was waiting, so the CLI test of a NaN model could not show this reliably)."""
    from dotresize.errors import NonFiniteActivationError
    from flows.logs import UserErrorFilter

    monkeypatch.setattr(UserErrorFilter, "seen_user_error", False)
    log_filter = UserErrorFilter()

    def record(message: str, level: int = logging.ERROR, exc=None) -> logging.LogRecord:
        return logging.LogRecord("prefect.task_runs", level, __file__, 1, message, None,
                                 (type(exc), exc, None) if exc else None)

    crash = ("Crash detected! Execution was interrupted by an unexpected exception: CancelledError: Task run "
             "cancelled by the task runner")
    assert log_filter.filter(record(crash)), "before any user error a crash is news"
    assert not log_filter.filter(record("Task run failed", exc=NonFiniteActivationError("NaN at point 4")))
    assert not log_filter.filter(record(crash))
    assert not log_filter.filter(record("Finished in state Crashed('Execution was interrupted by an unexpected "
                                        "exception: CancelledError: Task run cancelled by the task runner')"))
    assert log_filter.filter(record("a different error"))
