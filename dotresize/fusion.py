"""Norm fusion (method.md decision 1): fold every norm's scale (and bias) into the linears it feeds.

After fusion every norm before a block is a weight-free :class:`RMSN` that divides by the original width D, the
head is untied from the embeddings, and the model computes exactly the same function: orthogonal bases can then be
absorbed into the weights without changing it. :func:`fuse_layer` does one decoder layer (the layer-streamed
loader fuses each layer as it reads it); :func:`fuse_norms` a whole in-memory model.

LayerNorm families (OPT), SliceGPT's way: LayerNorm(x) = RMSN(x − mean(x))·w + b. Every writer to the residual
stream (token and position embeddings, the attention output and MLP output linears, their biases) has its output
mean subtracted, so the stream is mean-free and the LayerNorm is RMSN·w + b; w folds into the next linears'
columns and b into their biases (W·b), the final norm's b into a bias of the head.

A norm on a block's output before the residual add (Gemma 3's post-attention / post-feed-forward norms) has no
linear after it to fold into: it keeps its weight here, and absorption turns it into the projection after a
weight-free norm (``dotresize.modeling.BranchNorm``).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelAdapter
from .adapters.base import FamilyLayout, layer_modules_of, set_submodule
from .errors import UnsupportedArchitectureError
from .modeling import RMSN

F64 = torch.float64


def norm_scale(norm: nn.Module, offset: float = 0.0) -> torch.Tensor | None:
    """The scale a norm multiplies by (float64: its weight plus ``offset``), or None for an already weight-free
    :class:`RMSN` or a norm without a weight."""
    weight = None if isinstance(norm, RMSN) else getattr(norm, "weight", None)
    if weight is None:
        return None
    return weight.detach().to(F64) + offset


def norm_bias(norm: nn.Module) -> torch.Tensor | None:
    """The bias a (LayerNorm) norm adds (float64), or None."""
    bias = None if isinstance(norm, RMSN) else getattr(norm, "bias", None)
    return None if bias is None else bias.detach().to(F64)


def scale_columns(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``weight * scale[None, :]`` computed in float64 and cast back to ``weight``'s dtype."""
    if scale is None:
        return weight
    return (weight.detach().to(F64) * scale.to(weight.device)[None, :]).to(weight.dtype)


def centre_rows(weight: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean (float64, cast back): a table of residual-stream vectors made mean-free."""
    w = weight.detach().to(F64)
    return (w - w.mean(dim=-1, keepdim=True)).to(weight.dtype)


@torch.no_grad()
def _centre_outputs(linear: nn.Linear) -> None:
    """A residual-stream writer's outputs made mean-free (its weight's columns and its bias)."""
    w = linear.weight.detach().to(F64)
    linear.weight.data = (w - w.mean(dim=0, keepdim=True)).to(linear.weight.dtype)
    if linear.bias is not None:
        b = linear.bias.detach().to(F64)
        linear.bias.data = (b - b.mean()).to(linear.bias.dtype)


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear], offset: float) -> None:
    """The norm's scale into the linears' columns, its bias (if any) into their biases."""
    scale, bias = norm_scale(norm, offset), norm_bias(norm)
    for linear in linears:
        if bias is not None:
            if linear.bias is None:
                raise UnsupportedArchitectureError("a norm with a bias needs a bias on every linear after it: this "
                                                   "model's norm feeds a linear without one")
            folded = linear.bias.detach().to(F64) + linear.weight.detach().to(F64) @ bias.to(linear.weight.device)
            linear.bias.data = folded.to(linear.bias.dtype)
        linear.weight.data = scale_columns(linear.weight, scale)


def is_fused(adapter: ModelAdapter) -> bool:
    return isinstance(adapter.final_norm(), RMSN)


@torch.no_grad()
def fuse_layer(layout: FamilyLayout, layer: nn.Module, width: int, eps: float) -> None:
    """Fuse one decoder layer in place: the pre-block norms' scales (and biases) into q/k/v and gate/up, those
    norms become :class:`RMSN`; a LayerNorm family's writers (attention and MLP outputs) become mean-free; norms on
    block outputs are left as they are."""
    mods = layer_modules_of(layout, layer)
    if layout.layernorm:
        _centre_outputs(mods.attention_output)
        _centre_outputs(mods.mlp_output)
    _fold(mods.input_norm, mods.attention_inputs, layout.norm_offset)
    _fold(mods.post_attention_norm, mods.mlp_inputs, layout.norm_offset)
    set_submodule(layer, layout.input_norm, RMSN(width, eps))
    set_submodule(layer, layout.post_attention_norm, RMSN(width, eps))


@torch.no_grad()
def fused_head_bias(head_weight: torch.Tensor, final_norm_bias: torch.Tensor | None,
                    head_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """The fused head's bias: the final norm's bias through the (unscaled) head, plus the head's own (float64)."""
    if final_norm_bias is None:
        return None if head_bias is None else head_bias.detach().to(F64)
    out = head_weight.detach().to(F64) @ final_norm_bias.to(head_weight.device)
    return out if head_bias is None else out + head_bias.detach().to(F64)


@torch.no_grad()
def fuse_norms(adapter: ModelAdapter) -> None:
    """Fuse the norms of ``adapter.model`` in place (idempotent)."""
    if is_fused(adapter):
        return
    model, layout = adapter.model, adapter.layout
    head, embeddings = adapter.lm_head(), adapter.embeddings()
    if head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if layout.layernorm:
        for table in (embeddings, adapter.position_embeddings()):
            if table is not None:
                table.weight.data = centre_rows(table.weight)
    width, eps = adapter.hidden_size, adapter.rms_norm_eps
    for layer in adapter.layers():
        fuse_layer(layout, layer, width, eps)
    final = adapter.final_norm()
    bias = fused_head_bias(head.weight, norm_bias(final), head.bias)
    if bias is not None:
        new_head = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                             device=head.weight.device)
        new_head.weight = nn.Parameter(head.weight.detach(), requires_grad=False)
        new_head.bias = nn.Parameter(bias.to(head.weight.dtype), requires_grad=False)
        adapter.set_lm_head(new_head)
        head = new_head
    head.weight.data = scale_columns(head.weight, norm_scale(final, layout.norm_offset))
    adapter.set_final_norm(RMSN(width, eps))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
