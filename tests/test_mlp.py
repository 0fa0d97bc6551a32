"""The MLP's intermediate axis (dotresize.mlp): statistics, keep-sets, prune / lsq / dot maps, weight surgery."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from dotresize.errors import InvalidConfigError, NonFiniteActivationError
from dotresize.mlp import (MlpDotOptions, MlpOptions, MlpStatsAccumulator, MlpStats, complement, dot_map,
                           keep_scores, lsq_map, mlp_width, output_error, prune_map, reduce_mlp, reduce_mlp_weights,
                           select_keep, transport_rows)

F64 = torch.float64


def _stats(h: torch.Tensor, batches: int = 3) -> MlpStats:
    acc = MlpStatsAccumulator(h.shape[-1])
    for chunk in torch.chunk(h, batches):
        acc.add(chunk)
    return acc.finalize()


def _correlated(n=600, kept=12, removed=6, noise=0.0, seed=0):
    """h = [h_K, h_S] with h_S = h_K·B + noise; the removed neurons are the last ``removed`` columns."""
    g = torch.Generator().manual_seed(seed)
    h_k = torch.randn(n, kept, generator=g, dtype=F64) * torch.linspace(2.0, 0.5, kept, dtype=F64)
    B = torch.randn(kept, removed, generator=g, dtype=F64) / kept ** 0.5
    h_s = h_k @ B + noise * torch.randn(n, removed, generator=g, dtype=F64)
    down = torch.randn(8, kept + removed, generator=g, dtype=F64)
    return torch.cat([h_k, h_s], 1), down, torch.arange(kept), B


def _tiny_mlp(hidden=16, inter=24, seed=0) -> LlamaMLP:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", num_attention_heads=2,
                         num_key_value_heads=2)
    return LlamaMLP(config).to(F64).eval()


def _capture(mlp: LlamaMLP, x: torch.Tensor) -> MlpStats:
    acc = MlpStatsAccumulator(mlp.down_proj.in_features)
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, args: acc.add(args[0]))
    with torch.no_grad():
        for chunk in torch.chunk(x, 4):
            mlp(chunk)
    handle.remove()
    return acc.finalize()


def _reduced_mlp(mlp: LlamaMLP, keep, A) -> LlamaMLP:
    new = reduce_mlp_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, keep, A)
    config = LlamaConfig(hidden_size=mlp.hidden_size, intermediate_size=new.down.shape[1], hidden_act="silu",
                         num_attention_heads=2, num_key_value_heads=2)
    small = LlamaMLP(config).to(F64).eval()
    with torch.no_grad():
        small.gate_proj.weight.copy_(new.gate)
        small.up_proj.weight.copy_(new.up)
        small.down_proj.weight.copy_(new.down)
    return small


# --- statistics ------------------------------------------------------------------------------------------------
def test_accumulator_matches_direct_statistics_and_round_trips():
    h = torch.randn(5, 7, 10, generator=torch.Generator().manual_seed(1))
    stats = _stats(h.reshape(35, 10).reshape(5, 7, 10))
    flat = h.reshape(-1, 10).to(F64)
    assert stats.gram.dtype == F64 and stats.count == 35
    assert torch.allclose(stats.gram, flat.T @ flat, rtol=1e-12, atol=1e-12)
    assert torch.allclose(stats.sum, flat.sum(0)) and torch.allclose(stats.abs_sum, flat.abs().sum(0))
    back = MlpStats.from_tensors(stats.tensors())
    assert torch.equal(back.gram, stats.gram) and back.count == 35


def test_accumulator_refuses_non_finite_activations():
    acc = MlpStatsAccumulator(4, layer=3)
    with pytest.raises(NonFiniteActivationError, match="layer 3"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


# --- widths and keep-sets --------------------------------------------------------------------------------------
def test_width_rounds_down_to_a_multiple_of_eight_and_ratio_zero_keeps_all():
    assert mlp_width(1536, 0.3) == 1072          # floor(1075.2) = 1075 -> 1072
    assert mlp_width(1536, 0.17) == 1272
    assert mlp_width(1530, 0.0) == 1530          # not rounded: nothing is removed
    assert mlp_width(1536, 0.3, round_to=1) == 1075
    with pytest.raises(InvalidConfigError):
        mlp_width(1536, 1.0)
    with pytest.raises(InvalidConfigError):
        mlp_width(16, 0.9)                       # 1.6 -> 0 neurons


def test_keep_rules_pick_what_they_claim():
    # neuron energies 9, 4, 1, 0.25; down columns with norms 0.1, 1, 10, 100: energy keeps {0, 1},
    # output (energy * column norm²: 0.09, 4, 100, 2500) keeps {2, 3}
    h = torch.zeros(4, 4, dtype=F64)
    h[0, 0], h[1, 1], h[2, 2], h[3, 3] = 3.0, 2.0, 1.0, 0.5
    stats = _stats(h, batches=1)
    down = torch.zeros(2, 4, dtype=F64)
    down[0] = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=F64)
    assert select_keep(stats, 2, "energy").tolist() == [0, 1]
    assert select_keep(stats, 2, "output", down).tolist() == [2, 3]
    assert torch.allclose(keep_scores(stats, "output", down), torch.tensor([0.09, 4.0, 100.0, 2500.0], dtype=F64))
    with pytest.raises(InvalidConfigError):
        keep_scores(stats, "output")             # needs the down projection
    reduction = reduce_mlp(stats, down, keep=[3, 1], options=MlpOptions(method="prune"))
    assert reduction.keep.tolist() == [1, 3] and reduction.removed.tolist() == [0, 2]
    with pytest.raises(InvalidConfigError):
        reduce_mlp(stats, down, keep=[1, 1])


# --- maps --------------------------------------------------------------------------------------------------------
def test_lsq_is_exact_when_removed_neurons_are_linear_in_kept_ones():
    h, down, keep, B = _correlated()
    stats = _stats(h)
    reduction = lsq_map(stats, keep, ridge=0.0)
    assert reduction.A.shape == (12, 6)
    assert torch.allclose(reduction.A, B, atol=1e-9)
    new = reduce_mlp_weights(None, None, down, keep, reduction.A)
    full, small = h @ down.T, h[:, keep] @ new.down.T
    assert float((full - small).norm() / full.norm()) <= 1e-8
    assert output_error(stats, down, keep, reduction.A) <= 1e-14
    assert output_error(stats, down, keep) > 1e-2          # dropping them is not


def test_lsq_reproduces_a_real_mlp_layer_with_duplicated_neurons():
    mlp = _tiny_mlp()
    with torch.no_grad():  # neurons 20..23 copy neurons 0..3, up rows scaled: h_{20+i} = (i + 2)·h_i exactly
        for i in range(4):
            mlp.gate_proj.weight[20 + i] = mlp.gate_proj.weight[i]
            mlp.up_proj.weight[20 + i] = (i + 2) * mlp.up_proj.weight[i]
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    stats = _capture(mlp, x)
    keep = torch.arange(20)
    exact = _reduced_mlp(mlp, keep, lsq_map(stats, keep, ridge=0.0).A)
    pruned = _reduced_mlp(mlp, keep, None)
    with torch.no_grad():
        y = mlp(x)
        err = float((y - exact(x)).norm() / y.norm())
        err_prune = float((y - pruned(x)).norm() / y.norm())
    assert exact.down_proj.in_features == 20
    assert err <= 1e-8
    assert err_prune > 1e-2
    # the default ridge (0.1 · mean diag) is no longer exact but still far better than pruning
    ridged = _reduced_mlp(mlp, keep, lsq_map(stats, keep, ridge=0.1).A)
    with torch.no_grad():
        assert 1e-8 < float((y - ridged(x)).norm() / y.norm()) < 0.5 * err_prune


@pytest.mark.parametrize("method", ["prune", "lsq", "dot"])
def test_ratio_zero_is_the_identity(method):
    mlp = _tiny_mlp(seed=3)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4), dtype=F64)
    stats = _capture(mlp, x)
    width = mlp_width(24, 0.0)
    reduction = reduce_mlp(stats, mlp.down_proj.weight, width, MlpOptions(method=method))
    assert reduction.keep.tolist() == list(range(24)) and reduction.A.shape == (24, 0)
    same = _reduced_mlp(mlp, reduction.keep, reduction.A)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(same, name).weight, getattr(mlp, name).weight)
    assert reduction.info["output_error"] == 0.0


def test_prune_drops_rows_and_columns_and_keeps_biases():
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(10, 4, generator=g), torch.randn(4, 10, generator=g)
    up_bias, down_bias = torch.randn(10, generator=g), torch.randn(4, generator=g)
    keep = torch.tensor([0, 3, 4, 9])
    stats = _stats(torch.randn(50, 10, generator=g))
    reduction = prune_map(stats, keep)
    assert reduction.removed.tolist() == [1, 2, 5, 6, 7, 8] and not reduction.A.any()
    for A in (None, reduction.A):
        new = reduce_mlp_weights(None, up, down, keep, A, up_bias=up_bias, down_bias=down_bias)  # OPT-like fc1/fc2
        assert new.gate is None and new.down.dtype == torch.float32
        assert torch.equal(new.down, down[:, keep]) and torch.equal(new.up, up[keep])
        assert torch.equal(new.up_bias, up_bias[keep]) and torch.equal(new.down_bias, down_bias)
    with pytest.raises(InvalidConfigError, match="4 x 6"):
        reduce_mlp_weights(None, up, down, keep, torch.zeros(6, 4))


def test_down_projection_is_kept_columns_plus_merged_removed_columns():
    g = torch.Generator().manual_seed(6)
    gate, up, down = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g), torch.randn(3, 6, generator=g)
    keep, A = torch.tensor([1, 2, 5]), torch.randn(3, 3, generator=g, dtype=F64)
    new = reduce_mlp_weights(gate, up, down, keep, A)
    expected = down.double()[:, [1, 2, 5]] + down.double()[:, [0, 3, 4]] @ A.T
    assert torch.allclose(new.down.double(), expected, atol=1e-6) and new.down.dtype == torch.float32
    assert torch.equal(new.gate, gate[keep])


def test_dot_beats_prune_on_correlated_neurons_and_lsq_beats_both_on_its_data():
    h, down, keep, _ = _correlated(kept=16, removed=8, noise=0.3, seed=7)
    stats = _stats(h)
    errors = {name: output_error(stats, down, keep, r.A) for name, r in {
        "prune": prune_map(stats, keep),
        "dot": dot_map(stats, keep, MlpDotOptions(epsilon=0.05), ridge=0.1),
        "lsq": lsq_map(stats, keep, ridge=0.0),
    }.items()}
    assert errors["dot"] < 0.7 * errors["prune"]
    assert errors["lsq"] <= errors["dot"]
    assert errors["lsq"] < 0.2 * errors["prune"]


def test_dot_map_is_a_scaled_transport_plan():
    h, down, keep, _ = _correlated(kept=10, removed=5, noise=0.2, seed=8)
    stats = _stats(h)
    options = MlpDotOptions(epsilon=0.1, scale="none")
    reduction = dot_map(stats, keep, options)
    # scale "none": each removed neuron becomes a weighted average of kept ones (columns of A sum to 1, A >= 0)
    assert torch.allclose(reduction.A.sum(0), torch.ones(5, dtype=F64), atol=1e-12)
    assert (reduction.A >= 0).all()
    assert reduction.info["sinkhorn_converged"] and reduction.info["marginal_error"] < 1e-6
    # balanced plan: every kept neuron receives the same total mass
    from dotresize.mlp import profile_cost
    removed = complement(keep, 15)
    rows, _ = transport_rows(profile_cost(stats, removed, keep, "l2") / 10.0, options)
    assert torch.allclose(rows.sum(0) / 5, torch.full((10,), 0.1, dtype=F64), atol=1e-6)
    soft, info = transport_rows(torch.rand(5, 10, generator=torch.Generator().manual_seed(0), dtype=F64),
                                MlpDotOptions(epsilon=0.1, marginals="row"))
    assert info == {} and torch.allclose(soft.sum(1), torch.ones(5, dtype=F64))


def test_dot_prior_interpolates_between_lsq_and_the_plan():
    h, down, keep, _ = _correlated(kept=10, removed=5, noise=0.5, seed=9)
    stats = _stats(h)
    plan = dot_map(stats, keep, MlpDotOptions(epsilon=0.1))
    strong = dot_map(stats, keep, MlpDotOptions(epsilon=0.1, prior=True), ridge=1e6)
    weak = dot_map(stats, keep, MlpDotOptions(epsilon=0.1, prior=True), ridge=1e-9)
    assert torch.allclose(strong.A, plan.A, atol=1e-4)
    assert torch.allclose(weak.A, lsq_map(stats, keep, ridge=0.0).A, atol=1e-6)
    assert not torch.allclose(weak.A, plan.A, atol=1e-2)
    with pytest.raises(InvalidConfigError):
        MlpOptions(method="dot", ridge=0.0, dot=MlpDotOptions(prior=True)).validate()


@pytest.mark.parametrize("options", [
    MlpOptions(method="lsq"),
    MlpOptions(method="dot"),
    MlpOptions(method="dot", keep_rule="energy", dot=MlpDotOptions(cost="cosine", scale="norm")),
])
def test_reductions_are_deterministic(options):
    h, down, _, _ = _correlated(noise=0.3, seed=10)
    first = reduce_mlp(_stats(h), down, 8, options)
    second = reduce_mlp(_stats(h), down, 8, options)
    assert torch.equal(first.keep, second.keep) and torch.equal(first.A, second.A)
    assert first.info == second.info


def test_output_error_matches_the_error_measured_on_activations():
    h, down, keep, _ = _correlated(noise=0.4, seed=11)
    stats = _stats(h)
    A = dot_map(stats, keep, MlpDotOptions(epsilon=0.2)).A
    new = reduce_mlp_weights(None, None, down, keep, A)
    full = h @ down.T
    measured = float(((full - h[:, keep] @ new.down.T) ** 2).sum() / (full ** 2).sum())
    assert abs(output_error(stats, down, keep, A) - measured) < 1e-10
    assert measured > 1e-3


@pytest.mark.parametrize("scale, expected", [("lsq", (3.0, 0.5)), ("norm", (3.0, 0.5)), ("none", (1.0, 1.0))])
def test_dot_scale_rules_on_scaled_copies(scale, expected):
    # removed neurons are exact positive multiples of kept neurons 0 and 1: a sharp plan sends each row to its
    # original, and the scale rule decides the factor
    g = torch.Generator().manual_seed(12)
    h_k = torch.randn(400, 6, generator=g, dtype=F64)
    h = torch.cat([h_k, 3.0 * h_k[:, :1], 0.5 * h_k[:, 1:2]], 1)
    options = MlpDotOptions(epsilon=0.01, cost="cosine", marginals="row", scale=scale)
    A = dot_map(_stats(h), torch.arange(6), options).A
    target = torch.zeros(6, 2, dtype=F64)
    target[0, 0], target[1, 1] = expected
    assert torch.allclose(A, target, atol=1e-6)


def test_obs_keep_drops_redundant_copies_that_score_high():
    # three loud copies (5x) of neurons 0-2: energy/output rules keep them and lose neurons 3-5;
    # obs sees that they are explained by their originals and keeps a spanning set
    g = torch.Generator().manual_seed(13)
    h_k = torch.randn(500, 6, generator=g, dtype=F64) * torch.linspace(1.0, 0.6, 6, dtype=F64)
    h = torch.cat([h_k, 5.0 * h_k[:, :3]], 1)
    down = torch.randn(5, 9, generator=g, dtype=F64)
    stats = _stats(h)
    errors = {}
    for rule in ("output", "obs"):
        reduction = reduce_mlp(stats, down, 6, MlpOptions(method="lsq", keep_rule=rule, ridge=1e-9))
        errors[rule] = reduction.info["output_error"]
        assert reduction.width == 6
    assert errors["obs"] < 1e-9 < 1e-2 < errors["output"]


def test_obs_removes_the_neuron_whose_lsq_corrected_error_is_smallest():
    h, down, _, _ = _correlated(kept=7, removed=3, noise=0.5, seed=14)
    stats = _stats(h)
    keep = select_keep(stats, 9, "obs", down, ridge=1e-10)
    brute = []
    for q in range(10):
        rest = torch.tensor([i for i in range(10) if i != q])
        brute.append(output_error(stats, down, rest, lsq_map(stats, rest, ridge=1e-10).A))
    expected = int(torch.tensor(brute).argmin())
    assert complement(keep, 10).tolist() == [expected]
    assert sorted(brute)[1] > 1.01 * sorted(brute)[0]          # a clear winner, so the test can fail


def test_obs_rescores_after_every_removal():
    # neurons 6 and 7 copy neuron 0: each of the three alone looks free to remove, but removing all three loses
    # neuron 0; removing three of eight greedily must match the best keep-set found by brute force
    import itertools

    g = torch.Generator().manual_seed(15)
    h_k = torch.randn(400, 6, generator=g, dtype=F64) * torch.tensor([0.5, 2.0, 1.5, 1.2, 1.0, 0.8], dtype=F64)
    h = torch.cat([h_k, h_k[:, :1], h_k[:, :1]], 1)
    down = torch.randn(4, 8, generator=g, dtype=F64)
    stats = _stats(h)

    def error(keep):
        keep = torch.tensor(sorted(keep))
        return output_error(stats, down, keep, lsq_map(stats, keep, ridge=1e-10).A)

    best = min(error(k) for k in itertools.combinations(range(8), 5))
    keep = select_keep(stats, 5, "obs", down, ridge=1e-10)
    assert len({0, 6, 7} & set(keep.tolist())) == 1
    assert error(keep.tolist()) <= best * (1 + 1e-6) + 1e-12


def test_allocate_widths_spends_removals_where_they_cost_least():
    from dotresize.mlp import allocate_widths, error_curve

    # layer 0: removed neurons are copies (free to remove); layer 1: independent neurons (every removal costs)
    g = torch.Generator().manual_seed(16)
    base = torch.randn(300, 8, generator=g, dtype=F64)
    redundant = _stats(torch.cat([base, base @ torch.randn(8, 8, generator=g, dtype=F64)], 1))
    independent = _stats(torch.randn(300, 16, generator=g, dtype=F64))
    down = torch.randn(4, 16, generator=g, dtype=F64)
    options = MlpOptions(method="lsq", ridge=1e-9)
    curves = [error_curve(s, down, (16, 12, 8), options) for s in (redundant, independent)]
    assert curves[0][8] < 1e-9 < 0.1 < curves[1][8]
    assert allocate_widths(curves, 24) == [8, 16]
    assert allocate_widths(curves, 32) == [16, 16]
    two = [{16: 0.0, 8: 1.0}, {16: 0.0, 8: 2.0}]
    assert allocate_widths(two, 24) == [8, 16]
    assert allocate_widths(two, 24, weights=[3.0, 1.0]) == [16, 8]      # weighted errors decide
    with pytest.raises(InvalidConfigError):
        allocate_widths(curves, 8)
