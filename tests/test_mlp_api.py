"""The MLP's intermediate width as a second axis (issue 16): config, in-memory API, export and command line.

The pure functions (keep rules, maps, exactness of ``lsq`` on linearly dependent neurons) are tested in
tests/test_mlp.py; here the axis is tested end to end on tiny in-code models.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_fresh_process_logits, make_tiny_model, tiny_calibration, write_model_dir
from dotresize import CompressionConfig, compress, load_compressed, save_compressed
from dotresize.config import MlpDotOptions, MlpOptions
from dotresize.errors import InvalidConfigError
from dotresize.mlp import MlpStatsAccumulator, reduce_mlp, reduce_mlp_weights


# --- config ---------------------------------------------------------------------------------------------------------
def test_config_with_the_mlp_axis_round_trips_exactly():
    configs = [
        CompressionConfig(method="pca", ratio=0.25, mlp_ratio=0.3,
                          mlp=MlpOptions(method="dot", keep_rule="energy", ridge=0.05,
                                         dot=MlpDotOptions(epsilon=0.1, cost="l2", prior=True))),
        CompressionConfig(ratio=0.0, layout="global", mlp_widths=(80, 96, 104)),
        CompressionConfig(mlp=MlpOptions(method="prune")),  # options without a ratio still round-trip
        CompressionConfig(ratio=0.0, mlp_keep_sets=((0, 3, 5), (1, 2, 7), (4, 6, 9))),
    ]
    for config in configs:
        config.validate()
        text = config.to_json()
        again = CompressionConfig.from_json(text)
        assert again == config and again.to_json() == text
        assert json.loads(text)["version"] == 2
    assert configs[0].mlp_method == "dot" and configs[1].mlp_active and not configs[2].mlp_active


def test_a_config_without_the_mlp_axis_keeps_its_version_1_form():
    """Recipe digests, stage keys and run keys hash ``to_dict()``: it must not change for existing configs."""
    config = CompressionConfig(method="pca", ratio=0.2, mlp_ratio=0.0)
    data = config.to_dict()
    assert data["version"] == 1 and not any(key.startswith("mlp") for key in data)
    assert CompressionConfig.from_dict(data) == config
    old = dict(data)  # what version 1 wrote, read as the current version
    assert CompressionConfig.from_dict(old).validate().mlp_ratio == 0.0


@pytest.mark.parametrize("changes, message", [
    ({"mlp_ratio": 1.0}, "mlp_ratio must be in"),
    ({"mlp_ratio": -0.1}, "mlp_ratio must be in"),
    ({"mlp_ratio": 0.2, "mlp_widths": (8, 8, 8)}, "not both"),
    ({"mlp_widths": (8, 0, 8)}, "one positive integer width per layer"),
    ({"mlp_widths": ()}, "one positive integer width per layer"),
    ({"mlp": MlpOptions(method="svd")}, "mlp method must be one of"),
    ({"mlp": MlpOptions(ridge=-1.0)}, "mlp ridge must be"),
    ({"mlp": MlpOptions(keep_rule="random")}, "mlp keep rule must be one of"),
    ({"mlp": MlpOptions(dot=MlpDotOptions(epsilon=0.0))}, "mlp dot epsilon"),
    ({"mlp_ratio": 0.2, "version": 1}, "no MLP axis"),
    ({"mlp_ratio": 0.2, "mlp_keep_sets": ((0, 1),) * 3}, "without mlp_ratio or mlp_widths"),
    ({"mlp_keep_sets": ((0, 1), (2, 2), (3,))}, r"mlp_keep_sets\[1\] must be a non-empty list of distinct"),
    ({"mlp_keep_sets": ((0, 1), (), (3,))}, r"mlp_keep_sets\[1\] must be a non-empty list"),
    ({"mlp_keep_sets": ((0, -1), (2,), (3,))}, r"mlp_keep_sets\[0\] must be"),
])
def test_bad_mlp_values_are_rejected_with_one_message(changes, message):
    with pytest.raises(InvalidConfigError, match=message) as caught:
        CompressionConfig(**changes).validate()
    assert "\n" not in str(caught.value)


def test_unknown_mlp_keys_and_versions_are_rejected():
    with pytest.raises(InvalidConfigError, match="unknown mlp option keys"):
        CompressionConfig.from_dict({"mlp": {"sparsity": 0.2}})
    with pytest.raises(InvalidConfigError, match="unknown mlp dot option keys"):
        CompressionConfig.from_dict({"mlp": {"dot": {"eps": 0.2}}})
    with pytest.raises(InvalidConfigError, match="not supported"):
        CompressionConfig.from_dict({"version": 3})


# --- in-memory API --------------------------------------------------------------------------------------------------
INTERMEDIATE = 112  # the tiny configs' intermediate size


def _compress(family="llama-untied", **config):
    model = make_tiny_model(family)
    ids = tiny_calibration(samples=32)
    compressed, report = compress(model, ids, CompressionConfig(**config), progress=False)
    return compressed, report, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mlp_ratio_zero_is_the_identity():
    """mlp_ratio 0 takes the existing path; keeping every neuron through the MLP path changes no weight either
    (and its one-pass capture gives the residual bases bit for bit)."""
    plain, plain_report, ids = _compress(method="pca", ratio=0.25)
    zero, zero_report, _ = _compress(method="pca", ratio=0.25, mlp_ratio=0.0)
    full, full_report, _ = _compress(method="pca", ratio=0.25, mlp_widths=(INTERMEDIATE,) * 3)
    reference = plain.state_dict()
    for other in (zero, full):
        state = other.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        assert torch.equal(_logits(other, ids[:4]), _logits(plain, ids[:4]))
    assert zero_report.mlp is None and zero_report.config == plain_report.config
    assert full_report.mlp["widths"] == [INTERMEDIATE] * 3
    assert full_report.parameters_after == plain_report.parameters_after


def _reduced_by_hand(family, ids, width, options, keep_sets=None):
    """The reference: every MLP of the unfused dense model reduced from its own statistics (to ``width`` by the
    options' rule, or to ``keep_sets[layer]``), modules replaced."""
    model = make_tiny_model(family)
    layers = list(model.model.layers)
    accs = [MlpStatsAccumulator(INTERMEDIATE, layer=i) for i in range(len(layers))]
    handles = [l.mlp.down_proj.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0]))
               for l, acc in zip(layers, accs)]
    with torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    for index, (layer, acc) in enumerate(zip(layers, accs)):
        mlp = layer.mlp
        keep = None if keep_sets is None else keep_sets[index]
        reduction = reduce_mlp(acc.finalize(), mlp.down_proj.weight, None if keep else width, options, keep)
        new = reduce_mlp_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, reduction.keep,
                                 reduction.A)
        for name, weight in (("gate_proj", new.gate), ("up_proj", new.up), ("down_proj", new.down)):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight = torch.nn.Parameter(weight)
            setattr(mlp, name, linear)
    return model.eval()


@pytest.mark.parametrize("method", ["prune", "lsq", "dot"])
def test_parallel_mlp_only_equals_reducing_the_dense_model_by_hand(method):
    options = MlpOptions(method=method)
    compressed, report, ids = _compress(ratio=0.0, mlp_ratio=0.3, mlp=options)
    assert report.mlp["widths"] == [72] * 3 and report.widths == [64] * 7
    expected = _logits(_reduced_by_hand("llama-untied", ids, 72, options), ids[:4])
    assert (_logits(compressed, ids[:4]) - expected).abs().max() <= 1e-4
    dense = make_tiny_model("llama-untied")
    saved = 3 * 3 * 64 * (INTERMEDIATE - 72)  # three layers x (gate, up, down) x D x removed
    untied = dense.lm_head.weight.numel() if dense.config.tie_word_embeddings else 0
    assert report.parameters_after == report.parameters_before - saved + untied


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_lsq_halving_an_mlp_of_duplicated_neurons_keeps_the_model_exact(mode):
    """End to end (the unit version is in test_mlp.py): neurons 56..111 copy 0..55 (gate/up rows), their down
    columns scaled by 0.01 so the output rule keeps the originals; ``lsq`` folds the copies back exactly."""
    model = make_tiny_model("llama-untied")
    half = INTERMEDIATE // 2
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight[half:] = mlp.gate_proj.weight[:half]
            mlp.up_proj.weight[half:] = mlp.up_proj.weight[:half]
            mlp.down_proj.weight[:, half:] = 0.01 * mlp.down_proj.weight[:, :half]
    ids = tiny_calibration(samples=32)
    expected = _logits(model, ids[:4])
    config = CompressionConfig(ratio=0.0, mlp_ratio=0.5, mode=mode, mlp=MlpOptions(method="lsq", ridge=0.0))
    compressed, report = compress(model, ids, config, progress=False)
    assert compressed.config.intermediate_size == half
    assert max(layer["output_error"] for layer in report.mlp["layers"]) < 1e-10
    assert (_logits(compressed, ids[:4]) - expected).abs().max() <= 1e-5  # prune: 1.5e-3


def test_sequential_mlp_statistics_come_from_the_reduced_layers():
    _, parallel, _ = _compress(ratio=0.0, mlp_ratio=0.4)
    _, sequential, _ = _compress(ratio=0.0, mlp_ratio=0.4, mode="sequential")
    first = [r["layers"][0]["output_error"] for r in (parallel.mlp, sequential.mlp)]
    later = [r["layers"][2]["output_error"] for r in (parallel.mlp, sequential.mlp)]
    assert first[0] == pytest.approx(first[1], rel=1e-9)  # layer 0 sees the same signal
    assert later[0] != pytest.approx(later[1], rel=1e-6)


def test_both_axes_compose_in_either_mode():
    for mode in ("parallel", "sequential"):
        compressed, report, ids = _compress(method="pca", ratio=0.25, mode=mode, mlp_ratio=0.3)
        assert report.layout == "per-point" and report.widths[0] == 48
        assert compressed.config.dotresize["intermediate_sizes"] == [72] * 3
        assert torch.isfinite(_logits(compressed, ids[:2])).all()


# --- export ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, config", [
    ("qwen2", {"method": "pca", "ratio": 0.25, "layout": "global", "mlp_ratio": 0.3}),
    ("llama-tied", {"ratio": 0.0, "mlp_ratio": 0.3, "mlp": MlpOptions(method="dot")}),
])
def test_uniform_mlp_width_exports_a_stock_model_that_loads_in_a_fresh_process(tmp_path, family, config):
    compressed, report, ids = _compress(family, **config)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["intermediate_size"] == 72 and saved["hidden_size"] == report.widths[0]
    assert saved["model_type"] == family.split("-")[0] and "auto_map" not in saved and "dotresize" not in saved
    assert not (out / "modeling_dotresize.py").exists()
    assert json.loads((out / "dotresize.json").read_text())["intermediate_sizes"] == [72] * 3
    if config["ratio"] == 0:  # the residual stream untouched: a tied source stays tied (no second matrix)
        from safetensors import safe_open

        assert saved["tie_word_embeddings"] is True
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        layers, hidden = 3, saved["hidden_size"]
        assert report.parameters_before - report.parameters_after == layers * 3 * hidden * (112 - 72)
    assert_fresh_process_logits(out, ids[:2], _logits(compressed, ids[:2]), tmp_path, checks="""
assert type(m).__module__.startswith("transformers."), type(m)
assert all(l.mlp.down_proj.in_features == 72 for l in m.model.layers)
""")


@pytest.mark.parametrize("config", [
    {"method": "pca", "ratio": 0.25, "mlp_widths": (104, 72, 40)},                      # per-point layout
    {"method": "pca", "ratio": 0.25, "layout": "global", "mlp_widths": (104, 72, 40)},  # one width, no shortcuts
    {"ratio": 0.0, "mlp_widths": (104, 72, 40), "mode": "sequential"},                   # residual untouched
])
def test_non_uniform_mlp_widths_export_with_the_per_point_code(tmp_path, config):
    compressed, report, ids = _compress("mistral", **config)
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    spec = json.loads((out / "config.json").read_text())["dotresize"]
    assert spec["intermediate_sizes"] == [104, 72, 40] and spec["format_version"] >= 2
    assert spec.get("shortcuts", True) is (config.get("layout") != "global" and config["ratio"] > 0)
    expected = _logits(compressed, ids[:4])
    for loaded in (load_compressed(out), AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        assert [l.mlp.down_proj.in_features for l in loaded.model.layers] == [104, 72, 40]
        assert (_logits(loaded.eval(), ids[:4]) - expected).abs().max() <= 1e-5
    if not spec.get("shortcuts", True):
        assert not any("shortcut" in k for k in compressed.state_dict())


def test_non_uniform_mlp_widths_of_a_tied_source_untie_the_head_exactly(tmp_path):
    """Only a stock export keeps a tied head tied (the per-point code's norms have no weight to keep)."""
    compressed, report, ids = _compress("llama-tied", ratio=0.0, mlp_widths=(104, 72, 40))
    out = save_compressed(compressed, tmp_path / "model", compression=report.config)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_compressed(out)
    assert (_logits(loaded.eval(), ids[:4]) - _logits(compressed, ids[:4])).abs().max() <= 1e-5


#: an explicit keep-set per layer (72 of 112 neurons, a different pattern in every layer, unsorted on purpose)
KEEP_SETS = tuple(tuple(sorted(range(INTERMEDIATE), key=lambda i, l=l: (i * (7 + 2 * l)) % INTERMEDIATE)[:72][::-1])
                  for l in range(3))


def test_explicit_mlp_keep_sets_keep_exactly_those_neurons():
    options = MlpOptions(method="lsq")
    compressed, report, ids = _compress(ratio=0.0, mlp_keep_sets=KEEP_SETS, mlp=options)
    assert report.mlp["widths"] == [72] * 3
    assert all(layer["keep_rule"] == "explicit" for layer in report.mlp["layers"])
    expected = _logits(_reduced_by_hand("llama-untied", ids, None, options, KEEP_SETS), ids[:4])
    assert (_logits(compressed, ids[:4]) - expected).abs().max() <= 1e-4
    by_rule, _, _ = _compress(ratio=0.0, mlp_ratio=0.3, mlp=options)  # same width, the rule's neurons: differs
    assert (_logits(by_rule, ids[:4]) - expected).abs().max() > 1e-3


def test_mlp_keep_sets_that_do_not_fit_the_model_are_one_message():
    with pytest.raises(InvalidConfigError, match="mlp_keep_sets must list 3 index lists"):
        _compress(ratio=0.0, mlp_keep_sets=KEEP_SETS[:2])
    with pytest.raises(InvalidConfigError, match=r"mlp_keep_sets\[2\] names neuron 112: indices must be below 112"):
        _compress(ratio=0.0, mlp_keep_sets=KEEP_SETS[:2] + ((0, 112),))


def test_mlp_width_schedule_of_the_wrong_length_is_one_message():
    with pytest.raises(InvalidConfigError, match="mlp_widths must list 3 values"):
        _compress(ratio=0.0, mlp_widths=(64, 64))
    with pytest.raises(InvalidConfigError, match=r"every mlp width must be in \[1, 112\]"):
        _compress(ratio=0.0, mlp_widths=(64, 200, 64))


# --- command line ---------------------------------------------------------------------------------------------------
def _cli(capsys, *argv):
    from flows.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, match", [
    (["--ratio", "0.2", "--mlp-ratio", "1.0", "--in-memory"], "mlp ratio must be in [0, 1)"),
    (["--ratio", "0.2", "--mlp-ratio", "abc", "--in-memory"], "mlp ratio must be a number"),
    (["--ratio", "0.2", "--mlp-ratio", "0.3", "--mlp-method", "svd", "--in-memory"], "invalid choice: 'svd'"),
    (["--ratio", "0.2", "--mlp-ridge", "0.5", "--in-memory"], "--mlp-ridge needs --mlp-ratio"),
    (["--ratio", "0.2", "--mlp-ratio", "0.3", "--mlp-keep-rule", "random"], "invalid choice: 'random'"),
    (["--ratio", "0", "--in-memory"], "--ratio 0 compresses nothing"),
    (["--ratio", "0.2", "--mlp-method", "dot", "--in-memory"], "--mlp-method needs --mlp-ratio"),
    (["--ratio", "0", "--mlp-keep-set", "missing.json", "--in-memory"], "--mlp-keep-set missing.json does not exist"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:[[0, 1], [2]", "--in-memory"], "is not JSON"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:{\"0\": [1]}", "--in-memory"], "one list of integer neuron indices"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:[[0, 1.5]]", "--in-memory"], "one list of integer neuron indices"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:[[0, 1], [2], [3]]", "--mlp-ratio", "0.3", "--in-memory"],
     "--mlp-keep-set fixes every layer's MLP width: drop --mlp-ratio"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:[[0, 1], [2], [3]]", "--mlp-keep-rule", "energy", "--in-memory"],
     "drop --mlp-keep-rule"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:[[0, 1], [2]]", "--in-memory"], "mlp_keep_sets must list 3 index lists"),
    (["--ratio", "0", "--mlp-keep-set", "KEEP:[[0, 1], [2], [3, 3]]", "--in-memory"], "distinct neuron indices"),
])
def test_bad_mlp_options_are_one_error_line(capsys, tiny_env, argv, match):
    out = tiny_env / "out"
    if "--mlp-keep-set" in argv:  # read once the model is known to exist
        write_model_dir(tiny_env / "src")
    for index, arg in enumerate(argv):  # "KEEP:<json>": a keep-set file with that text
        if arg.startswith("KEEP:"):
            keep_file = tiny_env / "keep.json"
            keep_file.write_text(arg[len("KEEP:"):])
            argv = [*argv[:index], str(keep_file), *argv[index + 1:]]
    code, _, err = _cli(capsys, "compress", "--model", str(tiny_env / "src"), *argv, "--out", str(out))
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code != 0 and len(lines) == 1 and match in lines[0], err
    assert lines[0].startswith("dotresize") and "Traceback" not in err and not out.exists()


def test_in_memory_cli_reduces_the_mlps_to_a_stock_model(capsys, tiny_env):
    src = write_model_dir(tiny_env / "src")
    out = tiny_env / "out"
    code, stdout, err = _cli(capsys, "-q", "compress", "--model", str(src), "--ratio", "0", "--mlp-ratio", "0.3",
                             "--mlp-method", "prune", "--in-memory", "--calib-samples", "8", "--calib-seqlen", "32",
                             "--out", str(out), "--json")
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["intermediate_size"] == 72 and saved["model_type"] == "llama"
    recorded = json.loads((out / "dotresize.json").read_text())["compression"]
    assert recorded["mlp_ratio"] == 0.3 and recorded["mlp"]["method"] == "prune" and recorded["version"] == 2
    result = json.loads(stdout)
    assert result["parameters_after"] < result["parameters_before"] and result["mlp_widths"] == [72] * 3


def test_in_memory_cli_takes_an_mlp_keep_set_file(capsys, tiny_env):
    src = write_model_dir(tiny_env / "src")
    keep_file = tiny_env / "keep.json"
    keep_file.write_text(json.dumps([list(kept) for kept in KEEP_SETS]))
    out = tiny_env / "out"
    code, stdout, err = _cli(capsys, "-q", "compress", "--model", str(src), "--ratio", "0", "--mlp-keep-set",
                             str(keep_file), "--in-memory", "--calib-samples", "8", "--calib-seqlen", "32",
                             "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 72
    recorded = json.loads((out / "dotresize.json").read_text())["compression"]
    assert tuple(tuple(kept) for kept in recorded["mlp_keep_sets"]) == KEEP_SETS
    assert json.loads(stdout)["mlp_widths"] == [72] * 3


def test_the_pipeline_takes_the_mlp_axis():
    from flows.compress import build_config

    config = build_config(ratio=0.0, method="dot", mode="parallel", layout_name="per-point", seed=0,
                          overrides={"mlp_ratio": 0.3, "mlp": {"method": "prune"}})
    assert config.mlp_active and config.mlp.method == "prune" and not config.residual_active


# --- compress --recipe FILE -----------------------------------------------------------------------------------------
def test_a_recipe_file_gives_the_options_and_the_command_line_overrides_it(tmp_path):
    from flows.cli import _compression_config, build_parser
    from flows.options_file import expand_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: pca\nratio: 0\nlayout: global\ncalibration: {samples: 8, seqlen: 32}\n"
                      "evaluation: {ppl: true, max_windows: 5}\n"
                      "config: {mlp_ratio: 0.3, slice_head: true, mlp: {method: prune, dot: {epsilon: 0.2}}}\n")
    parser = build_parser()
    args = parser.parse_args(expand_recipe(["-q", "compress", "--recipe", str(recipe), "--mlp-method", "lsq",
                                            "--set", "mlp.dot.epsilon=0.3"]))
    assert (args.ratio, args.mlp_ratio, args.layout, args.calib_samples, args.max_windows) == (0.0, 0.3, "global",
                                                                                               8, 5)
    assert args.ppl and args.slice_head and args.method == "pca"
    config = _compression_config(args)
    assert config.mlp.method == "lsq" and config.mlp.dot.epsilon == 0.3  # the command line wins


@pytest.mark.parametrize("text, match", [
    ("ratio: 0.2\nsparsity: 0.5\n", "unknown key 'sparsity'"),
    ("ratios: [0.1, 0.2]\n", "lists 2 ratios"),
    ("- ratio\n", "expected a mapping"),
    ("ratio: [0.2\n", "not valid YAML"),
    ("ratio: 1.5\n", "ratio must be a number in (0, 1)"),
    ("ratio: 0\n", "ratio 0 compresses nothing"),
    ("ratio: 0.2\nmethod: svd\n", "method"),
    ("ratio: 0.2\nconfig: {mlp: {ridge: -1}}\n", "mlp ridge"),
])
def test_a_bad_recipe_file_is_one_error_line(capsys, tiny_env, text, match):
    recipe = tiny_env / "bad.yaml"
    recipe.write_text(text)
    out = tiny_env / "out"
    code, _, err = _cli(capsys, "compress", "--recipe", str(recipe), "--out", str(out))
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code != 0 and len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_a_missing_recipe_and_a_bad_setting_are_one_line(capsys, tiny_env):
    code, _, err = _cli(capsys, "compress", "--recipe", str(tiny_env / "missing.yaml"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    src = write_model_dir(tiny_env / "src")
    code, _, err = _cli(capsys, "compress", "--model", str(src), "--ratio", "0.2", "--calib-samples", "4", "--set", "mlp=3",
                        "--out", str(tiny_env / "o"))
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "mlp is a group of options" in errors[0], err
    code, _, err = _cli(capsys, "compress", "--model", str(src), "--ratio", "0.2", "--calib-samples", "4", "--set", "sparsity=0.5",
                        "--out", str(tiny_env / "o"))
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "unknown compression config keys" in errors[0], err


def test_the_shipped_recipes_parse():
    from pathlib import Path

    from flows.cli import _compression_config, build_parser
    from flows.options_file import expand_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "no recipes/*.yaml"
    parser = build_parser()
    for recipe in recipes:
        config = _compression_config(parser.parse_args(expand_recipe(["compress", "--recipe", str(recipe)])))
        assert config.mlp_active or config.residual_active, recipe
