"""Done-when 1: fusion + full-width rotation is exact; slicing by 0 % is the identity (every family)."""

import pytest
import torch

from conftest import global_refusal, layers_of, make_tiny_model, tiny_calibration
from dotresize import CompressionConfig, compress
from dotresize.adapters import get_adapter
from dotresize.errors import InvalidConfigError
from dotresize.fusion import fuse_norms

TOL = 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fusion_alone_is_exact(family):
    model = make_tiny_model(family)
    ids = tiny_calibration(samples=4)
    reference = _logits(model, ids)
    fuse_norms(get_adapter(model))
    assert (_logits(model, ids) - reference).abs().max() <= TOL


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_random_orthogonal_full_width_is_exact(family, mode):
    model = make_tiny_model(family)
    ids = tiny_calibration()
    reference = _logits(model, ids[:4])
    compressed, report = compress(model, ids, CompressionConfig(method="random", ratio=0.0, mode=mode, seed=3),
                                  progress=False)
    assert report.widths == [report.hidden_size] * len(report.widths)
    # the bases really rotate (else the test would prove nothing)
    shortcut = layers_of(compressed)[0].attn_shortcut
    assert not torch.allclose(shortcut, torch.eye(shortcut.shape[0]), atol=1e-3)
    assert (_logits(compressed, ids[:4]) - reference).abs().max() <= TOL


@pytest.mark.parametrize("method", ["pca", "dot", "prune"])
def test_zero_ratio_is_identity(family, method):
    model = make_tiny_model(family)
    ids = tiny_calibration()
    reference = _logits(model, ids[:4])
    compressed, _ = compress(model, ids, CompressionConfig(method=method, ratio=0.0), progress=False)
    assert (_logits(compressed, ids[:4]) - reference).abs().max() <= TOL


def test_global_layout_full_width_is_a_stock_model(family):
    model = make_tiny_model(family)
    source_class = type(model)
    ids = tiny_calibration()
    reference = _logits(model, ids[:4])
    if global_refusal(family):  # no stock form of a rotated stream: refused in one line, before any work
        with pytest.raises(InvalidConfigError, match="layout 'global' is not available for"):
            compress(model, ids, CompressionConfig(method="pca", ratio=0.0, layout="global"), progress=False)
        return
    compressed, _ = compress(model, ids, CompressionConfig(method="pca", ratio=0.0, layout="global"),
                             progress=False)
    assert type(compressed) is source_class
    assert (_logits(compressed, ids[:4]) - reference).abs().max() <= TOL


def test_slicing_changes_the_function_and_shrinks_shapes():
    model = make_tiny_model("llama-untied")
    ids = tiny_calibration(samples=32)
    reference = _logits(model, ids[:4])
    compressed, report = compress(model, ids, CompressionConfig(method="pca", ratio=0.25), progress=False)
    assert report.widths[0] == 48 and report.widths[-1] == 64
    assert compressed.model.embed_tokens.weight.shape == (96, 48)
    assert compressed.model.layers[0].self_attn.q_proj.weight.shape[1] == 48
    difference = (_logits(compressed, ids[:4]) - reference).abs().max()
    assert 0 < difference < 10
