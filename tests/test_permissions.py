"""Issue 12, item 7: exported model directories honour the umask (they were 0700 with 0600 files whatever it was).

``tempfile.mkdtemp``/``mkstemp`` create 0700/0600; everything dotresize renames into place from them now gets
the mode ``mkdir``/``open`` would have given it. Checked under two umasks for the in-memory export, the atomic
JSON writer, the digest cache and a pipeline compression's ``--out`` copy.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer, write_model_dir
from flows.cli import main


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in sorted(root.rglob("*")):
        out[path.relative_to(root).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return out


def _assert_tree(root: Path, mask: int, skip: tuple[str, ...] = ()) -> None:
    wrong = {}
    for rel, mode in _modes(root).items():
        if rel in skip:
            continue
        expected = (0o777 if (root / rel).is_dir() else 0o666) & ~mask
        if mode != expected:
            wrong[rel] = f"{mode:o} (expected {expected:o})"
    assert not wrong, wrong


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_in_memory_export_honours_the_umask(tmp_path, mask):
    from dotresize.export import save_compressed

    with umask(mask):
        out = save_compressed(make_tiny_model("llama-untied"), tmp_path / "out", tokenizer=make_tiny_tokenizer(),
                              compression={"method": "test"}, extra_json={"report.json": {"a": 1}})
    assert {"config.json", "model.safetensors", "dotresize.json", "report.json"} <= {p.name for p in out.iterdir()}
    _assert_tree(out, mask)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_json_and_digest_cache_honour_the_umask(tmp_path, mask):
    from dotresize.export import write_json_atomic
    from dotresize.permissions import current_umask
    from storage.checkpoints import DigestCache

    with umask(mask):
        assert current_umask() == mask
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        (tmp_path / "f").write_text("x")
        cache = DigestCache(tmp_path / "digests.json")
        cache.sha256(tmp_path / "f")
        cache.save()
    for name in ("a.json", "digests.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_pipeline_out_copy_honours_the_umask(pipeline_env, capsys):
    src = write_model_dir(pipeline_env / "ckpt", seed=4)
    out = pipeline_env / "exported"
    with umask(0o027):
        code = main(["-q", "compress", "--model", str(src), "--ratio", "0.25", "--calib-samples", "8",
                     "--calib-seqlen", "32", "--run-dir", str(pipeline_env / "runs" / "perm"), "--out", str(out),
                     "--no-mlflow", "--workers", "1"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "lineage.json").is_file() and (out / "config.json").is_file()
    _assert_tree(out, 0o027)  # 0750 directory, 0640 files (not 0700 / 0600)
    model_dir = pipeline_env / "runs" / "perm" / "model"
    # the run's model directory and what dotresize.export wrote into it
    _assert_tree(model_dir, 0o027)


def test_run_directory_files_honour_the_umask(tmp_path):
    from storage import RunDir

    with umask(0o022):
        run = RunDir(str(tmp_path / "run"))
        run.write_json("model/lineage.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "run" / "model" / "lineage.json").stat().st_mode) == 0o644
