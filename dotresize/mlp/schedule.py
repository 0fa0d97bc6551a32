"""Per-layer MLP widths under one parameter budget: spend the removals where they cost the least output error."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidConfigError
from .maps import MlpOptions
from .statistics import MlpStats


def error_curve(stats: MlpStats, down: torch.Tensor, widths: Sequence[int], options: MlpOptions = MlpOptions()
                ) -> dict[int, float]:
    """Relative output error of the down projection (on the statistics' data) at every width, with ``options``."""
    from . import reduce_mlp  # noqa: PLC0415 - the package's dispatcher imports this module's siblings

    return {int(w): float(reduce_mlp(stats, down, int(w), options).info["output_error"]) for w in widths}


def allocate_widths(curves: Sequence[dict[int, float]], total: int, weights: Sequence[float] | None = None
                    ) -> list[int]:
    """Widths (one per layer, each a key of its curve) with Σ widths ≤ ``total``, chosen greedily: start every layer
    at its largest width and repeatedly take the step down that adds the least weighted error per removed neuron.

    ``curves[l]`` maps width -> error of layer l (e.g. :func:`error_curve`); ``weights`` scale each layer's error
    (default 1: relative errors of all layers count alike). Deterministic (ties go to the lower layer index).
    """
    weights = [1.0] * len(curves) if weights is None else list(weights)
    if len(weights) != len(curves):
        raise InvalidConfigError("allocate_widths needs one weight per layer")
    grids = [sorted(c, reverse=True) for c in curves]
    if not all(grids):
        raise InvalidConfigError("every layer needs a non-empty error curve")
    position = [0] * len(curves)
    if sum(g[-1] for g in grids) > total:
        raise InvalidConfigError(f"the budget of {total} neurons is below the smallest widths of the curves")
    while sum(g[p] for g, p in zip(grids, position)) > total:
        best, best_cost = -1, float("inf")
        for layer, (grid, p) in enumerate(zip(grids, position)):
            if p + 1 >= len(grid):
                continue
            removed = grid[p] - grid[p + 1]
            cost = weights[layer] * (curves[layer][grid[p + 1]] - curves[layer][grid[p]]) / removed
            if cost < best_cost:
                best, best_cost = layer, cost
        position[best] += 1
    return [g[p] for g, p in zip(grids, position)]
