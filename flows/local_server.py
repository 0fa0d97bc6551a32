"""A local Prefect server for one command, when ``PREFECT_API_URL`` names none.

Prefect's own ephemeral server is a child in the caller's process group: a terminal's Ctrl-C kills it while the
flow still runs (the client then retries a dead server for minutes), and a SIGTERM of the caller leaves it
running. This one is the same uvicorn app, started

* in its own session, so that only this process decides when it stops (the interrupt cleanup, or the end of the
  block);
* with ``PR_SET_PDEATHSIG`` on Linux, so that the kernel stops it if this process dies without cleaning up
  (``kill -9``); start it from the main thread (the signal follows the thread that started it);
* with the default signal mask (see :func:`flows.interrupts.unblocked_child_argv`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import interrupts

log = logging.getLogger("dotresize")


class ServerStartError(RuntimeError):
    """The local Prefect server did not come up."""


class LocalPrefectServer:
    """``with LocalPrefectServer() as server: server.api_url``; see the module docstring.

    :meth:`launch` starts the process and returns its URL at once (the port is bound here and handed to uvicorn
    as a file descriptor, so no other process can take it in between); :meth:`wait_ready` waits until it
    answers. The command line launches it before its input checks, which then run while it starts."""

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.ready = False
        self._log: Path | None = None
        self._deadline, self._timeout = 0.0, 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self) -> str:
        import prefect
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

        timeout = self.timeout or max(60.0, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        self._deadline, self._timeout = time.monotonic() + timeout, timeout
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        fd, log_path = tempfile.mkstemp(prefix="dotresize-prefect-server-", suffix=".log")
        self._log = Path(log_path)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            argv = interrupts.unblocked_child_argv(
                "uvicorn", "--app-dir", str(Path(prefect.__file__).resolve().parent.parent), "--factory",
                "prefect.server.api.server:create_app", "--fd", str(sock.fileno()),
                "--log-level", "error", "--lifespan", "on")
            try:
                self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                                start_new_session=True, pass_fds=(sock.fileno(),))
            finally:
                os.close(fd)
        return self.api_url

    def wait_ready(self) -> str:
        """The API's URL once it answers; :class:`ServerStartError` (one line) when it does not in time."""
        if self.ready:
            return self.api_url
        if self.process is None:
            self.launch()
        if self._wait_healthy(self._deadline):
            self.ready = True
            return self.api_url
        tail = self._log_tail()
        self.stop()
        raise ServerStartError(f"the local Prefect server did not start within {self._timeout:.0f} s"
                               + (f": {tail}" if tail else "") + "; set PREFECT_API_URL to a running server")

    def start(self) -> str:
        self.launch()
        return self.wait_ready()

    def _wait_healthy(self, deadline: float) -> bool:
        import httpx

        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return True
                time.sleep(0.1)
        return False

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = [line for line in self._log.read_text(errors="replace").splitlines() if line.strip()]
            return lines[-1][:300] if lines else ""
        return ""

    def stop(self, grace: float = 3.0) -> None:
        """Stop the server (its whole session): SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent."""
        process, self.process, self.ready = self.process, None, False
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=grace)
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None

    def __enter__(self) -> LocalPrefectServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _database_exists() -> bool:
    """Whether the local server's SQLite database is already there: only then may it start before the input
    checks (a first run's server creates its database, and a bad input must leave nothing behind)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    prefix = "sqlite+aiosqlite:///"
    return url.startswith(prefix) and Path(url[len(prefix):]).is_file()


#: the server :func:`launched_early` started for this command, adopted by :func:`prefect_api`
_early: LocalPrefectServer | None = None


@contextlib.contextmanager
def _owned(server: LocalPrefectServer) -> Iterator[LocalPrefectServer]:
    """``server`` stopped when the block ends (an error included) or on an interrupt."""
    with interrupts.cleanup(server.stop, "stop the local Prefect server"):
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def launched_early() -> Iterator[None]:
    """Launch the command's local Prefect server now, without waiting for it (when ``PREFECT_API_URL`` names
    none and its database exists): its ~3 s of start-up then overlap the command's input checks and imports.
    :func:`prefect_api` inside the block uses it; it is stopped when the block ends or on an interrupt."""
    global _early
    if _early is not None or not _prefect_home().is_dir():  # loading Prefect's settings would create it
        yield
        return
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not _database_exists():
        yield
        return
    with _owned(LocalPrefectServer()) as server:
        log.debug("local Prefect server starting at %s while the inputs are checked", server.launch())
        _early = server
        try:
            yield
        finally:
            _early = None


def _drain_prefect_services(timeout: float = 5.0) -> None:
    """Send the logs and events Prefect still holds before their server goes away (best effort: the run's
    result does not depend on them)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout, at_exit=False)
        except Exception as error:  # noqa: BLE001 - any failure of a background sender, logged and passed over
            log.debug("%s did not drain: %r", worker.__name__, error)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """``$PREFECT_API_URL`` when set; else the server :func:`launched_early` started, or a new
    :class:`LocalPrefectServer` for the block (stopped on an interrupt too), with the setting pointing at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    with contextlib.nullcontext(_early) if _early is not None else _owned(LocalPrefectServer()) as server:
        with temporary_settings({PREFECT_API_URL: server.wait_ready()}):
            try:
                yield server.api_url
            finally:
                _drain_prefect_services()


__all__ = ["LocalPrefectServer", "prefect_api", "launched_early", "ServerStartError"]
