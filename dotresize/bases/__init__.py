"""Pluggable bases: one function per kind, ``(stats of point p, d_p, options) -> Basis``."""

from __future__ import annotations

import time

import torch

from ..config import CompressionConfig
from ..statistics import PointStats
from .common import Basis, reconstruction_error


def compute_basis(stats: PointStats, width: int, config: CompressionConfig, *, point: int = 0,
                  keep: torch.Tensor | None = None, device: str | None = None) -> Basis:
    """The basis of kind ``config.method`` for one point, with its diagnostics in ``info``."""
    from .dot import dot_basis
    from .pca import pca_basis
    from .prune import prune_basis
    from .random import random_basis

    start = time.perf_counter()
    if width >= stats.dim and config.method in ("prune", "dot"):
        # Full width: keeping every neuron is the identity; there is nothing to merge.
        basis = Basis(Q=torch.eye(stats.dim, dtype=torch.float64, device=stats.gram.device), info={})
    elif config.method == "pca":
        basis = pca_basis(stats, width, damping=config.pca_damping)
    elif config.method == "dot":
        basis = dot_basis(stats, width, options=config.dot, keep=keep, point=point, device=device)
    elif config.method == "prune":
        basis = prune_basis(stats, width, keep=keep, rule=config.dot.targets)
    elif config.method == "random":
        basis = random_basis(stats, width, seed=config.seed, point=point)
    else:  # validated earlier; kept for direct callers
        raise ValueError(f"unknown basis kind {config.method!r}")
    basis.info.update(
        point=point,
        width=basis.width,
        reconstruction_error=reconstruction_error(stats, basis.Q, basis.U),
        tokens=int(stats.count),
        seconds=round(time.perf_counter() - start, 6),
    )
    return basis


__all__ = ["Basis", "compute_basis", "reconstruction_error"]
