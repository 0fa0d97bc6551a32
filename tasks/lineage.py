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

from storage import RunDir, digest_of_digests, evaluation_entries, stage_manifests
from storage import rundir as layout
from storage.records import LINEAGE_VERSION, Lineage

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "lineage"

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


def build_lineage(run: RunDir, export: dict, tags: dict | None = None) -> dict:
    base = export.get("lineage") or run.read_json(layout.LINEAGE)
    if not base:
        raise FileNotFoundError(f"{run.uri(layout.LINEAGE)} is missing and the export manifest has no lineage")
    from .export import versions

    doc = Lineage.from_dict(base, run.uri(layout.LINEAGE))
    return doc.completed(recipe_sha256=digest_of_digests(doc.recipe or {}), code=code_version(), versions=versions(),
                         stage_outputs=Lineage.stage_outputs_of(stage_manifests(run)),
                         evaluation=evaluation_entries(run, (export["model_sha256"], (doc.source or {}).get("digest"))),
                         tags=tags).to_dict()


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
