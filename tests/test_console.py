"""Issue 14, item 1: a compression's console is one line per stage, its progress bars and the summary; every
task's lines go to the run directory's log file, and ``-v`` shows them on the console as well. Item 2: a usage
error is one line."""

from __future__ import annotations

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
    err = capsys.readouterr().err
    assert code == 0, err
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
