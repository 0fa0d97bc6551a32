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
from .modeling import compressed_layer

F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64)


#: float64 elements of a weight transformed at once (bounds the temporaries of an 8B layer's MLP to ~64 MB)
BLOCK_ELEMENTS = 1 << 23


def _blockwise(weight: torch.Tensor, matrix: torch.Tensor | None, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
    """``weight @ matrixᵀ`` (``dim`` 0: a block of rows at a time) or ``matrixᵀ @ weight`` (``dim`` 1: a block of
    columns at a time) in float64, each block cast once to ``dtype`` (default: the weight's); no matrix: the
    weight itself."""
    dtype = dtype or weight.dtype
    if matrix is None:
        return weight.to(dtype)
    matrix_t = matrix.to(weight.device).T
    step = max(1, BLOCK_ELEMENTS // max(weight.shape[1 - dim], 1))
    shape = (weight.shape[0], matrix_t.shape[1]) if dim == 0 else (matrix_t.shape[0], weight.shape[1])
    out = torch.empty(shape, dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[dim], step):
        block = _f64(weight.narrow(dim, start, min(step, weight.shape[dim] - start)))
        product = block @ matrix_t if dim == 0 else matrix_t @ block
        out.narrow(dim, start, block.shape[dim]).copy_(product.to(dtype))
    return out


def _consume(weight: torch.Tensor, decoder: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight @ decoderᵀ`` (a consumer's input side), in float64 a block of rows at a time, cast once."""
    return _blockwise(weight, decoder, 0, dtype)


def _produce(weight: torch.Tensor, Q: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Qᵀ @ weight`` (a producer's output side), in float64 a block of columns at a time, cast once."""
    return _blockwise(weight, Q, 1, dtype)


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


def _branch_weight(norm: nn.Module, Q: torch.Tensor | None, offset: float, dtype: torch.dtype) -> torch.Tensor:
    """A :class:`~dotresize.modeling.BranchNorm`'s projection (d x D): ``Qᵀ diag(scale)``, the norm's scale (its
    weight + ``offset``) applied after the weight-free norm over D and before the point's basis."""
    scale = norm.weight.detach().to(F64) + offset
    if Q is None:
        return torch.diag(scale).to(dtype)
    return (Q.to(scale.device).T * scale[None, :]).to(dtype)


@torch.no_grad()
def absorb_layer(mods: LayerModules, decoder_in: torch.Tensor | None, Q_attn: torch.Tensor | None,
                 decoder_attn: torch.Tensor | None, Q_mlp: torch.Tensor | None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The compressed tensors of one fused layer, keyed like :class:`CompressedDecoderLayer`'s state dict.

    A block whose output goes through a norm before the residual add keeps its output linear full width; the
    norm becomes a weight-free norm and a projection to the point's basis (``attn_output_norm`` /
    ``mlp_output_norm``). Products are computed in float64 and cast once to ``dtype`` (default: the layer's own).
    """
    layer, layout = mods.layer, mods.layout
    dtype = dtype or mods.attention_output.weight.dtype
    branch = tuple(path + "." for path in layout.branch_norms)
    out: dict[str, torch.Tensor] = {k: v.to(dtype) if v.is_floating_point() else v
                                    for k, v in layer.state_dict().items() if not k.startswith(branch)}
    for linear in mods.attention_inputs:
        out[_linear_keys(layer, linear) + ".weight"] = _consume(linear.weight, decoder_in, dtype)
    for linear, norm, Q in ((mods.attention_output, mods.attention_output_norm, Q_attn),
                            (mods.mlp_output, mods.mlp_output_norm, Q_mlp)):
        if norm is not None:  # the block's output stays full width; its norm projects
            key = "attn_output_norm" if linear is mods.attention_output else "mlp_output_norm"
            out[key + ".weight"] = _branch_weight(norm, Q, layout.norm_offset, dtype)
            continue
        name = _linear_keys(layer, linear)
        out[name + ".weight"] = _produce(linear.weight, Q, dtype)
        if linear.bias is not None:
            out[name + ".bias"] = _bias(linear.bias, Q, dtype)
    for linear in mods.mlp_inputs:
        out[_linear_keys(layer, linear) + ".weight"] = _consume(linear.weight, decoder_attn, dtype)
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
    """A runnable :class:`CompressedDecoderLayer` from :func:`absorb_layer`'s tensors (holding them, no copy; the
    source layer is left unchanged)."""
    layout = mods.layout
    d_in = tensors[layout.weight(layout.attention_inputs[0])].shape[1]
    d_attn = tensors[layout.weight(layout.mlp_inputs[0])].shape[1]
    d_mlp = tensors["mlp_output_norm.weight" if layout.mlp_output_norm else layout.weight(layout.mlp_output)].shape[0]
    inner = tensors[layout.weight(layout.mlp_output)].shape[1]
    layer = compressed_layer(mods.layer, layout.to_dict(), d_in, d_attn, d_mlp, hidden_size, eps, inner_width=inner,
                             shortcuts=False, device="meta")
    for name in ("attn_shortcut", "mlp_shortcut"):
        if name in tensors:
            setattr(layer, name, nn.Parameter(torch.empty_like(tensors[name], device="meta"), requires_grad=False))
    layer.load_state_dict(tensors, strict=True, assign=True)
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    return layer


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


def embeddings_chunks(model, Q: torch.Tensor | None, dtype: torch.dtype, raw: bool = False) -> TensorChunks:
    """The (fused) embedding matrix rotated by the first point's encoder; ``raw``: as the source stores it."""
    width = model.hidden_size if Q is None else Q.shape[1]
    rows = model.raw_embedding_rows if raw else model.embedding_rows
    return TensorChunks(model.layout.weight(model.layout.embeddings), (model.vocab_size, width), dtype,
                        _row_chunks(rows, model.vocab_size, lambda w: _produce(w.T, Q, dtype).T))


def position_chunks(model, Q: torch.Tensor | None, dtype: torch.dtype) -> list[TensorChunks]:
    """The learned position table (OPT's), rotated like the token embeddings; none for other families."""
    path = model.layout.position_embeddings
    if path is None:
        return []
    width = model.hidden_size if Q is None else Q.shape[1]
    rows = model.position_count
    return [TensorChunks(model.layout.weight(path), (rows, width), dtype,
                         _row_chunks(model.position_rows, rows, lambda w: _produce(w.T, Q, dtype).T))]


def head_chunks(model, decoder: torch.Tensor | None, dtype: torch.dtype) -> list[TensorChunks]:
    """The fused head decoding the last point, and its bias where the final norm had one (LayerNorm families)."""
    width = model.hidden_size if decoder is None else decoder.shape[0]
    out = [TensorChunks(model.layout.weight(model.layout.lm_head), (model.vocab_size, width), dtype,
                        _row_chunks(model.head_rows, model.vocab_size, lambda w: _consume(w, decoder, dtype)))]
    bias = model.head_bias()
    if bias is not None:
        out.append(_constant(model.layout.bias(model.layout.lm_head), bias.to(device="cpu", dtype=dtype)))
    return out


def _constant(name: str, value: torch.Tensor) -> TensorChunks:
    return TensorChunks(name, tuple(value.shape), value.dtype, lambda: iter([value]))


def _ends_dtype(model, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or model.embedding_rows(0, 1).dtype


def per_point_ends(model, first: Basis, last: Basis, dtype: torch.dtype | None = None) -> list[TensorChunks]:
    """Embeddings (rotated by the first point's basis) and head (decoding the last point) of the per-point model."""
    full, dtype = model.hidden_size, _ends_dtype(model, dtype)
    encoder = _encoder(first, full)
    return [embeddings_chunks(model, encoder, dtype), *position_chunks(model, encoder, dtype),
            *head_chunks(model, _decoder(last, full), dtype)]


def _global_norm_weight(hidden_size: int, width: int, dtype: torch.dtype, offset: float = 0.0) -> torch.Tensor:
    """A stock RMSNorm over d dims with eps·D/d equals RMSN over D times √(d/D): its scale is √(D/d) (stored as
    √(D/d) − ``offset`` where the stored weight w means the scale w + offset)."""
    return torch.full((width,), math.sqrt(hidden_size / width) - offset, dtype=dtype)


def _global_norms(layout: FamilyLayout, paths: list[str], hidden_size: int, width: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights (and, for LayerNorms, zero biases) of the stock model's norms before a block or the head."""
    out = {}
    for path in paths:
        out[layout.weight(path)] = _global_norm_weight(hidden_size, width, dtype, layout.norm_offset)
        if layout.layernorm:
            out[layout.bias(path)] = torch.zeros(width, dtype=dtype)
    return out


@torch.no_grad()
def global_layer_state(layout: FamilyLayout, mods: LayerModules, index: int, basis: Basis, hidden_size: int,
                       dtype: torch.dtype | None = None, stock: bool = True) -> dict[str, torch.Tensor]:
    """``<layers>.<index>.*`` of the global-layout model (no shortcuts: QᵀQ = I); ``stock`` false: for the
    per-point class without shortcuts (weight-free norms, branch norms as projections). A family whose stock form
    cannot hold a rotated stream (``ModelAdapter.global_layout_refusal``) gets here only with the identity (the
    MLP axis alone): its norms on block outputs then keep their own weights."""
    Qm, Um = basis.Q, basis.decoder
    tensors = absorb_layer(mods, Um, Qm, Um, Qm, dtype)
    tensors.pop("attn_shortcut", None)
    tensors.pop("mlp_shortcut", None)
    dtype = dtype or mods.attention_output.weight.dtype
    if basis.width != hidden_size:
        _scale_head_norm_inputs(mods, tensors, Um, math.sqrt(hidden_size / basis.width), dtype)
    if not stock:
        return _prefixed(layout, index, tensors)
    tensors.update(_global_norms(layout, [layout.input_norm, layout.post_attention_norm], hidden_size, basis.width,
                                 dtype))
    for key, norm, path in (("attn_output_norm", mods.attention_output_norm, layout.attention_output_norm),
                            ("mlp_output_norm", mods.mlp_output_norm, layout.mlp_output_norm)):
        if norm is None:
            continue
        if not _is_identity(basis, hidden_size):
            raise ValueError(f"{path} normalises a full-width block output: no stock model holds a rotated stream")
        tensors.pop(key + ".weight")
        tensors[layout.weight(path)] = norm.weight.detach().to(dtype)
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
    :func:`keeps_tied_ends`: no head, the final norm's own weight (and bias)."""
    dtype = _ends_dtype(model, dtype)
    layout = model.layout
    if keep_tied and keeps_tied_ends(model, basis):
        norm = {layout.weight(layout.final_norm): model.final_norm_weight()}
        if model.final_norm_bias() is not None:
            norm[layout.bias(layout.final_norm)] = model.final_norm_bias()
        # the head is the embedding matrix: as stored (a LayerNorm family's stock norms remove the stream's mean)
        return [embeddings_chunks(model, None, dtype, raw=True), *position_chunks(model, None, dtype),
                *(_constant(k, v.to(device="cpu", dtype=dtype)) for k, v in norm.items())]
    if keep_tied and model.head_bias() is not None:
        raise ValueError("the stock head has no bias for the final LayerNorm's: an untied LayerNorm source exports "
                         "with the per-point layout")
    if keep_tied and layout.embedding_scale and basis.width != model.hidden_size:
        raise ValueError("the stock model scales its embeddings by its own width: no global layout below it")
    norm = _global_norms(layout, [layout.final_norm], model.hidden_size, basis.width, dtype)
    return [embeddings_chunks(model, basis.Q, dtype), *position_chunks(model, basis.Q, dtype),
            *(_constant(k, v) for k, v in norm.items()), *head_chunks(model, basis.decoder, dtype)]


@torch.no_grad()
def layer_state(model, index: int, layer: nn.Module, bases: list[Basis], layout_name: str,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The compressed tensors of fused layer ``index`` (``bases``: the three per-point bases, or the global one)."""
    mods = model.adapter_cls.modules_of(layer)
    if layout_name == "global":
        widths = getattr(model, "mlp_widths", None)  # non-uniform MLP widths: the per-point class, no shortcuts
        return global_layer_state(model.layout, mods, index, bases[0], model.hidden_size, dtype,
                                  stock=widths is None or len(set(widths)) == 1)
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
