"""The MLP axis in the orchestrated pipeline (issue 16): the intermediate statistics captured with the residual
points, one reduction task per layer (a chain in sequential mode), absorbed with the layer; equal to the in-memory
API, resumable, and a stock model where the layout allows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_model_dir

ARGS = dict(calib_samples=16, calib_seqlen=32, seed=7)
#: explicit MLP keep-sets: 72 of the 112 neurons, another pattern per layer
KEEP_SETS = [sorted(range(112), key=lambda i, l=l: (i * (5 + 2 * l)) % 112)[:72] for l in range(3)]


@pytest.fixture
def src(pipeline_env) -> Path:
    return write_model_dir(pipeline_env / "src", family="llama-tied", seed=3)


def _flow(model_dir: Path, run_dir: Path, overrides: dict, **kwargs) -> dict:
    from flows.compress import compress_flow

    params = {**ARGS, "method": "pca", "mlflow": False, "progress": False, **kwargs}
    return compress_flow(model=str(model_dir), run_dir=str(run_dir), config_overrides=overrides, **params)


def _in_memory(model_dir: Path, config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotresize import compress
    from dotresize.data import calibration_set

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = calibration_set(tokenizer, "wikitext2", samples=ARGS["calib_samples"],
                                  seqlen=ARGS["calib_seqlen"], seed=ARGS["seed"])
    return compress(model, calibration.input_ids, config, progress=False)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("ratio,mode,layout,mlp", [
    (0.25, "parallel", "per-point", {"mlp_ratio": 0.3}),
    (0.25, "sequential", "per-point", {"mlp_ratio": 0.3, "mlp": {"method": "dot"}}),
    (0.25, "parallel", "global", {"mlp_ratio": 0.3, "mlp": {"method": "prune"}}),
    (0.0, "sequential", "per-point", {"mlp_ratio": 0.3}),
    (0.0, "parallel", "per-point", {"mlp_keep_sets": KEEP_SETS}),
])
def test_pipeline_with_the_mlp_axis_equals_the_in_memory_api(src, pipeline_env, ratio, mode, layout, mlp):
    from dotresize import CompressionConfig, load_compressed

    run = pipeline_env / "run"
    result = _flow(src, run, mlp, ratio=ratio, mode=mode, layout=layout)
    config = CompressionConfig.from_dict({**CompressionConfig(method="pca", ratio=ratio, mode=mode, layout=layout,
                                                              seed=ARGS["seed"]).to_dict(), **mlp, "version": 2})
    reference, report = _in_memory(src, config)
    assert result["mlp_widths"] == report.mlp["widths"] == [72, 72, 72]  # 112 neurons, 30 % off: 78.4, down to a multiple of 8
    assert result["parameters_after"] == report.parameters_after
    assert sorted(result["stages"]["mlp"]["computed"]) == ["0", "1", "2"]
    for layer in range(3):
        assert (run / "mlp" / f"layer_{layer}.safetensors").is_file()
        if "mlp_keep_sets" in mlp:
            from safetensors.torch import load_file

            kept = load_file(run / "mlp" / f"layer_{layer}.safetensors")["keep"].tolist()
            assert kept == sorted(KEEP_SETS[layer])
    if mode == "parallel":  # statistics captured with the residual points, one group per layer
        assert (run / "activations.zarr" / "mlp_1" / "gram" / "zarr.json").is_file()
    exported = load_compressed(run / "model")
    assert (_logits(exported) - _logits(reference)).abs().max().item() <= 1e-5
    lineage = json.loads((run / "model" / "lineage.json").read_text())
    assert sorted(lineage["stages"]["mlp"]) == ["0", "1", "2"]


def test_a_uniform_mlp_width_in_the_global_layout_is_a_stock_model(src, pipeline_env):
    """No custom code: plain transformers loads it, with both widths smaller."""
    from transformers import AutoModelForCausalLM

    result = _flow(src, pipeline_env / "run", {"mlp_ratio": 0.3}, ratio=0.25, layout="global")
    model_dir = Path(result["model_dir"])
    assert not list(model_dir.glob("*.py"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["intermediate_size"] == 72 and config["hidden_size"] < 64 and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.isfinite(_logits(model)).all()


def test_mlp_stages_resume_and_rerun_byte_identical(src, pipeline_env):
    first = _flow(src, pipeline_env / "a", {"mlp_ratio": 0.3}, ratio=0.25)
    (pipeline_env / "a" / "mlp" / "layer_1.safetensors").unlink()  # a lost reduction is recomputed, alone
    again = _flow(src, pipeline_env / "a", {"mlp_ratio": 0.3}, ratio=0.25)
    computed = {stage: info["computed"] for stage, info in again["stages"].items() if info["computed"]}
    assert computed == {"mlp": ["1"]}, computed
    assert again["model_sha256"] == first["model_sha256"]
    fresh = _flow(src, pipeline_env / "b", {"mlp_ratio": 0.3}, ratio=0.25)
    assert fresh["model_sha256"] == first["model_sha256"]
    # a different MLP option changes the reductions and what depends on them, not the captures
    other = _flow(src, pipeline_env / "a", {"mlp_ratio": 0.3, "mlp": {"ridge": 0.5}}, ratio=0.25)
    computed = {stage: sorted(info["computed"]) for stage, info in other["stages"].items() if info["computed"]}
    assert computed.get("capture") is None and computed["mlp"] == ["0", "1", "2"]
    assert other["model_sha256"] != first["model_sha256"]
