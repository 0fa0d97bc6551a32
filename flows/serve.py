"""``dotresize serve``: serve the deployments of ``deployments/prefect.yaml`` from this machine.

The same file is what ``prefect deploy --all --prefect-file deployments/prefect.yaml`` registers on a Prefect
server for a work pool; here every deployment is built with ``RunnerDeployment.from_entrypoint`` from its
entrypoint, parameters, schedules, tags and description, and served with Prefect's ``serve`` (scheduled and
manually triggered runs execute as subprocesses of this process, in the repository root).

The Prefect API: ``PREFECT_API_URL`` when set; otherwise ``serve`` starts one local Prefect server (loopback,
``prefect server start``, stopped with it) and hands its URL to every flow run it starts. Prefect's default
without an API URL does not work here: the serve process and each flow-run subprocess would each start their own
ephemeral server, and an ephemeral server keeps deployment-concurrency leases in its memory and runs no
scheduler. A run of the watch deployment (``concurrency_limit: 1``) was then Cancelled at PENDING -> RUNNING
("Deployment concurrency slot lost during provisioning": the flow run's server could not renew the lease the
serve process's server had granted, and the slot was taken), and its schedule never fired.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dotresize.errors import DotResizeError

#: keys of a prefect.yaml deployment that serving uses; the others (work_pool, build/push/pull, ...) are for
#: `prefect deploy` and workers
SERVED_KEYS = ("name", "entrypoint", "description", "parameters", "schedules", "schedule", "tags", "version",
               "concurrency_limit", "enforce_parameter_schema", "paused")
KNOWN_KEYS = SERVED_KEYS + ("work_pool", "build", "push", "pull", "triggers", "flow_name", "version_type",
                            "sla", "job_variables")


class DeploymentError(DotResizeError):
    """deployments/prefect.yaml is missing, malformed, or names an unknown deployment."""


def project_root() -> Path:
    """The directory holding the ``flows`` package: entrypoints and relative paths are relative to it."""
    import flows

    return Path(flows.__file__).resolve().parent.parent


def default_file() -> Path:
    import deployments

    return Path(deployments.__file__).resolve().parent / "prefect.yaml"


def load_deployments(path: str | os.PathLike | None = None) -> list[dict]:
    import yaml

    path = Path(path) if path else default_file()
    if not path.is_file():
        raise DeploymentError(f"{path} does not exist: pass --file with a prefect.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise DeploymentError(f"{path} is not valid YAML{where}") from None
    deployments = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(deployments, list) or not deployments:
        raise DeploymentError(f"{path} has no 'deployments' list")
    for spec in deployments:
        if not isinstance(spec, dict) or not spec.get("name") or not spec.get("entrypoint"):
            raise DeploymentError(f"{path}: every deployment needs a name and an entrypoint (file.py:flow)")
        unknown = sorted(set(spec) - set(KNOWN_KEYS))
        if unknown:
            raise DeploymentError(f"{path}: deployment {spec['name']!r} has an unknown key {unknown[0]!r}")
    return deployments


def _schedules(spec: dict) -> list:
    from prefect.schedules import Cron, Interval, RRule

    entries = spec.get("schedules")
    if entries is None and spec.get("schedule"):
        entries = [spec["schedule"]]
    out = []
    for entry in entries or []:
        common = {k: entry[k] for k in ("timezone", "active", "parameters", "slug") if entry.get(k) is not None}
        if entry.get("cron"):
            out.append(Cron(entry["cron"], day_or=entry.get("day_or", True), **common))
        elif entry.get("interval") is not None:
            out.append(Interval(float(entry["interval"]), anchor_date=entry.get("anchor_date"), **common))
        elif entry.get("rrule"):
            common.pop("timezone", None)
            out.append(RRule(entry["rrule"], timezone=entry.get("timezone"), **common))
        else:
            raise DeploymentError(f"deployment {spec['name']!r}: a schedule needs cron, interval or rrule")
    return out


def build_deployments(specs: list[dict], names: list[str] | None = None, parameters: dict | None = None,
                      schedules: bool = True) -> list:
    """RunnerDeployments of ``specs`` (those named in ``names``, default all), with ``parameters`` overriding the
    file's for every deployment whose flow takes them. Call with the project root as working directory."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.flows import load_flow_from_entrypoint

    chosen = [s for s in specs if not names or s["name"] in names]
    if names:
        unknown = sorted(set(names) - {s["name"] for s in specs})
        if unknown:
            raise DeploymentError(f"no deployment named {unknown[0]!r} (known: "
                                  f"{', '.join(s['name'] for s in specs)})")
    out = []
    for spec in chosen:
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        accepted = set(flow.parameters.properties) if getattr(flow, "parameters", None) else set()
        params = dict(spec.get("parameters") or {})
        params.update({k: v for k, v in (parameters or {}).items() if k in accepted})
        kwargs: dict[str, Any] = {k: spec[k] for k in ("description", "tags", "version", "concurrency_limit",
                                                        "enforce_parameter_schema", "paused") if k in spec}
        out.append(RunnerDeployment.from_entrypoint(spec["entrypoint"], spec["name"], parameters=params,
                                                    schedules=_schedules(spec) if schedules else None, **kwargs))
    return out


log = logging.getLogger("dotresize")

#: seconds to wait for the local Prefect server to answer /api/health
SERVER_STARTUP_SECONDS = 180.0


class ServerError(DotResizeError):
    """The local Prefect server that ``serve`` starts did not come up."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: runs ``python -m prefect ARGS`` after asking Linux to SIGTERM it when its parent dies (``kill -9`` of serve);
#: done in the child's own Python rather than a ``preexec_fn`` (not safe once threads run)
_PREFECT_DYING_WITH_PARENT = (
    "import runpy, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    try:\n"
    "        import ctypes\n"
    "        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    except (OSError, AttributeError):  # no libc with prctl here: nothing to ask\n"
    "        pass\n"
    "sys.argv = ['prefect', *sys.argv[1:]]\n"
    "runpy.run_module('prefect', run_name='__main__', alter_sys=True)\n"
)


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def local_server(log_file: Path, timeout: float = SERVER_STARTUP_SECONDS) -> Iterator[str]:
    """A full Prefect server (scheduler and lease services included) on a free loopback port for the duration
    of the block; yields its API URL. Its output goes to ``log_file``; it is stopped (and reaped) on exit."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-c", _PREFECT_DYING_WITH_PARENT, "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--no-ui", "--analytics-off", "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with open(log_file, "ab") as output:
        # its own session: a terminal's Ctrl-C reaches serve, which stops the server after its flow runs
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if process.poll() is not None:
                raise ServerError(f"the local Prefect server exited with code {process.returncode} (see "
                                  f"{log_file}): set PREFECT_API_URL to a running server instead")
            if time.monotonic() > deadline:
                raise ServerError(f"the local Prefect server did not answer within {timeout:g} s (see {log_file}): "
                                  "set PREFECT_API_URL to a running server instead")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def api_for_serving() -> Iterator[str]:
    """The Prefect API the serve process and its flow runs share: ``PREFECT_API_URL``, else a local server.

    The URL is exported in the environment, which Prefect's runner passes on to every flow-run subprocess."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    saved = os.environ.get("PREFECT_API_URL")
    with local_server(Path(PREFECT_HOME.value()) / "dotresize-serve-server.log") as url:
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                print(f"dotresize serve: PREFECT_API_URL is not set; started a local Prefect server at {url} "
                      "(stopped with this process). Trigger runs with: PREFECT_API_URL=" + url
                      + " prefect deployment run ...", flush=True)
                yield url
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


def serve(path: str | None = None, names: list[str] | None = None, parameters: dict | None = None,
          schedules: bool = True, limit: int | None = None) -> None:
    """Serve the deployments until interrupted (blocks)."""
    from prefect import serve as prefect_serve

    specs = load_deployments(Path(path).resolve() if path else None)  # relative to the caller's directory
    os.chdir(project_root())
    deployments = build_deployments(specs, names, parameters, schedules)
    with api_for_serving():
        prefect_serve(*deployments, limit=limit, print_starting_message=True)


__all__ = ["serve", "build_deployments", "load_deployments", "project_root", "api_for_serving", "local_server",
           "DeploymentError", "ServerError"]
