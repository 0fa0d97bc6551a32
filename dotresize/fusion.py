"""Norm fusion (method.md decision 1): fold every RMSNorm scale into the linears it feeds.

After fusion every norm is a weight-free :class:`RMSN` that divides by the original width D, the head is
untied from the embeddings, and the model computes exactly the same function: orthogonal bases can then be
absorbed into the weights without changing it.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelAdapter
from .modeling import RMSN


def _norm_scale(norm: nn.Module) -> torch.Tensor | None:
    if isinstance(norm, RMSN):
        return None
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("norms with a bias (LayerNorm) are not supported by this adapter")
    return norm.weight.detach().to(torch.float64)


@torch.no_grad()
def _fold_scale(scale: torch.Tensor | None, linears: list[nn.Linear]) -> None:
    if scale is None:
        return
    for linear in linears:
        weight = linear.weight.to(torch.float64) * scale[None, :]
        linear.weight.data = weight.to(linear.weight.dtype)


def is_fused(adapter: ModelAdapter) -> bool:
    return isinstance(adapter.final_norm(), RMSN)


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
    for index in range(adapter.num_layers):
        mods = adapter.layer_modules(index)
        _fold_scale(_norm_scale(mods.input_norm), mods.attention_inputs)
        _fold_scale(_norm_scale(mods.post_attention_norm), mods.mlp_inputs)
        adapter.set_layer_norms(index, RMSN(width, eps), RMSN(width, eps))
    _fold_scale(_norm_scale(adapter.final_norm()), [head])
    adapter.set_final_norm(RMSN(width, eps))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
