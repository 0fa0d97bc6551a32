"""Checking a compressed model directory against its recorded digests (``lineage.json`` and any other record).

``lineage.json`` (inside every exported model directory and its run directory) records the sha256 of every
other file of the model, of the source's weight files and of every stage output; it cannot record its own
digest, so that one is kept elsewhere (the MLflow record). The functions here recompute digests and compare
them with a record, returning one :class:`Mismatch` per disagreeing, missing or unrecorded file. They know
nothing of MLflow: the caller passes whatever record it has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dotresize.digests import sha256_file

from .rundir import LINEAGE, SIGNATURE
MISSING = "missing"
UNRECORDED = "not recorded"


@dataclass(frozen=True)
class Mismatch:
    """``file`` has digest ``actual`` but ``against`` records ``expected`` (either may be missing/unrecorded)."""

    file: str
    expected: str
    actual: str
    against: str

    def line(self) -> str:
        return f"{self.file}: {self.against} records {self.expected}, found {self.actual}"


def file_digests(directory: str | os.PathLike, exclude: tuple[str, ...] = (), hidden: bool = False
                 ) -> dict[str, str]:
    """sha256 of every file under ``directory`` by ``/``-separated relative path (hidden files skipped unless
    ``hidden``)."""
    root = Path(directory)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel in exclude or (not hidden and any(p.startswith(".") for p in rel.split("/"))):
            continue
        out[rel] = sha256_file(path)
    return out


def model_digests(model_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a model directory except ``lineage.json`` and the signature ``model.sig`` (what
    lineage.json records; the signature covers lineage.json, so it is written after it and checked on its own)."""
    return file_digests(model_dir, exclude=(LINEAGE, SIGNATURE))


def compare(expected: dict[str, str], actual: dict[str, str], against: str) -> list[Mismatch]:
    """A mismatch for every file whose digest differs, that ``expected`` names but is missing, or that exists
    but ``expected`` does not record."""
    out = []
    for name in sorted(set(expected) | set(actual)):
        want, have = expected.get(name, UNRECORDED), actual.get(name, MISSING)
        if want != have:
            out.append(Mismatch(name, want, have, against))
    return out


def check_files(root: str | os.PathLike, recorded: dict[str, str], against: str,
                missing_ok: bool = False) -> tuple[list[Mismatch], int, int]:
    """(mismatches, checked, skipped): files named relative to ``root`` against their recorded sha256.

    With ``missing_ok`` an absent file is skipped (e.g. a cleaned-up intermediate) rather than a mismatch."""
    root = Path(root)
    mismatches, checked, skipped = [], 0, 0
    for rel, sha in sorted(recorded.items()):
        path = root / rel
        if not path.is_file():
            if missing_ok:
                skipped += 1
            else:
                mismatches.append(Mismatch(rel, sha, MISSING, against))
            continue
        actual = sha256_file(path)
        checked += 1
        if actual != sha:
            mismatches.append(Mismatch(rel, sha, actual, against))
    return mismatches, checked, skipped


def check_activations(run_dir: str | os.PathLike, points: dict[str, str], against: str
                      ) -> tuple[list[Mismatch], int, int]:
    """(mismatches, checked, skipped): every captured point's recorded digest against the Zarr store, whose
    chunks are re-hashed. Points (or the store) no longer present are skipped."""
    from .activations import ActivationStore
    from .rundir import ACTIVATIONS, RunDir, point_name

    run = RunDir(str(run_dir))
    if not points:
        return [], 0, 0
    if not run.exists(ACTIVATIONS):
        return [], 0, len(points)
    store = ActivationStore(run)
    mismatches, checked, skipped = [], 0, 0
    for name, recorded in sorted(points.items()):
        point = int(name) if str(name).isdigit() else name
        label = f"{ACTIVATIONS}/{point_name(point)}"
        attrs = store.attrs(point)  # None when the point is gone
        if attrs is None:
            skipped += 1
            continue
        checked += 1
        actual = store.digest(point)
        if actual != recorded:
            mismatches.append(Mismatch(label, recorded, actual, against))
            continue
        ok, why = store.status(point, attrs.get("key"), verify=True)
        if not ok:
            mismatches.append(Mismatch(label, recorded, f"re-hashed chunks differ ({why})", against))
    return mismatches, checked, skipped


def source_files(source: dict) -> tuple[Path | None, dict[str, str]]:
    """(directory, {file name: sha256}) of a recorded source's weight and side files (directory None if gone)."""
    recorded = {**(source.get("files_sha256") or {}), **(source.get("weights_sha256") or {})}
    where = Path(source.get("path") or "")
    directory = where.parent if source.get("gguf_file") else where
    return (directory if str(where) and directory.is_dir() else None), recorded


__all__ = ["Mismatch", "file_digests", "model_digests", "compare", "check_files", "check_activations",
           "source_files", "LINEAGE", "SIGNATURE", "MISSING", "UNRECORDED"]
