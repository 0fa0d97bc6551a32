"""SliceGPT's basis: top eigenvectors of the uncentred Gram matrix (float64, damped)."""

from __future__ import annotations

import torch

from ..statistics import PointStats
from .common import Basis, fix_signs


def pca_basis(stats: PointStats, width: int, *, damping: float = 0.01, **_) -> Basis:
    gram = stats.gram
    damped = gram + damping * torch.mean(torch.diagonal(gram)) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                            device=gram.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    order = torch.argsort(eigenvalues, descending=True, stable=True)[:width]
    Q = fix_signs(eigenvectors[:, order])
    kept = eigenvalues[order].sum() / eigenvalues.sum()
    return Basis(Q=Q, info={"explained_variance": float(kept)})
