"""Basis files, tensor artifacts and stage manifests, each with its digest and a completion marker.

A basis is ``bases/point_<p>.safetensors`` (Q and, for the ``plan`` decompression, U, float64) plus
``bases/point_<p>.json`` (key, sha256 of the tensors, shapes, the per-point statistics). The JSON is written
after the tensors: it is the basis's completion marker.

A stage manifest (``stages/<stage>/<name>.json``) is the completion marker of any other stage output:
``{stage, name, key, uri, files: {relative path: sha256}, shapes, seconds, started, finished, ...}``; it is
written after every file it names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from .errors import CorruptArtifactError, MissingArtifactError
from .records import StageManifest
from .rundir import EVAL, STAGES, RunDir, basis_file, basis_meta_file, manifest_file

log = logging.getLogger("dotresize.pipeline")


# --- bases ----------------------------------------------------------------------------------------------------
def save_basis(run: RunDir, point: int | str, tensors: dict, *, key: str, info: dict[str, Any],
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a basis (tensors, then its JSON marker); returns the JSON record (``extra`` is added to it)."""
    sha = run.save_tensors(basis_file(point), tensors, metadata={"key": key})
    record = {
        "key": key,
        "point": point,
        "file": basis_file(point),
        "sha256": sha,
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "info": info,
        **dict(extra or {}),
        "complete": True,
    }
    run.write_json(basis_meta_file(point), record)
    return record


def basis_status(run: RunDir, point: int | str, key: str, verify: bool = True) -> tuple[bool, str, dict | None]:
    """(ok, why, record): a basis is usable when its JSON marker has ``key`` and the tensors match their sha256."""
    try:
        record = run.read_json(basis_meta_file(point))
    except CorruptArtifactError as error:
        return False, str(error), None
    if record is None:
        return False, f"{basis_meta_file(point)} is missing", None
    if record.get("complete") is not True or record.get("key") != key:
        return False, f"{basis_meta_file(point)} was computed for another key", record
    if verify:
        ok, why = run.check_file(record["file"], record["sha256"])
        if not ok:
            return False, why, record
    return True, "ok", record


def load_basis(run: RunDir, point: int | str) -> tuple[dict, dict[str, Any]]:
    """(tensors, record) of a stored basis, verified against its digest."""
    record = run.read_json(basis_meta_file(point))
    if record is None:
        raise MissingArtifactError(f"{run.uri(basis_meta_file(point))} is missing")
    return run.load_tensors(record["file"], record["sha256"]), record


# --- manifests ------------------------------------------------------------------------------------------------
def write_manifest(run: RunDir, manifest: Mapping[str, Any] | StageManifest) -> dict[str, Any]:
    """Write a stage manifest (after its outputs): it marks the stage complete. Returns its dict."""
    if not isinstance(manifest, StageManifest):
        data = {**manifest, "complete": True}
        data.pop("reused", None)
        manifest = StageManifest.from_dict(data)
    record = manifest.to_dict()
    run.write_json(manifest_file(manifest.stage, manifest.name), record)
    return record


def finish_stage(run: RunDir, stage: str, name: str | None, key: str, started: float,
                 body: Mapping[str, Any]) -> dict[str, Any]:
    """Write the manifest of an output computed since ``started`` (``body``: the stage's own fields, ``files``
    first of all), now; returns its dict."""
    return write_manifest(run, StageManifest.finish(stage=stage, name=name, key=key, uri=run.uri(), started=started,
                                                    body=body, finished=time.time()))


def read_manifest(run: RunDir, stage: str, name: str | None = None) -> dict[str, Any] | None:
    """The stored manifest's dict, or None when missing or unreadable; a manifest of a version this dotresize does
    not read raises :class:`storage.records.RecordVersionError`."""
    record = read_stage_manifest(run, stage, name)
    return None if record is None else record.to_dict()


def read_stage_manifest(run: RunDir, stage: str, name: str | None = None) -> StageManifest | None:
    """The stored manifest as a :class:`StageManifest`, or None when missing or unreadable."""
    rel = manifest_file(stage, name)
    try:
        data = run.read_json(rel)
    except CorruptArtifactError:
        return None
    if data is None:
        return None
    if not isinstance(data, dict) or ("manifest_version" not in data and not ("stage" in data and "key" in data)):
        return None  # not a manifest this pipeline wrote: as good as missing
    return StageManifest.from_dict(data, run.uri(rel))


def stage_manifests(run: RunDir) -> dict[str, StageManifest]:
    """``{"<stage>" or "<stage>/<name>": manifest}`` of every complete stage manifest of the run, sorted by label
    (hidden files skipped; an unreadable manifest is left out)."""
    out: dict[str, StageManifest] = {}
    if not run.exists(STAGES):
        return out
    base = run.path(STAGES)
    for path in sorted(run.fs.find(base)):
        rel = path[len(base):].lstrip("/\\").replace(os.sep, "/")
        if not rel.endswith(".json") or any(part.startswith(".") for part in rel.split("/")):
            continue
        try:
            data = run.read_json(f"{STAGES}/{rel}") or {}
        except CorruptArtifactError:
            continue
        if not isinstance(data, dict) or data.get("complete") is not True or "stage" not in data or "key" not in data:
            continue
        out[rel[:-len(".json")]] = StageManifest.from_dict(data, run.uri(f"{STAGES}/{rel}"))
    return out


def evaluation_entries(run: RunDir, digests: tuple[str | None, ...]) -> dict[str, dict]:
    """lineage.json's ``evaluation``: ``{"ppl": {file, sha256, result}, "lm_eval_source": {...}, ...}``, one entry per
    ``eval/*.json`` of a model whose digest is in ``digests`` (or that names none); an unreadable file is left out
    (said in the log)."""
    out: dict[str, dict] = {}
    for name in run.listdir(EVAL):
        if not name.endswith(".json") or name.startswith("."):
            continue
        rel = f"{EVAL}/{name}"
        try:
            data = run.read_json(rel)
        except (CorruptArtifactError, OSError) as error:
            log.warning("lineage: %s is unreadable (%s); left out", rel, error)
            continue
        if not isinstance(data, dict):
            continue
        digest = data.get("model_digest")
        if digest is not None and digest not in digests:
            continue  # an evaluation of another model left in the directory
        out[name[:-len(".json")]] = {"file": rel, "sha256": run.sha256(rel), "result": data}
    return out


def manifest_status(run: RunDir, stage: str, name: str | None, key: str,
                    verify: bool = True) -> tuple[bool, str, dict | None]:
    """(ok, why, manifest): reusable when complete, with ``key``, and every file it names matches its sha256."""
    label = stage if name is None else f"{stage}/{name}"
    record = read_stage_manifest(run, stage, name)
    if record is None:
        return False, f"no manifest for {label}", None
    manifest = record.to_dict()
    if record.complete is not True:
        return False, f"{label} is incomplete", manifest
    if record.key != key:
        return False, f"{label} was computed for another key", manifest
    if verify:
        for rel, sha in record.files.items():
            ok, why = run.check_file(rel, sha)
            if not ok:
                return False, why, manifest
    return True, "ok", manifest
