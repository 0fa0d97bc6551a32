"""What an adapter declares: where a family keeps its norms, linears, embeddings and head.

The names are data (:class:`FamilyLayout`): module paths inside the causal LM and inside one decoder layer.
Everything that walks a model — fusion, capture, absorption, the layer-streamed loader reading a checkpoint
tensor by tensor, the MLP axis — asks the layout, so a Llama-like family is one adapter file with its layout and a
tiny config, plus its compressed config and model class in :mod:`dotresize.modeling` (that code ships inside exports
without dotresize, so it keeps its own copy of the paths; tests/test_families.py checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of a pre-norm decoder LM (dotted, as in ``named_modules`` / state-dict keys).

    ``layers`` is the ModuleList of decoder layers in the causal LM; the other model-level paths are the
    embeddings, the final norm and the head; the layer-level paths are relative to one decoder layer.

    A fused projection is one linear in ``attention_inputs`` / ``mlp_inputs`` (Phi-3's ``qkv_proj``,
    ``gate_up_proj``): the residual stream only touches its input side, so it needs nothing more, except on the
    MLP axis, where ``mlp_input_blocks`` says how many intermediate-width blocks each MLP input linear stacks along
    its outputs (gate then up: 2). ``head_norm_inputs`` are the linears whose outputs an RMSNorm with the config's
    eps normalises per head (Qwen3's q_proj / k_proj before ``head_norms`` q_norm / k_norm): the global layout
    scales them by √(D/d), which makes the stock config's eps·D/d leave those norms exact.
    """

    layers: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_output: str = "self_attn.o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    mlp_input_blocks: int = 1
    head_norm_inputs: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()

    @property
    def attention_block(self) -> str:
        """The attention module's path in a layer (the parent of its output linear)."""
        return self.attention_output.rpartition(".")[0]

    @property
    def mlp_block(self) -> str:
        """The MLP module's path in a layer (the parent of its output linear)."""
        return self.mlp_output.rpartition(".")[0]

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


@dataclass
class LayerModules:
    """The modules of one pre-norm decoder layer that compression touches."""

    layer: nn.Module
    input_norm: nn.Module
    post_attention_norm: nn.Module
    attention_inputs: list[nn.Linear]
    attention_output: nn.Linear
    mlp_inputs: list[nn.Linear]
    mlp_output: nn.Linear
    layout: FamilyLayout = FamilyLayout()


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
    )


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at dotted ``path`` under ``root``."""
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, name, module)


class ModelAdapter:
    """Adapter for pre-norm decoder LMs; the family's names live in ``layout``.

    Subclasses name their model classes, model types, compressed classes, layout and a tiny test config.
    An instance wraps a loaded model (the in-memory path); the class-level declarations are used without one
    (the layer-streamed path reads a checkpoint through them).
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[type[PreTrainedModel], ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    compressed_model_class: ClassVar[type[PreTrainedModel]]
    compressed_config_class: ClassVar[type[PretrainedConfig]]
    layout: ClassVar[FamilyLayout] = FamilyLayout()

    def __init__(self, model: PreTrainedModel):
        self.model = model

    # --- declarations -------------------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, **overrides) -> PretrainedConfig:
        """A few-kilobyte config of this family for fast, exact tests."""
        raise NotImplementedError(f"{cls.__name__} must define tiny_config")

    @classmethod
    def modules_of(cls, layer: nn.Module) -> LayerModules:
        return layer_modules_of(cls.layout, layer)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def num_points(self) -> int:
        """Residual-stream slice points: embeddings, then after attention and after the MLP of each layer."""
        return 2 * self.num_layers + 1

    @property
    def rms_norm_eps(self) -> float:
        return float(self.config.rms_norm_eps)

    @property
    def num_attention_heads(self) -> int:
        return int(self.config.num_attention_heads)

    def embeddings(self) -> nn.Embedding:
        return self.model.get_submodule(self.layout.embeddings)

    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.layout.lm_head)

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
