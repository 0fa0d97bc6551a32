"""Model adapters, chosen by model class (or, before loading, by the config's model_type).

Every module of this package but ``base`` is scanned for :class:`ModelAdapter` subclasses that name model classes:
adding a family is adding its adapter file (nothing to register here).
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import PretrainedConfig, PreTrainedModel

from ..errors import InvalidConfigError, UnsupportedArchitectureError
from .base import FamilyLayout, LayerModules, ModelAdapter


def _discover() -> tuple[type[ModelAdapter], ...]:
    found: list[type[ModelAdapter]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, ModelAdapter) and obj.model_classes
                  and obj.__module__ == module.__name__]
    return tuple(found)


ADAPTERS: tuple[type[ModelAdapter], ...] = _discover()
#: family name → adapter
BY_FAMILY: dict[str, type[ModelAdapter]] = {a.family: a for a in ADAPTERS}


def supported_families() -> str:
    return ", ".join(
        f"{a.family} ({', '.join(c.__name__ for c in a.model_classes)})" for a in ADAPTERS
    )


def adapter_class_for_config(config: PretrainedConfig) -> type[ModelAdapter]:
    """The adapter for a config, checked before any weights are loaded (a variant the adapter cannot compress
    exactly is refused here too)."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check_config(config)
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
            adapter.check_config(model.config)
            return adapter(model)
    raise UnsupportedArchitectureError(
        f"model class {type(model).__name__} is not supported; supported families: {supported_families()}"
    )


def intermediate_size_of(config: PretrainedConfig) -> int | None:
    """The MLP intermediate width in ``config``, whatever its family calls it (``FamilyLayout.intermediate_size``);
    None for an unsupported family or a config without one."""
    try:
        adapter = adapter_class_for_config(config)
    except UnsupportedArchitectureError:
        return None
    return adapter.layout.intermediate_size_of(config)


def check_layout(adapter: type[ModelAdapter] | str | None, layout: str, residual_active: bool = True) -> None:
    """Refuse the global layout, in one line, for a family whose rotated or sliced residual stream has no stock
    form (``adapter``: the adapter or its family name; the MLP axis alone, ``residual_active`` false, is fine)."""
    if isinstance(adapter, str):
        adapter = BY_FAMILY.get(adapter)
    if adapter is None or layout != "global" or not residual_active or not adapter.global_layout_refusal:
        return
    raise InvalidConfigError(f"layout 'global' is not available for {adapter.family}: "
                             f"{adapter.global_layout_refusal}; use --layout per-point")


__all__ = ["ADAPTERS", "BY_FAMILY", "FamilyLayout", "LayerModules", "ModelAdapter", "adapter_class_for_config",
           "check_layout", "get_adapter", "intermediate_size_of", "supported_families"]
