"""Which intermediate neurons an MLP keeps: the width m from a ratio, and keep-set rules."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..bases.common import top_indices
from ..errors import InvalidConfigError
from .statistics import MlpStats

#: ``energy``: ‖h_j‖²; ``output``: ‖h_j‖²·‖W_down[:, j]‖² (the neuron's output energy if it were alone)
KEEP_RULES = ("output", "energy")


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


def select_keep(stats: MlpStats, width: int, rule: str = "output", down: torch.Tensor | None = None) -> torch.Tensor:
    """The ``width`` top-scoring neurons under ``rule``, ascending (ties broken by index)."""
    if not 1 <= width <= stats.dim:
        raise InvalidConfigError(f"MLP width must be in [1, {stats.dim}], got {width}")
    return top_indices(keep_scores(stats, rule, down).cpu(), width)


def complement(keep: torch.Tensor, dim: int) -> torch.Tensor:
    """The removed neurons S: every index of [0, dim) not in ``keep``, ascending."""
    mask = torch.ones(dim, dtype=torch.bool)
    mask[keep.cpu()] = False
    return torch.nonzero(mask).flatten()
