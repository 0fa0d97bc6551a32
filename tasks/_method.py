"""Pieces of dotresize's in-memory functions, split so that a pipeline can run them stage by stage.

Nothing here is new math: every function is a slice of ``dotresize.surgery.per_point_state_dict`` /
``global_state_dict``, ``dotresize.api.build_compressed_model`` or ``dotresize.calibration.sequential_bases``,
calling the same dotresize helpers in the same way so that the pipeline's result is bitwise the in-memory one.
They belong in dotresize (see the report accompanying this module: proposed public helpers
``layer_state`` / ``ends_state`` in surgery, ``build_compressed_model(..., state=)`` in api and
``sequential_layer`` in calibration); until then they live here, importing the private helpers they need.
"""

from __future__ import annotations

import copy
import math

import torch
from accelerate import init_empty_weights

from dotresize.adapters import ModelAdapter
from dotresize.api import compressed_config
from dotresize.bases import Basis
from dotresize.calibration import _hidden_from, _rebase, build_layer
from dotresize.surgery import _consume, _is_identity, _produce, absorb_layer


# --- absorption, one layer at a time (per_point_state_dict / global_state_dict split by layer) ------------------
def _Q(basis: Basis, full: int):
    return None if _is_identity(basis, full) else basis.Q


def _U(basis: Basis, full: int):
    return None if _is_identity(basis, full) else basis.decoder


@torch.no_grad()
def per_point_layer_state(adapter: ModelAdapter, index: int, b_in: Basis, b_attn: Basis,
                          b_mlp: Basis) -> dict[str, torch.Tensor]:
    """``model.layers.<index>.*`` of :func:`dotresize.surgery.per_point_state_dict`."""
    full = adapter.hidden_size
    tensors = absorb_layer(adapter.layer_modules(index), _U(b_in, full), _Q(b_attn, full), _U(b_attn, full),
                           _Q(b_mlp, full))
    dtype = adapter.embeddings().weight.dtype
    tensors.setdefault("attn_shortcut", torch.eye(full, dtype=dtype))
    tensors.setdefault("mlp_shortcut", torch.eye(full, dtype=dtype))
    return {f"model.layers.{index}.{key}": value.contiguous() for key, value in tensors.items()}


@torch.no_grad()
def per_point_ends_state(adapter: ModelAdapter, first: Basis, last: Basis) -> dict[str, torch.Tensor]:
    """Embeddings and head of :func:`dotresize.surgery.per_point_state_dict`."""
    full = adapter.hidden_size
    emb = adapter.embeddings().weight
    return {
        "model.embed_tokens.weight": _produce(emb.T, _Q(first, full)).T.contiguous(),
        "lm_head.weight": _consume(adapter.lm_head().weight, _U(last, full)).contiguous(),
    }


def _global_norm(adapter: ModelAdapter, width: int) -> torch.Tensor:
    return torch.full((width,), math.sqrt(adapter.hidden_size / width), dtype=adapter.embeddings().weight.dtype)


@torch.no_grad()
def global_layer_state(adapter: ModelAdapter, index: int, basis: Basis) -> dict[str, torch.Tensor]:
    """``model.layers.<index>.*`` of :func:`dotresize.surgery.global_state_dict`."""
    Qm, Um = basis.Q, basis.decoder
    tensors = absorb_layer(adapter.layer_modules(index), Um, Qm, Um, Qm)
    tensors.pop("attn_shortcut", None)
    tensors.pop("mlp_shortcut", None)
    norm = _global_norm(adapter, basis.width)
    tensors["input_layernorm.weight"] = norm.clone()
    tensors["post_attention_layernorm.weight"] = norm.clone()
    return {f"model.layers.{index}.{key}": value.contiguous() for key, value in tensors.items()}


@torch.no_grad()
def global_ends_state(adapter: ModelAdapter, basis: Basis) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and head of :func:`dotresize.surgery.global_state_dict`."""
    return {
        "model.embed_tokens.weight": _produce(adapter.embeddings().weight.T, basis.Q).T.contiguous(),
        "model.norm.weight": _global_norm(adapter, basis.width).clone(),
        "lm_head.weight": _consume(adapter.lm_head().weight, basis.decoder).contiguous(),
    }


def assemble_model(adapter: ModelAdapter, widths: list[int], layout: str, state: dict[str, torch.Tensor]):
    """:func:`dotresize.api.build_compressed_model` from an already absorbed state dict."""
    config = compressed_config(adapter, widths, layout)
    config._attn_implementation = adapter.config._attn_implementation
    model_cls = type(adapter.model) if layout == "global" else adapter.compressed_model_class
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = copy.deepcopy(adapter.model.generation_config)
    model.eval()
    return model


# --- sequential calibration, one point at a time (the loop body of sequential_bases) ----------------------------
def sequential_layer(adapter: ModelAdapter, index: int, b_in: Basis, b_attn: Basis | None = None):
    """Layer ``index`` as ``sequential_bases`` runs it: input compressed by ``b_in`` and, for the second pass,
    attention output and MLP input compressed by ``b_attn``."""
    mods = adapter.layer_modules(index)
    if b_attn is None:
        tensors = absorb_layer(mods, b_in.decoder, None, None, None)
    else:
        tensors = absorb_layer(mods, b_in.decoder, b_attn.Q, b_attn.decoder, None)
    return build_layer(mods, tensors, adapter.hidden_size, adapter.rms_norm_eps)


def rebase(x: torch.Tensor, basis: Basis) -> torch.Tensor:
    """A signal expressed in a point's compressed basis, as ``sequential_bases`` feeds it to the next layer."""
    return _rebase(x, basis.Q)


@torch.no_grad()
def post_attention_signal(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The residual after attention (the input of the second norm) of one batch."""
    captured: list[torch.Tensor] = []
    handle = layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, args, kw: captured.append(_hidden_from(args, kw).detach()), with_kwargs=True)
    try:
        layer(x, **kwargs)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def layer_output(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return layer(x, **kwargs)
