"""Exclusive inter-process locks on local files (``fcntl.flock``).

The lock is held by an open file description, so two threads of one process and two processes exclude each
other alike, and the operating system releases it when its holder dies (a crashed run never leaves a stale
lock). Lock files are never deleted: deleting one while another process waits on it would let a third take a
fresh lock beside it.

For short critical sections on one machine (creating the MLflow database, one watch identity). A run directory,
local or on an object store, is held with :mod:`storage.lease` instead (no ``flock`` on S3; an owner and a
heartbeat that outlive one call).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path


class FileLock:
    """``with FileLock(path, blocking=False) as held: ...`` — ``held`` says whether the lock was taken."""

    def __init__(self, path: str | os.PathLike, blocking: bool = True, timeout: float | None = None,
                 poll: float = 0.2):
        self.path = Path(path)
        self.blocking = blocking
        self.timeout = timeout
        self.poll = poll
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.blocking or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    return False
                time.sleep(self.poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.3f}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds (or last held) the lock: ``host pid time``, for messages."""
        with contextlib.suppress(OSError):
            return self.path.read_text().strip()
        return "unknown"

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["FileLock"]
