"""Done-when 4: every bad input gets one clear line, a non-zero exit and no output directory."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import write_model_dir
from flows.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


def _assert_clean_failure(code, err, out_dir, match):
    assert code != 0
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()


@pytest.fixture(autouse=True)
def _pipeline(pipeline_env):
    """Every compression here goes through the pipeline: share the session's Prefect server."""
    return pipeline_env


@pytest.fixture
def model_dir(tiny_env):
    return write_model_dir(tiny_env / "src")


def test_compress_and_evaluate_a_local_directory(capsys, model_dir, tiny_env):
    out = tiny_env / "out"
    code, stdout, err = _run(capsys, "-q", "compress", "--model", str(model_dir), "--ratio", "0.25", "--method",
                             "dot", "--calib-samples", "8", "--calib-seqlen", "32", "--out", str(out), "--ppl",
                             "--ctx", "32", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["widths"][0] == 48 and result["widths"][-1] == 64
    assert result["ppl_source"]["ppl"] > 1 and math.isfinite(result["ppl"]["ppl"])
    assert result["source"]["weights_sha256"]["model.safetensors"] == _sha(model_dir / "model.safetensors")
    assert {"config.json", "model.safetensors.index.json", "dotresize.json", "compression_report.json",
            "source.json", "calibration.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    code, stdout, err = _run(capsys, "-q", "evaluate", str(out), "--ppl", "--ctx", "32", "--json")
    assert code == 0, err
    assert json.loads(stdout)["ppl"]["ppl"] == pytest.approx(result["ppl"]["ppl"], rel=1e-5)


def _sha(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "abc"])
def test_ratio_outside_unit_interval(capsys, model_dir, tiny_env, ratio):
    out = tiny_env / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", str(model_dir), "--ratio", ratio, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert "ratio" in err.splitlines()[-1] and not out.exists()


def test_missing_model_path(capsys, tiny_env):
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", str(tiny_env / "nope"), "--ratio", "0.2", "--out", str(out))
    _assert_clean_failure(code, err, out, "no model at")


def test_hub_id_offline_says_to_pass_a_local_path(capsys, tiny_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", "someorg/somemodel", "--ratio", "0.2", "--out", str(out))
    _assert_clean_failure(code, err, out, "pass its local directory")


def test_unsupported_architecture(capsys, tiny_env):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tiny_env / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(src)
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", str(src), "--ratio", "0.2", "--out", str(out))
    _assert_clean_failure(code, err, out, "supported families: ")
    assert "llama (LlamaForCausalLM)" in err


def test_pickle_only_weights_are_refused(capsys, tiny_env):
    src = write_model_dir(tiny_env / "pickled")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", str(src), "--ratio", "0.2", "--out", str(out))
    _assert_clean_failure(code, err, out, "pickle")


def test_calibration_with_fewer_tokens_than_hidden_size_is_allowed_with_a_warning(capsys, model_dir, tiny_env,
                                                                                   caplog):
    """A timing run on a large model (8 x 128 tokens for hidden size 4096) is legitimate: warned, not refused."""
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", str(model_dir), "--ratio", "0.2", "--calib-samples", "2",
                        "--calib-seqlen", "16", "--in-memory", "--out", str(out))
    assert code == 0, err
    assert "fewer than the hidden size" in err + caplog.text
    assert (out / "config.json").is_file()


def test_nan_in_activations(capsys, tiny_env):
    def poison(model):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")

    src = write_model_dir(tiny_env / "nan", mutate=poison)
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", str(src), "--ratio", "0.2", "--calib-samples", "8",
                        "--calib-seqlen", "32", "--out", str(out))
    _assert_clean_failure(code, err, out, "NaN or Inf in the activations")


def test_non_empty_output_directory(capsys, model_dir, tiny_env):
    out = tiny_env / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = _run(capsys, "compress", "--model", str(model_dir), "--ratio", "0.2", "--out", str(out))
    assert code != 0 and "--overwrite" in _error_lines(err)[0]
    assert (out / "precious.txt").read_text() == "keep me"


def test_missing_calibration_file(capsys, model_dir, tiny_env):
    out = tiny_env / "out"
    code, _, err = _run(capsys, "compress", "--model", str(model_dir), "--ratio", "0.2", "--calib-data",
                        str(tiny_env / "none.txt"), "--out", str(out))
    _assert_clean_failure(code, err, out, "no data file")


def test_console_script_exit_code_and_single_line(model_dir, tiny_env):
    out = tiny_env / "out"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "compress", "--model", str(tiny_env / "missing"),
                             "--ratio", "0.2", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("dotresize: error: no model at")
    assert "Traceback" not in result.stderr and not out.exists()
