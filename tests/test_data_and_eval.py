"""Calibration sampling, data resolution, perplexity against a hand computation, speed measurement."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_model, make_tiny_tokenizer, write_model_dir
from dotresize.data import calibration_set, load_text, resolve_data_dir, sample_windows
from dotresize.errors import CalibrationError, DataNotFoundError
from dotresize.evaluation.perplexity import perplexity, windows_of
from dotresize.evaluation.speed import forward_throughput, generation_latency
from flows.cli import main


def test_sample_windows_is_reproducible_and_non_overlapping():
    ids = torch.arange(1000)
    a = sample_windows(ids, 5, 100, seed=7)
    b = sample_windows(ids, 5, 100, seed=7)
    assert torch.equal(a, b) and a.shape == (5, 100)
    starts = sorted(int(row[0]) for row in a)
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 5
    assert not torch.equal(a, sample_windows(ids, 5, 100, seed=8))


def test_too_short_text_is_a_clear_error():
    with pytest.raises(CalibrationError, match="fewer than one sequence"):
        sample_windows(torch.arange(10), 1, 64, seed=0)


def test_data_dir_setting_and_named_sets(tiny_env, tiny_data_dir):
    assert resolve_data_dir() == tiny_data_dir.resolve()
    test = load_text("wikitext2-test")
    assert "\r" not in test.text and "\n\n" in test.text and len(test.sha256) == 64


def test_missing_local_data_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataNotFoundError, match="DOTRESIZE_DATA_DIR"):
        load_text("wikitext2")


def test_jsonl_calibration_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90 + 1}" for j in range(50))})
                              for i in range(20)))
    calibration = calibration_set(make_tiny_tokenizer(), str(path), samples=4, seqlen=32, seed=1)
    assert calibration.input_ids.shape == (4, 32)
    meta = calibration.meta()
    assert meta["id"] == "file:calib.jsonl" and meta["tokens"] == 128 and meta["seed"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(CalibrationError, match="'text' field"):
        calibration_set(make_tiny_tokenizer(), str(bad))


class _FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is a fixed table: ppl can be computed by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"vocab_size": table.shape[1]})()

    def forward(self, input_ids, use_cache=False, **_):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_matches_hand_computation():
    # vocabulary {0, 1}; after 0 the model says P(1) = 0.8, after 1 it says P(0) = 0.25
    table = torch.log(torch.tensor([[0.2, 0.8], [0.25, 0.75]]))
    model = _FixedLogits(table)
    ids = torch.tensor([0, 1, 1, 0, 0, 1, 9])  # tail token dropped by the windowing (ctx 3 -> 2 windows)
    result = perplexity(model, ids[:6], ctx=3, max_windows=None, batch_size=1, progress=False)
    # window [0,1,1]: -log .8, -log .75 ; window [0,0,1]: -log .2, -log .8
    w1 = (-math.log(0.8) - math.log(0.75)) / 2
    w2 = (-math.log(0.2) - math.log(0.8)) / 2
    assert result["windows"] == 2 and result["tokens"] == 6
    assert result["ppl"] == pytest.approx(math.exp((w1 + w2) / 2), rel=1e-6)
    assert windows_of(ids, 3).shape == (2, 3)


def test_speed_measurements_are_positive():
    model = make_tiny_model("llama-untied")
    forward = forward_throughput(model, batch=2, ctx=16, repeats=2)
    assert forward["tokens_per_second"] > 0 and len(forward["seconds_all"]) == 2
    latency = generation_latency(model, prompt=8, new_tokens=4, repeats=1)
    assert latency["seconds_per_token"] > 0


def test_bench_command_compares_with_the_recorded_source(capsys, pipeline_env):
    src = write_model_dir(pipeline_env / "src")
    out = pipeline_env / "out"
    assert main(["-q", "compress", "--model", str(src), "--ratio", "0.25", "--method", "pca", "--calib-samples", "8",
                 "--calib-seqlen", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "bench", str(out), "--batch", "2", "--ctx", "16", "--prompt", "8", "--new-tokens", "4",
                 "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"]["original"]["model"] == str(src)
    assert result["ratios"]["parameters"] == pytest.approx(
        result["rows"]["compressed"]["parameters"] / result["rows"]["original"]["parameters"])
    assert result["ratios"]["tokens_per_second"] > 0
