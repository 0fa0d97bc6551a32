"""File modes that honour the umask.

``tempfile.mkstemp`` and ``mkdtemp`` create 0600 files and 0700 directories whatever the umask, and so does
anything renamed into place from them (every atomic write): an exported model would be readable by its owner only.
Whatever dotresize creates through them gets, before it is renamed into place, the mode a plain ``open`` /
``mkdir`` would have given it: ``0666 & ~umask`` for files (``0777 & ~umask`` for executables) and ``0777 & ~umask``
for directories. (Private key files are the one deliberate exception: always 0600, see ``storage.signing``.)
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status`` on Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _LOCK:  # elsewhere: set and restore (briefly process-wide)
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def mode_for(directory: bool, executable: bool = False, umask: int | None = None) -> int:
    """The mode ``open``/``mkdir`` would give a new file or directory under the umask."""
    mask = current_umask() if umask is None else umask
    return (0o777 if directory or executable else 0o666) & ~mask


def apply_umask(path: str | os.PathLike, umask: int | None = None) -> None:
    """chmod one file or directory we created to its umask mode (symbolic links are left alone)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return
    directory = stat.S_ISDIR(info.st_mode)
    os.chmod(path, mode_for(directory, bool(info.st_mode & 0o100), umask))


def apply_umask_tree(root: str | os.PathLike) -> None:
    """:func:`apply_umask` on ``root`` and everything under it (a tree this process just wrote)."""
    mask = current_umask()
    root = Path(root)
    apply_umask(root, mask)
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            apply_umask(os.path.join(directory, name), mask)


__all__ = ["current_umask", "mode_for", "apply_umask", "apply_umask_tree"]
