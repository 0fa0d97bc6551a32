"""Calibration passes: statistics at every slice point (parallel) or point by point (sequential)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .adapters import ModelAdapter
from .bases import Basis
from .statistics import PointStats, StatsAccumulator
from .surgery import absorb_layer, build_layer

log = logging.getLogger(__name__)

BasisFn = Callable[[PointStats, int], Basis]


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def iter_batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an (n, L) token tensor into batches of at most ``batch_size`` rows."""
    return [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]


def point_hooks(adapter: ModelAdapter, sink: Callable[[int, torch.Tensor], None]) -> list:
    """Forward pre-hooks that hand every slice point's residual stream to ``sink(point, hidden)``.

    Point 2l is the input of layer l, 2l+1 the input of its second norm, 2L the input of the final norm.
    """
    handles = []

    def make(point: int):
        def hook(module, args, kwargs):
            sink(point, _hidden_from(args, kwargs))
        return hook

    for index in range(adapter.num_layers):
        mods = adapter.layer_modules(index)
        handles.append(mods.layer.register_forward_pre_hook(make(2 * index), with_kwargs=True))
        handles.append(mods.post_attention_norm.register_forward_pre_hook(make(2 * index + 1), with_kwargs=True))
    handles.append(adapter.final_norm().register_forward_pre_hook(make(2 * adapter.num_layers), with_kwargs=True))
    return handles


@torch.no_grad()
def run_with_point_hooks(adapter: ModelAdapter, batches: Iterable[torch.Tensor],
                         sink: Callable[[int, torch.Tensor], None], *, progress: bool = True,
                         desc: str = "capture") -> None:
    """One forward pass of the (fused, uncompressed) base model over ``batches`` with every point hooked."""
    handles = point_hooks(adapter, sink)
    base = adapter.model.model
    device = next(adapter.model.parameters()).device
    try:
        batches = list(batches)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            base(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def capture_point_stats(adapter: ModelAdapter, batches: Sequence[torch.Tensor], *, sample_tokens: int = 0,
                        outlier_tokens: float | None = None, seed: int = 0, progress: bool = True) -> list[PointStats]:
    """Statistics of all 2L+1 points from one pass of the uncompressed model (``parallel`` mode)."""
    accumulators = [
        StatsAccumulator(adapter.hidden_size, point=p, sample_tokens=sample_tokens, outlier_tokens=outlier_tokens,
                         seed=seed)
        for p in range(adapter.num_points)
    ]
    run_with_point_hooks(adapter, batches, lambda p, h: accumulators[p].add(h), progress=progress)
    return [acc.finalize() for acc in accumulators]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(adapter: ModelAdapter, batches: Sequence[torch.Tensor]) -> tuple[list, list]:
    """The inputs of layer 0 and its keyword arguments (mask, rotary embeddings) for every batch."""
    inputs, kwargs_list = [], []
    first = adapter.layers()[0]

    def catcher(module, args, kwargs):
        inputs.append(_hidden_from(args, kwargs).detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(catcher, with_kwargs=True)
    device = next(adapter.model.parameters()).device
    try:
        for batch in batches:
            try:
                adapter.model.model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _accumulate(tensors: Iterable[torch.Tensor], point: int, sample_tokens: int, outlier_tokens, seed) -> PointStats:
    acc = None
    for t in tensors:
        if acc is None:
            acc = StatsAccumulator(t.shape[-1], point=point, sample_tokens=sample_tokens,
                                   outlier_tokens=outlier_tokens, seed=seed)
        acc.add(t)
    return acc.finalize()


def _rebase(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return (x.to(torch.float64) @ Q).to(x.dtype)


def rebase(x: torch.Tensor, basis: Basis) -> torch.Tensor:
    """A signal of the full width expressed in a point's compressed basis (float64 product, model dtype)."""
    return _rebase(x, basis.Q)


def sequential_layer(adapter: ModelAdapter, index: int, b_in: Basis, b_attn: Basis | None = None) -> torch.nn.Module:
    """Layer ``index`` with its input compressed by ``b_in`` and, once ``b_attn`` is known, its attention output
    and MLP input compressed by ``b_attn`` (its MLP output stays full width)."""
    mods = adapter.layer_modules(index)
    if b_attn is None:
        tensors = absorb_layer(mods, b_in.decoder, None, None, None)
    else:
        tensors = absorb_layer(mods, b_in.decoder, b_attn.Q, b_attn.decoder, None)
    return build_layer(mods, tensors, adapter.hidden_size, adapter.rms_norm_eps)


@torch.no_grad()
def post_attention_signal(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The residual after attention (the input of the layer's second norm) for one batch."""
    captured: list[torch.Tensor] = []
    handle = layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, args, kw: captured.append(_hidden_from(args, kw).detach()), with_kwargs=True)
    try:
        layer(x, **kwargs)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def sequential_bases(adapter: ModelAdapter, batches: Sequence[torch.Tensor], widths: Sequence[int],
                     basis_fn: Callable[[PointStats, int, int], Basis], *, sample_tokens: int = 0,
                     outlier_tokens: float | None = None, seed: int = 0, progress: bool = True) -> list[Basis]:
    """SliceGPT's order: each point's signals are recomputed through the already-compressed layers.

    ``basis_fn(stats, width, point)`` computes one basis. Layer l is run twice per batch: once with its
    attention input compressed (to get the post-attention signal), once with attention fully compressed and the
    MLP input compressed (to get the layer output).
    """
    acc_kwargs = dict(sample_tokens=sample_tokens, outlier_tokens=outlier_tokens, seed=seed)
    inputs, kwargs_list = capture_layer_inputs(adapter, batches)
    bases = [basis_fn(_accumulate(inputs, 0, **acc_kwargs), widths[0], 0)]
    xs = [rebase(x, bases[0]) for x in inputs]
    del inputs
    for index in tqdm(range(adapter.num_layers), desc="sequential", unit="layer", disable=not progress):
        b_in = bases[-1]
        layer = sequential_layer(adapter, index, b_in)
        captured = [post_attention_signal(layer, x, kw) for x, kw in zip(xs, kwargs_list)]
        b_attn = basis_fn(_accumulate(captured, 2 * index + 1, **acc_kwargs), widths[2 * index + 1], 2 * index + 1)
        del captured
        layer = sequential_layer(adapter, index, b_in, b_attn)
        outputs = [layer(x, **kw) for x, kw in zip(xs, kwargs_list)]
        b_mlp = basis_fn(_accumulate(outputs, 2 * index + 2, **acc_kwargs), widths[2 * index + 2], 2 * index + 2)
        xs = [rebase(o, b_mlp) for o in outputs]
        bases.extend([b_attn, b_mlp])
    return bases
