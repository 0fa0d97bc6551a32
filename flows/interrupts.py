"""Ctrl-C and SIGTERM on the command line: stop within seconds, with one line, leaving no process behind.

:func:`guard` blocks SIGINT and SIGTERM in every thread (it must run before any thread starts: threads inherit
the mask) and one watcher thread takes them with ``sigwait``. So no handler ever runs in the main thread --
neither Python's ``KeyboardInterrupt`` nor Prefect's SIGTERM bridge, which would start the engine's crash
reporting -- and a worker thread inside a long torch call cannot delay the exit. On the first signal the
watcher, in a cleanup thread:

1. prints one line, ``dotresize: interrupted (SIGINT): ...``, and points stdout and stderr at ``/dev/null``
   (whatever a dying library prints after that is not the user's concern);
2. runs the registered cleanups, newest first (cancel the flow run, release the run lease, stop the local
   Prefect server), each given a few seconds;
3. kills every process left below this one (terminate, then kill);
4. exits with 128 + the signal number (130, 143) through ``os._exit``: worker threads are not waited for. Every
   stage output is written atomically with a completion marker written last, so the same command resumes.

A second signal, or the cleanup running past :data:`DEADLINE`, exits at once. ``guard(block=False)`` installs
plain handlers instead (for ``serve``, whose flow-run subprocesses must keep the default signal mask so that
Prefect can cancel them); the watcher does the same work.

Subprocesses started under a blocking guard inherit the blocked mask: start long-lived ones through
:func:`unblocked_child_argv` (see :mod:`flows.local_server`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("dotresize")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: seconds the whole cleanup may take before the process exits regardless
DEADLINE = 10.0
#: seconds one cleanup may take
STEP_TIMEOUT = 4.0


@dataclass
class _Cleanup:
    name: str
    fn: Callable[[], None]


@dataclass
class _State:
    cleanups: dict[int, _Cleanup] = field(default_factory=dict)
    hint: str = "run the same command again to resume"
    fired: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=itertools.count)


_state = _State()


# --- what to do on an interrupt ---------------------------------------------------------------------------------
@contextlib.contextmanager
def cleanup(fn: Callable[[], None], name: str = "") -> Iterator[None]:
    """Run ``fn`` if the process is interrupted while inside the block (newest registered first)."""
    with _state.lock:
        key = next(_state.ids)
        _state.cleanups[key] = _Cleanup(name or getattr(fn, "__name__", "cleanup"), fn)
    try:
        yield
    finally:
        with _state.lock:
            _state.cleanups.pop(key, None)


@contextlib.contextmanager
def hint(text: str) -> Iterator[None]:
    """What the interrupt line tells the user to do next, while inside the block."""
    previous, _state.hint = _state.hint, text
    try:
        yield
    finally:
        _state.hint = previous


def interrupted() -> bool:
    return _state.fired.is_set()


# --- installing the guard ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def guard(block: bool = True, what_next: str | None = None) -> Iterator[None]:
    """Handle SIGINT/SIGTERM as described in the module docstring while inside the block (main thread only);
    ``what_next`` replaces the interrupt line's default advice (see :func:`hint`)."""
    if what_next is not None:
        with hint(what_next), guard(block):
            yield
        return
    stop = threading.Event()
    if block:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        watcher = threading.Thread(target=_wait_for_signals, args=(stop,), name="dotresize-signals", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join(timeout=1.0)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: _on_signal(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_for_signals(stop: threading.Event) -> None:
    while not stop.is_set():
        received = signal.sigtimedwait(SIGNALS, 0.25)
        # a stop by a tracer (a profiler attaching, a debugger) can return a record that is no signal of ours
        if received is not None and received.si_signo in SIGNALS:
            _on_signal(received.si_signo)


def _on_signal(signum: int) -> None:
    if _state.fired.is_set():  # a second Ctrl-C: no more waiting
        os._exit(128 + signum)
    _state.fired.set()
    threading.Thread(target=_shutdown, args=(signum,), name="dotresize-interrupt", daemon=True).start()
    timer = threading.Timer(DEADLINE, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()


def _shutdown(signum: int) -> None:
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError, ValueError):  # stderr closed or gone: nothing to tell
        sys.stderr.write(f"dotresize: interrupted ({name}): stopped; {_state.hint}\n")
        sys.stderr.flush()
    _silence()
    with _state.lock:
        steps = list(reversed(_state.cleanups.values()))
    for step in steps:
        _run_bounded(step.fn, STEP_TIMEOUT)
    kill_descendants()
    os._exit(128 + signum)


def _silence() -> None:
    """Point fds 1 and 2 (and sys.stdout/stderr) at /dev/null: nothing printed after the interrupt line."""
    with contextlib.suppress(OSError):  # no /dev/null: the output stays as it is
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives until os._exit)


def _run_bounded(fn: Callable[[], None], timeout: float) -> None:
    thread = threading.Thread(target=lambda: _quietly(fn), daemon=True)
    thread.start()
    thread.join(timeout)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except BaseException as error:  # noqa: BLE001 - the process is exiting: a failed cleanup must not stop the next
        log.debug("interrupt cleanup %s failed: %r", getattr(fn, "__name__", fn), error)


def kill_descendants(grace: float = 2.0) -> None:
    """Terminate every process below this one, then kill what is left after ``grace`` seconds."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return
    with contextlib.suppress(psutil.Error, OSError):  # this process's table unreadable: nothing to kill
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=grace)


# --- children that outlive a blocking guard ----------------------------------------------------------------------
#: run as ``python -c _CHILD PARENT_PID MODULE ARGS...``: restores the default signal mask (inherited blocked
#: from the guard), asks the kernel to SIGTERM it when its parent dies (Linux), then runs ``python -m MODULE``.
_CHILD = (
    "import os, runpy, signal, sys\n"
    "signal.pthread_sigmask(signal.SIG_SETMASK, set())\n"
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):  # no prctl (not Linux)\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)  # the parent died before the death signal was armed\n"
    "sys.argv = [sys.argv[2]] + sys.argv[3:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def unblocked_child_argv(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args`` with the default signal mask, dying with this process."""
    return [sys.executable, "-c", _CHILD, str(os.getpid()), module, *args]


__all__ = ["guard", "cleanup", "hint", "interrupted", "kill_descendants", "unblocked_child_argv", "DEADLINE"]
