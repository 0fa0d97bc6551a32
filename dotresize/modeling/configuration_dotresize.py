"""Configurations of width-compressed (DOTResize / SliceGPT-layout) models.

This file ships inside every exported ``per-point`` model directory, so it imports only transformers.
A compressed config is the source architecture's config plus one extra field, ``dotresize``::

    {"format_version": 3, "hidden_size": D, "widths": [d_0, ..., d_2L], "norm_eps": eps, "layout": {...}}

``hidden_size`` stays the *original* width D (the normalisation divides by it); ``widths[p]`` is the
width of residual-stream point p (0 = embeddings, 2l+1 = after attention of layer l, 2l+2 = after its MLP).

Format 2 adds two optional keys: ``intermediate_sizes`` (one MLP intermediate width per layer, when the MLPs were
reduced) and ``shortcuts`` (false: no shortcut matrices, every width equal — the global layout with non-uniform
MLP widths, or MLPs reduced with the residual stream untouched). Format 3 records the family's ``layout`` (module
paths, norm kind, branch norms: what ``dotresize.adapters.base.FamilyLayout`` holds, as JSON) and ``norm_eps``, so
the modeling code needs no entry per family; formats 1-2 carry neither (their families' layouts are registered by
``import dotresize``, and their own shipped code still loads them).

There is no class per family here: ``DotResize<Source>Config`` (``DotResizeLlamaConfig``, ``DotResizeOPTConfig``,
...) is made on first use from transformers' ``<Source>Config``, with model type ``dotresize_<source type>``.
"""

from __future__ import annotations

import re

import transformers

PREFIX = "DotResize"
MODEL_TYPE_PREFIX = "dotresize_"
_CLASSES: dict[str, type] = {}


def made_once(classes: dict[str, type], base: type, bases: tuple[type, ...], namespace: dict, module: str,
              doc: str) -> type:
    """``DotResize<Base>``, made from ``bases`` and ``namespace`` in ``module`` on first use, then the same class
    (``classes``: the module's cache)."""
    name = PREFIX + base.__name__
    if name not in classes:
        classes[name] = type(name, bases, {**namespace, "__module__": module, "__qualname__": name, "__doc__": doc})
    return classes[name]


def resolve_compressed(module: str, name: str, suffix: str, make) -> type:
    """``DotResizeX<suffix>`` for any transformers class ``X<suffix>`` (what ``auto_map`` names), by ``make``."""
    match = re.fullmatch(PREFIX + rf"(\w+{suffix})", name)
    base = getattr(transformers, match.group(1), None) if match else None
    if base is None or not isinstance(base, type):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return make(base)


def compressed_config_class(base: type) -> type:
    """``DotResize<Base>``: ``base`` (a transformers config class) with the compressed model type."""
    return made_once(_CLASSES, base, (base,), {"model_type": MODEL_TYPE_PREFIX + base.model_type,
                                               "dotresize_base_model_type": base.model_type},
                     __name__, f"{base.__name__} of a width-compressed model (see this module's docstring).")


def __getattr__(name: str):
    """``DotResizeXConfig`` for any transformers config class ``XConfig`` (what ``auto_map`` names)."""
    return resolve_compressed(__name__, name, "Config", compressed_config_class)
