"""dotresize: make LLMs narrower by merging residual-stream neurons with discrete optimal transport.

Usable alone in a notebook::

    from dotresize import compress, CompressionConfig, save_compressed
    small, report = compress(model, calibration_ids, CompressionConfig(method="dot", ratio=0.2))

Importing the package registers the compressed model classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(exported_dir)`` works without ``trust_remote_code``.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import CompressionConfig, DotOptions, MlpDotOptions, MlpOptions
from .errors import DotResizeError
from .modeling import register_auto_classes

try:
    __version__ = version("dotresize")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from .adapters import ADAPTERS  # noqa: E402

register_auto_classes([cls for a in ADAPTERS for cls in a.model_classes],
                      {cls.config_class.model_type: a.layout.to_dict() for a in ADAPTERS for cls in a.model_classes})

from .api import CompressionReport, compress, count_parameters  # noqa: E402
from .export import load_compressed, save_compressed  # noqa: E402


__all__ = ["CompressionConfig", "DotOptions", "MlpOptions", "MlpDotOptions", "DotResizeError", "compress", "save_compressed", "load_compressed",
           "CompressionReport", "count_parameters", "__version__"]
