"""Calibration statistics of one slice point, accumulated batch by batch in float64."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import NonFiniteActivationError


@dataclass
class PointStats:
    """Sufficient statistics of the activations X (N tokens x D) at one slice point.

    ``gram`` = XᵀX (uncentred, float64), ``abs_sum`` = Σ|x|, ``sum`` = Σx, ``count`` = N, and optionally
    ``sample``: up to k raw activation rows (float32), chosen reproducibly, for costs that need raw values.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    sum: torch.Tensor
    count: int
    sample: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def rms(self) -> torch.Tensor:
        return torch.sqrt(torch.clamp(torch.diagonal(self.gram), min=0) / max(self.count, 1))


class StatsAccumulator:
    """Accumulates :class:`PointStats` from activation batches of shape (..., D).

    ``sample_tokens`` > 0 keeps a reservoir of raw rows; ``outlier_tokens`` (a multiple of the batch's median
    token norm) drops massive-activation tokens from every statistic. ``gram=False`` skips the Gram matrix (the
    pipeline reduces it from the stored rows instead, and keeps only the sample and the outlier mask from here).
    """

    def __init__(self, dim: int, *, point: int = 0, sample_tokens: int = 0, outlier_tokens: float | None = None,
                 seed: int = 0, device: torch.device | str = "cpu", gram: bool = True):
        self.point = point
        self.with_gram = gram
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device) if gram else \
            torch.zeros(0, 0, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0
        self.excluded = 0
        self.sample_tokens = sample_tokens
        self.outlier_tokens = outlier_tokens
        self._sample: torch.Tensor | None = None
        self._priorities: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed * 1_000_003 + point)

    @torch.no_grad()
    def add(self, activations: torch.Tensor) -> torch.Tensor | None:
        """Accumulate a batch; returns the mask of rows kept (None when no outlier rule is set)."""
        x = activations.reshape(-1, activations.shape[-1]).to(device=self.gram.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"NaN or Inf in the activations at slice point {self.point}: check the model's weights and dtype "
                "(use float32) and the calibration text"
            )
        keep = None
        if self.outlier_tokens is not None:
            keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            if x.shape[0] > 1:
                norms = x.norm(dim=1)
                keep = norms <= self.outlier_tokens * norms.median()
                self.excluded += int((~keep).sum())
                x = x[keep]
        if self.with_gram:
            self.gram.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.sum += x.sum(0)
        self.count += x.shape[0]
        if self.sample_tokens > 0:
            self._reservoir(x.to(torch.float32).cpu())
        return None if keep is None else keep.cpu()

    def _reservoir(self, rows: torch.Tensor) -> None:
        """Keep the rows with the k smallest random priorities: a uniform, reproducible sample."""
        priorities = torch.rand(rows.shape[0], generator=self._generator, dtype=torch.float64)
        if self._sample is not None:
            rows = torch.cat([self._sample, rows])
            priorities = torch.cat([self._priorities, priorities])
        if rows.shape[0] > self.sample_tokens:
            order = torch.argsort(priorities)[: self.sample_tokens]
            order, _ = torch.sort(order)
            rows, priorities = rows[order], priorities[order]
        self._sample, self._priorities = rows, priorities

    def finalize(self) -> PointStats:
        return PointStats(self.gram, self.abs_sum, self.sum, self.count, self._sample)


def accumulate(blocks: Iterable[torch.Tensor], *, point: int = 0, sample_tokens: int = 0,
               outlier_tokens: float | None = None, seed: int = 0) -> PointStats:
    """The statistics of a point's signal given as blocks of rows (a calibration batch at a time, in order): the
    same blocks in the same order give bitwise the same statistics, in memory or streamed from a store."""
    accumulator = None
    for block in blocks:
        if accumulator is None:
            accumulator = StatsAccumulator(block.shape[-1], point=point, sample_tokens=sample_tokens,
                                           outlier_tokens=outlier_tokens, seed=seed)
        accumulator.add(block)
    if accumulator is None:
        raise ValueError(f"no activations for slice point {point}")
    return accumulator.finalize()


def pool_stats(stats: list[PointStats], normalization: str = "trace") -> PointStats:
    """Pool several points' statistics into one (for the ``global`` layout).

    ``trace`` weights each point so that its mean squared activation counts equally (deep points with large
    residual norms would otherwise decide the basis alone); ``sum`` adds the raw statistics.
    """
    dim = stats[0].dim
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=stats[0].gram.device)
    abs_sum = torch.zeros(dim, dtype=torch.float64, device=gram.device)
    total = torch.zeros(dim, dtype=torch.float64, device=gram.device)
    count = 0
    samples = []
    for s in stats:
        if normalization == "trace":
            scale2 = s.count / torch.clamp(torch.trace(s.gram), min=1e-300)
            scale = torch.sqrt(scale2)
        else:
            scale2 = scale = torch.tensor(1.0, dtype=torch.float64)
        gram += s.gram * scale2
        abs_sum += s.abs_sum * scale
        total += s.sum * scale
        count += s.count
        if s.sample is not None:
            samples.append(s.sample * scale.to(torch.float32))
    sample = torch.cat(samples) if samples else None
    return PointStats(gram, abs_sum, total, count, sample)
