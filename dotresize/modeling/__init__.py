"""The compressed model's own format: configs and modeling code, registered with transformers' Auto classes."""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_dotresize import (
    FORMAT_VERSION,
    MLP_FORMAT_VERSION,
    DotResizeLlamaConfig,
    DotResizeMistralConfig,
    DotResizePhi3Config,
    DotResizeQwen2Config,
    DotResizeQwen3Config,
)
from .modeling_dotresize import (
    RMSN,
    CompressedDecoderLayer,
    DotResizeLlamaForCausalLM,
    DotResizeMistralForCausalLM,
    DotResizePhi3ForCausalLM,
    DotResizeQwen2ForCausalLM,
    DotResizeQwen3ForCausalLM,
)

#: files copied into every per-point export so that ``trust_remote_code=True`` loading works without dotresize.
MODELING_FILES = (
    Path(__file__).with_name("configuration_dotresize.py"),
    Path(__file__).with_name("modeling_dotresize.py"),
)

_PAIRS = (
    (DotResizeLlamaConfig, DotResizeLlamaForCausalLM),
    (DotResizeMistralConfig, DotResizeMistralForCausalLM),
    (DotResizeQwen2Config, DotResizeQwen2ForCausalLM),
    (DotResizeQwen3Config, DotResizeQwen3ForCausalLM),
    (DotResizePhi3Config, DotResizePhi3ForCausalLM),
)


def register_auto_classes() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(dir)`` load compressed exports without remote code."""
    for config_cls, model_cls in _PAIRS:
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:
            pass  # already registered in this process
        try:
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:
            pass


__all__ = [
    "FORMAT_VERSION", "MLP_FORMAT_VERSION", "MODELING_FILES", "RMSN", "CompressedDecoderLayer", "register_auto_classes",
    "DotResizeLlamaConfig", "DotResizeMistralConfig", "DotResizeQwen2Config", "DotResizeQwen3Config",
    "DotResizePhi3Config", "DotResizeLlamaForCausalLM", "DotResizeMistralForCausalLM", "DotResizeQwen2ForCausalLM",
    "DotResizeQwen3ForCausalLM", "DotResizePhi3ForCausalLM",
]
