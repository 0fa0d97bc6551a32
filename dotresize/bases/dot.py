"""DOTResize's basis: an entropic transport plan from all neurons to a kept subset, orthonormalised by QR.

With the pseudo-inverse decompression the triangular factor R cancels and the point keeps range(T);
with the ``plan`` decompression the consumers decode with R·P, P the row-normalised plan (method.md §2.5).
"""

from __future__ import annotations

import logging
import math

import torch

from ..config import DotOptions
from ..errors import BasisError
from ..statistics import PointStats
from .common import Basis, target_scores, top_indices
from .sinkhorn import sinkhorn_log, sinkhorn_pot

log = logging.getLogger(__name__)


def l2_cost(stats: PointStats, targets: torch.Tensor) -> torch.Tensor:
    """RMS distance between activation profiles: C_ij² = (H_ii + H_jj − 2 H_ij) / N, from the Gram matrix."""
    gram = stats.gram
    diag = torch.diagonal(gram)
    squared = diag[:, None] + diag[targets][None, :] - 2.0 * gram[:, targets]
    return torch.sqrt(torch.clamp(squared, min=0.0) / max(stats.count, 1))


def l1_cost(stats: PointStats, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of activation profiles, from the raw-activation sample."""
    if stats.sample is None:
        raise BasisError("the L1 cost needs raw activations: capture with a sample (dot.sample_tokens > 0)")
    x = stats.sample.to(torch.float64)
    xs = x[:, targets]
    dim, width = x.shape[1], xs.shape[1]
    cost = torch.zeros(dim, width, dtype=torch.float64)
    step = max(1, (1 << 25) // max(dim * width, 1))
    for start in range(0, x.shape[0], step):
        block, block_s = x[start:start + step], xs[start:start + step]
        cost += (block[:, :, None] - block_s[:, None, :]).abs().sum(0)
    return cost / x.shape[0]


def normalize_cost(cost: torch.Tensor, how: str) -> tuple[torch.Tensor, float]:
    """Divide the cost by a scale so that one ε means the same sharpness at every point."""
    positive = cost[cost > 0]
    if positive.numel() == 0:
        return cost, 1.0
    if how == "max":
        scale = positive.max()
    elif how == "median":
        scale = positive.median()
    elif how == "mean":
        scale = positive.mean()
    elif how == "q90":
        scale = torch.quantile(positive.float(), 0.9).to(cost.dtype) if positive.numel() < 16_000_000 \
            else positive.max()
    else:
        raise ValueError(f"unknown cost normalisation {how!r}")
    return cost / scale, float(scale)


def marginals(stats: PointStats, targets: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    dim, width = stats.dim, targets.numel()
    if kind == "uniform":
        return (torch.full((dim,), 1.0 / dim, dtype=torch.float64),
                torch.full((width,), 1.0 / width, dtype=torch.float64))
    mass = stats.mean_abs.to(torch.float64).cpu() + 1e-12
    return mass / mass.sum(), mass[targets.cpu()] / mass[targets.cpu()].sum()


def least_squares_decoder(stats: PointStats, Q: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """The decoder U minimising ‖X − X·Q·U‖² on the calibration data: (QᵀHQ)⁻¹ QᵀH (= Qᵀ for eigenvectors of H)."""
    gram = stats.gram.to(Q.device)
    projected = Q.T @ gram @ Q
    projected = projected + damping * torch.mean(torch.diagonal(projected)) * torch.eye(
        projected.shape[0], dtype=projected.dtype, device=projected.device)
    return torch.linalg.solve(projected, Q.T @ gram)


def effective_rank(matrix: torch.Tensor | None = None, *, singular_values: torch.Tensor | None = None) -> float:
    """exp(entropy of the normalised singular values): ~1 for a rank-1 plan, ~d for a well-spread one."""
    s = torch.linalg.svdvals(matrix) if singular_values is None else singular_values
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def starved_targets(plan: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, share: float = 0.1) -> list[int]:
    """Target neurons whose column of the plan is short by more than ``share`` of its mass (isolated targets:
    with a finite ε only the neuron itself is close enough to send it mass)."""
    short = (b.to(plan.dtype) - plan.sum(dim=0)) / b.to(plan.dtype)
    return [int(targets[j]) for j in torch.nonzero(short > share).flatten().tolist()]


def dot_basis(stats: PointStats, width: int, *, options: DotOptions, keep: torch.Tensor | None = None,
              point: int = 0, device: torch.device | str | None = None, **_) -> Basis:
    targets = keep if keep is not None else top_indices(target_scores(stats, options.targets), width)
    raw_cost = l2_cost(stats, targets) if options.cost == "l2" else l1_cost(stats, targets)
    cost, scale = normalize_cost(raw_cost.cpu(), options.cost_normalization)
    a, b = marginals(stats, targets, options.marginals)
    if options.solver == "pot":
        result = sinkhorn_pot(a, b, cost, options.epsilon, tol=options.tol, max_iter=options.max_iter)
    else:
        dev = torch.device(device) if device else torch.device("cpu")
        result = sinkhorn_log(a.to(dev), b.to(dev), cost.to(dev), options.epsilon, tol=options.tol,
                              max_iter=options.max_iter)
    plan = result.plan.to(torch.float64).cpu()
    starved = starved_targets(plan, b, targets) if not result.converged else []
    if not result.converged:
        if starved:
            log.warning("Sinkhorn at point %d stopped after %d iterations with marginal error %.2e: target neurons "
                        "%s are isolated (every other neuron is far more than epsilon %g away), so their uniform "
                        "mass cannot be met and they are kept as themselves; marginals='mass' or a larger epsilon "
                        "merges them", point, result.iterations, result.marginal_error, starved[:8], options.epsilon)
        else:
            log.warning("Sinkhorn at point %d stopped after %d iterations with marginal error %.2e (tolerance %.0e): "
                        "raise dot max_iter or epsilon", point, result.iterations, result.marginal_error, options.tol)
    if not torch.isfinite(plan).all():
        raise BasisError(f"Sinkhorn produced a non-finite plan at point {point}: raise dot epsilon")
    compress = plan / b[None, :]                      # targets as weighted averages of the sources
    Q, R = torch.linalg.qr(compress, mode="reduced")
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    Q, R = Q * signs[None, :], R * signs[:, None]
    # one SVD for both diagnostics: R's singular values are the plan's (compress = QR, Q orthonormal)
    singular = torch.linalg.svdvals(R)
    cond = float(singular.max() / singular.min()) if singular.numel() and singular.min() > 0 else math.inf
    if not math.isfinite(cond) or cond > options.max_cond:
        raise BasisError(
            f"the transport plan at point {point} is near rank-deficient (cond(R) = {cond:.3g} > "
            f"{options.max_cond:.3g}): lower dot epsilon (now {options.epsilon}) or use a sharper cost normalisation"
        )
    U = None
    if options.decompression == "plan":
        row_normalised = plan / plan.sum(dim=1, keepdim=True)  # each source's mass over the targets, sums to 1
        U = R @ row_normalised.T
    elif options.decompression == "lsq":
        U = least_squares_decoder(stats, Q)
    info = {
        "targets": targets.tolist(),
        "epsilon": options.epsilon,
        "cost_scale": scale,
        "cost_mean": float(cost.mean()),
        "transport_cost": float((plan * cost).sum()),
        "sinkhorn_iterations": int(result.iterations),
        "sinkhorn_converged": bool(result.converged),
        "starved_targets": starved,
        "marginal_error": float(result.marginal_error),
        "cond_r": cond,
        "effective_rank": effective_rank(singular_values=singular),
        "solver": result.solver,
    }
    return Basis(Q=Q, U=U, info=info)
