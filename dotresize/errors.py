"""One exception type per user-facing failure; each message says what to change."""


class DotResizeError(Exception):
    """Base class of every error dotresize raises on purpose (the CLI prints its message on one line)."""


class InvalidConfigError(DotResizeError, ValueError):
    """A compression setting is out of range or inconsistent."""


class UnsupportedArchitectureError(DotResizeError):
    """The model's architecture has no adapter."""


class SourceNotFoundError(DotResizeError, FileNotFoundError):
    """The model source (directory, GGUF file, hub id) cannot be found or reached."""


class UnsafeWeightsError(DotResizeError):
    """The source holds only pickle-based weights; only safetensors and GGUF are loaded."""


class DataNotFoundError(DotResizeError, FileNotFoundError):
    """A calibration or evaluation data set cannot be found locally nor fetched."""


class CalibrationError(DotResizeError):
    """The calibration set is unusable (too few tokens, non-finite activations, ...)."""


class NonFiniteActivationError(CalibrationError):
    """NaN or Inf appeared in the activations at a slice point."""


class BasisError(DotResizeError):
    """A basis could not be computed reliably (e.g. a near rank-1 transport plan)."""


class OutputExistsError(DotResizeError, FileExistsError):
    """The output directory exists and is not empty."""
