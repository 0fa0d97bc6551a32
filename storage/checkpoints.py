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

Checkpoints in an object store (``s3://bucket/prefix``, any fsspec URL; endpoint and credentials from the usual
AWS settings, as for run directories) are found the same way from a listing (:func:`scan_remote`), judged by what
the listing shows (:func:`remote_problem`: config, weights, index shards, marker; sizes and ETags unchanged across
two looks), then copied to a local mirror (:func:`mirror`, once per content: the mirror remembers the listing it
was made from) whose files get the full checks above: the pipeline reads a source from a local path.

Nothing here knows about Prefect or MLflow; digests are cached by (path, size, mtime, inode) so that a watch
tick does not re-read unchanged multi-GB files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import struct
import posixpath
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dotresize.errors import DotResizeError
from dotresize.digests import sha256_file  # the one sha256 of a file (re-exported)

from .atomic import write_atomic

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
        write_atomic(self.path, text)


# --- checkpoints in an object store ------------------------------------------------------------------------------
def is_remote(source) -> bool:
    """Whether ``source`` is a URL of a remote filesystem (``s3://...``; ``file://`` and plain paths are local)."""
    text = str(source)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One checkpoint found under a watched URL: a model folder (``.../checkpoint-500``) or a ``.gguf`` object."""

    name: str
    url: str
    kind: str    # "hf-dir" | "gguf"


def _remote_fs(url: str):
    from .rundir import open_url

    return open_url(url)


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_hf_names(names: list[str]) -> bool:
    return any(n == "config.json" or n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
               for n in names)


def scan_remote(url: str, pattern: str = "*") -> list[RemoteCheckpoint]:
    """Every checkpoint directly under ``url`` whose name matches ``pattern``, in natural order: folders holding a
    ``config.json`` or safetensors weights, and ``.gguf`` objects (names starting with ``.`` or ``tmp`` skipped);
    ``url`` itself when it is one. Nothing outside ``url`` is listed."""
    check_pattern(pattern)
    fs, root = _remote_fs(url)
    root = root.rstrip("/")
    protocol = _protocol(fs)
    base = f"{protocol}://{root}"
    if root.endswith(".gguf") and fs.isfile(root):
        return [RemoteCheckpoint(posixpath.basename(root), base, "gguf")]
    if not fs.exists(root):
        return []
    entries = fs.ls(root, detail=True)
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries]
    if "config.json" in names:
        return [RemoteCheckpoint(posixpath.basename(root), base, "hf-dir")]
    found = []
    for entry, name in sorted(zip(entries, names), key=lambda item: natural_key(item[1])):
        if not fnmatch.fnmatchcase(name, pattern) or name.startswith((".", "tmp")):
            continue
        path = entry["name"].rstrip("/")
        if entry.get("type") == "directory":
            inside = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
            if _is_hf_names(inside):
                found.append(RemoteCheckpoint(name, f"{protocol}://{path}", "hf-dir"))
        elif name.endswith(".gguf"):
            found.append(RemoteCheckpoint(name, f"{protocol}://{path}", "gguf"))
    return found


def remote_snapshot(checkpoint: RemoteCheckpoint) -> dict[str, list]:
    """``{relative path: [size, ETag or modification time]}`` of every object of the checkpoint (a remote
    checkpoint is unchanged, and its mirror up to date, when this is)."""
    fs, root = _remote_fs(checkpoint.url)
    root = root.rstrip("/")
    if checkpoint.kind == "gguf":
        info = fs.info(root)
        return {checkpoint.name: _stamp(info)}
    out = {}
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") == "directory":
            continue
        out[path[len(root):].lstrip("/")] = _stamp(info)
    return out


def _stamp(info: dict) -> list:
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") \
        or info.get("created") or ""
    return [int(info.get("size") or 0), str(version)]


def _unsafe(rel: str) -> bool:
    """A relative object path that could not be mirrored inside the checkpoint's folder."""
    parts = rel.split("/")
    return not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts)


def remote_problem(checkpoint: RemoteCheckpoint, snapshot: dict[str, list], marker: str | None = None) -> str | None:
    """None when the listing ``snapshot`` of a checkpoint looks complete (the mirror gets the full checks); else
    why not: no config, no weights, index shards not there yet, no marker, or an object name that would leave the
    checkpoint's folder."""
    unsafe = sorted(rel for rel in snapshot if _unsafe(rel))
    if unsafe:
        return f"object name {unsafe[0]!r} would leave the checkpoint's folder"
    if checkpoint.kind == "gguf":
        return None if snapshot else "not there any more"
    if marker and marker not in snapshot:
        return f"no {marker} yet"
    if "config.json" not in snapshot:
        return "no config.json yet"
    indexes = sorted(rel for rel in snapshot if rel.endswith(".safetensors.index.json") and "/" not in rel)
    if indexes:
        fs, root = _remote_fs(checkpoint.url)
        try:
            index = json.loads(fs.cat_file(posixpath.join(root.rstrip("/"), indexes[0])))
            shards = sorted({str(v) for v in index["weight_map"].values()})
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{indexes[0]} unreadable"
        missing = [s for s in shards if s not in snapshot]
        if missing:
            return f"{indexes[0]} lists shards not uploaded yet: {', '.join(missing[:3])}"
    elif not any(rel.endswith(".safetensors") and "/" not in rel for rel in snapshot):
        if any(rel.endswith((".bin", ".pt", ".pth")) for rel in snapshot):
            return "only pickle weights (.bin/.pt), which dotresize never loads"
        return "no *.safetensors weights yet"
    return None


#: beside a mirrored checkpoint, the listing it was copied from: ``.<name>.remote.json``
def _mirror_record(local_root: Path, name: str) -> Path:
    return local_root / f".{name}.remote.json"


def mirror(checkpoint: RemoteCheckpoint, snapshot: dict[str, list], local_root: str | os.PathLike) -> Checkpoint:
    """A local copy of a remote checkpoint as listed in ``snapshot``, at ``<local_root>/<name>``: reused when it
    was made from the same listing (sizes and ETags), else downloaded whole into a temporary folder and renamed
    into place, so a mirror is never partial. Returns it as a local :class:`Checkpoint`."""
    local_root = Path(local_root)
    local_root.mkdir(parents=True, exist_ok=True)
    name = checkpoint.name
    if "/" in name or name.startswith(".") or _unsafe(name):
        raise DotResizeError(f"{checkpoint.url}: the name {name!r} cannot be mirrored")
    target = local_root / name
    record = _mirror_record(local_root, name)
    wanted = {"url": checkpoint.url, "objects": snapshot}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()) == wanted and target.exists():
            return Checkpoint(name, target.resolve(), checkpoint.kind)
    fs, root = _remote_fs(checkpoint.url)
    root = root.rstrip("/")
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=local_root))
    try:
        local = staging / name
        if checkpoint.kind == "gguf":
            fs.get_file(root, str(local))
        else:
            local.mkdir()
            for rel in snapshot:
                path = local.joinpath(*rel.split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(posixpath.join(root, rel), str(path))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(local, target)
        write_atomic(record, json.dumps(wanted, sort_keys=True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Checkpoint(name, target.resolve(), checkpoint.kind)


__all__ = ["Checkpoint", "Scan", "PatternError", "scan", "discover", "check_pattern", "escape", "snapshot", "static_problem", "safetensors_problem", "gguf_problem",
           "natural_key", "sha256_file", "DigestCache", "RemoteCheckpoint", "is_remote", "scan_remote", "remote_snapshot",
           "remote_problem", "mirror"]
