"""Bases: orthonormality, known answers on constructed statistics, DOT diagnostics and guards."""

import pytest
import torch

from dotresize import CompressionConfig, DotOptions
from dotresize.bases import compute_basis
from dotresize.bases.dot import l1_cost, l2_cost
from dotresize.errors import BasisError
from dotresize.statistics import StatsAccumulator, pool_stats


def _stats(n=512, d=16, seed=0, sample=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, d) if scales is None else scales
    x = torch.randn(n, d, generator=g) * scales
    acc = StatsAccumulator(d, sample_tokens=sample, seed=seed)
    acc.add(x)
    return acc.finalize(), x


@pytest.mark.parametrize("method", ["pca", "dot", "prune", "random"])
def test_bases_are_orthonormal_with_requested_width(method):
    stats, _ = _stats()
    basis = compute_basis(stats, 8, CompressionConfig(method=method))
    assert basis.Q.shape == (16, 8) and basis.Q.dtype == torch.float64
    assert torch.allclose(basis.Q.T @ basis.Q, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert 0.0 <= basis.info["reconstruction_error"] <= 1.0


def test_pca_keeps_the_largest_variance_axes():
    stats, _ = _stats(scales=torch.tensor([4.0, 3.5, 3.0, 2.5] + [0.2] * 12))
    basis = compute_basis(stats, 4, CompressionConfig(method="pca"))
    # four high-variance axes, then a gap: the top-4 subspace is (almost exactly) span(e_0..e_3)
    mass_on_top = (basis.Q[:4] ** 2).sum()
    assert mass_on_top > 3.99
    prune = compute_basis(stats, 4, CompressionConfig(method="prune"))
    assert prune.info["kept"] == [0, 1, 2, 3]
    assert basis.info["reconstruction_error"] <= prune.info["reconstruction_error"] + 1e-9


def test_gram_statistics_match_direct_computation():
    stats, x = _stats()
    x64 = x.double()
    assert torch.allclose(stats.gram, x64.T @ x64)
    assert torch.allclose(stats.mean_abs, x64.abs().mean(0))
    assert stats.count == x.shape[0]


def test_l2_cost_from_gram_equals_direct_distance():
    stats, x = _stats()
    targets = torch.tensor([0, 3, 5])
    direct = torch.cdist(x.double().T, x.double()[:, targets].T) / x.shape[0] ** 0.5
    assert torch.allclose(l2_cost(stats, targets), direct, atol=1e-8)


def test_l1_cost_from_sample_equals_direct_mean_abs_difference():
    stats, x = _stats(n=256, sample=256)
    targets = torch.tensor([1, 2])
    direct = (x.double()[:, :, None] - x.double()[:, None, targets]).abs().mean(0)
    assert torch.allclose(l1_cost(stats, targets), direct, atol=1e-6)


def _redundant_stats(n=1024, seed=0):
    """16 neurons that are noisy copies of 8 latent signals: merging duplicates should recover them."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g) * torch.linspace(2.0, 1.0, 8)
    x = torch.cat([latent, 0.9 * latent + 0.1 * torch.randn(n, 8, generator=g)], dim=1)
    acc = StatsAccumulator(16)
    acc.add(x)
    return acc.finalize()


def test_dot_reports_sinkhorn_diagnostics_and_merges_into_targets():
    stats = _redundant_stats()
    basis = compute_basis(stats, 8, CompressionConfig(method="dot", dot=DotOptions(epsilon=0.2)))
    info = basis.info
    assert info["sinkhorn_converged"] and info["marginal_error"] < 1e-6
    assert 1.0 <= info["cond_r"] < 1e8 and 1.0 < info["effective_rank"] <= 8.0
    # targets: the top mean |activation| neurons, duplicates included (5 originals, 3 copies)
    assert info["targets"] == [0, 1, 2, 3, 4, 8, 9, 10]
    # DOT keeps more of the signal than dropping the same neurons
    prune = compute_basis(stats, 8, CompressionConfig(method="prune"))
    assert info["reconstruction_error"] < prune.info["reconstruction_error"]


def test_dot_plan_decompression_gives_a_decoder():
    stats, _ = _stats()
    basis = compute_basis(stats, 8, CompressionConfig(method="dot", dot=DotOptions(decompression="plan")))
    assert basis.U is not None and basis.U.shape == (8, 16)


def test_dot_with_huge_epsilon_is_rejected_as_rank_deficient():
    stats, _ = _stats()
    with pytest.raises(BasisError, match="lower dot epsilon"):
        compute_basis(stats, 8, CompressionConfig(method="dot", dot=DotOptions(epsilon=1e10)))


def test_keep_set_overrides_targets():
    stats, _ = _stats()
    keep = torch.tensor([2, 7, 9, 15])
    basis = compute_basis(stats, 4, CompressionConfig(method="dot"), keep=keep)
    assert basis.info["targets"] == [2, 7, 9, 15]
    pruned = compute_basis(stats, 4, CompressionConfig(method="prune"), keep=keep)
    assert pruned.info["kept"] == [2, 7, 9, 15]


def test_pooling_by_trace_weighs_points_equally():
    small, _ = _stats(seed=1)
    big, _ = _stats(seed=2)
    big.gram *= 1e6
    pooled = pool_stats([small, big], "trace")
    ratio = torch.trace(big.gram) / torch.trace(small.gram)
    assert ratio > 1e5
    assert torch.allclose(torch.trace(pooled.gram), torch.tensor(2.0 * 512, dtype=torch.float64), rtol=1e-9)


def test_least_squares_decoder_never_reconstructs_worse_than_pinv():
    stats = _redundant_stats()
    pinv = compute_basis(stats, 8, CompressionConfig(method="dot", dot=DotOptions(epsilon=0.2)))
    lsq = compute_basis(stats, 8, CompressionConfig(method="dot", dot=DotOptions(epsilon=0.2, decompression="lsq")))
    assert torch.allclose(lsq.Q, pinv.Q)
    assert lsq.U.shape == (8, 16)
    assert lsq.info["reconstruction_error"] < pinv.info["reconstruction_error"] - 1e-4


def test_an_isolated_massive_target_is_named_when_its_mass_cannot_be_met(caplog):
    """A massive-activation neuron far from every other one cannot receive its uniform share at a small ε:
    Sinkhorn stops at max_iter and the warning names that neuron instead of blaming max_iter."""
    scales = torch.linspace(3.0, 0.5, 16)
    scales[5] = 400.0
    stats, _ = _stats(scales=scales)
    options = DotOptions(epsilon=0.02, max_iter=200, cost_normalization="median")
    with caplog.at_level("WARNING", logger="dotresize.bases.dot"):
        basis = compute_basis(stats, 8, CompressionConfig(method="dot", dot=options))
    assert not basis.info["sinkhorn_converged"]
    assert basis.info["starved_targets"] == [5]
    assert "target neurons [5] are isolated" in caplog.text
