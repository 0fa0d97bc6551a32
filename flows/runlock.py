"""The run directory's lease (:mod:`storage.lease`) around one compression, with the command line's messages.

``with hold_run(run): ...`` waits for another process computing in the same run directory (saying which run,
who holds it and since when) or, after ``configure(wait=False)`` (``compress --no-wait``), refuses at once with
:class:`RunBusyError`. While held, an interrupt releases the lease and marks the Prefect flow run Cancelled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from dotresize.errors import DotResizeError
from storage import RunDir
from storage.lease import DEFAULT_TTL, LeaseHeldError, LeaseRecord, RunLease

from . import interrupts
from .preflight import busy_message

log = logging.getLogger("dotresize")


class RunBusyError(DotResizeError):
    """Another live process holds the run directory's lease (and the command was told not to wait)."""


@dataclass
class LeaseSettings:
    wait: bool = True
    ttl: float = DEFAULT_TTL


settings = LeaseSettings()


def configure(*, wait: bool = True, ttl: float = DEFAULT_TTL) -> None:
    """How :func:`hold_run` behaves in this process (the CLI sets ``wait=False`` for ``--no-wait``)."""
    settings.wait, settings.ttl = wait, ttl


def _announce(run: RunDir):
    def on_wait(record: LeaseRecord) -> None:
        log.info("run %s is in use by %s: waiting for it to finish (Ctrl-C to stop; --no-wait refuses instead)",
                 run.uri(), record.describe())
    return on_wait


def _flow_run_canceller():
    """A function marking the current Prefect flow run Cancelled, or None outside a flow run.

    It posts to the API directly (httpx, 2 s timeout): it runs in the interrupt's cleanup thread, where Prefect's
    client would see none of this flow's settings (and would start an ephemeral server of its own)."""
    try:
        from prefect.context import FlowRunContext
        from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

        context = FlowRunContext.get()
        api_url, api_key = PREFECT_API_URL.value(), PREFECT_API_KEY.value()
    except Exception as error:  # no Prefect context or settings here: nothing to mark Cancelled
        log.debug("no Prefect flow run to cancel on an interrupt (%s: %s)", type(error).__name__, error)
        return None
    if context is None or context.flow_run is None or not api_url:
        return None
    flow_run_id = context.flow_run.id

    def cancel() -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
        state = {"type": "CANCELLED", "name": "Cancelled", "message": "interrupted on the command line"}
        httpx.post(f"{api_url.rstrip('/')}/flow_runs/{flow_run_id}/set_state", json={"state": state, "force": True},
                   headers=headers, timeout=2.0)

    return cancel


@contextlib.contextmanager
def hold_run(run: RunDir) -> Iterator[RunLease]:
    """Hold ``run``'s lease for the block (see the module docstring)."""
    lease = RunLease(run, ttl=settings.ttl, on_wait=_announce(run))
    try:
        lease.acquire(wait=settings.wait)
    except LeaseHeldError as error:
        raise RunBusyError(busy_message(run, error.record)) from None
    if lease.waited:
        log.info("run %s is free: continuing (finished stages are reused)", run.uri())
    cancel = _flow_run_canceller()
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupts.cleanup(lease.release, "release the run lease"))
        if cancel is not None:
            stack.enter_context(interrupts.cleanup(cancel, "mark the flow run Cancelled"))
        stack.enter_context(interrupts.hint(f"the same command resumes {run.uri()}"))
        try:
            yield lease
        finally:
            if lease.lost:
                log.warning("the lease on %s was taken over by another process while this one ran (its heartbeat "
                            "stopped for over %.0f s)", run.uri(), lease.ttl)
            lease.release()


__all__ = ["hold_run", "configure", "RunBusyError", "settings"]
