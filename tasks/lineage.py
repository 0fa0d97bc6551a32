"""The final lineage.json of a run: the export's record plus evaluation results, every stage output's digests,
the code version and any provenance tags (e.g. the watch flow's checkpoint identity).

Written after the evaluate stages, into ``<run>/lineage.json`` and ``<run>/model/lineage.json`` (the same bytes).
Its content is a function of the run directory's manifests and evaluation files and of ``tags``: writing it
again for the same run gives the same file. It is not in any stage manifest, so rewriting it never makes a
stage stale; its own sha256 is recorded by the MLflow run instead.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import RunDir, digest_of_digests
from storage import rundir as layout

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "lineage"

LINEAGE_VERSION = 2
log = logging.getLogger("dotresize.pipeline")


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The package version, and the git commit of the source tree it runs from when that is a git checkout
    (``git_dirty``: uncommitted changes to tracked files)."""
    from dotresize import __version__

    out: dict = {"package": "dotresize", "version": __version__, "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return out
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, env=env)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30, env=env)
            if status.returncode == 0:
                out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _stage_outputs(run: RunDir) -> dict[str, dict]:
    """``{"<stage>" or "<stage>/<name>": {key, digest, files}}`` of every complete stage manifest of the run."""
    out: dict[str, dict] = {}
    if not run.exists(layout.STAGES):
        return out
    base = run.path(layout.STAGES)
    for path in sorted(run.fs.find(base)):
        rel = path[len(base):].lstrip("/\\").replace(os.sep, "/")
        if not rel.endswith(".json") or any(part.startswith(".") for part in rel.split("/")):
            continue
        manifest = run.read_json(f"{layout.STAGES}/{rel}") or {}
        if manifest.get("complete") is not True:
            continue
        entry = {"key": manifest.get("key")}
        if manifest.get("digest"):
            entry["digest"] = manifest["digest"]
        if manifest.get("points"):
            entry["points"] = manifest["points"]
        files = {k: v for k, v in (manifest.get("files") or {}).items()
                 if not k.endswith(layout.LINEAGE)}
        if files:
            entry["files"] = files
        out[rel[:-len(".json")]] = entry
    return out


def _evaluation(run: RunDir, model_sha256: str, source_digest: str | None) -> dict[str, dict]:
    """``{"ppl": {...}, "lm_eval_source": {...}, ...}``: every ``eval/*.json`` of this model (or its source)."""
    out: dict[str, dict] = {}
    for name in run.listdir(layout.EVAL):
        if not name.endswith(".json") or name.startswith("."):
            continue
        rel = f"{layout.EVAL}/{name}"
        try:
            data = run.read_json(rel)
        except Exception as error:  # an unreadable evaluation file is left out of the lineage, said in the log
            log.warning("lineage: %s is unreadable (%s); left out", rel, error)
            continue
        if not isinstance(data, dict):
            continue
        digest = data.get("model_digest")
        if digest is not None and digest not in (model_sha256, source_digest):
            continue  # an evaluation of another model left in the directory
        out[name[:-len(".json")]] = {"file": rel, "sha256": run.sha256(rel), "result": data}
    return out


def build_lineage(run: RunDir, export: dict, tags: dict | None = None) -> dict:
    base = export.get("lineage") or run.read_json(layout.LINEAGE)
    if not base:
        raise FileNotFoundError(f"{run.uri(layout.LINEAGE)} is missing and the export manifest has no lineage")
    from .export import versions

    lineage = dict(base)
    recipe = lineage.get("recipe") or {}
    source = lineage.get("source") or {}
    lineage.update({
        "lineage_version": LINEAGE_VERSION,
        "recipe_sha256": digest_of_digests(recipe),
        "code": code_version(),
        "versions": versions(),
        "stage_outputs": _stage_outputs(run),
        "evaluation": _evaluation(run, export["model_sha256"], source.get("digest")),
        "tags": {str(k): str(v) for k, v in sorted((tags or {}).items())},
    })
    for point, basis in ((lineage.get("stages") or {}).get("bases") or {}).items():  # solves have no manifest
        name = int(point) if str(point).isdigit() else point
        lineage["stage_outputs"][f"solve/{point}"] = {"key": basis.get("key"),
                                                     "files": {layout.basis_file(name): basis.get("sha256")}}
    lineage["model"] = {k: v for k, v in (lineage.get("model") or {}).items() if k != layout.LINEAGE}
    return lineage


@task(name=NAME, cache_policy=NO_CACHE, persist_result=False)
def lineage_task(run_url: str, export: dict, tags: dict | None = None) -> dict:
    """Write the final lineage.json of the run (both copies); returns ``{"sha256", "file"}``."""
    run = RunDir(run_url)
    lineage = build_lineage(run, export, tags)
    sha = run.write_json(f"{layout.MODEL}/{layout.LINEAGE}", lineage)
    run.write_json(layout.LINEAGE, lineage)
    return {"stage": NAME, "sha256": sha, "file": run.uri(layout.LINEAGE),
            "evaluations": sorted(lineage["evaluation"])}


__all__ = ["lineage_task", "build_lineage", "code_version", "LINEAGE_VERSION"]
