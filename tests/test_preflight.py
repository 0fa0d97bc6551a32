"""Issue 12, items 1 and 4: ``--out`` never touches the run directory, the MLflow store or the source;
``--overwrite`` replaces only a previous export; unwritable places, too little disk and too few calibration
windows are refused in one line before any work; an OSError of a full disk or a read-only filesystem found late
is one line naming the path."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_model_dir
from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()  # what fixtures printed
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (to show nothing changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tiny_env) -> Path:
    return write_model_dir(tiny_env / "src", family="llama-tied", seed=3)


@pytest.fixture
def previous(tiny_env) -> Path:
    """A directory D as a finished run leaves it: D/run, D/mlflow.db, D/mlartifacts (MLflow home = D)."""
    home = tiny_env / "D"
    (home / "run" / "model").mkdir(parents=True)
    (home / "run" / "recipe.yaml").write_text("config: {}\n")
    (home / "run" / "model" / "dotresize.json").write_text("{}\n")
    (home / "mlflow.db").write_bytes(b"SQLite format 3\0 pretend")
    (home / "mlartifacts" / "1").mkdir(parents=True)
    (home / "mlartifacts" / "1" / "model.safetensors").write_bytes(b"artifact")
    return home


COMPRESS = ("compress", "--ratio", "0.25", "--calib-samples", "8", "--calib-seqlen", "32")


def _compress(*extra: str, ratio: str = "0.25", samples: str = "8") -> list[str]:
    return ["compress", "--ratio", ratio, "--calib-samples", samples, "--calib-seqlen", "32", *extra]


# --- item 1: --out and --overwrite ---------------------------------------------------------------------------------
def test_the_reported_data_loss_is_refused_before_any_work(previous, model_dir, tiny_env):
    """`--run-dir D/run --out D --overwrite` used to delete D (run, mlflow.db, mlartifacts) after a full run."""
    before = _tree(previous)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DOTRESIZE_HOME", None)
    result = subprocess.run([sys.executable, "-m", "flows.cli", *COMPRESS, "--model", str(model_dir),
                             "--run-dir", str(previous / "run"), "--out", str(previous), "--overwrite"],
                            env=env, cwd=tiny_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()  # one line: nothing ran (no Prefect, no stage logs)
    assert line == (f"dotresize: error: --out {previous} overlaps the run directory {previous / 'run'}: choose an "
                    "--out outside it (and not holding it)")
    assert _tree(previous) == before


@pytest.mark.parametrize("out,run_dir,match", [
    ("D/run", "D/run", "overlaps the run directory"),
    ("D/run/model", "D/run", "overlaps the run directory"),
    ("D", "elsewhere/run", "overlaps the MLflow store"),
    ("D/mlartifacts", "elsewhere/run", "overlaps the MLflow store"),
    ("D/mlartifacts/1/copy", "elsewhere/run", "overlaps the MLflow store"),
    ("src", "elsewhere/run", "overlaps the source model"),
    ("src/inside", "elsewhere/run", "overlaps the source model"),
    (".", None, "holds the run directories"),
    ("runs/src-dot-0123456789ab/model", None, "lies inside a run directory"),
    ("runs/mlflow.db", None, "overlaps the MLflow store"),
])
def test_out_may_not_overlap_the_run_the_mlflow_store_or_the_source(capsys, monkeypatch, previous, model_dir,
                                                                    tiny_env, out, run_dir, match):
    if run_dir and run_dir.startswith("elsewhere"):
        monkeypatch.setenv("DOTRESIZE_HOME", str(previous))  # the MLflow store D/mlflow.db, D/mlartifacts
    else:
        monkeypatch.delenv("DOTRESIZE_HOME", raising=False)  # the default: beside the run directory
    before = _tree(tiny_env)
    argv = [*COMPRESS, "--model", str(model_dir), "--out", str(tiny_env / out), "--overwrite"]
    if run_dir:
        argv += ["--run-dir", str(tiny_env / run_dir)]
    code, lines = _run(capsys, *argv)
    assert code == 1 and len(lines) == 1 and match in lines[0], lines
    assert _tree(tiny_env) == before and not (tiny_env / "elsewhere").exists()


def test_overwrite_replaces_only_a_previous_export(capsys, model_dir, tiny_env):
    out = tiny_env / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    code, lines = _run(capsys, *COMPRESS, "--model", str(model_dir), "--out", str(out), "--overwrite")
    assert code == 1 and len(lines) == 1 and "replaces only a previous dotresize export" in lines[0]
    assert (out / "holiday.jpg").read_bytes() == b"precious" and not (tiny_env / "runs").exists()


def test_overwrite_replaces_a_previous_export_atomically(model_dir, pipeline_env, prefect_api):
    out = pipeline_env / "exported"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "flows.cli", "-q"]
    tail = ["--model", str(model_dir), "--out", str(out), "--no-mlflow", "--json"]
    first = subprocess.run([*base, *_compress(*tail)], env=env, cwd=pipeline_env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "dotresize.json").read_text())["compression"]["ratio"] == 0.25
    again = subprocess.run([*base, *_compress(*tail, ratio="0.5")], env=env, cwd=pipeline_env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "--overwrite" in again.stderr.strip().splitlines()[-1]
    replaced = subprocess.run([*base, *_compress(*tail, "--overwrite", ratio="0.5")], env=env, cwd=pipeline_env,
                              capture_output=True, text=True, timeout=600)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((out / "dotresize.json").read_text())["compression"]["ratio"] == 0.5
    assert sorted(p.name for p in pipeline_env.iterdir() if p.name.startswith(".exported")) == []


# --- item 4: writability, disk space, calibration windows ------------------------------------------------------
@contextlib.contextmanager
def read_only(path: Path):
    """``path`` made read-only: a read-only bind mount as root (root ignores permission bits), else chmod."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        pytest.skip("a read-only mount needs CAP_SYS_ADMIN here, and as root permission bits do not apply")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("what", ["run directory", "--out parent", "Zarr store"])
def test_unwritable_places_are_refused_before_any_work(capsys, model_dir, tiny_env, what):
    run, out = tiny_env / "runs" / "r", tiny_env / "outs" / "model"
    (tiny_env / "outs").mkdir()
    run.mkdir(parents=True)
    store = run / "activations.zarr" / "point_3"
    store.mkdir(parents=True)
    locked = {"run directory": run, "--out parent": tiny_env / "outs", "Zarr store": run / "activations.zarr"}[what]
    with read_only(locked):
        code, lines = _run(capsys, *COMPRESS, "--model", str(model_dir), "--run-dir", str(run), "--out", str(out),
                           "--no-mlflow")
    assert code == 1 and len(lines) == 1 and "not writable" in lines[0], lines
    assert str(locked) in lines[0] and not out.exists()


def test_too_little_free_space_is_refused_with_the_estimate(capsys, monkeypatch, model_dir, tiny_env):
    import shutil as shutil_module

    import flows.preflight

    usage = shutil_module.disk_usage(tiny_env)
    monkeypatch.setattr(flows.preflight.shutil, "disk_usage",
                        lambda path: usage._replace(free=200_000))  # 200 kB free; the run needs about 1 MB
    code, lines = _run(capsys, *COMPRESS, "--model", str(model_dir), "--run-dir", str(tiny_env / "run"),
                       "--out", str(tiny_env / "out"), "--no-mlflow")
    assert code == 1 and len(lines) == 1, lines
    assert "not enough free space" in lines[0] and "200.0 kB are free" in lines[0] and "activations" in lines[0]
    assert not (tiny_env / "run").exists() and not (tiny_env / "out").exists()


def test_a_tmpfs_too_small_for_the_activations_is_refused(capsys, model_dir, tiny_env):
    small = tiny_env / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        code, lines = _run(capsys, *_compress("--model", str(model_dir), "--run-dir", str(small / "run"),
                                              "--no-mlflow", samples="150"))
        assert code == 1 and len(lines) == 1 and "not enough free space" in lines[0], lines
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_more_calibration_windows_than_the_text_holds_are_refused(capsys, model_dir, tiny_env):
    code, lines = _run(capsys, *_compress("--model", str(model_dir), "--run-dir", str(tiny_env / "run"),
                                          samples="100000"))
    assert code == 1 and len(lines) == 1, lines
    assert "--calib-samples 100000 asks for more windows than the calibration text wikitext2 holds: 187 windows " \
           "of 32 tokens" in lines[0] and "pass --calib-samples 187 or fewer" in lines[0]
    assert not (tiny_env / "run").exists()


def test_sample_windows_refuses_more_windows_than_exist():
    import torch

    from dotresize.data import sample_windows
    from dotresize.errors import CalibrationError

    with pytest.raises(CalibrationError, match="holds 3 windows of 100 tokens"):
        sample_windows(torch.arange(350), 4, 100, seed=0)
    assert sample_windows(torch.arange(350), 3, 100, seed=0).shape == (3, 100)


# --- late OSErrors: one line naming the path --------------------------------------------------------------------
@pytest.mark.parametrize("code,expected", [
    (errno.ENOSPC, "no space left on the device holding /data/run/layers/layer_3.safetensors"),
    (errno.EROFS, "/data/run/layers/layer_3.safetensors is on a read-only filesystem"),
    (errno.EACCES, "permission denied on /data/run/layers/layer_3.safetensors"),
])
def test_a_late_disk_error_is_one_line_naming_the_path(capsys, monkeypatch, code, expected):
    import flows.cli

    def fails(args):
        raise OSError(code, os.strerror(code), "/data/run/layers/layer_3.safetensors")

    monkeypatch.setattr(flows.cli, "cmd_compress", fails)
    status, lines = _run(capsys, "compress", "--ratio", "0.2")
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"dotresize: error: {expected}"), lines


def _export(path: Path, marker: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / "dotresize.json").write_text(json.dumps({"marker": marker}))
    (path / "weights.bin").write_bytes(os.urandom(40_000))
    return path


def test_a_copy_to_out_that_fails_midway_leaves_the_old_export_and_nothing_else(monkeypatch, tiny_env):
    import shutil

    from flows.outputs import copy_model as _copy_model

    model, out = _export(tiny_env / "run" / "model", "new"), _export(tiny_env / "out", "old")
    calls = []

    def copy2(src, dst, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, **kwargs)

    real = shutil.copy2
    monkeypatch.setattr(shutil, "copy2", copy2)
    with pytest.raises(OSError) as failed:
        _copy_model(model, out, overwrite=True)
    assert failed.value.errno == errno.ENOSPC
    assert json.loads((out / "dotresize.json").read_text()) == {"marker": "old"}
    assert sorted(p.name for p in tiny_env.iterdir()) == ["out", "run"]
    monkeypatch.setattr(shutil, "copy2", real)
    assert _copy_model(model, out, overwrite=True) == out.resolve()
    assert json.loads((out / "dotresize.json").read_text()) == {"marker": "new"}
    assert sorted(p.name for p in tiny_env.iterdir()) == ["out", "run"]


def test_a_full_disk_at_the_copy_to_out_is_one_line_and_nothing_is_left(capsys, monkeypatch, tiny_env):
    full = tiny_env / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        import flows.cli
        from flows.outputs import copy_model

        model = _export(tiny_env / "run" / "model", "new")
        (model / "weights.bin").write_bytes(os.urandom(200_000))  # more than the 64 kB device holds

        def copy_only(args):
            return {"out": str(copy_model(model, full / "out", overwrite=False))}

        monkeypatch.setattr(flows.cli, "cmd_compress", copy_only)
        status, lines = _run(capsys, "compress", "--ratio", "0.2")
        assert status == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"dotresize: error: no space left on the device holding {full / '.out.tmp-'}")
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)


# --- the fast calibration check agrees with dotresize.data ------------------------------------------------------
@pytest.mark.parametrize("name,content", [
    ("ok.txt", "w1 w2 w3\n".encode()), ("ok.jsonl", b'{"text": "w1 w2"}\n\n{"text": "w3", "id": 1}\r\n'),
    ("latin.txt", "caf\u00e9".encode("latin-1")), ("empty.txt", b""), ("blank.jsonl", b"\n \n"),
    ("bad.jsonl", b'{"text": "a"}\n{'), ("list.jsonl", b"[1]\n"), ("number.jsonl", b'{"text": 1}\n'),
    ("nul.jsonl", b'{"text": "a"}\x00\n'), ("sep.jsonl", '{"text": "a"}\u2028{"text": "b"}\n'.encode()),
])
def test_the_fast_calibration_check_agrees_with_the_loader(tmp_path, name, content):
    from dotresize.data import load_text
    from dotresize.errors import DotResizeError
    from flows.preflight import PreflightError, check_calibration_file

    path = tmp_path / name
    path.write_bytes(content)
    try:
        check_calibration_file(str(path))
        fast = None
    except PreflightError as error:
        fast = str(error)
    try:
        load_text(str(path))
        slow = None
    except DotResizeError as error:
        slow = str(error)
    assert (fast is None) == (slow is None), (fast, slow)


def test_the_run_size_estimate():
    from storage.estimate import dtype_bytes, estimate_run_bytes

    estimate = estimate_run_bytes(num_layers=30, hidden_size=576, kept_width=456, calibration_tokens=64 * 256,
                                  parameters=134_515_008, export_bytes_per_parameter=dtype_bytes("bfloat16"))
    # statistics (576² x 8 bytes) are smaller than a signal here: 31 layer-input signals + 61 Gram matrices
    assert estimate.activations == 31 * 64 * 256 * 576 * 4 + 61 * 576 * 576 * 8
    few = estimate_run_bytes(num_layers=32, hidden_size=4096, kept_width=3272, calibration_tokens=1024,
                             parameters=8_030_261_248)
    assert few.activations == 65 * 1024 * 4096 * 4  # an 8B model on 8 x 128 tokens: every signal, no Gram
    assert estimate.bases == 61 * 576 * 456 * 8
    assert estimate.export == 134_515_008 * 2
    assert estimate.total == pytest.approx(1.1 * (estimate.activations + estimate.bases + estimate.export), abs=1)
    assert dtype_bytes(None) == 4 and dtype_bytes("torch.float16") == 2 and dtype_bytes("F32") == 4
    assert estimate.mlp == 0
    # the MLP axis: every layer's I x I float64 statistics (parallel) or its input signal (sequential), + A
    mlp = estimate_run_bytes(num_layers=30, hidden_size=576, kept_width=576, calibration_tokens=64 * 256,
                             parameters=134_515_008, intermediate_size=1536, mlp_kept=1016)
    assert mlp.mlp == 30 * (1536 * 1536 * 8 + 1016 * 520 * 8 + 1536 * 8)
    sequential = estimate_run_bytes(num_layers=30, hidden_size=576, kept_width=576, calibration_tokens=64 * 256,
                                    parameters=134_515_008, intermediate_size=1536, mlp_kept=1016,
                                    mlp_sequential=True)
    assert sequential.mlp == 30 * (64 * 256 * 576 * 4 + 1016 * 520 * 8 + 1536 * 8)
    assert mlp.total > estimate.total


_DISK_FULL_AT = """
import errno, os
import storage.rundir

_save = storage.rundir.RunDir.save_tensors


def save_tensors(self, rel, *args, **kwargs):
    full_at = os.environ.get("DOTRESIZE_TEST_DISK_FULL_AT")
    if full_at and rel.startswith(full_at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path(rel))
    return _save(self, rel, *args, **kwargs)


storage.rundir.RunDir.save_tensors = save_tensors
"""


def test_a_disk_full_inside_a_stage_is_one_line_and_the_run_resumes(model_dir, pipeline_env, prefect_api):
    """The last resort: an ENOSPC raised in a Dask worker thread (here: writing the absorbed layers) reaches the
    command line as one line naming the file; Prefect's tracebacks of it are not shown; finished stages stay."""
    hook = pipeline_env / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DISK_FULL_AT)
    run = pipeline_env / "run"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
           "DOTRESIZE_TEST_DISK_FULL_AT": "layers/"}
    argv = [sys.executable, "-m", "flows.cli", "-q", *_compress("--model", str(model_dir), "--run-dir", str(run),
                                                                "--no-mlflow", "--json")]
    full = subprocess.run(argv, env=env, cwd=pipeline_env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if "error" in line.lower() or "Errno" in line]
    assert len(errors) == 1 and errors[0] == full.stderr.strip().splitlines()[-1], errors
    assert errors[0].startswith(f"dotresize: error: no space left on the device holding {run / 'layers'}")
    env.pop("DOTRESIZE_TEST_DISK_FULL_AT")
    again = subprocess.run(argv, env=env, cwd=pipeline_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["stages"]["calibration"]["reused"] == ["calibration"]
