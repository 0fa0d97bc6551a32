"""Seeded random orthonormal bases: for invariance tests and as a floor in ablations."""

from __future__ import annotations

import torch

from ..statistics import PointStats
from .common import Basis


def random_basis(stats: PointStats, width: int, *, seed: int = 0, point: int = 0, **_) -> Basis:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + point)
    gaussian = torch.randn(stats.dim, stats.dim, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)
    Q = Q * torch.sign(torch.diagonal(R))[None, :]
    return Basis(Q=Q[:, :width].to(stats.gram.device), info={"seed": seed})
