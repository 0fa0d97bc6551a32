"""Done-when 3: exports reload both ways with identical logits; global exports are stock models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, tiny_calibration
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
    torch.save(ids[:2].clone(), tmp_path / "ids.pt")  # test-only fixture, read back with weights_only
    torch.save(_logits(compressed, ids[:2]), tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32, trust_remote_code=True).eval()
assert "dotresize" not in sys.modules, "dotresize was imported"
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
exp = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    diff = (m(input_ids=ids).logits - exp).abs().max().item()
print(diff)
assert diff <= 1e-5, diff
"""
    _run_isolated(script, tmp_path)


def test_global_export_is_a_stock_model_in_a_fresh_process(tmp_path):
    compressed, report, ids = _compressed("qwen2", layout="global")
    out = save_compressed(compressed, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["hidden_size"] == report.widths[0]
    assert "auto_map" not in config and not (out / "modeling_dotresize.py").exists()
    torch.save(ids[:2].clone(), tmp_path / "ids.pt")
    torch.save(_logits(compressed, ids[:2]), tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
assert "dotresize" not in sys.modules
assert type(m).__name__ == "Qwen2ForCausalLM"
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
exp = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    diff = (m(input_ids=ids).logits - exp).abs().max().item()
assert diff <= 1e-5, diff
"""
    _run_isolated(script, tmp_path)


def _run_isolated(script: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    # -I: isolated mode, no cwd / user site on sys.path; run from tmp so the source tree is not importable
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


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
