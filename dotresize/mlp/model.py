"""The MLP axis on a whole model, a layer at a time: every layer's intermediate statistics, one reduction per layer,
and a :class:`~dotresize.layerwise.LayeredModel` whose layers carry the reduced MLPs.

``parallel``: the statistics of h (the input of the MLP's output linear) come from one pass of the uncompressed
model — the same pass that can feed the residual slice points (``sink``). ``sequential``: layer by layer, each
layer's h from the calibration signal that ran through the already-reduced layers before it.

:class:`MlpReducedModel` wraps any layered model (resident or streamed) and hands out its layers with the reduced
MLP linears, so the residual compression (capture, sequential bases, absorption) runs on it unchanged: the
compressed model's MLPs are then both narrower inside and re-based on the residual side.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.base import FamilyLayout
from ..calibration import Sink, layer_inputs, run_layer
from ..config import CompressionConfig, MlpOptions, checked_widths
from ..errors import InvalidConfigError
from ..layerwise import LayeredModel
from ..surgery import frozen_linear
from .keep import mlp_width
from .maps import MlpReduction
from .statistics import MlpStats, MlpStatsAccumulator
from .weights import reduce_mlp_weights


def intermediate_size(model: LayeredModel) -> int:
    """The source's MLP intermediate width I (the config's ``intermediate_size``, whatever the family calls it)."""
    size = model.layout.intermediate_size_of(model.config)
    if not size:
        raise InvalidConfigError(f"{type(model.config).__name__} has no {model.layout.intermediate_size}: the MLP "
                                 "axis needs one")
    return int(size)


def plan_mlp_widths(config: CompressionConfig, intermediate: int, num_layers: int) -> list[int]:
    """Kept intermediate neurons of every layer: the ``mlp_keep_sets``' sizes, the ``mlp_widths`` schedule, else
    ``mlp_ratio`` for every layer."""
    if config.mlp_keep_sets is not None:
        keep_sets = config.mlp_keep_sets
        if len(keep_sets) != num_layers:
            raise InvalidConfigError(f"mlp_keep_sets must list {num_layers} index lists (one per layer), got "
                                     f"{len(keep_sets)}")
        for layer, kept in enumerate(keep_sets):
            if max(kept) >= intermediate:
                raise InvalidConfigError(f"mlp_keep_sets[{layer}] names neuron {max(kept)}: indices must be below "
                                         f"{intermediate} (the intermediate size)")
        return [len(kept) for kept in keep_sets]
    if config.mlp_widths is not None:
        return checked_widths(config.mlp_widths, num_layers, intermediate, key="mlp_widths", per="one per layer",
                              noun="mlp width", within=" (the intermediate size)")
    return [mlp_width(intermediate, config.mlp_ratio, config.mlp.round_to)] * num_layers


def _mlp_output(layout: FamilyLayout, layer: nn.Module) -> nn.Linear:
    return layer.get_submodule(layout.mlp_output)


@contextlib.contextmanager
def capturing_mlp(layout: FamilyLayout, layer: nn.Module, index: int, device) -> Iterator[MlpStatsAccumulator]:
    """An accumulator fed the input of the layer's MLP output linear while the block runs."""
    down = _mlp_output(layout, layer)
    acc = MlpStatsAccumulator(down.in_features, layer=index, device=device)
    handle = down.register_forward_pre_hook(lambda module, args: acc.add(args[0]))
    try:
        yield acc
    finally:
        handle.remove()


@torch.no_grad()
def capture_mlp_stats(model: LayeredModel, batches: Sequence[torch.Tensor], *, sink: Sink | None = None,
                      progress: bool = True) -> list[MlpStats]:
    """Every layer's intermediate statistics from one pass of ``model`` (``parallel`` mode).

    ``sink(point, signal)`` also receives every residual slice point of the same pass, in the order of
    :func:`dotresize.calibration.stream_points` (so residual statistics accumulate exactly as they would alone).
    """
    hidden, kwargs = layer_inputs(model, batches)
    if sink is not None:
        for h in hidden:
            sink(0, h)
    stats = []
    for index in tqdm(range(model.num_layers), desc="capture (mlp)", unit="layer", disable=not progress):
        with model.layer(index) as layer, capturing_mlp(model.layout, layer, index, model.device) as acc:
            hidden = run_layer(model, layer, index, hidden, kwargs, sink)
        stats.append(acc.finalize())
    return stats


def layer_keep_set(config: CompressionConfig, index: int) -> list[int] | None:
    """Layer ``index``'s explicit keep-set (``config.mlp_keep_sets``), ascending; None when a rule chooses."""
    if config.mlp_keep_sets is None:
        return None
    return sorted(int(i) for i in config.mlp_keep_sets[index])


def reduce_layer_mlp(layout: FamilyLayout, layer: nn.Module, stats: MlpStats, width: int,
                     options: MlpOptions, keep: Sequence[int] | None = None) -> MlpReduction:
    """The reduction of one layer's MLP to ``width`` neurons (``keep``, else ``options``' keep rule, and its map)."""
    from . import reduce_mlp  # noqa: PLC0415 - the package's dispatcher imports this module's siblings

    if keep is not None and len(keep) != width:
        raise InvalidConfigError(f"the keep-set has {len(keep)} neurons, the width is {width}")
    return reduce_mlp(stats, _mlp_output(layout, layer).weight, None if keep is not None else width, options, keep)


def reduce_parallel(model: LayeredModel, stats: Sequence[MlpStats], widths: Sequence[int],
                    options: MlpOptions, keep_sets: Sequence[Sequence[int] | None] | None = None) -> list[MlpReduction]:
    """Every layer's reduction from statistics captured beforehand (independent of each other); ``keep_sets``
    (one per layer, or None) fixes the kept neurons instead of ``options``' rule."""
    keep_sets = keep_sets or [None] * len(widths)
    reductions = []
    for index, (layer_stats, width) in enumerate(zip(stats, widths)):
        with model.layer(index) as layer:
            reductions.append(reduce_layer_mlp(model.layout, layer, layer_stats, width, options, keep_sets[index]))
    return reductions


@torch.no_grad()
def layer_mlp_stats(model: LayeredModel, layer: nn.Module, index: int,
                    inputs: Iterable[tuple[torch.Tensor, list[dict]]]) -> MlpStats:
    """Layer ``index``'s intermediate statistics over ``inputs``: (its input, every layer's keyword arguments)
    batch by batch, in order."""
    with capturing_mlp(model.layout, layer, index, model.device) as acc:
        for h, kw in inputs:
            layer(h, **kw[index])
    return acc.finalize()


@torch.no_grad()
def reduce_sequential(model: LayeredModel, batches: Sequence[torch.Tensor], widths: Sequence[int],
                      options: MlpOptions, *, keep_sets: Sequence[Sequence[int] | None] | None = None,
                      progress: bool = True) -> list[MlpReduction]:
    """Layer by layer: each layer's statistics from the signal through the already-reduced layers before it."""
    keep_sets = keep_sets or [None] * len(widths)
    hidden, kwargs = layer_inputs(model, batches)
    reductions = []
    for index in tqdm(range(model.num_layers), desc="sequential (mlp)", unit="layer", disable=not progress):
        with model.layer(index) as layer:
            stats = layer_mlp_stats(model, layer, index, zip(hidden, kwargs))
            reduction = reduce_layer_mlp(model.layout, layer, stats, widths[index], options, keep_sets[index])
            hidden = run_layer(model, with_reduced_mlp(model.layout, layer, reduction), index, hidden, kwargs)
        reductions.append(reduction)
    return reductions


@torch.no_grad()
def reduced_mlp_tensors(layout: FamilyLayout, layer: nn.Module, reduction: MlpReduction) -> dict[str, torch.Tensor]:
    """New weights (and biases) of the layer's MLP linears, keyed by their paths in the layer: the input linears
    (gate/up) keep rows K — in every block of a fused one (Phi-3's gate_up_proj) —, the output linear is
    W[:, K] + W[:, S]·Aᵀ (float64, cast once)."""
    out: dict[str, torch.Tensor] = {}
    down = _mlp_output(layout, layer)
    rows = input_rows(reduction.keep, down.in_features, layout.mlp_input_blocks)
    for path in layout.mlp_inputs:
        linear = layer.get_submodule(path)
        keep = rows.to(linear.weight.device)
        out[path + ".weight"] = linear.weight.detach()[keep].clone()
        if linear.bias is not None:
            out[path + ".bias"] = linear.bias.detach()[keep].clone()
    out[layout.mlp_output + ".weight"] = reduce_mlp_weights(None, None, down.weight, reduction.keep, reduction.A).down
    if down.bias is not None:
        out[layout.mlp_output + ".bias"] = down.bias.detach().clone()
    return out


def input_rows(keep: torch.Tensor, intermediate: int, blocks: int = 1) -> torch.Tensor:
    """Rows an MLP input linear keeps: K in each of its ``blocks`` stacked intermediate-width blocks."""
    keep = keep.to(torch.int64)
    return torch.cat([keep + block * intermediate for block in range(blocks)])


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy that shares parameters and submodules but has its own child table and hook tables."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    for name, value in vars(module).items():
        if "hook" in name and isinstance(value, dict):  # hooks registered on the copy stay on the copy
            setattr(new, name, type(value)(value))
    return new


def _replaced(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``root`` with the modules at dotted paths replaced (containers on the way copied)."""
    new = _shallow_copy(root)
    nested: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = module
        else:
            new._modules[head] = module
    for head, inner in nested.items():
        new._modules[head] = _replaced(root.get_submodule(head), inner)
    return new


def with_reduced_mlp(layout: FamilyLayout, layer: nn.Module, reduction: MlpReduction) -> nn.Module:
    """A copy of ``layer`` whose MLP has ``reduction.width`` intermediate neurons (``layer`` is left unchanged;
    every other module is shared)."""
    tensors = reduced_mlp_tensors(layout, layer, reduction)
    linears = {path: frozen_linear(tensors[path + ".weight"], tensors.get(path + ".bias"))
               for path in (*layout.mlp_inputs, layout.mlp_output)}
    new = _replaced(layer, linears)
    mlp_path = layout.mlp_output.rpartition(".")[0]
    mlp = new.get_submodule(mlp_path) if mlp_path else new
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = reduction.width
    return new


class MlpReducedModel(LayeredModel):
    """``base`` with every layer's MLP reduced by ``reductions[layer]`` (computed when a layer is handed out)."""

    def __init__(self, base: LayeredModel, reductions: Sequence[MlpReduction]):
        if len(reductions) != base.num_layers:
            raise InvalidConfigError(f"one MLP reduction per layer: {base.num_layers} layers, {len(reductions)} given")
        self.base = base
        self.reductions = list(reductions)
        self.adapter_cls = base.adapter_cls
        self.config = base.config
        self.device = base.device

    @property
    def mlp_widths(self) -> list[int]:
        return [r.width for r in self.reductions]

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def model_class(self):
        return self.base.model_class

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.base, "attn_implementation", None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed(ids)

    def layer_kwargs(self, hidden: torch.Tensor) -> list[dict[str, Any]]:
        return self.base.layer_kwargs(hidden)

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        with self.base.layer(index) as layer:
            yield with_reduced_mlp(self.layout, layer, self.reductions[index])

    def embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.embedding_rows(start, stop)

    def head_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.head_rows(start, stop)

    def raw_embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.raw_embedding_rows(start, stop)

    @property
    def tied(self) -> bool:
        return self.base.tied

    def final_norm_weight(self) -> torch.Tensor:
        return self.base.final_norm_weight()

    def final_norm_bias(self) -> torch.Tensor | None:
        return self.base.final_norm_bias()

    def head_bias(self) -> torch.Tensor | None:
        return self.base.head_bias()

    @property
    def position_count(self) -> int:
        return self.base.position_count

    def position_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.position_rows(start, stop)

    def parameter_count(self) -> int:
        return self.base.parameter_count()


def reduction_info(reductions: Sequence[MlpReduction]) -> list[dict[str, Any]]:
    """Per-layer diagnostics of the reductions (method, kept width, output error, plan statistics)."""
    return [{"layer": index, "width": r.width, "removed": int(r.removed.numel()), **r.info}
            for index, r in enumerate(reductions)]


__all__ = ["intermediate_size", "plan_mlp_widths", "layer_keep_set", "capture_mlp_stats", "reduce_layer_mlp",
           "reduce_parallel",
           "reduce_sequential", "capturing_mlp", "layer_mlp_stats", "reduced_mlp_tensors", "input_rows", "with_reduced_mlp", "MlpReducedModel", "reduction_info"]
