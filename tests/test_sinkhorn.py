"""Tests for dotresize.bases.sinkhorn (entropic OT solvers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _load():
    try:
        from dotresize.bases import sinkhorn  # noqa: PLC0415

        return sinkhorn
    except ImportError:  # package __init__ files not there yet: load by path
        path = Path(__file__).resolve().parents[1] / "dotresize" / "bases" / "sinkhorn.py"
        spec = importlib.util.spec_from_file_location("_dotresize_sinkhorn_test", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


sk = _load()


def _problem(n, m, seed=0, normalize="max"):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, m, generator=g, dtype=torch.float64)
    cost = cost / (cost.max() if normalize == "max" else cost.median())
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return a / a.sum(), b / b.sum(), cost


@pytest.mark.parametrize("method", ["absorb", "logsumexp"])
@pytest.mark.parametrize(("n", "m", "eps"), [(50, 40, 0.1), (64, 48, 0.05), (120, 80, 0.005), (200, 30, 0.002)])
def test_marginals_satisfied(n, m, eps, method):
    a, b, cost = _problem(n, m, seed=n + m)
    res = sk.sinkhorn_log(a, b, cost, eps, tol=1e-9, max_iter=20000, method=method)
    assert res.converged
    assert res.solver == "torch"
    assert res.plan.shape == (n, m) and res.plan.dtype == torch.float64
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    assert torch.linalg.vector_norm(res.plan.sum(0) - b) < 1e-9
    assert res.marginal_error < 1e-7
    assert res.marginal_error == pytest.approx(
        max(float((res.plan.sum(1) - a).abs().sum()), float((res.plan.sum(0) - b).abs().sum()))
    )


def test_small_epsilon_large_cost_no_underflow():
    # C/eps up to 1000: exp(-C/eps) underflows to exactly 0 for many entries.
    a, b, cost = _problem(80, 60, seed=3)
    cost = cost * 5.0
    assert (torch.exp(-cost / 0.005) == 0).any()
    res = sk.sinkhorn_log(a, b, cost, 0.005, tol=1e-9, max_iter=20000)
    assert torch.isfinite(res.plan).all()
    assert res.converged and res.marginal_error < 1e-7
    pot = pytest.importorskip("ot")
    ref, _ = pot.bregman.sinkhorn_log(a.numpy(), b.numpy(), cost.numpy(), 0.005, numItermax=20000, stopThr=1e-9, log=True)
    assert float((res.plan - torch.from_numpy(ref)).abs().max()) <= 1e-10 * float(res.plan.max())


@pytest.mark.parametrize(("eps", "method"), [(0.05, "absorb"), (0.01, "absorb"), (0.01, "logsumexp")])
def test_matches_pot_numpy(eps, method):
    pytest.importorskip("ot")
    a, b, cost = _problem(64, 48, seed=1)
    ours = sk.sinkhorn_log(a, b, cost, eps, tol=1e-9, max_iter=5000, method=method)
    pot = sk.sinkhorn_pot(a, b, cost, eps, tol=1e-9, max_iter=5000, backend="numpy")
    assert pot.solver == "pot-numpy" and pot.converged and ours.converged
    scale = float(pot.plan.abs().max())
    assert float((ours.plan - pot.plan).abs().max()) <= 1e-10 * scale
    assert abs(ours.iterations - pot.iterations) <= 10
    assert ours.marginal_error == pytest.approx(pot.marginal_error, rel=1e-3, abs=1e-12)


def test_matches_pot_torch_and_dispatch():
    pytest.importorskip("ot")
    a, b, cost = _problem(40, 30, seed=2)
    pot_t = sk.solve(a, b, cost, 0.05, solver="pot-torch")
    ours = sk.solve(a, b, cost, 0.05)
    assert pot_t.solver == "pot-torch" and ours.solver == "torch"
    assert isinstance(pot_t.plan, torch.Tensor) and pot_t.plan.dtype == torch.float64
    assert float((ours.plan - pot_t.plan).abs().max()) <= 1e-10 * float(pot_t.plan.max())
    assert sk.solve(a, b, cost, 0.05, solver="pot-numpy").solver == "pot-numpy"


def test_max_iter_cap_not_converged():
    a, b, cost = _problem(64, 48, seed=4)
    res = sk.sinkhorn_log(a, b, cost, 0.002, tol=1e-14, max_iter=7)
    assert res.iterations == 7 and not res.converged
    assert torch.isfinite(res.plan).all()


def test_large_epsilon_approaches_independent_coupling():
    a, b, cost = _problem(30, 20, seed=5)
    ab = torch.outer(a, b)
    dev = {eps: float((sk.sinkhorn_log(a, b, cost, eps).plan - ab).abs().max()) for eps in (0.01, 1.0, 100.0, 1e4)}
    # cost in [0, 1]: T = a b^T (1 + O(1/eps)), so the deviation shrinks ~1/eps
    assert dev[100.0] < 1e-2 * float(ab.max())
    assert dev[1e4] < 1e-4 * float(ab.max())
    assert dev[0.01] > dev[1.0] > dev[100.0] > dev[1e4]


def test_zero_mass_entries():
    a, b, cost = _problem(20, 15, seed=6)
    a = a.clone()
    a[3] = 0.0
    a = a / a.sum()
    res = sk.sinkhorn_log(a, b, cost, 0.05)
    assert res.converged
    assert torch.all(res.plan[3] == 0)
    assert res.marginal_error < 1e-8


def test_deterministic():
    a, b, cost = _problem(96, 64, seed=7)
    r1 = sk.sinkhorn_log(a, b, cost, 0.01)
    r2 = sk.sinkhorn_log(a.clone(), b.clone(), cost.clone(), 0.01)
    assert torch.equal(r1.plan, r2.plan)
    assert r1.iterations == r2.iterations


def test_does_not_modify_inputs():
    a, b, cost = _problem(10, 8, seed=8)
    a0, b0, c0 = a.clone(), b.clone(), cost.clone()
    sk.sinkhorn_log(a, b, cost, 0.05)
    assert torch.equal(a, a0) and torch.equal(b, b0) and torch.equal(cost, c0)


def test_accepts_float32_lists_and_numpy():
    a, b, cost = _problem(6, 4, seed=9)
    res = sk.sinkhorn_log(a.tolist(), b.numpy(), cost.float(), 0.1, tol=1e-6)
    assert res.plan.dtype == torch.float64 and res.converged


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cost=torch.rand(5, 4, 2, dtype=torch.float64)), "2-D"),
        (dict(a=torch.full((4,), 0.25, dtype=torch.float64)), "a must have shape"),
        (dict(b=torch.full((5,), 0.2, dtype=torch.float64)), "b must have shape"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(b=torch.full((4,), 0.5, dtype=torch.float64)), "same total mass"),
        (dict(a=torch.tensor([0.4, 0.4, 0.4, -0.2, 0.0], dtype=torch.float64)), "nonnegative"),
        (dict(cost=torch.tensor([[float("inf")] * 4] * 5, dtype=torch.float64)), "finite"),
        (dict(tol=0.0), "tol"),
        (dict(max_iter=0), "max_iter"),
    ],
)
def test_input_validation(kwargs, match):
    args = dict(
        a=torch.full((5,), 0.2, dtype=torch.float64),
        b=torch.full((4,), 0.25, dtype=torch.float64),
        cost=torch.rand(5, 4, dtype=torch.float64),
        epsilon=0.1,
    )
    args.update(kwargs)
    eps = args.pop("epsilon")
    with pytest.raises(ValueError, match=match):
        sk.sinkhorn_log(args.pop("a"), args.pop("b"), args.pop("cost"), eps, **args)


def test_unknown_solver_names_valid_ones():
    a, b, cost = _problem(5, 4)
    with pytest.raises(ValueError, match="torch, pot-numpy, pot-torch"):
        sk.solve(a, b, cost, 0.1, solver="scipy")
    with pytest.raises(ValueError, match="backend"):
        sk.sinkhorn_pot(a, b, cost, 0.1, backend="jax")
    with pytest.raises(ValueError, match="method"):
        sk.sinkhorn_log(a, b, cost, 0.1, method="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b, cost = _problem(64, 48, seed=10)
    cpu = sk.sinkhorn_log(a, b, cost, 0.01)
    gpu = sk.sinkhorn_log(a.cuda(), b.cuda(), cost.cuda(), 0.01)
    assert gpu.plan.device.type == "cuda"
    assert float((gpu.plan.cpu() - cpu.plan).abs().max()) <= 1e-10 * float(cpu.plan.max())


def test_frequent_absorption_matches_logsumexp(monkeypatch):
    # A tiny scaling limit forces the absorb-and-redo-in-log-domain fallback on most half steps.
    a, b, cost = _problem(70, 50, seed=11)
    ref = sk.sinkhorn_log(a, b, cost, 0.01, method="logsumexp")
    monkeypatch.setattr(sk, "_SCALE_LIMIT", 1.5)
    res = sk.sinkhorn_log(a, b, cost, 0.01)
    assert res.converged and res.iterations == ref.iterations
    assert float((res.plan - ref.plan).abs().max()) <= 1e-12 * float(ref.plan.max())
