"""Every family against one base (issue 13): what the shared invariance/export tests do not cover per family.

The family-parametrised tests elsewhere (tests/test_invariance.py, tests/test_export.py) run on every tiny config
in conftest.FAMILY_CONFIGS; here: the compressed class agrees with its adapter's layout, the global layout is exact
at a width below D (against the per-point layout with the same basis at every point, with a large eps so that any
misplaced eps shows), its stock export loads in a fresh process, and the MLP axis slices fused projections right.
"""

import json
import re

import pytest
import torch

from conftest import (FAMILY_CONFIGS, assert_fresh_process_logits, global_refusal, layers_of, make_tiny_model,
                      tiny_calibration, write_model_dir)
from dotresize import CompressionConfig, compress, load_compressed, save_compressed
from dotresize.adapters import ADAPTERS, get_adapter
from dotresize.api import build_compressed_model, plan_widths
from dotresize.bases import Basis
from dotresize.config import MlpOptions
from dotresize.errors import InvalidConfigError
from dotresize.layerwise import ResidentModel
from dotresize.mlp.model import MlpReducedModel, capture_mlp_stats, input_rows, reduce_parallel

INTERMEDIATE = 112  # the tiny configs' intermediate size


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_adapter_has_a_tiny_config_in_the_shared_tests():
    """A family is its adapter file (found by scanning dotresize.adapters) and its line in FAMILY_CONFIGS."""
    tested = {make_tiny_model(name).config.model_type for name in FAMILY_CONFIGS}
    assert {t for a in ADAPTERS for t in a.model_types} <= tested


def test_the_compressed_config_records_the_layout_and_the_code_reads_nothing_else(tmp_path, family):
    """The shipped modeling code knows no family: what it builds comes from the config's recorded layout (an
    export whose layout names other paths fails to load, so the layout is really what is used)."""
    model = make_tiny_model(family)
    ids = tiny_calibration(samples=32)
    compressed, report = compress(model, ids, CompressionConfig(method="pca", ratio=0.25), progress=False)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    config = json.loads((out / "config.json").read_text())
    adapter = get_adapter(make_tiny_model(family))
    assert config["dotresize"]["layout"] == adapter.layout.to_dict() and config["dotresize"]["format_version"] == 3
    assert config["model_type"] == "dotresize_" + model.config.model_type
    assert config["architectures"] == ["DotResize" + type(model).__name__]
    source = (out / "modeling_dotresize.py").read_text() + (out / "configuration_dotresize.py").read_text()
    assert type(model).__name__ not in source and not re.search(r"\bfrom transformers import \w+For", source)
    config["dotresize"]["layout"]["mlp_output"] = "mlp.no_such_proj"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="no_such_proj"):
        load_compressed(out, trust_remote_code=True)


def test_an_export_written_before_format_3_still_loads(tmp_path):
    """Configs of formats 1-2 record no layout: ``import dotresize`` knows their family's (old model types too)."""
    compressed, report = compress(make_tiny_model("qwen3"), tiny_calibration(samples=32),
                                  CompressionConfig(method="pca", ratio=0.25), progress=False)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    expected = _logits(compressed, tiny_calibration(samples=2))
    config = json.loads((out / "config.json").read_text())
    for key in ("layout", "norm_eps"):
        del config["dotresize"][key]
    config["dotresize"]["format_version"] = 1
    (out / "config.json").write_text(json.dumps(config))
    assert (_logits(load_compressed(out), tiny_calibration(samples=2)) - expected).abs().max() <= 1e-5


def test_fused_and_head_norm_layouts_are_declared_and_used():
    phi3, qwen3 = make_tiny_model("phi3"), make_tiny_model("qwen3")
    mods = get_adapter(phi3).layer_modules(0)
    assert [m.out_features for m in mods.attention_inputs] == [64 + 2 * 2 * 16]  # q + k + v heads, fused
    assert [m.out_features for m in mods.mlp_inputs] == [2 * INTERMEDIATE]       # gate and up, fused
    layout = get_adapter(qwen3).layout
    norms = [qwen3.model.layers[0].get_submodule(p) for p in layout.head_norms]
    assert [n.weight.shape[0] for n in norms] == [24, 24]  # head_dim wide, not hidden_size
    assert not torch.allclose(norms[0].weight, torch.ones(24))  # randomised: the tests below really exercise them
    assert input_rows(torch.tensor([0, 5]), 112, 2).tolist() == [0, 5, 112, 117]


def _random_basis(width: int, hidden: int = 64, seed: int = 7) -> Basis:
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(hidden, width, dtype=torch.float64, generator=generator))
    return Basis(Q)


@pytest.mark.parametrize("mlp_widths", [None, [104, 72, 40]], ids=["stock", "per-point-class"])
def test_global_layout_equals_per_point_layout_with_one_basis(family, mlp_widths):
    """At d < D the global layout rescales norms and eps; with eps 0.5 (every norm's eps matters) it must still
    equal the per-point layout with the same basis at every point, which rescales nothing. Qwen3's per-head
    norms share the config's eps: without the √(D/d) on q_proj / k_proj this differs by 3e-3 (else ≤ 3e-7)."""
    source = make_tiny_model(family, rms_norm_eps=0.5)
    layout = get_adapter(source).layout
    with torch.no_grad():  # at init attention is nearly uniform and adds little: make q, k and its output matter
        for layer in get_adapter(source).layers():
            for path in (*layout.attention_inputs, layout.attention_output):
                layer.get_submodule(path).weight.mul_(10.0)
    model = ResidentModel(source)
    ids = tiny_calibration(samples=16)
    if mlp_widths is None and global_refusal(family):  # no stock form: the pipeline and the API refuse it
        with pytest.raises(InvalidConfigError, match="layout 'global' is not available for"):
            plan_widths(model, CompressionConfig(method="pca", ratio=0.25, layout="global"))
        return
    if mlp_widths is not None:
        stats = capture_mlp_stats(model, list(ids.split(8)), progress=False)
        model = MlpReducedModel(model, reduce_parallel(model, stats, mlp_widths, MlpOptions()))
    basis = _random_basis(48)
    per_point = build_compressed_model(model, [basis] * model.num_points, "per-point")
    global_ = build_compressed_model(model, [basis] * model.num_points, "global")
    stock = mlp_widths is None
    assert (type(global_) is model.model_class) is stock
    assert global_.get_input_embeddings().weight.shape[1] == 48
    reference = _logits(per_point, ids[:4])
    assert (_logits(global_, ids[:4]) - reference).abs().max() <= 1e-5


def test_global_export_is_a_stock_model_in_a_fresh_process(tmp_path, family):
    model = make_tiny_model(family)
    source_class, model_type = type(model).__name__, model.config.model_type
    ids = tiny_calibration(samples=32)
    if global_refusal(family):
        with pytest.raises(InvalidConfigError, match="layout 'global' is not available for"):
            compress(model, ids, CompressionConfig(method="pca", ratio=0.25, layout="global"), progress=False)
        return
    compressed, report = compress(model, ids, CompressionConfig(method="pca", ratio=0.25, layout="global"),
                                  progress=False)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["hidden_size"] == report.widths[0] == 48
    assert "auto_map" not in config and not (out / "modeling_dotresize.py").exists()
    assert_fresh_process_logits(out, ids[:2], _logits(compressed, ids[:2]), tmp_path, checks=f"""
assert type(m).__name__ == {source_class!r} and type(m).__module__.startswith("transformers."), type(m)
""")


def _duplicate_half_of_the_neurons(model) -> None:
    """Neurons 56..111 copy 0..55 (their rows and biases in every block of every MLP input linear), down columns
    x 0.01."""
    layout, half = get_adapter(model).layout, INTERMEDIATE // 2
    with torch.no_grad():
        for layer in get_adapter(model).layers():
            for path in layout.mlp_inputs:
                linear = layer.get_submodule(path)
                for block in range(layout.mlp_input_blocks):
                    start = block * INTERMEDIATE
                    if linear.bias is not None:  # ReLU (OPT): no neuron dead on the calibration set, else zero
                        linear.bias[start:start + half] += 1.0  # scores keep both copies of a live one (G_KK singular)
                    for tensor in (linear.weight, linear.bias) if linear.bias is not None else (linear.weight,):
                        tensor[start + half:start + INTERMEDIATE] = tensor[start:start + half]
            down = layer.get_submodule(layout.mlp_output).weight
            down[:, half:] = 0.01 * down[:, :half]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_mlp_axis_folds_duplicated_neurons_back_exactly(tmp_path, family, mode):
    """lsq is exact when the removed neurons copy kept ones: only if every block of a fused input linear keeps
    the same neurons (a wrong block would change the function by O(1))."""
    model = make_tiny_model(family)
    _duplicate_half_of_the_neurons(model)
    ids = tiny_calibration(samples=32)
    expected = _logits(model, ids[:4])
    config = CompressionConfig(ratio=0.0, mlp_ratio=0.5, mode=mode, mlp=MlpOptions(method="lsq", ridge=0.0))
    compressed, report = compress(model, ids, config, progress=False)
    assert report.mlp["widths"] == [INTERMEDIATE // 2] * 3
    assert getattr(compressed.config, get_adapter(model).layout.intermediate_size) == INTERMEDIATE // 2
    assert (_logits(compressed, ids[:4]) - expected).abs().max() <= 1e-5
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    assert (_logits(load_compressed(out), ids[:4]) - expected).abs().max() <= 1e-5


def test_both_axes_export_with_the_per_point_code(tmp_path, family):
    model = make_tiny_model(family)
    ids = tiny_calibration(samples=32)
    compressed, report = compress(model, ids, CompressionConfig(method="pca", ratio=0.25, mlp_widths=(104, 72, 40)),
                                  progress=False)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    expected = _logits(compressed, ids[:4])
    mlp_output = get_adapter(make_tiny_model(family)).layout.mlp_output
    for loaded in (load_compressed(out), load_compressed(out, trust_remote_code=True)):
        assert [l.get_submodule(mlp_output).in_features for l in layers_of(loaded)] == [104, 72, 40]
        assert (_logits(loaded, ids[:4]) - expected).abs().max() <= 1e-5


def test_opt_fusion_makes_the_stream_mean_free_and_its_export_keeps_the_norm_biases(tmp_path):
    """SliceGPT's LayerNorm fusion: writers' outputs mean-free, LayerNorm weights and biases in the next linears
    (the final norm's bias in a bias of the head); the LayerNorm biases are not zero here, so this is exercised."""
    model = make_tiny_model("opt")
    assert model.model.decoder.layers[0].self_attn_layer_norm.bias.abs().max() > 0.05
    ids = tiny_calibration(samples=32)
    reference = _logits(model, ids[:4])
    layered = ResidentModel(model)
    hidden = layered.embed(ids[:4])
    assert hidden.mean(dim=-1).abs().max() <= 1e-6  # token and position rows both made mean-free
    with layered.layer(0) as layer:
        out = layer(hidden, **layered.layer_kwargs(hidden)[0])
    assert out.mean(dim=-1).abs().max() <= 1e-5 and out.abs().mean() > 0.1
    assert model.lm_head.bias is not None and (_logits(model, ids[:4]) - reference).abs().max() <= 1e-5
    compressed, report = compress(make_tiny_model("opt"), ids, CompressionConfig(method="pca", ratio=0.25),
                                  progress=False)
    assert compressed.model.decoder.embed_positions.weight.shape == (130, 48)
    assert compressed.lm_head.bias is not None and compressed.lm_head.in_features == 64
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    assert (_logits(load_compressed(out, trust_remote_code=True), ids[:4]) - _logits(compressed, ids[:4])).abs().max() \
        <= 1e-5


@pytest.mark.parametrize("overrides, why", [
    ({"word_embed_proj_dim": 32}, "project_in / project_out"),
    ({"do_layer_norm_before": False}, "post-LN"),
    ({"enable_bias": False}, "without biases"),
])
def test_opt_variants_that_would_not_be_exact_are_refused_in_one_line(overrides, why):
    from dotresize.adapters import adapter_class_for_config
    from dotresize.errors import UnsupportedArchitectureError

    config = FAMILY_CONFIGS["opt"]()
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedArchitectureError, match=why) as error:
        adapter_class_for_config(config)
    assert "\n" not in str(error.value)


def test_gemma3_block_outputs_stay_full_width_through_their_norms(tmp_path):
    """Gemma 3's post-attention / post-feed-forward norms normalise the block output over D: o_proj and down_proj
    keep D outputs, and the norm's 1 + w and the point's basis become one D -> d projection after a weight-free
    norm. The tiny model makes every part matter: 1 + w far from 1, a sliding window (8) shorter than the inputs,
    per-head q/k norms, the √D embedding scale."""
    model = make_tiny_model("gemma3")
    layer = model.model.layers[0]
    assert (layer.post_attention_layernorm.weight.abs() > 0.3).float().mean() > 0.8
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"] and model.config.sliding_window < 32
    ids = tiny_calibration(samples=32)
    compressed, report = compress(model, ids, CompressionConfig(method="pca", ratio=0.25), progress=False)
    first = compressed.model.layers[0]
    assert first.self_attn.o_proj.out_features == first.mlp.down_proj.out_features == 64
    assert first.attn_output_norm.weight.shape == first.mlp_output_norm.weight.shape == (48, 64)
    assert first.self_attn.q_proj.in_features == first.mlp.gate_proj.in_features == 48
    assert float(compressed.model.embed_tokens.embed_scale) == 8.0  # √D, D the source width
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    expected = _logits(compressed, ids[:4])
    assert (_logits(load_compressed(out, trust_remote_code=True), ids[:4]) - expected).abs().max() <= 1e-5
    # a 0 % PCA basis is a full-width rotation: the branch norms' projections are then exact
    reference = _logits(make_tiny_model("gemma3"), ids[:4])
    full, _ = compress(make_tiny_model("gemma3"), ids, CompressionConfig(method="pca", ratio=0.0), progress=False)
    assert (_logits(full, ids[:4]) - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen3", "phi3", "opt", "gemma3"])
def test_cli_compresses_both_axes_of_a_new_family(capsys, tiny_env, name):
    """The command line reads a checkpoint of the family from disk (in memory: no Prefect server needed here)."""
    from flows.cli import main

    src = write_model_dir(tiny_env / "src", family=name)
    out = tiny_env / "out"
    code = main(["-q", "compress", "--model", str(src), "--ratio", "0.25", "--mlp-ratio", "0.3", "--in-memory",
                 "--calib-samples", "8", "--calib-seqlen", "32", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["mlp_widths"] == [72] * 3 and result["parameters_after"] < result["parameters_before"]
    loaded = load_compressed(out)
    assert type(loaded).__name__ == get_adapter(make_tiny_model(name)).compressed_model_class.__name__
    assert loaded.config.dotresize["widths"][0] == 48
