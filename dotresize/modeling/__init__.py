"""The compressed model's own format: configs and modeling code, registered with transformers' Auto classes."""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_dotresize import compressed_config_class
from .modeling_dotresize import (
    DEFAULT_LAYOUTS,
    MAX_FORMAT_VERSION,
    RMSN,
    BranchNorm,
    CompressedDecoderLayer,
    compressed_layer,
    compressed_model_class,
    layout_of,
)

#: ``dotresize.json``'s format (the export directory's record)
FORMAT_VERSION = 1
#: the config format that may hold ``intermediate_sizes`` and ``shortcuts``
MLP_FORMAT_VERSION = 2
#: the config format every compressed config is written in: it records the family's layout and norm eps
CONFIG_FORMAT_VERSION = MAX_FORMAT_VERSION

#: files copied into every per-point export so that ``trust_remote_code=True`` loading works without dotresize.
MODELING_FILES = (
    Path(__file__).with_name("configuration_dotresize.py"),
    Path(__file__).with_name("modeling_dotresize.py"),
)


def register_auto_classes(model_classes, layouts: dict[str, dict] | None = None) -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(dir)`` load compressed exports of the source classes
    ``model_classes`` without remote code; ``layouts`` (source model type → layout) serve configs written before
    format 3, which record none."""
    DEFAULT_LAYOUTS.update(layouts or {})
    for base in model_classes:
        model_cls = compressed_model_class(base)
        config_cls = model_cls.config_class
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:
            pass  # already registered in this process
        try:
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:
            pass


__all__ = [
    "FORMAT_VERSION", "MLP_FORMAT_VERSION", "CONFIG_FORMAT_VERSION", "MODELING_FILES", "RMSN", "BranchNorm",
    "CompressedDecoderLayer", "compressed_layer", "compressed_config_class", "compressed_model_class", "layout_of",
    "register_auto_classes",
]
