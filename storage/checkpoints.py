"""Checkpoints on disk as a training run writes them: discovery, readiness and content digests.

A *checkpoint* is a Hugging Face model folder (``checkpoint-500/`` with ``config.json`` and safetensors weights)
or a ``.gguf`` file inside a watched directory. A checkpoint is *ready* only when it is complete and no longer
being written:

* HF folder: ``config.json`` parses; every ``*.safetensors`` file's header parses and the file is exactly as
  long as the header says; a sharded checkpoint's index lists only shards that are present (and complete); an
  optional marker file (e.g. the trainer's ``trainer_state.json``) exists;
* GGUF file: the header, metadata and tensor table parse and the file holds every tensor's bytes;
* both: the sizes and modification times of its files are the same at two looks ``settle`` seconds apart.

Discovery is confined to the watched folder: ``pattern`` matches entry *names* (never paths, so ``../*``
matches nothing), paths are resolved, and a checkpoint that is, or holds, a symbolic link resolving outside the
folder is refused unless ``follow_symlinks``.

Nothing here knows about Prefect or MLflow; digests are cached by (path, size, mtime, inode) so that a watch
tick does not re-read unchanged multi-GB files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dotresize.errors import DotResizeError
from dotresize.permissions import apply_umask

#: safetensors headers larger than this are treated as corrupt (the format's own limit is 100 MB)
MAX_HEADER = 100 * 1024 * 1024
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint found in a watched directory."""

    name: str    # folder or file name, e.g. ``checkpoint-500`` or ``model-q4.gguf``
    path: Path   # absolute path of the folder or file
    kind: str    # "hf-dir" | "gguf"

    @property
    def spec(self) -> str:
        """What ``dotresize compress --model`` takes for it."""
        return str(self.path)


def natural_key(name: str) -> list:
    """``checkpoint-2`` sorts before ``checkpoint-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_hf_candidate(path: Path) -> bool:
    try:
        names = [p.name for p in path.iterdir()]
    except OSError:
        return False
    return any(n == "config.json" or n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
               for n in names)


class PatternError(DotResizeError, ValueError):
    """A checkpoint name pattern that would reach outside the watched folder."""


@dataclass
class Scan:
    """What :func:`scan` found in a watched folder: the checkpoints, and those refused (with why)."""

    root: Path
    checkpoints: list[Checkpoint] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)   # {"checkpoint": name, "reason": text}


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is a name pattern (``checkpoint-*``); a path-like one raises :class:`PatternError`."""
    if not pattern or "/" in pattern or "\\" in pattern or os.sep in pattern or pattern in (".", ".."):
        raise PatternError(f"--pattern {pattern!r} must match checkpoint names inside the watched folder (like "
                           "'checkpoint-*'): it cannot be empty, contain '/' or be '.' or '..'")
    return pattern


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def escape(path: Path, root: Path) -> str | None:
    """None when ``path`` and everything under it resolve inside ``root``; else the first symbolic link that
    leads outside (as ``link -> target``). ``root`` must be resolved."""
    target = path.resolve()
    if not _inside(target, root):
        return f"{path.name} -> {target}"
    if not target.is_dir():
        return None
    for directory, dirs, files in os.walk(target, followlinks=False):
        for name in [*dirs, *files]:
            entry = Path(directory) / name
            if entry.is_symlink():
                resolved = entry.resolve()
                if not _inside(resolved, root):
                    return f"{entry.relative_to(target).as_posix()} -> {resolved}"
    return None


def _candidate(path: Path) -> Checkpoint | None:
    if path.is_dir() and _is_hf_candidate(path):
        return Checkpoint(path.name, path.resolve(), "hf-dir")
    if path.is_file() and path.suffix == ".gguf":
        return Checkpoint(path.name, path.resolve(), "gguf")
    return None


def scan(root: str | os.PathLike, pattern: str = "*", follow_symlinks: bool = False) -> Scan:
    """Every checkpoint directly in ``root`` whose *name* matches ``pattern``, in natural order.

    Sub-folders holding a ``config.json`` or safetensors weights and ``*.gguf`` files are checkpoints; names
    starting with ``.`` or ``tmp`` (a trainer's or downloader's temporary names) are skipped. A ``root`` that is
    itself a model folder or a ``.gguf`` file is the only checkpoint. Paths are resolved; a checkpoint that is a
    symbolic link, or holds one, resolving outside ``root`` is refused unless ``follow_symlinks``.
    """
    check_pattern(pattern)
    root = Path(root).expanduser().resolve()
    result = Scan(root)
    if root.is_file():
        if root.suffix == ".gguf":
            result.checkpoints.append(Checkpoint(root.name, root, "gguf"))
        return result
    if not root.is_dir():
        return result
    if (root / "config.json").is_file():
        entries = [root]
    else:
        entries = sorted((p for p in root.iterdir() if fnmatch.fnmatchcase(p.name, pattern)
                          and not p.name.startswith((".", "tmp"))), key=lambda p: natural_key(p.name))
    for path in entries:
        try:
            found = _candidate(path)
        except OSError:
            continue
        if found is None:
            continue
        leak = None if follow_symlinks else escape(path, root)
        if leak is not None:
            result.refused.append({"checkpoint": path.name, "reason": f"a symbolic link leads outside the watched "
                                   f"folder {root} ({leak}): pass --follow-symlinks to compress it"})
            continue
        result.checkpoints.append(found)
    return result


def discover(root: str | os.PathLike, pattern: str = "*", follow_symlinks: bool = False) -> list[Checkpoint]:
    """The checkpoints of :func:`scan` (refused ones left out)."""
    return scan(root, pattern, follow_symlinks).checkpoints


# --- readiness ----------------------------------------------------------------------------------------------------
def snapshot(checkpoint: Checkpoint) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file of the checkpoint: two equal snapshots a while apart = not being written."""
    paths = [checkpoint.path] if checkpoint.path.is_file() else sorted(p for p in checkpoint.path.rglob("*")
                                                                       if p.is_file())
    out = {}
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        out[path.name if path == checkpoint.path else path.relative_to(checkpoint.path).as_posix()] = \
            (stat.st_size, stat.st_mtime_ns)
    return out


def safetensors_problem(path: Path) -> str | None:
    """None when ``path`` is a complete safetensors file, else why not (header unreadable, file too short, ...)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} has no safetensors header yet ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > MAX_HEADER or 8 + length > size:
                return f"{path.name}: safetensors header unreadable ({size} bytes written)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"{path.name}: safetensors header unreadable ({error.__class__.__name__})"
    if not isinstance(header, dict):
        return f"{path.name}: safetensors header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"{path.name}: tensor {name!r} has no data offsets"
    expected = 8 + length + end
    if size != expected:
        return f"{path.name} is incomplete ({size} of {expected} bytes)"
    return None


def gguf_problem(path: Path) -> str | None:
    """None when ``path`` is a complete GGUF file (header, metadata, tensor table and every tensor's bytes)."""
    from dotresize.checkpoint import gguf_tensor_table

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            return f"{path.name}: no GGUF magic ({path.stat().st_size} bytes written)"
        _, table, size = gguf_tensor_table(path)
    except (OSError, ValueError, EOFError, struct.error, KeyError) as error:
        return f"{path.name}: GGUF header unreadable ({error.__class__.__name__})"
    end = max((t.offset + t.nbytes for t in table), default=0)
    if size < end:
        return f"{path.name} is incomplete ({size} of {end} bytes)"
    return None


def static_problem(checkpoint: Checkpoint, marker: str | None = None) -> str | None:
    """None when the checkpoint's files are complete (one look); else why it is not ready yet."""
    path = checkpoint.path
    if checkpoint.kind == "gguf":
        return gguf_problem(path)
    if marker and not (path / marker).exists():
        return f"no {marker} yet"
    config = path / "config.json"
    if not config.is_file():
        return "no config.json yet"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            return "config.json is not a JSON object"
    except (OSError, ValueError):
        return "config.json unreadable (still being written?)"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            shards = sorted({str(v) for v in json.loads(indexes[0].read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{indexes[0].name} unreadable (still being written?)"
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return f"{indexes[0].name} lists shards not written yet: {', '.join(missing[:3])}"
        weights = [path / s for s in shards]
    else:
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            if any(p.suffix in (".bin", ".pt", ".pth") for p in path.iterdir()):
                return "only pickle weights (.bin/.pt), which dotresize never loads"
            return "no *.safetensors weights yet"
    for weight in weights:
        problem = safetensors_problem(weight)
        if problem:
            return problem
    return None


# --- digests ------------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 of files, remembered by (path, size, mtime_ns, inode) in a JSON file (``None``: in memory only).

    Several processes may share the file: entries are facts about file contents, so the last writer wins
    harmlessly; it is written to a temporary name and renamed into place.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self._entries = data

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns, stat.st_ino]

    def sha256(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        stamp = self._stamp(path)
        with self._lock:
            entry = self._entries.get(str(path))
            if entry and entry.get("stamp") == stamp:
                return entry["sha256"]
        digest = sha256_file(path)
        if self._stamp(path) != stamp:  # changed while it was read: do not remember a torn digest
            return digest
        with self._lock:
            self._entries[str(path)] = {"stamp": stamp, "sha256": digest}
        return digest

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            text = json.dumps(self._entries, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            apply_umask(tmp)  # mkstemp's 0600 -> what open() would give
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


__all__ = ["Checkpoint", "Scan", "PatternError", "scan", "discover", "check_pattern", "escape", "snapshot", "static_problem", "safetensors_problem", "gguf_problem",
           "natural_key", "sha256_file", "DigestCache"]
