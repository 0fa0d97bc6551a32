"""Apply a reduction to an MLP's weights (plain tensors of HF layout [out, in]) and measure its output error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidConfigError
from .keep import complement
from .statistics import MlpStats


@dataclass
class MlpWeights:
    """The reduced MLP: ``gate``/``up`` [m, D] (rows K), ``down`` [D, m]; biases where the source had them."""

    down: torch.Tensor
    up: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _rows(tensor: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()[keep.to(tensor.device)].clone()


@torch.no_grad()
def reduce_mlp_weights(gate: torch.Tensor | None, up: torch.Tensor | None, down: torch.Tensor, keep: torch.Tensor,
                       A: torch.Tensor | None = None, *, gate_bias: torch.Tensor | None = None,
                       up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> MlpWeights:
    """New tensors: gate/up (and their biases) keep rows K; down = W[:, K] + W[:, S]·Aᵀ in float64, cast back once.

    ``gate`` is None for non-gated MLPs (OPT's fc1/fc2: pass fc1 as ``up``); ``A`` None or all zeros is pruning.
    The down projection's bias is unchanged (returned as a copy).
    """
    width = down.shape[1]
    keep = keep.to(torch.int64).cpu()
    removed = complement(keep, width)
    for name, tensor in (("gate", gate), ("up", up)):
        if tensor is not None and tensor.shape[0] != width:
            raise InvalidConfigError(f"{name} has {tensor.shape[0]} output rows, down_proj {width} inputs")
    if A is not None and tuple(A.shape) != (keep.numel(), removed.numel()):
        raise InvalidConfigError(f"the MLP map must be |K| x |S| = {keep.numel()} x {removed.numel()}, "
                                 f"got {tuple(A.shape)}")
    weight = down.detach()
    kept = weight[:, keep.to(weight.device)]
    if A is None or removed.numel() == 0:
        new_down = kept.clone()
    else:
        w64 = weight.to(torch.float64)
        merged = w64[:, keep.to(weight.device)] + w64[:, removed.to(weight.device)] @ A.to(w64.device, w64.dtype).T
        new_down = merged.to(weight.dtype)
    return MlpWeights(down=new_down, up=_rows(up, keep), gate=_rows(gate, keep), up_bias=_rows(up_bias, keep),
                      gate_bias=_rows(gate_bias, keep),
                      down_bias=None if down_bias is None else down_bias.detach().clone())


def output_error(stats: MlpStats, down: torch.Tensor, keep: torch.Tensor, A: torch.Tensor | None = None) -> float:
    """Relative squared error ‖h·Wᵀ − h_K·W'ᵀ‖² / ‖h·Wᵀ‖² of the down projection's output, from the Gram matrix.

    With E = W_S·[−Aᵀ, I] over (K, S): error = tr(W_S·M·W_Sᵀ), M = G_SS − AᵀG_KS − G_SK·A + AᵀG_KK·A.
    """
    gram = stats.gram.to(torch.float64).cpu()
    w = down.detach().to(torch.float64).cpu()
    keep = keep.to(torch.int64).cpu()
    removed = complement(keep, stats.dim)
    total = float(torch.trace(w @ gram @ w.T))
    if total <= 0 or removed.numel() == 0:
        return 0.0
    g_ss = gram[removed][:, removed]
    if A is None:
        M = g_ss
    else:
        A = A.to(torch.float64).cpu()
        g_ks = gram[keep][:, removed]
        cross = A.T @ g_ks
        M = g_ss - cross - cross.T + A.T @ gram[keep][:, keep] @ A
    w_s = w[:, removed]
    return max(float(torch.trace(w_s @ M @ w_s.T)), 0.0) / total
