"""The "simple" baseline: keep a subset of neurons, drop the rest (columns of the identity)."""

from __future__ import annotations

import torch

from ..statistics import PointStats
from .common import Basis, target_scores, top_indices


def prune_basis(stats: PointStats, width: int, *, keep: torch.Tensor | None = None, rule: str = "mean_abs",
                **_) -> Basis:
    if keep is None:
        keep = top_indices(target_scores(stats, rule), width)
    Q = torch.zeros(stats.dim, width, dtype=torch.float64, device=stats.gram.device)
    Q[keep, torch.arange(width)] = 1.0
    return Basis(Q=Q, info={"kept": keep.tolist()})
