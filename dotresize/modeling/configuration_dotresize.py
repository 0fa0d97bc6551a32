"""Configurations of width-compressed (DOTResize / SliceGPT-layout) models.

This file ships inside every exported ``per-point`` model directory, so it imports only transformers.
A compressed config is the source architecture's config plus one extra field, ``dotresize``::

    {"format_version": 1, "hidden_size": D, "widths": [d_0, ..., d_2L]}

``hidden_size`` stays the *original* width D (the normalisation divides by it); ``widths[p]`` is the
width of residual-stream point p (0 = embeddings, 2l+1 = after attention of layer l, 2l+2 = after its MLP).

Format 2 adds two optional keys: ``intermediate_sizes`` (one MLP intermediate width per layer, when the MLPs were
reduced) and ``shortcuts`` (false: no shortcut matrices, every width equal — the global layout with non-uniform
MLP widths, or MLPs reduced with the residual stream untouched).
"""

from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

FORMAT_VERSION = 1
#: the format that may hold ``intermediate_sizes`` and ``shortcuts`` (written only by configs that use them)
MLP_FORMAT_VERSION = 2


class DotResizeLlamaConfig(LlamaConfig):
    model_type = "dotresize_llama"


class DotResizeMistralConfig(MistralConfig):
    model_type = "dotresize_mistral"


class DotResizeQwen2Config(Qwen2Config):
    model_type = "dotresize_qwen2"


class DotResizeQwen3Config(Qwen3Config):
    model_type = "dotresize_qwen3"


class DotResizePhi3Config(Phi3Config):
    model_type = "dotresize_phi3"
