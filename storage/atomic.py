"""Atomic replacement of a local file or directory: the one place storage writes through a temporary name.

``with atomic_file(final) as staged: write(staged.path)`` fills a temporary file beside ``final`` and renames it
into place when the block succeeds (a reader sees the old file or the whole new one, never part of it); on an
error, or after ``staged.abandon()``, the temporary file is removed and ``final`` left as it was.
:func:`swap_dir` puts a filled temporary directory in place of another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dotresize.permissions import apply_umask


@dataclass
class Staged:
    """The temporary file of :func:`atomic_file`."""

    path: str
    abandoned: bool = False

    def abandon(self) -> None:
        """Remove the temporary file at the end of the block instead of renaming it into place."""
        self.abandoned = True


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, *, prefix: str | None = None, fsync: bool = False, umask: bool = True,
                makedirs: bool = True) -> Iterator[Staged]:
    """A temporary file beside ``final`` (named ``prefix`` + random, default ``.<name>.tmp-``), renamed over
    ``final`` when the block succeeds. ``fsync``: flush it to disk first. ``umask``: give it the mode a plain
    ``open`` would have (``mkstemp`` makes it 0600). ``makedirs``: create ``final``'s folder when missing."""
    final = os.fspath(final)
    parent = os.path.dirname(final) or "."
    if makedirs:
        os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{os.path.basename(final)}.tmp-", dir=parent)
    os.close(fd)
    staged = Staged(tmp)
    try:
        yield staged
        if not staged.abandoned:
            if fsync:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            if umask:
                apply_umask(tmp)
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(final: str | os.PathLike, data: bytes | str, *, fsync: bool = False, umask: bool = True) -> None:
    """Write ``data`` (text is UTF-8) to ``final`` through :func:`atomic_file`."""
    with atomic_file(final, fsync=fsync, umask=umask) as staged, open(staged.path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def swap_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the directory ``tmp`` in place of ``final`` (which may not exist): ``final`` is moved aside, ``tmp``
    renamed into place, then the old one deleted. If the rename fails the old ``final`` is put back."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_file", "write_atomic", "swap_dir", "Staged"]
