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


@torch.no_grad()
def per_point_state_dict(adapter: ModelAdapter, bases: list[Basis]) -> dict[str, torch.Tensor]:
    """The state dict of the compressed per-point model, in the compressed classes' key layout."""
    full = adapter.hidden_size

    def Q(b: Basis):
        return None if _is_identity(b, full) else b.Q

    def U(b: Basis):
        return None if _is_identity(b, full) else b.decoder

    emb = adapter.embeddings().weight
    state = {"model.embed_tokens.weight": _produce(emb.T, Q(bases[0])).T.contiguous()}
    for index in range(adapter.num_layers):
        b_in, b_attn, b_mlp = bases[2 * index], bases[2 * index + 1], bases[2 * index + 2]
        tensors = absorb_layer(adapter.layer_modules(index), U(b_in), Q(b_attn), U(b_attn), Q(b_mlp))
        # per-point layers always carry both shortcuts (identity written out when a point is unsliced)
        dtype = emb.dtype
        tensors.setdefault("attn_shortcut", torch.eye(full, dtype=dtype))
        tensors.setdefault("mlp_shortcut", torch.eye(full, dtype=dtype))
        for key, value in tensors.items():
            state[f"model.layers.{index}.{key}"] = value.contiguous()
    state["lm_head.weight"] = _consume(adapter.lm_head().weight, U(bases[-1])).contiguous()
    return state


@torch.no_grad()
def global_state_dict(adapter: ModelAdapter, basis: Basis) -> dict[str, torch.Tensor]:
    """State dict of a stock model of the source architecture with hidden_size = d (one basis everywhere).

    Shortcuts vanish (QᵀQ = I). A stock RMSNorm over d dims with eps·D/d equals RMSN over D times √(d/D),
    so every norm weight is the constant √(D/d).
    """
    full, width = adapter.hidden_size, basis.width
    Qm, Um = basis.Q, basis.decoder
    dtype = adapter.embeddings().weight.dtype
    norm_weight = torch.full((width,), math.sqrt(full / width), dtype=dtype)
    state = {"model.embed_tokens.weight": _produce(adapter.embeddings().weight.T, Qm).T.contiguous()}
    for index in range(adapter.num_layers):
        tensors = absorb_layer(adapter.layer_modules(index), Um, Qm, Um, Qm)
        tensors.pop("attn_shortcut", None)
        tensors.pop("mlp_shortcut", None)
        tensors["input_layernorm.weight"] = norm_weight.clone()
        tensors["post_attention_layernorm.weight"] = norm_weight.clone()
        for key, value in tensors.items():
            state[f"model.layers.{index}.{key}"] = value.contiguous()
    state["model.norm.weight"] = norm_weight.clone()
    state["lm_head.weight"] = _consume(adapter.lm_head().weight, Um).contiguous()
    return state


def _is_identity(basis: Basis, full: int) -> bool:
    if basis.width != full or basis.U is not None:
        return False
    return bool(torch.equal(basis.Q, torch.eye(full, dtype=basis.Q.dtype, device=basis.Q.device)))
