"""Norm fusion (method.md decision 1): fold every RMSNorm scale into the linears it feeds.

After fusion every norm is a weight-free :class:`RMSN` that divides by the original width D, the head is
untied from the embeddings, and the model computes exactly the same function: orthogonal bases can then be
absorbed into the weights without changing it. :func:`fuse_layer` does one decoder layer (the layer-streamed
loader fuses each layer as it reads it); :func:`fuse_norms` a whole in-memory model.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelAdapter
from .adapters.base import FamilyLayout, layer_modules_of, set_submodule
from .modeling import RMSN


def norm_scale(norm: nn.Module) -> torch.Tensor | None:
    """The scale an RMSNorm multiplies by (float64), or None for an already weight-free :class:`RMSN`."""
    if isinstance(norm, RMSN):
        return None
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("norms with a bias (LayerNorm) are not supported by this adapter")
    return norm.weight.detach().to(torch.float64)


def scale_columns(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``weight * scale[None, :]`` computed in float64 and cast back to ``weight``'s dtype."""
    if scale is None:
        return weight
    return (weight.detach().to(torch.float64) * scale.to(weight.device)[None, :]).to(weight.dtype)


@torch.no_grad()
def _fold_scale(scale: torch.Tensor | None, linears: list[nn.Linear]) -> None:
    for linear in linears:
        linear.weight.data = scale_columns(linear.weight, scale)


def is_fused(adapter: ModelAdapter) -> bool:
    return isinstance(adapter.final_norm(), RMSN)


@torch.no_grad()
def fuse_layer(layout: FamilyLayout, layer: nn.Module, width: int, eps: float) -> None:
    """Fuse one decoder layer in place: norm scales into q/k/v and gate/up, norms become :class:`RMSN`."""
    mods = layer_modules_of(layout, layer)
    _fold_scale(norm_scale(mods.input_norm), mods.attention_inputs)
    _fold_scale(norm_scale(mods.post_attention_norm), mods.mlp_inputs)
    set_submodule(layer, layout.input_norm, RMSN(width, eps))
    set_submodule(layer, layout.post_attention_norm, RMSN(width, eps))


@torch.no_grad()
def fuse_norms(adapter: ModelAdapter) -> None:
    """Fuse the norms of ``adapter.model`` in place (idempotent)."""
    if is_fused(adapter):
        return
    model = adapter.model
    head, embeddings = adapter.lm_head(), adapter.embeddings()
    if head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    width, eps = adapter.hidden_size, adapter.rms_norm_eps
    for layer in adapter.layers():
        fuse_layer(adapter.layout, layer, width, eps)
    _fold_scale(norm_scale(adapter.final_norm()), [head])
    adapter.set_final_norm(RMSN(width, eps))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
