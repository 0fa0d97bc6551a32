"""What an adapter declares: where a family keeps its norms, linears, embeddings and head.

The names are data (:class:`FamilyLayout`): module paths inside the causal LM and inside one decoder layer, the
norm kind and where the norms sit. Everything that walks a model — fusion, capture, absorption, the layer-streamed
loader reading a checkpoint tensor by tensor, the MLP axis — asks the layout, and the compressed config records it,
so the shipped modeling code builds any family from it (:mod:`dotresize.modeling` has no entry per family). Adapters
are found by scanning this package: a Llama-like family is one adapter file (its model classes and a tiny config)
plus its line in the tests' ``FAMILY_CONFIGS``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..modeling import compressed_config_class, compressed_model_class

#: the shape every family's tiny test config shares (3 layers of width 64, 4 query and 2 key/value heads)
TINY_SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)

#: the values of :attr:`FamilyLayout.embedding_scale`: the factor the model multiplies its embedding rows by
EMBEDDING_SCALES = {None: lambda config: 1.0,
                    "sqrt_hidden_size": lambda config: math.sqrt(int(config.hidden_size))}


@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of a pre-norm decoder LM (dotted, as in ``named_modules`` / state-dict keys) and its norms.

    ``layers`` is the ModuleList of decoder layers in the causal LM; the other model-level paths are the
    embeddings, the final norm and the head; the layer-level paths are relative to one decoder layer.

    A fused projection is one linear in ``attention_inputs`` / ``mlp_inputs`` (Phi-3's ``qkv_proj``,
    ``gate_up_proj``): the residual stream only touches its input side, so it needs nothing more, except on the
    MLP axis, where ``mlp_input_blocks`` says how many intermediate-width blocks each MLP input linear stacks along
    its outputs (gate then up: 2). ``head_norm_inputs`` are the linears whose outputs an RMSNorm with the config's
    eps normalises per head (Qwen3's q_proj / k_proj before ``head_norms`` q_norm / k_norm): the global layout
    scales them by √(D/d), which makes the stock config's eps·D/d leave those norms exact.

    Beyond Llama's shape: ``norm`` is ``"rms"`` or ``"layernorm"`` (mean subtraction and a bias: fusion makes the
    residual stream mean-free and folds the bias into the next linears' biases, SliceGPT's way); ``norm_offset`` is
    added to a stored norm weight to give its scale (Gemma stores w for 1 + w); ``norm_eps`` is the config key of
    the norms' eps, or the eps itself; ``position_embeddings`` is a learned position table added to the token
    embeddings (``position_offset``: the row of position 0); ``embedding_scale`` a factor the model applies to its
    embedding rows (one of :data:`EMBEDDING_SCALES`); ``attention_output_norm`` / ``mlp_output_norm`` are norms on
    a block's output before the residual add (Gemma 3); ``mlp_activation`` names the activation module when the MLP
    is a chain on the layer itself (OPT's fc1 → activation_fn → fc2); ``intermediate_size`` is the config key of
    the MLP width.
    """

    layers: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    position_embeddings: str | None = None
    position_offset: int = 0
    embedding_scale: str | None = None
    norm: str = "rms"
    norm_offset: float = 0.0
    norm_eps: str | float = "rms_norm_eps"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    attention_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_output: str = "self_attn.o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    mlp_input_blocks: int = 1
    mlp_activation: str | None = None
    head_norm_inputs: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()
    intermediate_size: str = "intermediate_size"

    @property
    def attention_block(self) -> str:
        """The attention module's path in a layer (the parent of its output linear)."""
        return self.attention_output.rpartition(".")[0]

    @property
    def mlp_block(self) -> str:
        """The MLP module's path in a layer (the parent of its output linear; "" for a chain on the layer)."""
        return self.mlp_output.rpartition(".")[0]

    @property
    def layernorm(self) -> bool:
        return self.norm == "layernorm"

    @property
    def branch_norms(self) -> tuple[str, ...]:
        return tuple(p for p in (self.attention_output_norm, self.mlp_output_norm) if p)

    def layer_prefix(self, index: int) -> str:
        """State-dict prefix of decoder layer ``index`` (``model.layers.3.``)."""
        return f"{self.layers}.{index}."

    def layer_index(self, key: str) -> int | None:
        """The decoder layer a state-dict key belongs to, or None for model-level tensors."""
        prefix = self.layers + "."
        if not key.startswith(prefix):
            return None
        head = key[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def weight(self, path: str) -> str:
        return f"{path}.weight"

    def bias(self, path: str) -> str:
        return f"{path}.bias"

    def eps(self, config: PretrainedConfig) -> float:
        """The norms' eps in ``config``."""
        return float(self.norm_eps if not isinstance(self.norm_eps, str) else getattr(config, self.norm_eps))

    def embedding_multiplier(self, config: PretrainedConfig) -> float:
        return float(EMBEDDING_SCALES[self.embedding_scale](config))

    def intermediate_size_of(self, config: PretrainedConfig) -> int | None:
        size = getattr(config, self.intermediate_size, None)
        return int(size) if size else None

    def to_dict(self) -> dict:
        """The layout as JSON (what a compressed config records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LayerModules:
    """The modules of one pre-norm decoder layer that compression touches (``*_output_norm``: a norm on that
    block's output before the residual add, or None)."""

    layer: nn.Module
    input_norm: nn.Module
    post_attention_norm: nn.Module
    attention_inputs: list[nn.Linear]
    attention_output: nn.Linear
    mlp_inputs: list[nn.Linear]
    mlp_output: nn.Linear
    layout: FamilyLayout = FamilyLayout()
    attention_output_norm: nn.Module | None = None
    mlp_output_norm: nn.Module | None = None


def layer_modules_of(layout: FamilyLayout, layer: nn.Module) -> LayerModules:
    """The :class:`LayerModules` of one decoder layer module, found by the layout's paths."""
    return LayerModules(
        layer=layer,
        input_norm=layer.get_submodule(layout.input_norm),
        post_attention_norm=layer.get_submodule(layout.post_attention_norm),
        attention_inputs=[layer.get_submodule(p) for p in layout.attention_inputs],
        attention_output=layer.get_submodule(layout.attention_output),
        mlp_inputs=[layer.get_submodule(p) for p in layout.mlp_inputs],
        mlp_output=layer.get_submodule(layout.mlp_output),
        layout=layout,
        attention_output_norm=layer.get_submodule(layout.attention_output_norm) if layout.attention_output_norm
        else None,
        mlp_output_norm=layer.get_submodule(layout.mlp_output_norm) if layout.mlp_output_norm else None,
    )


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at dotted ``path`` under ``root``."""
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, name, module)


class ResidualShape:
    """The residual stream's shape as the config and layout give it (what the width plan and the norms read); the
    class using it has ``config``, ``layout`` and ``num_layers``."""

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_points(self) -> int:
        """Residual-stream slice points: embeddings, then after attention and after the MLP of each layer."""
        return 2 * self.num_layers + 1

    @property
    def num_attention_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def rms_norm_eps(self) -> float:
        """The norms' eps (whatever the config calls it)."""
        return self.layout.eps(self.config)


class ModelAdapter(ResidualShape):
    """Adapter for pre-norm decoder LMs; the family's names live in ``layout``.

    Subclasses name their model classes, layout and tiny test config (``tiny_settings``: its values beyond
    :data:`TINY_SHAPE`); the model types default to the model class's config's. Their compressed classes are made
    from the model class (``DotResize<Source>ForCausalLM``, :mod:`dotresize.modeling`). An instance wraps a
    loaded model (the in-memory path); the class-level declarations are used without one (the layer-streamed path
    reads a checkpoint through them). ``global_layout_refusal``: why a sliced or rotated residual stream has no stock
    form in this family (the global layout is then refused; the MLP axis alone still exports a stock model).
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[type[PreTrainedModel], ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    compressed_model_class: ClassVar[type[PreTrainedModel]]
    compressed_config_class: ClassVar[type[PretrainedConfig]]
    layout: ClassVar[FamilyLayout] = FamilyLayout()
    global_layout_refusal: ClassVar[str | None] = None
    tiny_settings: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.model_classes:
            if "model_types" not in vars(cls):
                cls.model_types = (cls.model_classes[0].config_class.model_type,)
            cls.compressed_model_class = compressed_model_class(cls.model_classes[0])
            cls.compressed_config_class = compressed_config_class(cls.model_classes[0].config_class)

    def __init__(self, model: PreTrainedModel):
        self.model = model

    # --- declarations -------------------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, **overrides) -> PretrainedConfig:
        """A few-kilobyte config of this family for fast, exact tests: :data:`TINY_SHAPE`, the family's
        ``tiny_settings``, then ``overrides``."""
        return cls.model_classes[0].config_class(**{**TINY_SHAPE, **copy.deepcopy(cls.tiny_settings), **overrides})

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        """Refuse (:class:`~dotresize.errors.UnsupportedArchitectureError`, one line) a variant of the family this
        adapter cannot compress exactly; called before any weight is read."""

    @classmethod
    def modules_of(cls, layer: nn.Module) -> LayerModules:
        return layer_modules_of(cls.layout, layer)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def embeddings(self) -> nn.Embedding:
        return self.model.get_submodule(self.layout.embeddings)

    def position_embeddings(self) -> nn.Embedding | None:
        path = self.layout.position_embeddings
        return None if path is None else self.model.get_submodule(path)

    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.layout.lm_head)

    def set_lm_head(self, module: nn.Module) -> None:
        set_submodule(self.model, self.layout.lm_head, module)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.layout.final_norm)

    def set_final_norm(self, module: nn.Module) -> None:
        set_submodule(self.model, self.layout.final_norm, module)

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layout.layers)

    def layer_modules(self, index: int) -> LayerModules:
        return self.modules_of(self.layers()[index])

    def set_layer_norms(self, index: int, input_norm: nn.Module, post_attention_norm: nn.Module) -> None:
        layer = self.layers()[index]
        set_submodule(layer, self.layout.input_norm, input_norm)
        set_submodule(layer, self.layout.post_attention_norm, post_attention_norm)
