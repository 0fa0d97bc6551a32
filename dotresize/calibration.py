"""Calibration passes over a :class:`dotresize.layerwise.LayeredModel`, one decoder layer at a time.

``parallel``: the calibration hidden states (tokens x D) go through layer 0, then layer 1, ...; every slice point
is handed to a sink as it appears (point 2l = input of layer l, 2l+1 = input of its second norm, 2L = input of
the final norm). Each point sees the batches in calibration order, so statistics accumulate exactly as in one
whole-model forward pass per batch. ``sequential`` (SliceGPT's order): each point's signal is recomputed through
the layers already compressed. Only one decoder layer is materialised at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters.base import LayerModules
from .bases import Basis
from .layerwise import LayeredModel
from .modeling import RMSN
from .statistics import PointStats, StatsAccumulator, accumulate
from .surgery import absorb_layer, build_layer

log = logging.getLogger(__name__)

Sink = Callable[[int, torch.Tensor], None]


def iter_batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an (n, L) token tensor into batches of at most ``batch_size`` rows."""
    return [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def embed_batches(model: LayeredModel, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The embedding output of every batch, looked up in one call (a streamed model reads the matrix once)."""
    if len({tuple(b.shape[1:]) for b in batches}) != 1:
        return [model.embed(batch) for batch in batches]
    return list(model.embed(torch.cat(list(batches))).split([b.shape[0] for b in batches]))


@torch.no_grad()
def layer_inputs(model: LayeredModel, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
    """The embedding output of every batch and every layer's keyword arguments for it."""
    hidden = embed_batches(model, batches)
    kwargs = [model.layer_kwargs(h) for h in hidden]
    return hidden, kwargs


@torch.no_grad()
def run_layer(model: LayeredModel, layer: torch.nn.Module, index: int, hidden: Sequence[torch.Tensor],
              kwargs: Sequence[list[dict[str, Any]]], sink: Sink | None = None) -> list[torch.Tensor]:
    """Decoder layer ``index`` over every batch; ``sink(2l+1, post-attention residual)`` and
    ``sink(2l+2, output)`` per batch. Returns the outputs (the next layer's inputs)."""
    norm = layer.get_submodule(model.layout.post_attention_norm)
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda m, a, kw: captured.append(_hidden_from(a, kw)), with_kwargs=True)
    outputs = []
    try:
        for h, kw in zip(hidden, kwargs):
            captured.clear()
            out = _output(layer(h, **kw[index]))
            if sink is not None:
                sink(2 * index + 1, captured[0])
                sink(2 * index + 2, out)
            outputs.append(out)
    finally:
        handle.remove()
    return outputs


@torch.no_grad()
def stream_points(model: LayeredModel, batches: Sequence[torch.Tensor], sink: Sink, *, progress: bool = True,
                  desc: str = "capture") -> None:
    """Every slice point of the uncompressed model, layer after layer (``parallel`` mode)."""
    hidden, kwargs = layer_inputs(model, batches)
    for h in hidden:
        sink(0, h)
    for index in tqdm(range(model.num_layers), desc=desc, unit="layer", disable=not progress):
        with model.layer(index) as layer:
            hidden = run_layer(model, layer, index, hidden, kwargs, sink)


def capture_point_stats(model: LayeredModel, batches: Sequence[torch.Tensor], *, sample_tokens: int = 0,
                        outlier_tokens: float | None = None, seed: int = 0, progress: bool = True) -> list[PointStats]:
    """Statistics of all 2L+1 points from one pass of the uncompressed model (``parallel`` mode)."""
    accumulators = [StatsAccumulator(model.hidden_size, point=p, sample_tokens=sample_tokens,
                                     outlier_tokens=outlier_tokens, seed=seed) for p in range(model.num_points)]
    stream_points(model, batches, lambda p, h: accumulators[p].add(h), progress=progress)
    return [acc.finalize() for acc in accumulators]


def rebase(x: torch.Tensor, basis: Basis) -> torch.Tensor:
    """A signal of the full width expressed in a point's compressed basis (float64 product, input dtype)."""
    return (x.to(torch.float64) @ basis.Q.to(x.device)).to(x.dtype)


def sequential_layer(mods: LayerModules, hidden_size: int, eps: float, b_in: Basis,
                     b_attn: Basis | None = None) -> torch.nn.Module:
    """A fused layer with its input compressed by ``b_in`` and, once ``b_attn`` is known, its attention output
    and MLP input compressed by ``b_attn`` (its MLP output stays full width)."""
    if b_attn is None:
        tensors = absorb_layer(mods, b_in.decoder, None, None, None)
    else:
        tensors = absorb_layer(mods, b_in.decoder, b_attn.Q, b_attn.decoder, None)
    return build_layer(mods, tensors, hidden_size, eps)


@torch.no_grad()
def post_attention_signal(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The residual after attention (the input of a compressed layer's second norm) for one batch."""
    captured: list[torch.Tensor] = []
    handle = layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, args, kw: captured.append(_hidden_from(args, kw)), with_kwargs=True)
    try:
        layer(x, **kwargs)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def sequential_signals(model: LayeredModel, index: int, layer: torch.nn.Module, xs: Sequence[torch.Tensor],
                       kwargs: Sequence[list[dict]], b_in: Basis, b_attn: Basis | None = None) -> list[torch.Tensor]:
    """Through fused layer ``index`` (inputs ``xs`` in ``b_in``'s basis): the post-attention residuals (no
    ``b_attn`` yet) or the layer outputs (attention output compressed by ``b_attn``), full width."""
    mods = model.adapter_cls.modules_of(layer)
    compressed = sequential_layer(mods, model.hidden_size, model.rms_norm_eps, b_in, b_attn)
    if b_attn is None:
        return [post_attention_signal(compressed, x, kw[index]) for x, kw in zip(xs, kwargs)]
    return [_output(compressed(x, **kw[index])) for x, kw in zip(xs, kwargs)]


@torch.no_grad()
def sequential_bases(model: LayeredModel, batches: Sequence[torch.Tensor], widths: Sequence[int],
                     basis_fn: Callable[[PointStats, int, int], Basis], *, sample_tokens: int = 0,
                     outlier_tokens: float | None = None, seed: int = 0, progress: bool = True) -> list[Basis]:
    """SliceGPT's order: each point's signals are recomputed through the already-compressed layers.

    ``basis_fn(stats, width, point)`` computes one basis. Layer l runs twice per batch: once with its attention
    input compressed (for the post-attention signal), once with attention and the MLP input compressed (for the
    layer output).
    """
    acc_kwargs = dict(sample_tokens=sample_tokens, outlier_tokens=outlier_tokens, seed=seed)
    hidden, kwargs = layer_inputs(model, batches)
    bases = [basis_fn(accumulate(hidden, point=0, **acc_kwargs), widths[0], 0)]
    xs = [rebase(h, bases[0]) for h in hidden]
    del hidden
    for index in tqdm(range(model.num_layers), desc="sequential", unit="layer", disable=not progress):
        b_in = bases[-1]
        with model.layer(index) as layer:
            captured = sequential_signals(model, index, layer, xs, kwargs, b_in)
            b_attn = basis_fn(accumulate(captured, point=2 * index + 1, **acc_kwargs), widths[2 * index + 1],
                              2 * index + 1)
            del captured
            outputs = sequential_signals(model, index, layer, xs, kwargs, b_in, b_attn)
        b_mlp = basis_fn(accumulate(outputs, point=2 * index + 2, **acc_kwargs), widths[2 * index + 2], 2 * index + 2)
        xs = [rebase(o, b_mlp) for o in outputs]
        bases.extend([b_attn, b_mlp])
    return bases


__all__ = ["iter_batches", "layer_inputs", "run_layer", "stream_points", "capture_point_stats", "rebase",
           "sequential_layer", "sequential_signals", "post_attention_signal", "sequential_bases", "RMSN"]
