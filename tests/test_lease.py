"""Issue 12, item 3: an exclusive lease per run directory (storage/lease.py) and two concurrent compressions of
one run directory (one computes, the other waits and reuses; byte-identical; verify passes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import RunDir
from storage.lease import LEASE_DIR, LeaseHeldError, LeaseRecord, Owner, RunLease

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "memory"])
def run_url(request, tmp_path) -> str:
    if request.param == "local":
        yield str(tmp_path / "run")
        return
    url = f"memory://lease-test-{os.getpid()}-{time.monotonic_ns()}/run"
    yield url
    RunDir(url).remove("")


def _plant(run_url: str, generation: int, owner: Owner, heartbeat: float, ttl: float = 60.0) -> None:
    """A lease file as another owner would have left it."""
    record = LeaseRecord(generation, owner, heartbeat=heartbeat, ttl=ttl)
    RunDir(run_url).write_bytes(f"{LEASE_DIR}/{generation:012d}.json", record.to_json())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_holder_is_refused_then_gets_it_after_release(run_url):
    first = RunLease(run_url).acquire(wait=False)
    with pytest.raises(LeaseHeldError) as refused:
        RunLease(run_url).acquire(wait=False)
    assert refused.value.record.owner.uuid == first.owner.uuid
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "since" in message
    first.release()
    second = RunLease(run_url).acquire(wait=False)
    assert second.held and RunLease(run_url).holder().owner.uuid == second.owner.uuid
    second.release()
    assert RunLease(run_url).holder() is None


def test_a_waiter_is_told_who_holds_it_and_gets_it_when_released(run_url):
    holder = RunLease(run_url).acquire()
    seen: list[LeaseRecord] = []
    waiter = RunLease(run_url, poll=0.05, on_wait=seen.append)
    got = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.acquire(wait=True), got.set()))
    thread.start()
    time.sleep(0.5)
    assert not got.is_set() and [r.owner.uuid for r in seen] == [holder.owner.uuid]
    holder.release()
    thread.join(timeout=10)
    assert got.is_set() and waiter.held and waiter.waited
    waiter.release()


def test_a_dead_owner_on_this_machine_is_stale_at_once(run_url):
    dead = Owner(host=socket.gethostname(), pid=_dead_pid(), uuid="dead", since=time.time(),
                 pid_namespace=Owner.current().pid_namespace)
    _plant(run_url, 3, dead, heartbeat=time.time())  # a fresh heartbeat does not keep a dead pid's lease
    lease = RunLease(run_url).acquire(wait=False)
    assert lease.generation == 4
    assert RunDir(run_url).listdir(LEASE_DIR) == ["000000000004.json"]  # older generations are removed
    lease.release()


def test_a_reused_pid_is_not_its_old_owner(run_url):
    reused = Owner(host=socket.gethostname(), pid=os.getpid(), uuid="old", since=time.time(),
                   process_start=1.0, pid_namespace=Owner.current().pid_namespace)
    _plant(run_url, 1, reused, heartbeat=time.time())
    RunLease(run_url).acquire(wait=False).release()


def test_another_hosts_owner_is_stale_only_after_its_ttl(run_url):
    remote = Owner(host="elsewhere.example", pid=1, uuid="remote", since=time.time())
    _plant(run_url, 1, remote, heartbeat=time.time(), ttl=30)
    with pytest.raises(LeaseHeldError, match="elsewhere.example pid 1"):
        RunLease(run_url).acquire(wait=False)
    _plant(run_url, 2, remote, heartbeat=time.time() - 31, ttl=30)
    lease = RunLease(run_url).acquire(wait=False)
    assert lease.generation == 3
    lease.release()


def test_the_heartbeat_renews_and_notices_a_takeover(run_url):
    lease = RunLease(run_url, ttl=0.4).acquire()
    path = f"{LEASE_DIR}/{lease.generation:012d}.json"
    first = json.loads(RunDir(run_url).read_bytes(path))["heartbeat"]
    time.sleep(0.35)
    assert json.loads(RunDir(run_url).read_bytes(path))["heartbeat"] > first
    _plant(run_url, lease.generation + 1, Owner(host="elsewhere.example", pid=1, uuid="x", since=time.time()),
           heartbeat=time.time())
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    assert lease.lost and not lease.held
    lease.release()  # writes nothing: the file belongs to an older generation now
    assert json.loads(RunDir(run_url).read_bytes(path))["released"] is False


def test_release_after_the_run_directory_was_removed_recreates_nothing(run_url):
    lease = RunLease(run_url).acquire()
    RunDir(run_url).remove("")
    lease.release()
    assert not RunDir(run_url).exists("")


def test_an_unreadable_lease_file_counts_as_held_until_it_is_old(tmp_path):
    run = tmp_path / "run"
    (run / LEASE_DIR).mkdir(parents=True)
    garbage = run / LEASE_DIR / "000000000001.json"
    garbage.write_text("{not json")
    with pytest.raises(LeaseHeldError, match="unknown"):
        RunLease(run, ttl=30).acquire(wait=False)
    os.utime(garbage, (time.time() - 60, time.time() - 60))
    RunLease(run, ttl=30).acquire(wait=False).release()


_CONTENDER = """
import sys, time
sys.path.insert(0, {root!r})
from storage.lease import LeaseHeldError, RunLease
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time() - 0.05))
while time.time() < start:
    pass
try:
    lease = RunLease(sys.argv[1]).acquire(wait=False)
except LeaseHeldError:
    print("refused", flush=True)
else:
    print("held", lease.generation, flush=True)
    time.sleep(120)  # keep it: a late starter must be refused too
"""


def test_processes_racing_for_a_free_lease_get_exactly_one_holder(tmp_path):
    """Create-if-absent is what makes it exclusive: five processes started at one instant, one holds it."""
    run = tmp_path / "run"
    start = time.time() + 8  # every process is up and waiting by then, even on a loaded machine
    script = _CONTENDER.format(root=str(ROOT))
    processes = [subprocess.Popen([sys.executable, "-c", script, str(run), str(start)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(5)]
    try:
        outputs = [p.stdout.readline().strip() for p in processes]
    finally:
        for p in processes:
            p.kill()
            p.wait()
    assert sorted(o.split()[0] for o in outputs if o) == ["held"] + ["refused"] * 4, outputs


# --- two compressions of one run directory at once, through the command line -------------------------------------
def test_two_concurrent_compressions_one_computes_the_other_reuses(pipeline_env, prefect_api):
    """Both commands start while the run directory is held (here by the test), wait saying so, then run one after
    the other: the first to get the lease computes, the other reuses everything; one MLflow run and version."""
    from conftest import write_model_dir

    src = write_model_dir(pipeline_env / "src", family="llama-tied", seed=3)
    run = pipeline_env / "runs" / "shared"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    env.pop("DOTRESIZE_TEST_PAUSE_AT", None)
    argv = [sys.executable, "-m", "flows.cli", "-q", "compress", "--model", str(src), "--ratio", "0.25",
            "--calib-samples", "16", "--calib-seqlen", "32", "--seed", "7", "--run-dir", str(run), "--json"]
    held = RunLease(run).acquire()
    logs = [pipeline_env / "a.err", pipeline_env / "b.err"]
    processes = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                  cwd=pipeline_env) for log in logs]
    waiting = f"run {run} is in use by {socket.gethostname()} pid {os.getpid()}"
    deadline = time.time() + 240
    try:
        while not all(waiting in log.read_text() for log in logs):
            assert all(p.poll() is None for p in processes) and time.time() < deadline, \
                [log.read_text()[-2000:] for log in logs]
            time.sleep(0.2)
    finally:
        held.release()
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    errors = [log.read_text() for log in logs]
    assert [p.returncode for p in processes] == [0, 0], [e[-3000:] for e in errors]
    results = [json.loads(out) for out in outputs]
    computed = [{stage: i["computed"] for stage, i in r["stages"].items() if i["computed"]} for r in results]
    assert sorted(bool(c) for c in computed) == [False, True], computed  # one computed, the other reused all
    later = computed.index({})
    assert f"in use by {socket.gethostname()} pid {processes[1 - later].pid}" in errors[later]
    one, two = results
    assert one["model_sha256"] == two["model_sha256"] and one["lineage_sha256"] == two["lineage_sha256"]
    assert one["mlflow_run_id"] == two["mlflow_run_id"] and one["model_version"] == two["model_version"]
    verify = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(run)], env=env, cwd=pipeline_env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]


def test_no_wait_refuses_a_held_run_directory_in_one_line(pipeline_env):
    run = pipeline_env / "runs" / "held"
    lease = RunLease(run).acquire()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "compress", "--model", str(pipeline_env / "missing-but-not-checked"),
             "--ratio", "0.25", "--run-dir", str(run), "--no-wait"], capture_output=True, text=True, timeout=120,
            cwd=pipeline_env, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        lease.release()
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"dotresize: error: run {run} is in use by {socket.gethostname()} pid {os.getpid()}")
    assert "without --no-wait" in line
