"""Issue 14: the pipeline's records are typed, versioned and round-trip exactly through JSON; an unknown version is
a one-line error that says what to do; "is this a run directory?" has one answer (storage/rundir.py)."""

from __future__ import annotations

import json

import pytest

from dotresize.errors import DotResizeError
from storage import RunDir, finish_stage, manifest_status, read_manifest, write_manifest
from storage import rundir as layout
from storage.records import (
    EXPORT_LINEAGE_VERSION,
    LINEAGE_VERSION,
    RECORDS,
    Lineage,
    RecordVersionError,
    RunRecipe,
    StageManifest,
    WatchVariant,
)

SHA = "ab" * 32

MANIFEST = {"stage": "capture", "name": "3", "key": "k" * 64, "uri": "/runs/r", "files": {"bases/point_0.json": SHA},
            "shapes": {"acts": [16, 8]}, "digest": SHA, "points": {"3": SHA}, "started": 1.5, "finished": 2.25,
            "seconds": 0.75, "complete": True}
EXPORT_LINEAGE = {
    "lineage_version": 1, "run_key": "r" * 64,
    "recipe": {"recipe_version": 1, "config": {"method": "dot", "ratio": 0.25}, "source": {"spec": "m", "digest": SHA},
               "calibration": {"data": "wikitext2", "samples": 8}},
    "source": {"spec": "m", "digest": SHA, "weights_sha256": {"model.safetensors": SHA}},
    "calibration": {"id": "wikitext2", "sha256": SHA, "tokens": 256},
    "stages": {"calibration": {"key": "c", "digest": SHA}, "bases": {"0": {"key": "b0", "sha256": SHA},
                                                                     "global": {"key": "bg", "sha256": SHA}},
               "ends": {"sha256": SHA}, "export": {"key": "e"}},
    "model": {"config.json": SHA, "model.safetensors": SHA, "lineage.json": SHA},
    "weights_file": "model.safetensors", "versions": {"python": "3.12", "torch": "2"},
}
FINAL_LINEAGE = {**EXPORT_LINEAGE, "lineage_version": 2, "recipe_sha256": SHA, "code": {"version": "0.1"},
                 "stage_outputs": {"capture/3": {"key": "k", "digest": SHA}, "export": {"key": "e", "files": {}}},
                 "evaluation": {"ppl": {"file": "eval/ppl.json", "sha256": SHA, "result": {"ppl": 3.0}}},
                 "tags": {"a": "1"}}
RUN_RECIPE = EXPORT_LINEAGE["recipe"]
VARIANT = {"recipe_version": 1, "method": "dot", "ratio": 0.2, "mode": "parallel", "layout": "per-point",
           "config": {"method": "dot", "ratio": 0.2, "version": 1},
           "calibration": {"data": "wikitext2", "samples": 64, "seqlen": 256, "seed": 42},
           "evaluation": {"ppl": True, "ctx": 256, "max_windows": 100, "source": False, "tasks": [], "limit": None}}

EXAMPLES = [(StageManifest, MANIFEST), (StageManifest, {**MANIFEST, "name": None, "files": {}}),
            (Lineage, EXPORT_LINEAGE), (Lineage, FINAL_LINEAGE), (RunRecipe, RUN_RECIPE), (WatchVariant, VARIANT)]
VERSION_KEYS = {StageManifest: "manifest_version", Lineage: "lineage_version", RunRecipe: "recipe_version",
                WatchVariant: "recipe_version"}


def test_every_record_type_is_covered():
    assert {kind for kind, _ in EXAMPLES} == set(RECORDS)


@pytest.mark.parametrize("kind,data", EXAMPLES, ids=lambda x: getattr(x, "__name__", ""))
def test_records_round_trip_exactly_through_json(kind, data):
    record = kind.from_dict(json.loads(json.dumps(data)))
    assert record.to_dict() == data
    assert json.loads(record.to_json()) == data
    assert kind.from_json(record.to_json()) == record
    assert record.to_json() == json.dumps(data, indent=2, sort_keys=True) + "\n"  # the bytes the run stores


@pytest.mark.parametrize("kind,data", EXAMPLES, ids=lambda x: getattr(x, "__name__", ""))
def test_an_unknown_version_is_a_one_line_error_that_says_what_to_do(kind, data):
    with pytest.raises(RecordVersionError) as error:
        kind.from_dict({**data, VERSION_KEYS[kind]: 99}, "runs/r/thing.json")
    text = str(error.value)
    assert isinstance(error.value, DotResizeError) and "\n" not in text
    assert "99" in text and "runs/r/thing.json" in text and "dotresize" in text.split("reads")[1]


def test_the_run_recipe_is_todays_dict_and_the_watch_recipe_has_its_own_version():
    from dotresize import CompressionConfig

    config = CompressionConfig(ratio=0.25)
    source = {"spec": "m", "digest": SHA, "path": "/m", "weights_sha256": {}}
    recipe = RunRecipe.make(config, source, {"data": "wikitext2"})
    assert recipe.to_dict() == {"recipe_version": 1, "config": config.to_dict(),
                                "source": {"spec": "m", "digest": SHA}, "calibration": {"data": "wikitext2"}}
    from storage.records import RUN_RECIPE_VERSION, WATCH_RECIPE_VERSION

    assert RunRecipe.from_dict(recipe.to_dict()).version == RUN_RECIPE_VERSION
    assert WatchVariant.from_dict(VARIANT).version == WATCH_RECIPE_VERSION


def test_the_lineage_schema_fills_in_as_the_stages_did():
    export = Lineage.from_export(**{k: EXPORT_LINEAGE[k] for k in ("run_key", "recipe", "source", "calibration",
                                                                  "stages", "model", "weights_file", "versions")})
    assert export.version == EXPORT_LINEAGE_VERSION and export.to_dict() == EXPORT_LINEAGE
    final = export.completed(recipe_sha256=SHA, code={"version": "0.1"}, versions={"python": "3.12"},
                             stage_outputs={"capture/3": {"key": "k", "digest": SHA}},
                             evaluation=FINAL_LINEAGE["evaluation"], tags={"b": 2, "a": 1})
    doc = final.to_dict()
    assert doc["lineage_version"] == LINEAGE_VERSION and list(doc["tags"].items()) == [("a", "1"), ("b", "2")]
    assert "lineage.json" not in doc["model"] and doc["model"]["config.json"] == SHA
    assert doc["stage_outputs"]["solve/0"] == {"key": "b0", "files": {"bases/point_0.safetensors": SHA}}
    assert doc["stage_outputs"]["solve/global"]["files"] == {"bases/global.safetensors": SHA}
    assert final.captured_points() == {"3": SHA}
    assert final.stage_output_files()["eval/ppl.json"] == SHA
    assert Lineage.from_dict(doc) == final


def test_manifests_are_written_read_and_checked_through_the_record(tmp_path):
    run = RunDir(tmp_path / "run")
    sha = run.write_text("bases/point_0.json", "{}")
    written = finish_stage(run, "solve", "0", "k1", 10.0, {"files": {"bases/point_0.json": sha}, "reused": True})
    assert written["complete"] is True and "reused" not in written and written["uri"] == run.uri()
    assert read_manifest(run, "solve", "0") == written
    assert (tmp_path / "run" / "stages" / "solve" / "0.json").read_text() == StageManifest.from_dict(written).to_json()
    assert manifest_status(run, "solve", "0", "k1")[:2] == (True, "ok")
    assert manifest_status(run, "solve", "0", "k2")[1] == "solve/0 was computed for another key"
    assert write_manifest(run, {**written, "key": "k3"})["key"] == "k3"  # the old dict form still works
    run.write_json(layout.manifest_file("solve", "0"), {**written, "manifest_version": 7})
    with pytest.raises(RecordVersionError, match="stage manifest version 7"):
        manifest_status(run, "solve", "0", "k1")


def test_one_test_of_a_run_directory_and_of_a_model_directory(tmp_path):
    run = tmp_path / "run"
    model = layout.at(run, layout.MODEL)
    model.mkdir(parents=True)
    assert not layout.is_run_dir(run) and not layout.is_model_dir(model)
    (model / layout.LINEAGE).write_text("{}")
    assert layout.is_model_dir(model) and not layout.is_run_dir(run)  # no stage manifests: a copy of a model
    layout.at(run, layout.STAGES).mkdir()
    assert layout.is_run_dir(run) and layout.is_run_dir(RunDir(run)) and layout.is_run_dir(str(run))
    assert layout.run_dir_of(model) == run.resolve() == layout.run_dir_of(run)
    assert layout.model_dir_of(run) == model and layout.model_dir_of(model) == model
    assert layout.run_dir_of(tmp_path) is None and layout.run_dir_of(None) is None


def test_stage_outputs_come_from_the_complete_manifests(tmp_path):
    from storage import stage_manifests

    run = RunDir(tmp_path / "run")
    finish_stage(run, "capture", "3", "k3", 1.0, {"digest": SHA, "files": {}})
    finish_stage(run, "export", None, "ke", 1.0, {"files": {"model/lineage.json": SHA, "model/config.json": SHA}})
    run.write_json(layout.manifest_file("absorb", "0"), {"stage": "absorb", "name": "0", "key": "ka"})  # incomplete
    manifests = stage_manifests(run)
    assert list(manifests) == ["capture/3", "export"]
    assert Lineage.stage_outputs_of(manifests) == {"capture/3": {"key": "k3", "digest": SHA},
                                                   "export": {"key": "ke", "files": {"model/config.json": SHA}}}
