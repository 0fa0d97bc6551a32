"""Issue 12, item 6: the watcher confines itself to the watched folder.

A symlinked checkpoint (or a checkpoint holding a symlinked weight file) that resolves outside the folder is
refused unless ``follow_symlinks``; ``--pattern`` matches names only, so ``../*`` cannot reach a sibling folder
(it is refused with one line before anything starts). The discovery rules are tested on their own (fast); one
watch tick through Prefect shows that nothing outside is compressed or registered.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write_model_dir
from flows.cli import main

RECIPE = {"method": "dot", "ratio": 0.25, "calibration": {"samples": 8, "seqlen": 32, "seed": 3},
          "evaluation": {"ppl": False}}


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    """watched/checkpoint-1 (real), watched/checkpoint-2 -> ../outside/ckpt-x, watched/checkpoint-3 (its weights a
    link to a file outside), watched/checkpoint-4 -> watched/checkpoint-1 (a link inside), and a sibling folder."""
    watched, outside, sibling = tmp_path / "watched", tmp_path / "outside", tmp_path / "sibling"
    write_model_dir(watched / "checkpoint-1", seed=1)
    write_model_dir(outside / "ckpt-x", seed=2)
    write_model_dir(sibling / "checkpoint-9", seed=9)
    os.symlink(outside / "ckpt-x", watched / "checkpoint-2")
    third = watched / "checkpoint-3"
    third.mkdir()
    for path in (outside / "ckpt-x").iterdir():
        if path.name == "model.safetensors":
            os.symlink(path, third / path.name)
        else:
            (third / path.name).write_bytes(path.read_bytes())
    os.symlink("checkpoint-1", watched / "checkpoint-4")  # relative, resolves inside: allowed
    return {"watched": watched, "outside": outside, "sibling": sibling}


def test_symlinks_leading_outside_are_refused(layout):
    from storage.checkpoints import scan

    found = scan(layout["watched"])
    assert [c.name for c in found.checkpoints] == ["checkpoint-1", "checkpoint-4"]
    assert all(c.path.is_relative_to(layout["watched"].resolve()) for c in found.checkpoints)
    assert found.checkpoints[1].path == (layout["watched"] / "checkpoint-1").resolve()  # resolved paths
    refused = {r["checkpoint"]: r["reason"] for r in found.refused}
    assert sorted(refused) == ["checkpoint-2", "checkpoint-3"]
    assert str((layout["outside"] / "ckpt-x").resolve()) in refused["checkpoint-2"]
    assert "model.safetensors ->" in refused["checkpoint-3"] and "--follow-symlinks" in refused["checkpoint-3"]

    followed = scan(layout["watched"], follow_symlinks=True)
    assert [c.name for c in followed.checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                      "checkpoint-4"]
    assert followed.refused == []
    assert followed.checkpoints[1].path == (layout["outside"] / "ckpt-x").resolve()


@pytest.mark.parametrize("pattern", ["../*", "../sibling/*", "*/..", "..", ".", "/etc/*", "sub/checkpoint-*", ""])
def test_a_pattern_cannot_leave_the_folder(layout, pattern):
    from storage.checkpoints import PatternError, scan

    with pytest.raises(PatternError, match="must match checkpoint names inside the watched folder"):
        scan(layout["watched"], pattern)


def test_patterns_match_names_only(layout):
    from storage.checkpoints import scan

    assert [c.name for c in scan(layout["watched"], "checkpoint-[14]").checkpoints] == ["checkpoint-1",
                                                                                      "checkpoint-4"]
    assert scan(layout["watched"], "..*").checkpoints == []  # a name pattern: '..' is no parent here
    assert scan(layout["watched"], "sibling").checkpoints == []


def test_watch_pattern_escape_is_one_line_before_prefect(layout, capsys):
    code = main(["watch", str(layout["watched"]), "--recipe", "recipes/dot-20.yaml", "--pattern", "../*"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().startswith("dotresize: error: --pattern '../*' must match checkpoint names")
    assert len(err.strip().splitlines()) == 1


def test_watch_tick_compresses_only_what_is_inside(layout, pipeline_env):
    """One tick over the layout: the inside checkpoint (and its inside alias) is compressed, the links out are
    reported as refused, and nothing from outside or the sibling folder is registered."""
    from mlflow import MlflowClient

    from flows.watch import watch_flow

    report = watch_flow(source=str(layout["watched"]), recipe=dict(RECIPE), settle_seconds=0,
                        register_name="tiny-confined", n_workers=1)
    assert sorted(r["checkpoint"] for r in report["refused"]) == ["checkpoint-2", "checkpoint-3"]
    done = sorted(r["checkpoint"] for r in report["compressed"] + report["existing"])
    assert done == ["checkpoint-1", "checkpoint-4"]  # one content, so one version (the second is "existing")
    assert len(report["compressed"]) == 1 and report["failed"] == []
    uri = f"sqlite:///{pipeline_env / 'home' / 'mlflow.db'}"
    versions = MlflowClient(uri).search_model_versions("name = 'tiny-confined'")
    assert len(versions) == 1
    assert versions[0].tags["dotresize.checkpoint"] == "checkpoint-1"
    runs = sorted(p.name for p in (pipeline_env / "home" / "runs").iterdir())
    assert not any("ckpt-x" in name or "checkpoint-9" in name or "checkpoint-2" in name for name in runs), runs
