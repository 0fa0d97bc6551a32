"""Modeling code of width-compressed models with a basis at every residual-stream point.

This file ships inside every exported ``per-point`` model directory (loaded with ``trust_remote_code=True``)
and is registered with the Auto classes by ``import dotresize``. It depends on torch and transformers only.

Structure (SliceGPT's layout): norms are weight-free and divide by the original width D; each decoder layer
carries two residual shortcut matrices, ``attn_shortcut`` (d_in x d_attn) and ``mlp_shortcut``
(d_attn x d_mlp), that move the residual stream between the bases of consecutive points. A norm on a branch's
output before it joins the stream (Gemma 3's post-attention / post-feed-forward norms) is a :class:`BranchNorm`:
the branch output stays full width through the weight-free norm over D and is projected to the point's width
after it.

Nothing here is written per family: the compressed config records the source family's layout (module paths,
norm kind, branch norms; ``config.dotresize["layout"]``), and ``DotResize<Source>ForCausalLM`` is made on first
use from transformers' own ``<Source>ForCausalLM``: its modules are built as the source builds them, then
reshaped from the layout (:func:`compress_structure`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .configuration_dotresize import MODEL_TYPE_PREFIX, compressed_config_class, made_once, resolve_compressed

#: the newest ``dotresize.format_version`` this code builds (2: per-layer intermediate sizes, optional shortcuts;
#: 3: the family's layout and norm eps recorded in the config)
MAX_FORMAT_VERSION = 3

#: a Llama-like family's layout (the defaults of every key a recorded layout may leave out)
LLAMA_LAYOUT = {
    "layers": "model.layers", "embeddings": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head",
    "position_embeddings": None, "norm": "rms", "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "attention_output_norm": None, "mlp_output_norm": None,
    "attention_inputs": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention_output": "self_attn.o_proj", "mlp_inputs": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_output": "mlp.down_proj", "mlp_input_blocks": 1, "mlp_activation": None, "head_norms": (),
}

#: layouts of configs written before format 3 (which record none), by source model type: ``import dotresize``
#: fills it from its adapters (such an export's own shipped code needs none)
DEFAULT_LAYOUTS: dict[str, dict] = {}


def _rms(x: torch.Tensor, mean_dim: int, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).sum(-1, keepdim=True) / mean_dim
    return (x32 * torch.rsqrt(variance + eps)).to(dtype)


class RMSN(nn.Module):
    """Weight-free RMS normalisation that divides by ``mean_dim`` (the original width), not the input width."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.mean_dim, self.eps)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class BranchNorm(nn.Module):
    """A norm on a full-width branch output (D wide) before the residual add, then its projection to the point's
    width: ``RMSN_D(x) @ weightᵀ``, ``weight`` (d x D) = ``Qᵀ diag(scale)`` (the norm's scale folded in)."""

    def __init__(self, mean_dim: int, eps: float, out_features: int, dtype=None, device=None):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(out_features, mean_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(_rms(x, self.mean_dim, self.eps), self.weight)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, out_features={self.weight.shape[0]}, eps={self.eps}"


def _apply_shortcut(x: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
    return x if shortcut is None else x @ shortcut


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


class CompressedDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose residual stream changes basis through shortcut matrices.

    Its children are the source layer's own (attention, MLP; their linears resized), so rotary embeddings, GQA,
    per-head norms, KV caching and attention backends behave exactly as in the source model; the source's norms
    are replaced by :class:`RMSN` (before a block) and :class:`BranchNorm` (on a block's output). An MLP that is not
    a module of its own (OPT's ``fc1``, ``activation_fn``, ``fc2`` on the layer) runs as that chain. A shortcut of
    ``None`` is the identity.
    """

    def __init__(self, children: dict[str, nn.Module], layout: dict, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, attn_shortcut: torch.Tensor | None = None,
                 mlp_shortcut: torch.Tensor | None = None, attn_output_norm: nn.Module | None = None,
                 mlp_output_norm: nn.Module | None = None):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.attn_output_norm = attn_output_norm
        self.mlp_output_norm = mlp_output_norm
        self.register_parameter("attn_shortcut", None if attn_shortcut is None
                                else nn.Parameter(attn_shortcut, requires_grad=False))
        self.register_parameter("mlp_shortcut", None if mlp_shortcut is None
                                else nn.Parameter(mlp_shortcut, requires_grad=False))
        self.attention_path = _parent(layout["attention_output"])
        self.mlp_path = _parent(layout["mlp_output"])
        self.mlp_chain = (layout["mlp_inputs"][0], layout["mlp_activation"], layout["mlp_output"])

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_path:
            return self.get_submodule(self.mlp_path)(x)
        first, activation, last = (self.get_submodule(p) for p in self.mlp_chain)
        return last(activation(first(x)))

    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        attn_out = self.get_submodule(self.attention_path)(hidden_states=self.input_layernorm(hidden_states),
                                                           **kwargs)[0]
        if self.attn_output_norm is not None:
            attn_out = self.attn_output_norm(attn_out)
        hidden_states = _apply_shortcut(residual, self.attn_shortcut) + attn_out
        mlp_out = self._mlp(self.post_attention_layernorm(hidden_states))
        if self.mlp_output_norm is not None:
            mlp_out = self.mlp_output_norm(mlp_out)
        return _apply_shortcut(hidden_states, self.mlp_shortcut) + mlp_out


def _resized_linear(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None,
                    bias: bool | None = None, device=None) -> nn.Linear:
    """A fresh linear of the new shape, same bias-ness (unless ``bias``), dtype and device (unless ``device``)."""
    return nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=(linear.bias is not None) if bias is None else bias,
        dtype=linear.weight.dtype,
        device=linear.weight.device if device is None else device,
    )


def _copy_module(module: nn.Module) -> nn.Module:
    """A copy with its own parameter, buffer, child and hook tables (sharing the tensors and other attributes)."""
    new = copy.copy(module)
    for name, value in vars(module).items():
        if name in ("_parameters", "_buffers", "_modules") or ("hook" in name and isinstance(value, dict)):
            setattr(new, name, type(value)(value))
    return new


def _rebuilt(module: nn.Module, path: str, shapes: dict[str, dict], device) -> nn.Module:
    """A structural copy of ``module`` (at ``path`` in its layer) with the linears named in ``shapes`` replaced
    by fresh ones of the new shapes; ``shapes`` loses the entries it used."""
    if path in shapes:
        return _resized_linear(module, **shapes.pop(path), device=device)
    new = _copy_module(module)
    for name, child in module.named_children():
        new._modules[name] = _rebuilt(child, f"{path}.{name}", shapes, device)
    return new


def layout_of(spec: dict | None) -> dict:
    """A recorded layout with every key a Llama-like family would have."""
    return {**LLAMA_LAYOUT, **(spec or {})}


def compressed_layer(layer: nn.Module, layout: dict, d_in: int, d_attn: int, d_mlp: int, hidden_size: int,
                     eps: float, *, inner_width: int | None = None, shortcuts: bool = True,
                     head_norm_eps: float | None = None, device=None) -> CompressedDecoderLayer:
    """The compressed form of decoder ``layer`` for the widths of its three points, with fresh (uninitialised)
    resized linears, branch norms and shortcuts (on ``device``, default where the layer is); ``layer`` itself is
    left unchanged (every other module is copied, sharing its tensors)."""
    layout = layout_of(layout)
    norms = [layout[k] for k in ("input_norm", "post_attention_norm", "attention_output_norm", "mlp_output_norm")]
    shapes: dict[str, dict] = {path: {"in_features": d_in} for path in layout["attention_inputs"]}
    shapes[layout["attention_output"]] = {} if layout["attention_output_norm"] else {"out_features": d_attn}
    inner = {} if inner_width is None else {"out_features": int(layout["mlp_input_blocks"]) * inner_width}
    for path in layout["mlp_inputs"]:
        shapes[path] = {"in_features": d_attn, **inner}
    shapes[layout["mlp_output"]] = {**({} if inner_width is None else {"in_features": inner_width}),
                                    **({} if layout["mlp_output_norm"] else {"out_features": d_mlp})}
    children = {name: _rebuilt(child, name, shapes, device) for name, child in layer.named_children()
                if name not in norms}
    if shapes:
        raise ValueError(f"the layout names linears this layer does not have: {sorted(shapes)}")
    out = layer.get_submodule(layout["attention_output"]).weight
    dtype, device = out.dtype, out.device if device is None else device
    new = CompressedDecoderLayer(
        children, layout, RMSN(hidden_size, eps), RMSN(hidden_size, eps),
        torch.zeros(d_in, d_attn, dtype=dtype, device=device) if shortcuts else None,
        torch.zeros(d_attn, d_mlp, dtype=dtype, device=device) if shortcuts else None,
        BranchNorm(hidden_size, eps, d_attn, dtype, device) if layout["attention_output_norm"] else None,
        BranchNorm(hidden_size, eps, d_mlp, dtype, device) if layout["mlp_output_norm"] else None)
    mlp_path = _parent(layout["mlp_output"])
    mlp = new.get_submodule(mlp_path) if mlp_path else None
    if inner_width is not None and mlp is not None and hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inner_width
    if head_norm_eps is not None:
        for path in layout["head_norms"]:
            norm = new.get_submodule(path)
            for name in ("variance_epsilon", "eps"):
                if hasattr(norm, name):
                    setattr(norm, name, head_norm_eps)
    for name in ("layer_idx", "attention_type"):
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    return new


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _resize_embedding(root: nn.Module, path: str, width: int) -> None:
    """The embedding at ``path`` with ``width`` columns, same class (a scaled or offset embedding stays one)."""
    emb = root.get_submodule(path)
    new = _copy_module(emb)
    new.weight = nn.Parameter(torch.empty(emb.weight.shape[0], width, dtype=emb.weight.dtype,
                                          device=emb.weight.device))
    new.embedding_dim = width
    _set(root, path, new)


def compress_structure(model: nn.Module, widths: list[int], hidden_size: int, eps: float,
                       with_shortcuts: bool = True, intermediate_sizes: list[int] | None = None,
                       modules: dict | None = None) -> None:
    """Reshape a freshly built causal LM in place to the compressed layout for ``widths`` (and, when given, one MLP
    intermediate width per layer); ``modules``: the family's layout (default :data:`LLAMA_LAYOUT`).

    Without shortcuts and at a width d < D (the global layout), per-head norms divide by eps·D/d, as the stock
    export's config does: the global layout scales their inputs by √(D/d). A LayerNorm family's head has a bias
    (the final norm's bias, folded into it)."""
    layout = layout_of(modules)
    layers = model.get_submodule(layout["layers"])
    num_layers = len(layers)
    if len(widths) != 2 * num_layers + 1:
        raise ValueError(f"expected {2 * num_layers + 1} widths for {num_layers} layers, got {len(widths)}")
    if intermediate_sizes is not None and len(intermediate_sizes) != num_layers:
        raise ValueError(f"expected {num_layers} intermediate sizes, got {len(intermediate_sizes)}")
    if not with_shortcuts and len(set(widths)) != 1:
        raise ValueError("a model without shortcut matrices needs one width at every point")
    _resize_embedding(model, layout["embeddings"], widths[0])
    if layout["position_embeddings"]:
        _resize_embedding(model, layout["position_embeddings"], widths[0])
    head_norm_eps = eps * hidden_size / widths[0] if not with_shortcuts and widths[0] != hidden_size else None
    new_layers = []
    for index, layer in enumerate(layers):
        inner = None if intermediate_sizes is None else int(intermediate_sizes[index])
        new_layers.append(compressed_layer(layer, layout, *widths[2 * index:2 * index + 3], hidden_size, eps,
                                           inner_width=inner, shortcuts=with_shortcuts, head_norm_eps=head_norm_eps))
    _set(model, layout["layers"], nn.ModuleList(new_layers))
    _set(model, layout["final_norm"], RMSN(hidden_size, eps))
    head = model.get_submodule(layout["lm_head"])
    _set(model, layout["lm_head"], _resized_linear(head, in_features=widths[-1],
                                                   bias=head.bias is not None or layout["norm"] == "layernorm"))


class _DotResizeMixin:
    """Builds the source architecture, then reshapes it to the widths recorded in ``config.dotresize``."""

    _tied_weights_keys: dict = {}
    _no_split_modules = ["CompressedDecoderLayer"]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._compress(config)

    def _compress(self, config) -> None:
        spec = getattr(config, "dotresize", None) or {}
        if "widths" not in spec:
            raise ValueError("this config has no 'dotresize.widths': it does not describe a compressed model")
        if int(spec.get("format_version", 1)) > MAX_FORMAT_VERSION:
            raise ValueError(f"this model's format {spec['format_version']} is newer than this code reads "
                             f"({MAX_FORMAT_VERSION}): load it with its own modeling code (trust_remote_code=True) "
                             "or a newer dotresize")
        source_type = str(config.model_type).removeprefix(MODEL_TYPE_PREFIX)
        layout = spec.get("layout") or DEFAULT_LAYOUTS.get(source_type)
        if layout is None:
            raise ValueError(f"this config records no module layout (format {spec.get('format_version', 1)}) and "
                             f"none is known for {source_type!r}: load it with its own modeling code "
                             "(trust_remote_code=True)")
        sizes = spec.get("intermediate_sizes")
        self._dotresize_layout = layout_of(layout)
        eps = float(spec["norm_eps"]) if "norm_eps" in spec else float(config.rms_norm_eps)
        compress_structure(self, list(spec["widths"]), int(spec["hidden_size"]), eps,
                           with_shortcuts=bool(spec.get("shortcuts", True)),
                           intermediate_sizes=None if sizes is None else [int(m) for m in sizes],
                           modules=self._dotresize_layout)

    def get_output_embeddings(self):
        layout = getattr(self, "_dotresize_layout", None)
        return super().get_output_embeddings() if layout is None else self.get_submodule(layout["lm_head"])


_MODEL_CLASSES: dict[str, type] = {}


def compressed_model_class(base: type) -> type:
    """``DotResize<Base>``: transformers' causal LM class ``base`` reshaped to the recorded widths and layout."""
    records = {**(getattr(base, "_can_record_outputs", None) or {}), "hidden_states": CompressedDecoderLayer}
    return made_once(_MODEL_CLASSES, base, (_DotResizeMixin, base),
                     {"config_class": compressed_config_class(base.config_class), "_can_record_outputs": records},
                     __name__, f"{base.__name__} with a compressed residual stream (see this module's docstring).")


def __getattr__(name: str):
    """``DotResizeXForCausalLM`` for any transformers class ``XForCausalLM`` (what ``auto_map`` names)."""
    return resolve_compressed(__name__, name, "ForCausalLM", compressed_model_class)
