"""Which intermediate neurons an MLP keeps: the width m from a ratio, and keep-set rules."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..bases.common import top_indices
from ..config import KEEP_RULES  # noqa: F401 (re-exported)
from ..errors import InvalidConfigError
from .statistics import MlpStats


def mlp_width(intermediate: int, ratio: float, round_to: int = 8) -> int:
    """Kept neurons m = floor(I·(1 − ratio)) rounded down to a multiple of ``round_to``; ratio 0 keeps all I."""
    if not 0.0 <= ratio < 1.0:
        raise InvalidConfigError(f"mlp ratio must be in [0, 1) (the fraction of neurons removed), got {ratio}")
    if round_to < 1:
        raise InvalidConfigError(f"mlp round_to must be >= 1, got {round_to}")
    if ratio == 0.0:
        return intermediate
    width = math.floor((1.0 - ratio) * intermediate + 1e-9)
    width -= width % round_to
    if width < 1:
        raise InvalidConfigError(f"mlp ratio {ratio} leaves no neuron of {intermediate} (rounded to {round_to})")
    return width


def keep_scores(stats: MlpStats, rule: str = "output", down: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every neuron under ``rule`` (float64, length I); ``output`` needs ``down`` ([D, I])."""
    energy = stats.energy.to(torch.float64)
    if rule == "energy":
        return energy
    if rule == "output":
        if down is None:
            raise InvalidConfigError("the 'output' keep rule needs the down projection's weight")
        if down.shape[-1] != stats.dim:
            raise InvalidConfigError(f"down projection has {down.shape[-1]} inputs, the statistics {stats.dim}")
        column_norms = (down.detach().to(device=energy.device, dtype=torch.float64) ** 2).sum(0)
        return energy * column_norms
    if rule == "obs":
        raise InvalidConfigError("the 'obs' keep rule has no per-neuron score: it is greedy (use select_keep)")
    raise InvalidConfigError(f"mlp keep rule must be one of {', '.join(KEEP_RULES)}; got {rule!r}")


def as_keep_set(keep: Sequence[int] | torch.Tensor, dim: int) -> torch.Tensor:
    """An explicit keep-set as sorted, unique int64 indices, checked against the width ``dim``."""
    indices = torch.as_tensor(keep, dtype=torch.int64).reshape(-1)
    unique = torch.unique(indices)  # sorted
    if unique.numel() != indices.numel():
        raise InvalidConfigError("the MLP keep-set lists a neuron more than once")
    if unique.numel() == 0 or int(unique[0]) < 0 or int(unique[-1]) >= dim:
        raise InvalidConfigError(f"the MLP keep-set must be non-empty indices in [0, {dim})")
    return unique


def obs_keep(stats: MlpStats, width: int, down: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """Greedy backward elimination: remove, one at a time, the neuron whose removal (with every remaining neuron's
    down-projection column re-fitted) raises the output error least; ascending kept indices.

    Optimal Brain Surgeon on W_down with Hessian H = G + λI (λ = ridge · mean diag G): removing q from the current
    set costs ‖B_q‖² / (H⁻¹)_qq, B the current re-fitted weights (I x D, starting at W_downᵀ). For a fixed keep-set
    the re-fitted weights are exactly ``lsq``'s W_K + W_S·Aᵀ with the same ridge, so this rule greedily minimises the
    objective that ``lsq`` solves. Float64; O(I·(k + D)) per removal after one I x I inverse.
    """
    gram = stats.gram.to(torch.float64).cpu()
    dim = gram.shape[0]
    if not 1 <= width <= dim:
        raise InvalidConfigError(f"MLP width must be in [1, {dim}], got {width}")
    mean_diag = float(torch.diagonal(gram).mean())
    lam = max(ridge, 1e-8) * (mean_diag if mean_diag > 0 else 1.0)
    P = torch.cholesky_inverse(torch.linalg.cholesky(gram + lam * torch.eye(dim, dtype=torch.float64)))
    # the inverse after removals is P − C·Cᵀ (C: one scaled column per removal), so a step costs O(I·(t + D))
    C = torch.zeros(dim - width, dim, dtype=torch.float64)
    diag = torch.diagonal(P).clone()
    B = down.detach().to(torch.float64).cpu().T.clone()
    alive = torch.ones(dim, dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for t in range(dim - width):
        cost = torch.where(alive, (B * B).sum(1) / diag.clamp(min=1e-300), inf)
        q = int(torch.argmin(cost))
        column = P[:, q] - C[:t].T @ C[:t, q]
        pivot = float(column[q])
        C[t] = column / pivot ** 0.5
        diag.sub_(C[t] ** 2)
        B.sub_(torch.outer(column / pivot, B[q]))
        alive[q] = False
    return torch.nonzero(alive).flatten()


def select_keep(stats: MlpStats, width: int, rule: str = "output", down: torch.Tensor | None = None,
                ridge: float = 0.1) -> torch.Tensor:
    """The ``width`` neurons kept under ``rule``, ascending (top scores, ties broken by index; ``obs``: greedy)."""
    if not 1 <= width <= stats.dim:
        raise InvalidConfigError(f"MLP width must be in [1, {stats.dim}], got {width}")
    if rule == "obs":
        if down is None:
            raise InvalidConfigError("the 'obs' keep rule needs the down projection's weight")
        return obs_keep(stats, width, down, ridge)
    return top_indices(keep_scores(stats, rule, down).cpu(), width)


def complement(keep: torch.Tensor, dim: int) -> torch.Tensor:
    """The removed neurons S: every index of [0, dim) not in ``keep``, ascending."""
    mask = torch.ones(dim, dtype=torch.bool)
    mask[keep.cpu()] = False
    return torch.nonzero(mask).flatten()
