"""Model adapters, chosen by model class (or, before loading, by the config's model_type)."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from ..errors import UnsupportedArchitectureError
from .base import LayerModules, ModelAdapter
from .llama import LlamaAdapter, MistralAdapter
from .phi3 import Phi3Adapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Phi3Adapter)


def supported_families() -> str:
    return ", ".join(
        f"{a.family} ({', '.join(c.__name__ for c in a.model_classes)})" for a in ADAPTERS
    )


def adapter_class_for_config(config: PretrainedConfig) -> type[ModelAdapter]:
    """The adapter for a config, checked before any weights are loaded."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    archs = ", ".join(getattr(config, "architectures", None) or []) or str(model_type)
    raise UnsupportedArchitectureError(
        f"architecture {archs} (model_type {model_type!r}) is not supported; supported families: "
        f"{supported_families()}"
    )


def get_adapter(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for a loaded model, matched by its exact class."""
    for adapter in ADAPTERS:
        if type(model) in adapter.model_classes:
            return adapter(model)
    raise UnsupportedArchitectureError(
        f"model class {type(model).__name__} is not supported; supported families: {supported_families()}"
    )


__all__ = ["ADAPTERS", "LayerModules", "ModelAdapter", "adapter_class_for_config", "get_adapter",
           "supported_families", "LlamaAdapter", "MistralAdapter", "Qwen2Adapter", "Qwen3Adapter", "Phi3Adapter"]
