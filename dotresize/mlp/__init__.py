"""The MLP's intermediate width, the second compression axis (method.md, decision 9; issue 16).

Between up/gate and down_proj sits an elementwise nonlinearity, so no rotation acts there: a layer keeps m of its
I intermediate neurons (K) and maps the removed ones (S) onto them with A (|K| x |S|, h_S ≈ h_K·A). The new down
projection is W_down[:, K] + W_down[:, S]·Aᵀ; gate/up keep rows K. Pure torch (+ the project's Sinkhorn)::

    acc = MlpStatsAccumulator(I)                 # feed it the input of down_proj, batch by batch
    acc.add(h)
    reduction = reduce_mlp(acc.finalize(), down.weight, mlp_width(I, 0.3), MlpOptions(method="lsq"))
    new = reduce_mlp_weights(gate.weight, up.weight, down.weight, reduction.keep, reduction.A)

A whole model, a layer at a time (statistics of every layer, reductions, a LayeredModel with reduced MLPs): see
:mod:`dotresize.mlp.model`, which :func:`dotresize.compress` uses when ``mlp_ratio`` or ``mlp_widths`` is set.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .keep import KEEP_RULES, as_keep_set, complement, keep_scores, mlp_width, obs_keep, select_keep
from .maps import (DOT_COSTS, DOT_MARGINALS, MLP_METHODS, SCALE_RULES, MlpDotOptions, MlpOptions, MlpReduction,
                   dot_map, lsq_map, profile_cost, prune_map, ridge_solve, row_scales, transport_rows)
from .schedule import allocate_widths, error_curve
from .statistics import MlpStats, MlpStatsAccumulator
from .weights import MlpWeights, output_error, reduce_mlp_weights

__all__ = [
    "KEEP_RULES", "MLP_METHODS", "DOT_COSTS", "DOT_MARGINALS", "SCALE_RULES",
    "MlpStats", "MlpStatsAccumulator", "MlpOptions", "MlpDotOptions", "MlpReduction", "MlpWeights",
    "mlp_width", "keep_scores", "select_keep", "obs_keep", "as_keep_set", "complement",
    "prune_map", "lsq_map", "dot_map", "profile_cost", "transport_rows", "row_scales", "ridge_solve",
    "reduce_mlp", "reduce_mlp_weights", "output_error", "error_curve", "allocate_widths",
]


def reduce_mlp(stats: MlpStats, down: torch.Tensor, width: int | None = None, options: MlpOptions = MlpOptions(),
               keep: Sequence[int] | torch.Tensor | None = None) -> MlpReduction:
    """Keep-set (explicit ``keep``, else the ``width`` best under ``options.keep_rule``) and the map of ``method``.

    ``down`` is the down projection's weight [D, I] (the ``output`` rule's column norms, and the reported
    ``info["output_error"]``: the relative output error on the statistics' own data).
    """
    options.validate()
    if keep is not None:
        kept = as_keep_set(keep, stats.dim)
    elif width is None:
        raise ValueError("reduce_mlp needs a width or an explicit keep-set")
    else:
        kept = select_keep(stats, width, options.keep_rule, down, options.ridge)
    if options.method == "prune":
        reduction = prune_map(stats, kept)
    elif options.method == "lsq":
        reduction = lsq_map(stats, kept, options.ridge)
    else:
        reduction = dot_map(stats, kept, options.dot, options.ridge)
    reduction.info["keep_rule"] = "explicit" if keep is not None else options.keep_rule
    reduction.info["output_error"] = output_error(stats, down, reduction.keep, reduction.A)
    return reduction
