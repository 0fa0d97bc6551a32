"""Absorb per-point bases into the weights of a fused model (method.md §2.7).

Conventions: HF weights are ``[out, in]``; a producer of point p (embeddings, o_proj, down_proj) is rotated on
its output side by ``Q_p`` (D x d_p); a consumer (q/k/v, gate/up, lm_head) on its input side by the decoder
``U_p`` (d_p x D; ``Q_pᵀ`` for the pseudo-inverse). ``None`` stands for the identity (an unsliced point).
All products are computed in float64 and cast back to the model dtype once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import LayerModules
from .adapters.base import FamilyLayout
from .bases import Basis
from .modeling import RMSN, CompressedDecoderLayer

F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64)


#: float64 elements of a weight transformed at once (bounds the temporaries of an 8B layer's MLP to ~64 MB)
BLOCK_ELEMENTS = 1 << 23


def _consume(weight: torch.Tensor, decoder: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight @ decoderᵀ`` (a consumer's input side), in float64 a block of rows at a time, cast once."""
    dtype = dtype or weight.dtype
    if decoder is None:
        return weight.to(dtype)
    decoder_t = decoder.to(weight.device).T
    step = max(1, BLOCK_ELEMENTS // max(weight.shape[1], 1))
    out = torch.empty(weight.shape[0], decoder_t.shape[1], dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], step):
        out[start:start + step] = (_f64(weight[start:start + step]) @ decoder_t).to(dtype)
    return out


def _produce(weight: torch.Tensor, Q: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Qᵀ @ weight`` (a producer's output side), in float64 a block of columns at a time, cast once."""
    dtype = dtype or weight.dtype
    if Q is None:
        return weight.to(dtype)
    q_t = Q.to(weight.device).T
    step = max(1, BLOCK_ELEMENTS // max(weight.shape[0], 1))
    out = torch.empty(q_t.shape[0], weight.shape[1], dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[1], step):
        out[:, start:start + step] = (q_t @ _f64(weight[:, start:start + step])).to(dtype)
    return out


def _shortcut(decoder_in: torch.Tensor | None, Q_out: torch.Tensor | None, dtype: torch.dtype):
    if decoder_in is None and Q_out is None:
        return None
    if decoder_in is None:
        return Q_out.to(dtype)
    if Q_out is None:
        return decoder_in.to(dtype)
    return (decoder_in @ Q_out.to(decoder_in.device)).to(dtype)


def _linear_keys(layer: nn.Module, linear: nn.Linear) -> str:
    for name, module in layer.named_modules():
        if module is linear:
            return name
    raise KeyError("linear not found in its layer")


def _bias(bias: torch.Tensor, Q: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return bias.to(dtype) if Q is None else (Q.to(bias.device).T @ _f64(bias)).to(dtype)


@torch.no_grad()
def absorb_layer(mods: LayerModules, decoder_in: torch.Tensor | None, Q_attn: torch.Tensor | None,
                 decoder_attn: torch.Tensor | None, Q_mlp: torch.Tensor | None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The compressed tensors of one fused layer, keyed like :class:`CompressedDecoderLayer`'s state dict.

    Products are computed in float64 and cast once to ``dtype`` (default: the layer's own dtype).
    """
    layer = mods.layer
    dtype = dtype or mods.attention_output.weight.dtype
    out: dict[str, torch.Tensor] = {k: v.to(dtype) if v.is_floating_point() else v
                                    for k, v in layer.state_dict().items()}
    for linear in mods.attention_inputs:
        out[_linear_keys(layer, linear) + ".weight"] = _consume(linear.weight, decoder_in, dtype)
    name = _linear_keys(layer, mods.attention_output)
    out[name + ".weight"] = _produce(mods.attention_output.weight, Q_attn, dtype)
    if mods.attention_output.bias is not None:
        out[name + ".bias"] = _bias(mods.attention_output.bias, Q_attn, dtype)
    for linear in mods.mlp_inputs:
        out[_linear_keys(layer, linear) + ".weight"] = _consume(linear.weight, decoder_attn, dtype)
    name = _linear_keys(layer, mods.mlp_output)
    out[name + ".weight"] = _produce(mods.mlp_output.weight, Q_mlp, dtype)
    if mods.mlp_output.bias is not None:
        out[name + ".bias"] = _bias(mods.mlp_output.bias, Q_mlp, dtype)
    attn_shortcut = _shortcut(decoder_in, Q_attn, dtype)
    mlp_shortcut = _shortcut(decoder_attn, Q_mlp, dtype)
    if attn_shortcut is not None:
        out["attn_shortcut"] = attn_shortcut
    if mlp_shortcut is not None:
        out["mlp_shortcut"] = mlp_shortcut
    return out


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` themselves (no copy, no gradient)."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                    device=weight.device)
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    return new


@torch.no_grad()
def build_layer(mods: LayerModules, tensors: dict[str, torch.Tensor], hidden_size: int, eps: float) -> nn.Module:
    """A runnable :class:`CompressedDecoderLayer` from :func:`absorb_layer`'s tensors (shares no storage)."""
    import copy

    layout = mods.layout
    attn = copy.copy(mods.layer.get_submodule(layout.attention_block))
    mlp = copy.copy(mods.layer.get_submodule(layout.mlp_block))
    attn._modules = dict(attn._modules)
    mlp._modules = dict(mlp._modules)
    for owner, prefix in ((attn, layout.attention_block), (mlp, layout.mlp_block)):
        for child_name, child in list(owner._modules.items()):
            if isinstance(child, nn.Linear):
                key = f"{prefix}.{child_name}"
                owner._modules[child_name] = frozen_linear(tensors[key + ".weight"], tensors.get(key + ".bias"))
    return CompressedDecoderLayer(attn, mlp, RMSN(hidden_size, eps), RMSN(hidden_size, eps),
                                  tensors.get("attn_shortcut"), tensors.get("mlp_shortcut"))


def _encoder(basis: Basis, full: int) -> torch.Tensor | None:
    return None if _is_identity(basis, full) else basis.Q


def _decoder(basis: Basis, full: int) -> torch.Tensor | None:
    return None if _is_identity(basis, full) else basis.decoder


def _prefixed(layout: FamilyLayout, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = layout.layer_prefix(index)
    return {prefix + key: value.contiguous() for key, value in tensors.items()}


#: rows of the embedding matrix or head absorbed at once (bounds the memory of a 128k-token vocabulary)
END_ROWS = 8192


@torch.no_grad()
def per_point_layer_state(layout: FamilyLayout, mods: LayerModules, index: int, b_in: Basis, b_attn: Basis,
                          b_mlp: Basis, hidden_size: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``<layers>.<index>.*`` of the per-point model: fused layer ``index`` between points 2l, 2l+1 and 2l+2."""
    full = hidden_size
    tensors = absorb_layer(mods, _decoder(b_in, full), _encoder(b_attn, full), _decoder(b_attn, full),
                           _encoder(b_mlp, full), dtype)
    # per-point layers always carry both shortcuts (identity written out when a point is unsliced)
    dtype = dtype or mods.attention_output.weight.dtype
    tensors.setdefault("attn_shortcut", torch.eye(full, dtype=dtype))
    tensors.setdefault("mlp_shortcut", torch.eye(full, dtype=dtype))
    return _prefixed(layout, index, tensors)


@dataclass(frozen=True)
class TensorChunks:
    """A tensor of the compressed model produced a block of rows at a time (the embedding matrix and head of a
    128k-token vocabulary never need to be whole in memory): ``chunks()`` yields its rows in order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterator[torch.Tensor]]

    def materialise(self) -> torch.Tensor:
        return torch.cat([c.cpu() for c in self.chunks()]).contiguous()


def _row_chunks(fetch, total: int, transform, rows: int = END_ROWS):
    def chunks():
        for start in range(0, total, rows):
            yield transform(fetch(start, min(start + rows, total))).contiguous()
    return chunks


def embeddings_chunks(model, Q: torch.Tensor | None, dtype: torch.dtype) -> TensorChunks:
    """The embedding matrix rotated by the first point's encoder."""
    width = model.hidden_size if Q is None else Q.shape[1]
    return TensorChunks(model.layout.weight(model.layout.embeddings), (model.vocab_size, width), dtype,
                        _row_chunks(model.embedding_rows, model.vocab_size, lambda w: _produce(w.T, Q, dtype).T))


def head_chunks(model, decoder: torch.Tensor | None, dtype: torch.dtype) -> TensorChunks:
    """The fused head decoding the last point."""
    width = model.hidden_size if decoder is None else decoder.shape[0]
    return TensorChunks(model.layout.weight(model.layout.lm_head), (model.vocab_size, width), dtype,
                        _row_chunks(model.head_rows, model.vocab_size, lambda w: _consume(w, decoder, dtype)))


def _constant(name: str, value: torch.Tensor) -> TensorChunks:
    return TensorChunks(name, tuple(value.shape), value.dtype, lambda: iter([value]))


def _ends_dtype(model, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or model.embedding_rows(0, 1).dtype


def per_point_ends(model, first: Basis, last: Basis, dtype: torch.dtype | None = None) -> list[TensorChunks]:
    """Embeddings (rotated by the first point's basis) and head (decoding the last point) of the per-point model."""
    full, dtype = model.hidden_size, _ends_dtype(model, dtype)
    return [embeddings_chunks(model, _encoder(first, full), dtype), head_chunks(model, _decoder(last, full), dtype)]


def _global_norm_weight(hidden_size: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A stock RMSNorm over d dims with eps·D/d equals RMSN over D times √(d/D): its weight is √(D/d)."""
    return torch.full((width,), math.sqrt(hidden_size / width), dtype=dtype)


@torch.no_grad()
def global_layer_state(layout: FamilyLayout, mods: LayerModules, index: int, basis: Basis, hidden_size: int,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``<layers>.<index>.*`` of the global-layout model (no shortcuts: QᵀQ = I)."""
    Qm, Um = basis.Q, basis.decoder
    tensors = absorb_layer(mods, Um, Qm, Um, Qm, dtype)
    tensors.pop("attn_shortcut", None)
    tensors.pop("mlp_shortcut", None)
    dtype = dtype or mods.attention_output.weight.dtype
    norm = _global_norm_weight(hidden_size, basis.width, dtype)
    tensors[layout.weight(layout.input_norm)] = norm.clone()
    tensors[layout.weight(layout.post_attention_norm)] = norm.clone()
    if basis.width != hidden_size:
        _scale_head_norm_inputs(mods, tensors, Um, math.sqrt(hidden_size / basis.width), dtype)
    return _prefixed(layout, index, tensors)


def _scale_head_norm_inputs(mods: LayerModules, tensors: dict[str, torch.Tensor], decoder: torch.Tensor,
                            scale: float, dtype: torch.dtype) -> None:
    """The linears feeding per-head norms (Qwen3's q_proj / k_proj) times ``scale`` = √(D/d), from the fused
    weights in one float64 product: the global layout's config multiplies every norm's eps by D/d, and an
    RMSNorm of c·x with eps·c² equals that of x with eps."""
    for path in mods.layout.head_norm_inputs:
        linear = mods.layer.get_submodule(path)
        tensors[path + ".weight"] = _consume(linear.weight, decoder * scale, dtype)
        if linear.bias is not None:
            tensors[path + ".bias"] = (_f64(linear.bias) * scale).to(dtype)


def keeps_tied_ends(model, basis: Basis) -> bool:
    """A residual stream left as it is (the MLP axis alone) keeps a tied source's head tied: the final norm keeps
    its weight instead of being folded into the head, which stays the embedding matrix."""
    return bool(model.tied) and _is_identity(basis, model.hidden_size)


def global_ends(model, basis: Basis, dtype: torch.dtype | None = None, keep_tied: bool = False) -> list[TensorChunks]:
    """Embeddings, final norm and head of the global-layout model; ``keep_tied`` (a stock export) and
    :func:`keeps_tied_ends`: no head, the final norm's own weight."""
    dtype = _ends_dtype(model, dtype)
    if keep_tied and keeps_tied_ends(model, basis):
        norm = model.final_norm_weight().to(device="cpu", dtype=dtype)
        return [embeddings_chunks(model, None, dtype), _constant(model.layout.weight(model.layout.final_norm), norm)]
    norm = _global_norm_weight(model.hidden_size, basis.width, dtype)
    return [embeddings_chunks(model, basis.Q, dtype), _constant(model.layout.weight(model.layout.final_norm), norm),
            head_chunks(model, basis.decoder, dtype)]


@torch.no_grad()
def layer_state(model, index: int, layer: nn.Module, bases: list[Basis], layout_name: str,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The compressed tensors of fused layer ``index`` (``bases``: the three per-point bases, or the global one)."""
    mods = model.adapter_cls.modules_of(layer)
    if layout_name == "global":
        return global_layer_state(model.layout, mods, index, bases[0], model.hidden_size, dtype)
    return per_point_layer_state(model.layout, mods, index, *bases, model.hidden_size, dtype)


def ends(model, bases: list[Basis], layout_name: str, dtype: torch.dtype | None = None,
         keep_tied: bool = False) -> list[TensorChunks]:
    """Embeddings and head (and the global layout's final norm), produced in chunks of rows; ``bases``: the first
    and last point's, or the global one; ``keep_tied``: see :func:`global_ends`."""
    if layout_name == "global":
        return global_ends(model, bases[0], dtype, keep_tied)
    return per_point_ends(model, bases[0], bases[-1], dtype)


@torch.no_grad()
def ends_state(model, bases: list[Basis], layout_name: str, dtype: torch.dtype | None = None,
               keep_tied: bool = False) -> dict[str, torch.Tensor]:
    """:func:`ends` materialised (the in-memory API's path)."""
    return {t.name: t.materialise() for t in ends(model, bases, layout_name, dtype, keep_tied)}


@torch.no_grad()
def compressed_state_dict(model, bases: list[Basis], layout_name: str,
                          dtype: torch.dtype | None = None, keep_tied: bool = False) -> dict[str, torch.Tensor]:
    """The whole compressed state dict of a :class:`~dotresize.layerwise.LayeredModel` (one layer at a time)."""
    state = ends_state(model, bases if layout_name == "global" else [bases[0], bases[-1]], layout_name, dtype,
                       keep_tied)
    for index in range(model.num_layers):
        with model.layer(index) as layer:
            layer_bases = bases if layout_name == "global" else bases[2 * index:2 * index + 3]
            state.update(layer_state(model, index, layer, layer_bases, layout_name, dtype))
    return state


def _is_identity(basis: Basis, full: int) -> bool:
    if basis.width != full or basis.U is not None:
        return False
    return bool(torch.equal(basis.Q, torch.eye(full, dtype=basis.Q.dtype, device=basis.Q.device)))
