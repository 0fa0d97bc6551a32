"""Absorb per-point bases into the weights of a fused model (method.md §2.7).

Conventions: HF weights are ``[out, in]``; a producer of point p (embeddings, o_proj, down_proj) is rotated on
its output side by ``Q_p`` (D x d_p); a consumer (q/k/v, gate/up, lm_head) on its input side by the decoder
``U_p`` (d_p x D; ``Q_pᵀ`` for the pseudo-inverse). ``None`` stands for the identity (an unsliced point).
All products are computed in float64 and cast back to the model dtype once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import LayerModules, ModelAdapter
from .bases import Basis
from .modeling import RMSN, CompressedDecoderLayer

F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64)


def _consume(weight: torch.Tensor, decoder: torch.Tensor | None) -> torch.Tensor:
    return weight if decoder is None else (_f64(weight) @ decoder.T).to(weight.dtype)


def _produce(weight: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    return weight if Q is None else (Q.T @ _f64(weight)).to(weight.dtype)


def _shortcut(decoder_in: torch.Tensor | None, Q_out: torch.Tensor | None, dtype: torch.dtype):
    if decoder_in is None and Q_out is None:
        return None
    if decoder_in is None:
        return Q_out.to(dtype)
    if Q_out is None:
        return decoder_in.to(dtype)
    return (decoder_in @ Q_out).to(dtype)


def _linear_keys(layer: nn.Module, linear: nn.Linear) -> str:
    for name, module in layer.named_modules():
        if module is linear:
            return name
    raise KeyError("linear not found in its layer")


@torch.no_grad()
def absorb_layer(mods: LayerModules, decoder_in: torch.Tensor | None, Q_attn: torch.Tensor | None,
                 decoder_attn: torch.Tensor | None, Q_mlp: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The compressed tensors of one fused layer, keyed like :class:`CompressedDecoderLayer`'s state dict."""
    layer = mods.layer
    out: dict[str, torch.Tensor] = {k: v for k, v in layer.state_dict().items()}
    for linear in mods.attention_inputs:
        out[_linear_keys(layer, linear) + ".weight"] = _consume(linear.weight, decoder_in)
    name = _linear_keys(layer, mods.attention_output)
    out[name + ".weight"] = _produce(mods.attention_output.weight, Q_attn)
    if mods.attention_output.bias is not None and Q_attn is not None:
        out[name + ".bias"] = (Q_attn.T @ _f64(mods.attention_output.bias)).to(mods.attention_output.bias.dtype)
    for linear in mods.mlp_inputs:
        out[_linear_keys(layer, linear) + ".weight"] = _consume(linear.weight, decoder_attn)
    name = _linear_keys(layer, mods.mlp_output)
    out[name + ".weight"] = _produce(mods.mlp_output.weight, Q_mlp)
    if mods.mlp_output.bias is not None and Q_mlp is not None:
        out[name + ".bias"] = (Q_mlp.T @ _f64(mods.mlp_output.bias)).to(mods.mlp_output.bias.dtype)
    dtype = mods.attention_output.weight.dtype
    attn_shortcut = _shortcut(decoder_in, Q_attn, dtype)
    mlp_shortcut = _shortcut(decoder_attn, Q_mlp, dtype)
    if attn_shortcut is not None:
        out["attn_shortcut"] = attn_shortcut
    if mlp_shortcut is not None:
        out["mlp_shortcut"] = mlp_shortcut
    return out


def _resized(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
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

    attn = copy.copy(mods.layer.self_attn)
    mlp = copy.copy(mods.layer.mlp)
    attn._modules = dict(attn._modules)
    mlp._modules = dict(mlp._modules)
    for owner, prefix in ((attn, "self_attn"), (mlp, "mlp")):
        for child_name, child in list(owner._modules.items()):
            if isinstance(child, nn.Linear):
                key = f"{prefix}.{child_name}"
                owner._modules[child_name] = _resized(child, tensors[key + ".weight"], tensors.get(key + ".bias"))
    return CompressedDecoderLayer(attn, mlp, RMSN(hidden_size, eps), RMSN(hidden_size, eps),
                                  tensors.get("attn_shortcut"), tensors.get("mlp_shortcut"))


def point_index(layer: int, where: str) -> int:
    """Slice-point number: 0 = embeddings; 2l+1 after attention of layer l; 2l+2 after its MLP."""
    return 2 * layer + (1 if where == "attn" else 2)


def _encoder(basis: Basis, full: int) -> torch.Tensor | None:
    return None if _is_identity(basis, full) else basis.Q


def _decoder(basis: Basis, full: int) -> torch.Tensor | None:
    return None if _is_identity(basis, full) else basis.decoder


def _prefixed(index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.layers.{index}.{key}": value.contiguous() for key, value in tensors.items()}


@torch.no_grad()
def per_point_layer_state(adapter: ModelAdapter, index: int, b_in: Basis, b_attn: Basis,
                          b_mlp: Basis) -> dict[str, torch.Tensor]:
    """``model.layers.<index>.*`` of the per-point model: layer ``index`` between points 2l, 2l+1 and 2l+2."""
    full = adapter.hidden_size
    tensors = absorb_layer(adapter.layer_modules(index), _decoder(b_in, full), _encoder(b_attn, full),
                           _decoder(b_attn, full), _encoder(b_mlp, full))
    # per-point layers always carry both shortcuts (identity written out when a point is unsliced)
    dtype = adapter.embeddings().weight.dtype
    tensors.setdefault("attn_shortcut", torch.eye(full, dtype=dtype))
    tensors.setdefault("mlp_shortcut", torch.eye(full, dtype=dtype))
    return _prefixed(index, tensors)


@torch.no_grad()
def per_point_ends_state(adapter: ModelAdapter, first: Basis, last: Basis) -> dict[str, torch.Tensor]:
    """Embeddings (rotated by the first point's basis) and head (decoding the last point) of the per-point model."""
    full = adapter.hidden_size
    emb = adapter.embeddings().weight
    return {
        "model.embed_tokens.weight": _produce(emb.T, _encoder(first, full)).T.contiguous(),
        "lm_head.weight": _consume(adapter.lm_head().weight, _decoder(last, full)).contiguous(),
    }


@torch.no_grad()
def per_point_state_dict(adapter: ModelAdapter, bases: list[Basis]) -> dict[str, torch.Tensor]:
    """The state dict of the compressed per-point model, in the compressed classes' key layout."""
    state = per_point_ends_state(adapter, bases[0], bases[-1])
    for index in range(adapter.num_layers):
        state.update(per_point_layer_state(adapter, index, *bases[2 * index:2 * index + 3]))
    return state


def _global_norm_weight(adapter: ModelAdapter, width: int) -> torch.Tensor:
    """A stock RMSNorm over d dims with eps·D/d equals RMSN over D times √(d/D): its weight is √(D/d)."""
    return torch.full((width,), math.sqrt(adapter.hidden_size / width), dtype=adapter.embeddings().weight.dtype)


@torch.no_grad()
def global_layer_state(adapter: ModelAdapter, index: int, basis: Basis) -> dict[str, torch.Tensor]:
    """``model.layers.<index>.*`` of the global-layout model (no shortcuts: QᵀQ = I)."""
    Qm, Um = basis.Q, basis.decoder
    tensors = absorb_layer(adapter.layer_modules(index), Um, Qm, Um, Qm)
    tensors.pop("attn_shortcut", None)
    tensors.pop("mlp_shortcut", None)
    norm = _global_norm_weight(adapter, basis.width)
    tensors["input_layernorm.weight"] = norm.clone()
    tensors["post_attention_layernorm.weight"] = norm.clone()
    return _prefixed(index, tensors)


@torch.no_grad()
def global_ends_state(adapter: ModelAdapter, basis: Basis) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and head of the global-layout model."""
    return {
        "model.embed_tokens.weight": _produce(adapter.embeddings().weight.T, basis.Q).T.contiguous(),
        "model.norm.weight": _global_norm_weight(adapter, basis.width),
        "lm_head.weight": _consume(adapter.lm_head().weight, basis.decoder).contiguous(),
    }


@torch.no_grad()
def global_state_dict(adapter: ModelAdapter, basis: Basis) -> dict[str, torch.Tensor]:
    """State dict of a stock model of the source architecture with hidden_size = d (one basis everywhere).

    Shortcuts vanish (QᵀQ = I); every norm weight is the constant √(D/d) (see :func:`_global_norm_weight`).
    """
    state = global_ends_state(adapter, basis)
    for index in range(adapter.num_layers):
        state.update(global_layer_state(adapter, index, basis))
    return state


def _is_identity(basis: Basis, full: int) -> bool:
    if basis.width != full or basis.U is not None:
        return False
    return bool(torch.equal(basis.Q, torch.eye(full, dtype=basis.Q.dtype, device=basis.Q.device)))
