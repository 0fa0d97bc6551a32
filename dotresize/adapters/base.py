"""What an adapter declares: where a family keeps its norms, linears, embeddings and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


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


class ModelAdapter:
    """Adapter for pre-norm decoder LMs laid out like Llama (``model.layers[i].self_attn.q_proj`` ...).

    Subclasses name their model classes, model types, compressed classes and a tiny test config.
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[type[PreTrainedModel], ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    compressed_model_class: ClassVar[type[PreTrainedModel]]
    compressed_config_class: ClassVar[type[PretrainedConfig]]

    def __init__(self, model: PreTrainedModel):
        self.model = model

    # --- declarations -------------------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, **overrides) -> PretrainedConfig:
        """A few-kilobyte config of this family for fast, exact tests."""
        raise NotImplementedError(f"{cls.__name__} must define tiny_config")

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

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
        return self.model.model.embed_tokens

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def set_final_norm(self, module: nn.Module) -> None:
        self.model.model.norm = module

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_modules(self, index: int) -> LayerModules:
        layer = self.model.model.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        return LayerModules(
            layer=layer,
            input_norm=layer.input_layernorm,
            post_attention_norm=layer.post_attention_layernorm,
            attention_inputs=[attn.q_proj, attn.k_proj, attn.v_proj],
            attention_output=attn.o_proj,
            mlp_inputs=[mlp.gate_proj, mlp.up_proj],
            mlp_output=mlp.down_proj,
        )

    def set_layer_norms(self, index: int, input_norm: nn.Module, post_attention_norm: nn.Module) -> None:
        layer = self.model.model.layers[index]
        layer.input_layernorm = input_norm
        layer.post_attention_layernorm = post_attention_norm
