"""Modeling code of width-compressed models with a basis at every residual-stream point.

This file ships inside every exported ``per-point`` model directory (loaded with ``trust_remote_code=True``)
and is registered with the Auto classes by ``import dotresize``. It depends on torch and transformers only.

Structure (SliceGPT's layout): norms are weight-free and divide by the original width D; each decoder layer
carries two residual shortcut matrices, ``attn_shortcut`` (d_in x d_attn) and ``mlp_shortcut``
(d_attn x d_mlp), that move the residual stream between the bases of consecutive points.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_dotresize import (
    DotResizeLlamaConfig,
    DotResizeMistralConfig,
    DotResizePhi3Config,
    DotResizeQwen2Config,
    DotResizeQwen3Config,
)

#: the newest ``dotresize.format_version`` this code builds (2: per-layer intermediate sizes, optional shortcuts)
MAX_FORMAT_VERSION = 2


class RMSN(nn.Module):
    """Weight-free RMS normalisation that divides by ``mean_dim`` (the original width), not the input width."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x32 * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


def _apply_shortcut(x: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
    return x if shortcut is None else x @ shortcut


class CompressedDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose residual stream changes basis through shortcut matrices.

    ``self_attn`` and ``mlp`` are the architecture's own modules (with resized linears), so rotary
    embeddings, GQA, KV caching and attention backends behave exactly as in the source model.
    A shortcut of ``None`` is the identity.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, attn_shortcut: torch.Tensor | None,
                 mlp_shortcut: torch.Tensor | None):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.attn_shortcut = None if attn_shortcut is None else nn.Parameter(attn_shortcut, requires_grad=False)
        self.mlp_shortcut = None if mlp_shortcut is None else nn.Parameter(mlp_shortcut, requires_grad=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        attn_out, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = _apply_shortcut(residual, self.attn_shortcut) + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return _apply_shortcut(hidden_states, self.mlp_shortcut) + mlp_out


def _resized_linear(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A fresh linear of the new shape, same bias-ness, dtype and device as ``linear``."""
    return nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=linear.bias is not None,
        dtype=linear.weight.dtype,
        device=linear.weight.device,
    )


#: module paths of a Llama-like family, as in the adapter's ``FamilyLayout`` (this file ships alone, so it keeps its
#: own copy; tests/test_families.py checks that every adapter agrees with its compressed class)
LLAMA_MODULES = {
    "layers": "model.layers", "embeddings": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head",
    "attention_inputs": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention_output": "self_attn.o_proj", "mlp_inputs": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_output": "mlp.down_proj", "mlp_input_blocks": 1, "head_norms": (),
}
#: Qwen3: per-head RMSNorms on q and k (head_dim wide, after the projections)
QWEN3_MODULES = {**LLAMA_MODULES, "head_norms": ("self_attn.q_norm", "self_attn.k_norm")}
#: Phi-3: fused q/k/v and gate/up projections (gate_up_proj stacks two intermediate-width blocks)
PHI3_MODULES = {**LLAMA_MODULES, "attention_inputs": ("self_attn.qkv_proj",), "mlp_inputs": ("mlp.gate_up_proj",),
                "mlp_input_blocks": 2}


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _resize(root: nn.Module, path: str, **shape) -> None:
    _set(root, path, _resized_linear(root.get_submodule(path), **shape))


def compress_structure(model: nn.Module, widths: list[int], hidden_size: int, eps: float,
                       with_shortcuts: bool = True, intermediate_sizes: list[int] | None = None,
                       modules: dict | None = None) -> None:
    """Reshape a freshly built causal LM in place to the compressed layout for ``widths`` (and, when given, one MLP
    intermediate width per layer); ``modules``: the family's module paths (default :data:`LLAMA_MODULES`).

    Without shortcuts and at a width d < D (the global layout), per-head norms divide by eps·D/d, as the stock
    export's config does: the global layout scales their inputs by √(D/d)."""
    modules = modules or LLAMA_MODULES
    layers = model.get_submodule(modules["layers"])
    num_layers = len(layers)
    if len(widths) != 2 * num_layers + 1:
        raise ValueError(f"expected {2 * num_layers + 1} widths for {num_layers} layers, got {len(widths)}")
    if intermediate_sizes is not None and len(intermediate_sizes) != num_layers:
        raise ValueError(f"expected {num_layers} intermediate sizes, got {len(intermediate_sizes)}")
    if not with_shortcuts and len(set(widths)) != 1:
        raise ValueError("a model without shortcut matrices needs one width at every point")
    emb = model.get_submodule(modules["embeddings"])
    _set(model, modules["embeddings"], nn.Embedding(emb.num_embeddings, widths[0], emb.padding_idx,
                                                    dtype=emb.weight.dtype, device=emb.weight.device))
    attn_path, mlp_path = (modules[k].rpartition(".")[0] for k in ("attention_output", "mlp_output"))
    head_norm_eps = eps * hidden_size / widths[0] if not with_shortcuts and widths[0] != hidden_size else None
    new_layers = []
    for index, layer in enumerate(layers):
        d_in, d_attn, d_mlp = widths[2 * index], widths[2 * index + 1], widths[2 * index + 2]
        for path in modules["attention_inputs"]:
            _resize(layer, path, in_features=d_in)
        _resize(layer, modules["attention_output"], out_features=d_attn)
        inner_width = None if intermediate_sizes is None else int(intermediate_sizes[index])
        blocks = int(modules["mlp_input_blocks"])
        for path in modules["mlp_inputs"]:
            _resize(layer, path, in_features=d_attn, out_features=None if inner_width is None else blocks * inner_width)
        _resize(layer, modules["mlp_output"], in_features=inner_width, out_features=d_mlp)
        attn, mlp = layer.get_submodule(attn_path), layer.get_submodule(mlp_path)
        if inner_width is not None and hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inner_width
        if head_norm_eps is not None:
            for path in modules["head_norms"]:
                layer.get_submodule(path).variance_epsilon = head_norm_eps
        out = layer.get_submodule(modules["attention_output"]).weight
        attn_shortcut = torch.zeros(d_in, d_attn, dtype=out.dtype, device=out.device) if with_shortcuts else None
        mlp_shortcut = torch.zeros(d_attn, d_mlp, dtype=out.dtype, device=out.device) if with_shortcuts else None
        new_layers.append(CompressedDecoderLayer(attn, mlp, RMSN(hidden_size, eps), RMSN(hidden_size, eps),
                                                 attn_shortcut, mlp_shortcut))
    _set(model, modules["layers"], nn.ModuleList(new_layers))
    _set(model, modules["final_norm"], RMSN(hidden_size, eps))
    _resize(model, modules["lm_head"], in_features=widths[-1])


class _DotResizeMixin:
    """Builds the source architecture, then reshapes it to the widths recorded in ``config.dotresize``."""

    dotresize_modules: dict = LLAMA_MODULES
    _tied_weights_keys: dict = {}
    _no_split_modules = ["CompressedDecoderLayer"]

    def _compress(self, config) -> None:
        spec = getattr(config, "dotresize", None) or {}
        if "widths" not in spec:
            raise ValueError("this config has no 'dotresize.widths': it does not describe a compressed model")
        if int(spec.get("format_version", 1)) > MAX_FORMAT_VERSION:
            raise ValueError(f"this model's format {spec['format_version']} is newer than this code reads "
                             f"({MAX_FORMAT_VERSION}): load it with its own modeling code (trust_remote_code=True) "
                             "or a newer dotresize")
        sizes = spec.get("intermediate_sizes")
        compress_structure(self, list(spec["widths"]), int(spec["hidden_size"]), float(config.rms_norm_eps),
                           with_shortcuts=bool(spec.get("shortcuts", True)),
                           intermediate_sizes=None if sizes is None else [int(m) for m in sizes],
                           modules=self.dotresize_modules)

    def get_output_embeddings(self):
        return self.lm_head


class DotResizeLlamaForCausalLM(_DotResizeMixin, LlamaForCausalLM):
    config_class = DotResizeLlamaConfig
    config: DotResizeLlamaConfig
    _can_record_outputs = {"hidden_states": CompressedDecoderLayer}

    def __init__(self, config):
        super().__init__(config)
        self._compress(config)


class DotResizeMistralForCausalLM(_DotResizeMixin, MistralForCausalLM):
    config_class = DotResizeMistralConfig
    config: DotResizeMistralConfig
    _can_record_outputs = {"hidden_states": CompressedDecoderLayer}

    def __init__(self, config):
        super().__init__(config)
        self._compress(config)


class DotResizeQwen2ForCausalLM(_DotResizeMixin, Qwen2ForCausalLM):
    config_class = DotResizeQwen2Config
    config: DotResizeQwen2Config
    _can_record_outputs = {"hidden_states": CompressedDecoderLayer}

    def __init__(self, config):
        super().__init__(config)
        self._compress(config)


class DotResizeQwen3ForCausalLM(_DotResizeMixin, Qwen3ForCausalLM):
    config_class = DotResizeQwen3Config
    config: DotResizeQwen3Config
    dotresize_modules = QWEN3_MODULES
    _can_record_outputs = {"hidden_states": CompressedDecoderLayer}

    def __init__(self, config):
        super().__init__(config)
        self._compress(config)


class DotResizePhi3ForCausalLM(_DotResizeMixin, Phi3ForCausalLM):
    config_class = DotResizePhi3Config
    config: DotResizePhi3Config
    dotresize_modules = PHI3_MODULES
    _can_record_outputs = {"hidden_states": CompressedDecoderLayer}

    def __init__(self, config):
        super().__init__(config)
        self._compress(config)
