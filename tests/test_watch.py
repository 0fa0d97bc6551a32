"""Issue 4, done-when 1: the watch flow compresses every checkpoint exactly once per recipe.

Tiny in-code checkpoints; the watch flow runs against the session's Prefect server (``pipeline_env``). The
readiness rules, recipe validation and the lock are also tested on their own, without Prefect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_model_dir

RECIPE = {"method": "dot", "ratio": 0.25, "calibration": {"samples": 8, "seqlen": 32, "seed": 3},
          "evaluation": {"ppl": True, "ctx": 32, "max_windows": 8}}


def _versions(home: Path, name: str) -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return sorted(MlflowClient(uri).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _watch(source: Path, **kwargs) -> dict:
    from flows.watch import watch_flow

    return watch_flow(source=str(source), recipe=dict(RECIPE), settle_seconds=0, register_name="tiny-watch",
                      n_workers=1, **kwargs)


def _names(report: dict, kind: str) -> list[str]:
    return sorted(item["checkpoint"] for item in report[kind])


@pytest.fixture
def checkpoints(pipeline_env) -> Path:
    root = pipeline_env / "train-run"
    for step in (1, 2):
        write_model_dir(root / f"checkpoint-{step}", seed=step)
    (root / "runs").mkdir()  # a trainer's tensorboard folder: not a checkpoint
    return root


# --- the flow ---------------------------------------------------------------------------------------------------
def test_two_checkpoints_then_none_then_exactly_the_new_one(checkpoints, pipeline_env):
    home = pipeline_env / "home"
    first = _watch(checkpoints)
    assert _names(first, "compressed") == ["checkpoint-1", "checkpoint-2"], first
    assert first["pending"] == [] and first["failed"] == []
    versions = _versions(home, "tiny-watch")
    assert [int(v.version) for v in versions] == [1, 2]
    identities = {v.tags["dotresize.identity"] for v in versions}
    assert len(identities) == 2
    for version in versions:  # the identity tags are on the version, with the recipe hash and source digest
        assert version.tags["dotresize.recipe_sha256"] == first["recipe_sha256"][0]
        assert version.tags["dotresize.lineage_sha256"]

    second = _watch(checkpoints)
    assert second["compressed"] == [] and _names(second, "existing") == ["checkpoint-1", "checkpoint-2"]
    assert len(_versions(home, "tiny-watch")) == 2

    write_model_dir(checkpoints / "checkpoint-3", seed=3)
    third = _watch(checkpoints)
    assert _names(third, "compressed") == ["checkpoint-3"]
    assert _names(third, "existing") == ["checkpoint-1", "checkpoint-2"]
    assert len(_versions(home, "tiny-watch")) == 3

    # the lineage of a watched artifact names its checkpoint, digests and recipe hash
    record = third["compressed"][0]
    lineage = json.loads((Path(record["run_dir"]) / "model" / "lineage.json").read_text())
    assert lineage["tags"]["dotresize.identity"] == record["identity"]
    assert lineage["source"]["spec"] == str(checkpoints / "checkpoint-3")
    assert lineage["evaluation"]["ppl"]["result"]["ppl"] == pytest.approx(record["ppl"])


def test_half_written_checkpoint_is_left_for_the_next_tick(pipeline_env):
    root = pipeline_env / "train-run"
    full = write_model_dir(pipeline_env / "staging" / "checkpoint-5", seed=5)
    target = root / "checkpoint-5"
    target.mkdir(parents=True)
    for path in full.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, target / path.name)
    weights = (full / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # the writer is half-way

    first = _watch(root)
    assert first["compressed"] == [] and _names(first, "pending") == ["checkpoint-5"]
    assert "incomplete" in first["pending"][0]["reason"]
    assert _versions(pipeline_env / "home", "tiny-watch") == []
    assert not list((pipeline_env / "home" / "runs").glob("checkpoint-5-*"))  # nothing was started

    (target / "model.safetensors").write_bytes(weights)  # the writer finished
    second = _watch(root)
    assert _names(second, "compressed") == ["checkpoint-5"] and second["pending"] == []
    assert len(_versions(pipeline_env / "home", "tiny-watch")) == 1


def test_two_watch_runs_started_at_once_register_one_version(pipeline_env, prefect_api, tmp_path):
    root = pipeline_env / "train-run"
    write_model_dir(root / "checkpoint-4", seed=4)
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "flows.cli", "-q", "watch", str(root), "--recipe", str(recipe), "--settle", "0",
               "--register-name", "tiny-watch", "--workers", "1", "--json"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=pipeline_env) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    reports = [json.loads(out[out.index("{"):]) for out, _ in outputs]
    compressed = [r for r in reports if r["compressed"]]
    assert len(compressed) == 1, reports
    other = next(r for r in reports if not r["compressed"])
    assert _names(other, "busy") + _names(other, "existing") == ["checkpoint-4"]
    versions = _versions(pipeline_env / "home", "tiny-watch")
    assert len(versions) == 1
    assert versions[0].tags["dotresize.checkpoint"] == "checkpoint-4"
    # and a later tick finds it done
    assert _names(_watch(root), "existing") == ["checkpoint-4"]


def test_a_crash_after_registration_does_not_register_twice(checkpoints, pipeline_env, monkeypatch):
    """Killed after the version was registered but before the run directory recorded it: the next tick finds
    the version by its identity tag, and even a plain rerun in the same run directory reuses it."""
    from flows import mlflow_logging
    from flows.compress import compress_flow
    from flows.recipe import parse_recipe
    from flows.watch import WatchError

    home = pipeline_env / "home"
    original = mlflow_logging._log_compression

    def crash_after(run_url, bundle, register_name=None):
        original(run_url, bundle, register_name)
        record = Path(run_url) / "mlflow.json"
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "complete": False, "version": None}))  # as at the crash
        raise RuntimeError("killed after registering")

    shutil.rmtree(checkpoints / "checkpoint-2")
    monkeypatch.setattr(mlflow_logging, "_log_compression", crash_after)
    with pytest.raises(WatchError, match="killed after registering"):
        _watch(checkpoints)
    monkeypatch.setattr(mlflow_logging, "_log_compression", original)
    [version] = _versions(home, "tiny-watch")
    [run_dir] = (home / "runs").glob("checkpoint-1-*")
    tags = {k: v for k, v in version.tags.items() if k.startswith("dotresize.") and k != "dotresize.lineage_sha256"}
    rerun = compress_flow(model=str(checkpoints / "checkpoint-1"), run_dir=str(run_dir), register_name="tiny-watch",
                          tags=tags, progress=False, n_workers=1, **parse_recipe(dict(RECIPE)).variants[0].compress_kwargs())
    assert rerun["model_version"] == int(version.version)
    assert len(_versions(home, "tiny-watch")) == 1
    again = _watch(checkpoints)
    assert _names(again, "existing") == ["checkpoint-1"] and again["compressed"] == []
    assert len(_versions(home, "tiny-watch")) == 1


def test_a_checkpoint_uploaded_to_an_object_store_prefix_is_compressed_once(pipeline_env):
    """Issue 15: the watch reads an fsspec URL (``memory://`` here, ``s3://`` in tests/test_scaleout.py): a
    half-uploaded checkpoint waits, a complete one is mirrored under <home>/watched and compressed from there, and
    the next tick neither copies nor compresses it again."""
    import fsspec

    fs = fsspec.filesystem("memory")
    prefix = "/watched-bucket/run-9"
    local = write_model_dir(pipeline_env / "staging" / "checkpoint-7", seed=7)
    fs.mkdir(f"{prefix}/checkpoint-7")
    fs.pipe_file(f"{prefix}/checkpoint-7/config.json", (local / "config.json").read_bytes())  # the upload begins
    fs.pipe_file(f"{prefix}/notes.txt", b"not a checkpoint")
    url = f"memory://{prefix}"
    try:
        first = _watch(url)
        assert first["compressed"] == [] and _names(first, "pending") == ["checkpoint-7"], first
        assert first["pending"][0]["reason"] == "no *.safetensors weights yet"

        for path in local.iterdir():  # the upload ends
            fs.pipe_file(f"{prefix}/checkpoint-7/{path.name}", path.read_bytes())
        second = _watch(url)
        assert _names(second, "compressed") == ["checkpoint-7"] and second["checkpoints"] == ["checkpoint-7"]
        mirrored = pipeline_env / "home" / "watched" / "memory" / "watched-bucket" / "run-9" / "checkpoint-7"
        assert sorted(p.name for p in mirrored.iterdir()) == sorted(p.name for p in local.iterdir())
        [version] = _versions(pipeline_env / "home", "tiny-watch")
        assert version.tags["dotresize.checkpoint"] == "checkpoint-7"
        assert version.tags["dotresize.checkpoint_url"] == f"memory://{prefix}/checkpoint-7"
        assert version.tags["dotresize.watch_source"] == url
        stamp = (mirrored / "model.safetensors").stat()

        third = _watch(url)
        assert third["compressed"] == [] and _names(third, "existing") == ["checkpoint-7"]
        assert len(_versions(pipeline_env / "home", "tiny-watch")) == 1
        again = (mirrored / "model.safetensors").stat()
        assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)  # not copied again
    finally:
        fs.rm("/watched-bucket", recursive=True)


def test_remote_listing_rules():
    """What a listing says about a remote checkpoint, before anything is copied."""
    from storage.checkpoints import RemoteCheckpoint, remote_problem

    ckpt = RemoteCheckpoint("checkpoint-1", "memory://nowhere/checkpoint-1", "hf-dir")
    stamp = [10, "etag"]
    assert remote_problem(ckpt, {"config.json": stamp, "model.safetensors": stamp}) is None
    assert remote_problem(ckpt, {"model.safetensors": stamp}) == "no config.json yet"
    assert remote_problem(ckpt, {"config.json": stamp, "pytorch_model.bin": stamp}).startswith("only pickle")
    assert remote_problem(ckpt, {"config.json": stamp, "model.safetensors": stamp},
                          marker="trainer_state.json") == "no trainer_state.json yet"
    assert "would leave" in remote_problem(ckpt, {"config.json": stamp, "../../escape.safetensors": stamp})


# --- readiness (no Prefect) --------------------------------------------------------------------------------------
def test_readiness_rules(tmp_path):
    from storage.checkpoints import discover, static_problem

    ready = write_model_dir(tmp_path / "checkpoint-1")
    assert static_problem(discover(tmp_path)[0]) is None
    assert static_problem(discover(tmp_path)[0], marker="trainer_state.json") == "no trainer_state.json yet"

    no_config = write_model_dir(tmp_path / "checkpoint-2")
    (no_config / "config.json").unlink()
    bad_header = write_model_dir(tmp_path / "checkpoint-3")
    (bad_header / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    sharded = write_model_dir(tmp_path / "checkpoint-10")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "tmp-checkpoint-11").mkdir()  # a trainer's temporary folder is not discovered
    (tmp_path / "tmp-checkpoint-11" / "config.json").write_text("{}")
    found = discover(tmp_path)
    assert [c.name for c in found] == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-10"]  # natural
    problems = {c.name: static_problem(c) for c in found}
    assert problems["checkpoint-1"] is None
    assert problems["checkpoint-2"] == "no config.json yet"
    assert "header unreadable" in problems["checkpoint-3"]
    assert "model-00002-of-00002.safetensors" in problems["checkpoint-10"]
    assert ready.exists()


def test_a_file_still_growing_is_not_ready(tmp_path):
    from flows.watch import _ready
    from storage.checkpoints import discover

    write_model_dir(tmp_path / "checkpoint-1")
    growing = tmp_path / "checkpoint-1" / "optimizer.pt.partial"
    growing.write_bytes(b"x")
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            with open(growing, "ab") as handle:
                handle.write(b"x" * 1024)
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        ready, pending = _ready(discover(tmp_path), settle_seconds=0.3, marker=None)
    finally:
        stop.set()
        thread.join()
    assert ready == [] and "still being written" in pending[0]["reason"]
    ready, pending = _ready(discover(tmp_path), settle_seconds=0.1, marker=None)
    assert [c.name for c in ready] == ["checkpoint-1"] and pending == []


def test_gguf_readiness(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from storage.checkpoints import discover, static_problem

    path = tmp_path / "model-step-100.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "model-step-200.gguf.part").write_bytes(b"GGUF")  # a download in progress: not a checkpoint
    [checkpoint] = discover(tmp_path)
    assert checkpoint.kind == "gguf" and static_problem(checkpoint) is None
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert "incomplete" in static_problem(checkpoint)
    path.write_bytes(data[:10])
    assert "unreadable" in static_problem(checkpoint)


# --- recipe, identity and lock (no Prefect) ---------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"ratio": 1.5}, "ratio must be a number in (0, 1)"),
    ({"ratios": [0.1]}, "exactly one of ratio"),
    ({"config": {"dot": {"epsilon": -1}}}, "epsilon must be a positive number"),
    ({"config": {"flavour": 1}}, "unknown compression config keys"),
    ({"config": {"ratio": 0.5}}, "config.ratio is set by the recipe"),
    ({"calibration": {"samples": 0}}, "calibration.samples must be a positive integer"),
    ({"evaluation": {"ppl": "yes"}}, "evaluation.ppl must be true or false"),
    ({"evaluation": {"windows": 3}}, "unknown key evaluation.windows"),
    ({"method": "magic"}, "method"),
])
def test_bad_recipes_get_one_line(change, message):
    from flows.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError) as error:
        parse_recipe({**RECIPE, **change}, "r.yaml")
    text = str(error.value)
    assert message in text and "\n" not in text and text.startswith("recipe r.yaml")


def test_recipe_hash_ignores_spelled_out_defaults_and_files(tmp_path):
    from dotresize import DotOptions
    from flows.recipe import RecipeError, load_recipe, parse_recipe

    base = parse_recipe(dict(RECIPE)).variants[0]
    default_epsilon = DotOptions().epsilon
    spelled = parse_recipe({**RECIPE, "mode": "parallel", "config": {"dot": {"epsilon": default_epsilon}}}).variants[0]
    assert spelled.sha256 == base.sha256
    assert parse_recipe({**RECIPE, "ratio": 0.3}).variants[0].sha256 != base.sha256
    several = parse_recipe({**{k: v for k, v in RECIPE.items() if k != "ratio"}, "ratios": [0.25, 0.5]})
    assert [v.ratio for v in several.variants] == [0.25, 0.5] and several.variants[0].sha256 == base.sha256
    assert load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "dot-20.yaml").variants[0].ratio == 0.2
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("method: [dot\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_identity_matches_the_source_digest_compress_records(tmp_path):
    from flows.watch import identity_of, source_meta
    from storage.checkpoints import DigestCache, discover
    from tasks.source import _resolve

    write_model_dir(tmp_path / "checkpoint-1")
    [checkpoint] = discover(tmp_path)
    cache = DigestCache(tmp_path / "digests.json")
    meta = source_meta(checkpoint, cache)
    cache.save()
    assert meta["digest"] == _resolve(checkpoint.spec)[1]["digest"]
    assert source_meta(checkpoint, DigestCache(tmp_path / "digests.json"))["digest"] == meta["digest"]  # cached
    assert identity_of(meta["digest"], "a") != identity_of(meta["digest"], "b")


def test_sources_and_hub_revisions_offline(tmp_path, monkeypatch):
    from flows.watch import WatchError, default_register_name, find_checkpoints

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("hub:someorg/some-model@main,abc123", "someorg/some-model@v2",
                   {"hub": "someorg/some-model", "revisions": ["main"]}):
        with pytest.raises(WatchError, match="not reachable here"):
            find_checkpoints(source)
    with pytest.raises(WatchError, match="does not exist"):
        find_checkpoints(str(tmp_path / "nowhere"))
    write_model_dir(tmp_path / "a" / "checkpoint-1")
    write_model_dir(tmp_path / "b" / "checkpoint-9")
    found = find_checkpoints([str(tmp_path / "a"), str(tmp_path / "b" / "checkpoint-9")])
    assert [c.name for c in found] == ["checkpoint-1", "checkpoint-9"]
    assert default_register_name("hub:someorg/some-model@main") == "dotresize-some-model"
    assert default_register_name(str(tmp_path / "train-run-7")) == "dotresize-train-run-7"


def test_lock_excludes_threads_and_processes_and_dies_with_its_holder(tmp_path):
    from storage.locks import FileLock

    path = tmp_path / "locks" / "x.lock"
    with FileLock(path) as held:
        assert held
        with FileLock(path, blocking=False) as other:
            assert not other
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from storage.locks import FileLock; "
        "lock = FileLock(%r); lock.acquire(); print('held', flush=True); time.sleep(60)")
        % (str(Path(__file__).resolve().parents[1]), str(path))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not FileLock(path, blocking=False).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = FileLock(path, blocking=True, timeout=10)
    assert lock.acquire()  # released by the OS when its holder died
    lock.release()


# --- registry aliases (issue 12, item 7) --------------------------------------------------------------------------
def test_recipe_alias_names(monkeypatch):
    from flows.mlflow_logging import recipe_alias

    bundle = {"recipe": {"config": {"method": "dot", "ratio": 0.2, "dot": {"epsilon": 0.2}},
                         "calibration": {"data": "/some/where.txt", "text_sha256": "ab", "samples": 64}}}
    alias = recipe_alias(bundle)
    assert alias.startswith("current-dot-20-") and len(alias) == len("current-dot-20-") + 8
    moved = {**bundle, "recipe": {**bundle["recipe"], "calibration": {**bundle["recipe"]["calibration"],
                                                                       "data": "/elsewhere/where.txt"}}}
    assert recipe_alias(moved) == alias  # the same text elsewhere is the same recipe
    other = {"recipe": {**bundle["recipe"], "config": {**bundle["recipe"]["config"], "dot": {"epsilon": 0.5}}}}
    assert recipe_alias(other) != alias
    assert recipe_alias({**bundle, "tags": {"dotresize.recipe_label": "My Recipe/v2"}}) == "current-my-recipe-v2"
    monkeypatch.setenv("DOTRESIZE_REGISTRY_ALIAS", "prod")
    assert recipe_alias({**bundle, "tags": {"dotresize.recipe_label": "dot-20"}}) == "prod-dot-20"


def test_registry_alias_is_per_recipe(checkpoints, pipeline_env):
    """`current` follows the latest compression of any recipe; `current-<recipe>` the latest with that recipe, so
    compressing with another recipe does not move it."""
    from mlflow import MlflowClient

    home = pipeline_env / "home"
    shutil.rmtree(checkpoints / "checkpoint-2")
    first = _watch(checkpoints)
    other = {**RECIPE, "name": "wide", "ratio": 0.125}
    from flows.watch import watch_flow

    second = watch_flow(source=str(checkpoints), recipe=other, settle_seconds=0, register_name="tiny-watch",
                        n_workers=1)
    assert len(first["compressed"]) == 1 and len(second["compressed"]) == 1
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    model = client.get_registered_model("tiny-watch")
    aliases = {k: int(v) for k, v in model.aliases.items()}
    assert aliases["current-recipe"] == 1          # the first recipe (a mapping: named "recipe")
    assert aliases["current-wide"] == 2
    assert aliases["current"] == 2                 # the latest of any recipe, as documented
    assert client.get_model_version("tiny-watch", "1").tags["dotresize.recipe_label"] == "recipe"
