"""The basis type shared by every basis kind, and helpers they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..statistics import PointStats


@dataclass
class Basis:
    """An orthonormal basis ``Q`` (D x d, float64) of one slice point.

    ``decoder`` is what consumers of the point multiply by (d x D): ``Qᵀ`` for the pseudo-inverse
    decompression (``None`` here), ``R·P`` for the transport-plan decompression. ``info`` holds the
    diagnostics reported per point (reconstruction error, Sinkhorn iterations, cond(R), ...).
    """

    Q: torch.Tensor
    U: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.Q.shape[1])

    @property
    def decoder(self) -> torch.Tensor:
        return self.Q.T if self.U is None else self.U


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties broken by index), returned in ascending index order."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def target_scores(stats: PointStats, rule: str) -> torch.Tensor:
    if rule == "mean_abs":
        return stats.mean_abs
    if rule == "rms":
        return stats.rms
    raise ValueError(f"unknown target rule {rule!r}")


def reconstruction_error(stats: PointStats, Q: torch.Tensor, U: torch.Tensor | None = None) -> float:
    """Relative squared error ‖X − X·Q·U‖² / ‖X‖² of the calibration activations, from the Gram matrix."""
    gram = stats.gram
    total = torch.trace(gram)
    if total <= 0:
        return 0.0
    if U is None:
        kept = ((gram @ Q) * Q).sum()  # trace(QᵀGQ) with one product
        return float(torch.clamp((total - kept) / total, min=0.0))
    residual = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) - Q @ U
    return float(torch.trace(residual.T @ gram @ residual) / total)


def fix_signs(Q: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of every column positive (a deterministic orientation)."""
    idx = Q.abs().argmax(dim=0)
    signs = torch.sign(Q[idx, torch.arange(Q.shape[1], device=Q.device)])
    signs[signs == 0] = 1
    return Q * signs[None, :]
