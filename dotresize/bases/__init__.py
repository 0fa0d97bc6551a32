"""Pluggable bases: one registry entry per kind, ``(stats of point p, d_p, config) -> Basis``.

:data:`BASIS_METHODS` is the one place a method is dispatched: the in-memory API and the pipeline's solve stage
compute through :func:`compute_basis`, and the solve stage's content key takes :func:`basis_key_options` (the
config fields the method's basis depends on), so a new method is one entry here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import CompressionConfig
from ..statistics import PointStats
from .common import Basis, reconstruction_error


@dataclass(frozen=True)
class BasisMethod:
    """A basis kind: how it is computed and which config fields its result depends on."""

    name: str
    compute: Callable[..., Basis]                 # (stats, width, config, point=, keep=, device=) -> Basis
    key_options: Callable[[CompressionConfig], dict]
    identity_at_full_width: bool = False          # keeping every neuron is the identity: nothing to compute


def _dot(stats: PointStats, width: int, config: CompressionConfig, *, point: int, keep, device) -> Basis:
    from .dot import dot_basis

    return dot_basis(stats, width, options=config.dot, keep=keep, point=point, device=device)


def _pca(stats: PointStats, width: int, config: CompressionConfig, **_) -> Basis:
    from .pca import pca_basis

    return pca_basis(stats, width, damping=config.pca_damping)


def _prune(stats: PointStats, width: int, config: CompressionConfig, *, keep, **_) -> Basis:
    from .prune import prune_basis

    return prune_basis(stats, width, keep=keep, rule=config.dot.targets)


def _random(stats: PointStats, width: int, config: CompressionConfig, *, point: int, **_) -> Basis:
    from .random import random_basis

    return random_basis(stats, width, seed=config.seed, point=point)


#: every basis kind, by ``CompressionConfig.method``
BASIS_METHODS: dict[str, BasisMethod] = {m.name: m for m in (
    BasisMethod("dot", _dot, lambda c: {"dot": c.to_dict()["dot"]}, identity_at_full_width=True),
    BasisMethod("pca", _pca, lambda c: {"pca_damping": c.pca_damping}),
    BasisMethod("prune", _prune, lambda c: {"targets": c.dot.targets}, identity_at_full_width=True),
    BasisMethod("random", _random, lambda c: {"seed": c.seed}),
)}


def basis_method(name: str) -> BasisMethod:
    try:
        return BASIS_METHODS[name]
    except KeyError:  # validated earlier; kept for direct callers
        raise ValueError(f"unknown basis kind {name!r}: use one of {', '.join(BASIS_METHODS)}") from None


def basis_key_options(config: CompressionConfig) -> dict:
    """The config fields the basis of ``config.method`` depends on (part of the solve stage's content key)."""
    return basis_method(config.method).key_options(config)


def compute_basis(stats: PointStats, width: int, config: CompressionConfig, *, point: int = 0,
                  keep: torch.Tensor | None = None, device: str | None = None) -> Basis:
    """The basis of kind ``config.method`` for one point, with its diagnostics in ``info``."""
    method = basis_method(config.method)
    start = time.perf_counter()
    if width >= stats.dim and method.identity_at_full_width:
        basis = Basis(Q=torch.eye(stats.dim, dtype=torch.float64, device=stats.gram.device), info={})
    else:
        basis = method.compute(stats, width, config, point=point, keep=keep, device=device)
    basis.info.update(
        point=point,
        width=basis.width,
        reconstruction_error=reconstruction_error(stats, basis.Q, basis.U),
        tokens=int(stats.count),
        seconds=round(time.perf_counter() - start, 6),
    )
    return basis


__all__ = ["Basis", "BasisMethod", "BASIS_METHODS", "basis_key_options", "compute_basis", "reconstruction_error"]
