"""Issue 12, item 2: SIGINT and SIGTERM stop a command within seconds, with one line, exit 130/143, leaving no
process behind; the next run resumes. Real subprocesses, signalled as a terminal does (the whole process group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import write_model_dir

ROOT = Path(__file__).resolve().parents[1]
#: "within a few seconds": generous, so a loaded machine does not fail the test
EXIT_WITHIN = 15.0


def _env(home: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOTRESIZE_HOME": str(home), **extra}
    env.pop("PREFECT_API_URL", None)  # the command starts its own local Prefect server
    env.pop("DOTRESIZE_TEST_PAUSE_AT", None)
    return env


def _session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of the session ``sid`` (the subprocess was started in a new session)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{process.pid} {' '.join(process.cmdline()[:4])}")
        except psutil.Error:
            continue
    return out


def _interrupt(process: subprocess.Popen, err_path: Path, signum: int) -> tuple[list[str], float, list[str]]:
    """Signal the process group; return the stderr lines written after the signal, the seconds to exit, and the
    processes of its tree (children in any session, and its own session) still alive a moment later."""
    tree = psutil.Process(process.pid).children(recursive=True)
    assert tree, "expected child processes (the local Prefect server) to check for orphans"
    before = err_path.stat().st_size
    os.killpg(process.pid, signum)
    started = time.monotonic()
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.monotonic() - started
    time.sleep(1.0)
    survivors = _alive(tree) + _alive(_session_processes(process.pid))
    for leftover in tree:  # never leave anything behind, even when the assertion below fails
        try:
            leftover.kill()
        except psutil.Error:
            pass
    with err_path.open("rb") as handle:
        handle.seek(before)
        lines = handle.read().decode(errors="replace").splitlines()
    return lines, seconds, survivors


def _wait_for(marker: Path, process: subprocess.Popen, err_path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the command ended before pausing:\n{err_path.read_text()[-3000:]}")
        if time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("the command never reached its pause point")
        time.sleep(0.2)


def test_sigint_then_sigterm_during_capture_stop_cleanly_and_the_next_run_resumes(tiny_env):
    src = write_model_dir(tiny_env / "src", family="llama-tied", seed=3)
    run = tiny_env / "runs" / "interrupted"
    argv = [sys.executable, "-m", "flows.cli", "-q", "compress", "--model", str(src), "--ratio", "0.25",
            "--calib-samples", "16", "--calib-seqlen", "32", "--seed", "7", "--run-dir", str(run), "--json"]
    env = _env(tiny_env / "home")
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        err_path = tiny_env / f"{signal.Signals(signum).name}.err"
        with err_path.open("w") as err:
            process = subprocess.Popen(argv, env={**env, "DOTRESIZE_TEST_PAUSE_AT": "capture"}, cwd=tiny_env,
                                       stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        _wait_for(run / ".paused-capture", process, err_path)
        lines, seconds, survivors = _interrupt(process, err_path, signum)
        name = signal.Signals(signum).name
        assert process.returncode == code, err_path.read_text()[-3000:]
        assert lines == [f"dotresize: interrupted ({name}): stopped; the same command resumes {run}"], lines
        assert "Traceback" not in err_path.read_text()
        assert seconds < EXIT_WITHIN, seconds
        assert survivors == [], survivors
        (run / ".paused-capture").unlink()
        lease = json.loads(next((run / ".lease").glob("*.json")).read_text())
        assert lease["released"] is True  # released on the way out, not left to go stale
    finished = subprocess.run(argv, env=env, cwd=tiny_env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout)
    assert result["stages"]["capture"]["reused"], result["stages"]  # the layers captured before the signals
    assert result["stages"]["calibration"]["reused"] == ["calibration"]


_GUARDED = """
import subprocess, sys, threading, time
sys.path.insert(0, {root!r})
from flows import interrupts

with interrupts.guard():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(child.pid, flush=True)
    busy = threading.Thread(target=time.sleep, args=(600,))  # a worker that cannot be interrupted
    busy.start()
    with interrupts.cleanup(lambda: open({marker!r}, "w").write("cleaned"), "mark"):
        print("ready", flush=True)
        busy.join()
"""


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_guard_runs_cleanups_kills_children_and_exits_without_waiting_for_threads(tmp_path, signum, code):
    marker = tmp_path / "cleaned"
    process = subprocess.Popen([sys.executable, "-c", _GUARDED.format(root=str(ROOT), marker=str(marker))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    child = psutil.Process(int(process.stdout.readline()))
    assert process.stdout.readline().strip() == "ready"
    started = time.monotonic()
    os.killpg(process.pid, signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code and time.monotonic() - started < EXIT_WITHIN
    assert err.splitlines() == [f"dotresize: interrupted ({signal.Signals(signum).name}): stopped; run the same "
                                "command again to resume"]
    assert marker.read_text() == "cleaned"
    child.wait(timeout=10)  # it inherited the blocked signals: only the guard's kill stops it
    assert not child.is_running()


def test_serve_stops_on_the_first_ctrl_c(tmp_path):
    env = _env(tmp_path / "home", PREFECT_HOME=str(tmp_path / "prefect-home"))
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--no-schedule"], env=env,
                                 cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while "being served" not in log_path.read_text():
        assert serve.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    lines, seconds, survivors = _interrupt(serve, log_path, signal.SIGINT)
    assert serve.returncode == 130, log_path.read_text()[-3000:]
    assert [line for line in lines if line.strip()][-1] == \
        "dotresize: interrupted (SIGINT): stopped; the deployments are no longer served", lines
    assert "Traceback" not in "\n".join(lines)
    assert seconds < EXIT_WITHIN, seconds
    assert survivors == [], survivors


def _with_environ(name: str, value: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(name) == value and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def test_the_server_launched_during_the_input_checks_is_stopped_by_a_bad_input(tmp_path):
    """With a Prefect database in place, compress launches its local server before checking its inputs (so that
    its start-up overlaps them); an input the checks refuse is still one line, and the server does not outlive
    the command."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = _env(tmp_path / "dotresize-home", PREFECT_HOME=str(home))
    subprocess.run([sys.executable, "-c", "from flows.local_server import LocalPrefectServer as S; s = S(); "
                    "s.start(); s.stop()"], env=env, cwd=ROOT, check=True, timeout=120)
    assert (home / "prefect.db").is_file()
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "-v", "compress", "--model", str(bad),
                             "--ratio", "0.2", "--run-dir", str(tmp_path / "run")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    time.sleep(1.0)
    left = _alive(_with_environ("PREFECT_HOME", str(home)))
    for process in _with_environ("PREFECT_HOME", str(home)):
        process.kill()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "while the inputs are checked" in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dotresize: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert not left, left
    assert not (tmp_path / "run").exists()
