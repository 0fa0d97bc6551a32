"""How many bytes a compression run will write, estimated before it starts (to compare with free space).

The layer-streamed run directory stores no fused copy of the model; what grows with the model and the
calibration set is::

    activations   per slice point its signal (calibration tokens x hidden size x 4 bytes) where stored — the L+1
                  layer inputs always, the L post-attention points when their statistics are not smaller — and
                  its statistics (hidden size² x 8 bytes) where they are smaller than the signal
    bases         (2L+1) x hidden size x kept width x 8 bytes (float64)
    mlp           with the MLP axis (intermediate size I, m kept): per layer, parallel, its statistics (I² x 8
                  bytes), sequential, its input through the reduced layers (calibration tokens x hidden size x 4);
                  and its reduction (m x (I - m) x 8 bytes + the indices)
    export        the source's parameter count x the export dtype's bytes (an upper bound: the export is smaller)
    + 10 % slack  (manifests, the tokenizer, Zarr metadata)

Adjust the terms here when the layout changes; nothing else encodes them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: bytes per element of the dtypes a source or an export may have (torch, safetensors and GGUF spellings)
DTYPE_BYTES = {"float64": 8, "F64": 8, "float32": 4, "F32": 4, "float16": 2, "F16": 2, "bfloat16": 2, "BF16": 2}
SLACK = 0.10


@dataclass(frozen=True)
class RunBytes:
    """The estimate, by term (bytes)."""

    activations: int
    bases: int
    export: int
    slack: int
    mlp: int = 0

    @property
    def total(self) -> int:
        return self.activations + self.bases + self.export + self.slack + self.mlp


def dtype_bytes(dtype: str | None, default: int = 4) -> int:
    """Bytes per element of ``dtype`` (``bfloat16``, ``torch.float16``, ``BF16``...); ``default`` when unknown
    (a GGUF source counts as float32: its weights are dequantized)."""
    if not dtype:
        return default
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), default)


def estimate_run_bytes(*, num_layers: int, hidden_size: int, kept_width: int, calibration_tokens: int,
                       parameters: int, export_bytes_per_parameter: int = 4, slack: float = SLACK,
                       intermediate_size: int = 0, mlp_kept: int = 0, mlp_sequential: bool = False) -> RunBytes:
    """Bytes a run of a model with ``num_layers`` decoder layers (2L+1 slice points) writes; see the module
    docstring for the terms (``intermediate_size`` 0: no MLP axis)."""
    mlp = 0
    if intermediate_size:
        per_layer = (calibration_tokens * hidden_size * 4 if mlp_sequential else intermediate_size ** 2 * 8)
        per_layer += mlp_kept * (intermediate_size - mlp_kept) * 8 + intermediate_size * 8
        mlp = num_layers * per_layer
    points = 2 * num_layers + 1
    signal, stats = calibration_tokens * hidden_size * 4, hidden_size * hidden_size * 8
    if stats < signal:  # statistics stored at capture for every point, signals of the layer inputs only
        activations = (num_layers + 1) * signal + points * stats
    else:
        activations = points * signal
    bases = points * hidden_size * kept_width * 8
    export = parameters * export_bytes_per_parameter
    return RunBytes(activations, bases, export, int(slack * (activations + bases + export + mlp)), mlp)


def human(nbytes: float) -> str:
    """``1.5 GB``, ``320 MB``, ``12 kB`` (decimal units, as ``df -H``)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


__all__ = ["estimate_run_bytes", "RunBytes", "dtype_bytes", "human", "DTYPE_BYTES"]
