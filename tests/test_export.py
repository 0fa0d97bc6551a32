"""Done-when 3: exports reload both ways with identical logits; global exports are stock models."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_fresh_process_logits, make_tiny_model, tiny_calibration
from dotresize import CompressionConfig, compress, load_compressed, save_compressed
from dotresize.errors import OutputExistsError

REPO = Path(__file__).resolve().parent.parent


def _compressed(family="llama-tied", **config):
    model = make_tiny_model(family)
    ids = tiny_calibration(samples=32)
    compressed, report = compress(model, ids, CompressionConfig(**{"method": "pca", "ratio": 0.25, **config}),
                                  progress=False)
    return compressed, report, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_per_point_export_reloads_both_ways(tmp_path, family):
    compressed, report, ids = _compressed(family)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    expected = _logits(compressed, ids[:4])
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "dotresize.json", "modeling_dotresize.py",
            "configuration_dotresize.py"} <= set(files)
    native = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # after `import dotresize`
    remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
    assert type(native).__name__ == type(remote).__name__ == type(compressed).__name__
    for loaded in (native, remote):
        assert (_logits(loaded.eval(), ids[:4]) - expected).abs().max() <= 1e-5
    meta = json.loads((out / "dotresize.json").read_text())
    assert meta["layout"] == "per-point" and meta["widths"] == report.widths


def test_remote_code_export_loads_in_a_process_without_dotresize(tmp_path):
    compressed, report, ids = _compressed()
    out = save_compressed(compressed, tmp_path / "model")
    assert_fresh_process_logits(out, ids[:2], _logits(compressed, ids[:2]), tmp_path, trust_remote_code=True)


def test_global_export_is_a_stock_model_in_a_fresh_process(tmp_path):
    compressed, report, ids = _compressed("qwen2", layout="global")
    out = save_compressed(compressed, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["hidden_size"] == report.widths[0]
    assert "auto_map" not in config and not (out / "modeling_dotresize.py").exists()
    assert_fresh_process_logits(out, ids[:2], _logits(compressed, ids[:2]), tmp_path,
                                checks='assert type(m).__name__ == "Qwen2ForCausalLM"')


def test_export_is_byte_identical_for_the_same_inputs(tmp_path):
    first, report, _ = _compressed(method="dot")
    second, _, _ = _compressed(method="dot")
    a = save_compressed(first, tmp_path / "a")
    b = save_compressed(second, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_existing_output_is_refused_and_nothing_is_left_behind(tmp_path):
    compressed, _, _ = _compressed()
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_compressed(compressed, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    save_compressed(compressed, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left


def test_load_compressed_round_trip(tmp_path):
    compressed, _, ids = _compressed()
    out = save_compressed(compressed, tmp_path / "m")
    assert (_logits(load_compressed(out), ids[:2]) - _logits(compressed, ids[:2])).abs().max() <= 1e-5
