"""An exclusive lease on a run directory: one process at a time computes in it.

The lease has an owner (host, pid, a uuid) that renews a heartbeat from a background thread. It is *stale*, and
taken over by the next process that wants it, when its owner is gone: at once on the same host (the owner's
pid is dead, or now belongs to another process), from another host once its heartbeat is older than ``ttl``
(clocks must agree to well within ``ttl``, as NTP gives).

It works on local disks and on object stores through fsspec, with no rename and no read-modify-write: only
create-if-absent. One file per holding, numbered::

    <run>/.lease/000000000007.json   {"owner": {...}, "heartbeat": ..., "ttl": ..., "released": false}

* **acquire**: list the generations; when the highest is free (released or stale) or there is none, create
  the next number *if absent* -- ``os.link`` of a complete temporary file on a local disk, fsspec's
  ``pipe_file(mode="create")`` elsewhere (a conditional put: ``If-None-Match: *`` on S3 with s3fs, a generation
  precondition on GCS). Exactly one contender creates a given number. It then lists again and holds the lease
  only if its number is still the highest (a contender that read an older listing may have created a lower
  number: it deletes that and steps back).
* **renew**: the owner rewrites its own file (nobody else writes it) every ``ttl / 4`` seconds, and notices
  when a higher number appeared (the lease was taken over: :attr:`RunLease.lost`).
* **release**: the owner rewrites its file as released. Files are deleted only by the creator of a higher
  number, so the highest file never disappears while it is the highest and listings never go backwards.

A backend whose ``pipe_file(mode="create")`` is only check-then-write (fsspec's generic fallback; the
``memory://`` filesystem within one process is fine) cannot make two *processes* exclusive: use local disks,
S3 or GCS. Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .atomic import atomic_file
from .errors import StorageError
from .rundir import RunDir

log = logging.getLogger("dotresize.storage")

#: the lease's folder inside the run directory (hidden: digests and listings of the run skip it)
LEASE_DIR = ".lease"
DEFAULT_TTL = 60.0
_NAME_DIGITS = 12


class LeaseHeldError(StorageError):
    """The run directory's lease is held by another live owner (raised when not waiting for it)."""

    def __init__(self, message: str, record: LeaseRecord):
        super().__init__(message)
        self.record = record


# --- who holds it ----------------------------------------------------------------------------------------------
def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")  # containers on one host share a name but not their pids
    return ""


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (to tell a live owner from a reused pid), or None when unknown."""
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except ImportError:
        return None
    except (psutil.Error, OSError, ValueError):  # no such process, access denied
        return None


@dataclass(frozen=True)
class Owner:
    """The process holding (or having held) a lease."""

    host: str
    pid: int
    uuid: str
    since: float                 # wall-clock time the lease was taken
    process_start: float | None = None
    pid_namespace: str = ""

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, uuid=uuid.uuid4().hex, since=time.time(),
                   process_start=_process_start(pid), pid_namespace=_pid_namespace())

    def same_machine(self) -> bool:
        """True when this process can see the owner's pid (same host name and pid namespace)."""
        return self.host == socket.gethostname() and self.pid_namespace == _pid_namespace()

    def alive(self) -> bool:
        """On this machine: is the owner's process still running (and not a reused pid)?"""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        if self.process_start is not None:
            started = _process_start(self.pid)
            if started is not None and abs(started - self.process_start) > 1.0:
                return False
        return True

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"


@dataclass(frozen=True)
class LeaseRecord:
    """The content of one generation file."""

    generation: int
    owner: Owner
    heartbeat: float
    ttl: float
    released: bool = False
    path: str = field(default="", compare=False)

    def to_json(self) -> bytes:
        data = {"owner": asdict(self.owner), "heartbeat": self.heartbeat, "ttl": self.ttl, "released": self.released}
        return (json.dumps(data, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, generation: int, data: bytes, path: str = "") -> LeaseRecord:
        doc = json.loads(data)
        return cls(generation=generation, owner=Owner(**doc["owner"]), heartbeat=float(doc["heartbeat"]),
                   ttl=float(doc["ttl"]), released=bool(doc.get("released")), path=path)

    def stale(self, now: float | None = None) -> bool:
        """Its owner is gone: a dead pid on this machine, else a heartbeat older than the ttl."""
        if self.owner.same_machine():
            return not self.owner.alive()
        return (now if now is not None else time.time()) - self.heartbeat > self.ttl

    def free(self) -> bool:
        return self.released or self.stale()

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.owner.since))
        age = max(0.0, time.time() - self.heartbeat)
        return f"{self.owner.describe()} since {since} (heartbeat {age:.0f} s ago)"


# --- the lease -------------------------------------------------------------------------------------------------
class RunLease:
    """``with RunLease(run): ...`` holds the run directory exclusively; see the module docstring.

    ``acquire(wait=False)`` raises :class:`LeaseHeldError` when a live owner holds it; ``wait=True`` polls every
    ``poll`` seconds, calling ``on_wait(record)`` when it starts waiting and whenever the holder changes.
    """

    def __init__(self, run: RunDir | str | os.PathLike, *, ttl: float = DEFAULT_TTL, poll: float = 0.5,
                 on_wait: Callable[[LeaseRecord], None] | None = None):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.ttl = float(ttl)
        self.poll = poll
        self.on_wait = on_wait
        self.owner = Owner.current()
        self.generation: int | None = None
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.waited = False

    # paths ------------------------------------------------------------------------------------------------------
    @property
    def _fs(self):
        return self.run.fs

    def _dir(self) -> str:
        return self.run.path(LEASE_DIR)

    def _file(self, generation: int) -> str:
        return self.run.path(f"{LEASE_DIR}/{generation:0{_NAME_DIGITS}d}.json")

    def _generations(self) -> list[int]:
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self._fs.ls(self._dir(), detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            stem, dot, ext = name.partition(".")
            if dot and ext == "json" and stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _read(self, generation: int) -> LeaseRecord | None:
        """The record of a generation; None when it vanished. An unreadable one (a partial write on a backend
        without atomic create) counts as a live unknown owner until it is ``ttl`` old."""
        path = self._file(generation)
        try:
            data = self._fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return LeaseRecord.from_json(generation, data, path)
        except (ValueError, KeyError, TypeError):
            unknown = Owner(host="unknown", pid=-1, uuid="", since=self._mtime(path))
            return LeaseRecord(generation, unknown, heartbeat=unknown.since, ttl=self.ttl, path=path)

    def _mtime(self, path: str) -> float:
        try:
            info = self._fs.info(path)
            for key in ("mtime", "LastModified", "updated", "created"):
                value = info.get(key)
                if isinstance(value, (int, float)):
                    return float(value)
                if hasattr(value, "timestamp"):
                    return float(value.timestamp())
        except Exception as error:  # gone, or a store whose info has no time: now is the best guess
            log.debug("lease %s: no modification time (%s: %s)", path, type(error).__name__, error)
        return time.time()

    def holder(self) -> LeaseRecord | None:
        """The live holder of the lease, or None when it is free."""
        for generation in reversed(self._generations()):
            record = self._read(generation)
            if record is not None:
                return None if record.free() else record
        return None

    # writes -----------------------------------------------------------------------------------------------------
    def _record(self, released: bool = False) -> LeaseRecord:
        assert self.generation is not None
        return LeaseRecord(self.generation, self.owner, heartbeat=time.time(), ttl=self.ttl, released=released)

    def _create(self, generation: int) -> bool:
        """Create generation's file if absent; True when this call created it."""
        self.generation = generation
        data = self._record().to_json()
        path = self._file(generation)
        if self.run.is_local:
            os.makedirs(self._dir(), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._dir())
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.link(tmp, path)  # atomic create-if-absent of a complete file
                return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        try:
            self._fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    def _rewrite(self, released: bool = False) -> bool:
        """Rewrite the own file (heartbeat or release); False when it no longer exists (the run was removed)."""
        path = self._file(self.generation)
        data = self._record(released).to_json()
        if self.run.is_local:
            try:
                with atomic_file(path, prefix=".tmp-", umask=False, makedirs=False) as staged:
                    with open(staged.path, "wb") as handle:
                        handle.write(data)
                    if not os.path.exists(path):
                        staged.abandon()
            except FileNotFoundError:  # the lease folder is gone with the run
                return False
            return not staged.abandoned
        if not self._fs.exists(path):
            return False
        self._fs.pipe_file(path, data)
        return True

    def _delete(self, generation: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._file(generation))

    # acquire / release ------------------------------------------------------------------------------------------
    def acquire(self, wait: bool = True, timeout: float | None = None) -> RunLease:
        if self.generation is not None and not self.lost:
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        announced: str | None = None
        while True:
            generations = self._generations()
            top = None
            for generation in reversed(generations):
                top = self._read(generation)
                if top is not None:
                    break
            if top is None or top.free():
                mine = (top.generation if top is not None else (generations[-1] if generations else 0)) + 1
                if self._create(mine):
                    if max(self._generations(), default=mine) == mine:
                        for older in self._generations():
                            if older < mine:
                                self._delete(older)
                        self.lost = False
                        self._start_heartbeat()
                        return self
                    self._delete(mine)  # a contender with a newer listing holds a higher number
                self.generation = None
                continue
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise LeaseHeldError(f"run {self.run.uri()} is in use by {top.describe()}", top)
            if self.on_wait is not None and announced != top.owner.uuid:
                self.on_wait(top)
            announced = top.owner.uuid
            self.waited = True
            time.sleep(self.poll)

    def release(self) -> None:
        """Give the lease up (idempotent, thread-safe); nothing is written when the run directory is gone."""
        with self._lock:
            if self.generation is None:
                return
            self._stop.set()
            if not self.lost:
                try:
                    self._rewrite(released=True)
                except Exception as error:  # the store is unreachable: the heartbeat stops, it goes stale
                    log.debug("lease %s: release not written (%s: %s)", self.run.uri(), type(error).__name__,
                              error)
            self.generation = None

    @property
    def held(self) -> bool:
        return self.generation is not None and not self.lost

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(self._stop,), name="run-lease-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self, stop: threading.Event) -> None:
        interval = max(0.05, self.ttl / 4)
        while not stop.wait(interval):
            with self._lock:
                if stop.is_set() or self.generation is None:
                    return
                try:
                    if not self._rewrite() or max(self._generations(), default=0) != self.generation:
                        self.lost = True
                        return
                except Exception as error:  # a transient storage error: try again at the next beat
                    log.debug("lease %s: heartbeat failed (%s: %s); retrying", self.run.uri(), type(error).__name__,
                              error)
                    continue

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["RunLease", "LeaseRecord", "Owner", "LeaseHeldError", "LEASE_DIR", "DEFAULT_TTL"]
