"""Calibration statistics of one layer's MLP intermediate activation h (the input of ``down_proj``), in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteActivationError


@dataclass
class MlpStats:
    """Sufficient statistics of h (N tokens x I neurons) of one MLP.

    ``gram`` = hᵀh (uncentred, float64, I x I), ``sum`` = Σh, ``abs_sum`` = Σ|h|, ``count`` = N.
    """

    gram: torch.Tensor
    sum: torch.Tensor
    abs_sum: torch.Tensor
    count: int

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @property
    def energy(self) -> torch.Tensor:
        """‖h_j‖² of every neuron (the Gram matrix's diagonal)."""
        return torch.diagonal(self.gram)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as named tensors (e.g. for safetensors); ``count`` as a 1-element int64 tensor."""
        return {"gram": self.gram, "sum": self.sum, "abs_sum": self.abs_sum,
                "count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "MlpStats":
        return cls(tensors["gram"].to(torch.float64), tensors["sum"].to(torch.float64),
                   tensors["abs_sum"].to(torch.float64), int(tensors["count"].reshape(-1)[0]))


class MlpStatsAccumulator:
    """Accumulates :class:`MlpStats` from batches of h of shape (..., I); ``layer`` only names errors."""

    def __init__(self, dim: int, *, layer: int = 0, device: torch.device | str = "cpu"):
        self.layer = layer
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, h: torch.Tensor) -> None:
        x = h.reshape(-1, h.shape[-1]).to(device=self.gram.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"NaN or Inf in the MLP intermediate activations of layer {self.layer}: check the model's weights "
                "and dtype (use float32) and the calibration text"
            )
        self.gram.addmm_(x.T, x)
        self.sum += x.sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    def finalize(self) -> MlpStats:
        return MlpStats(self.gram, self.sum, self.abs_sum, self.count)
