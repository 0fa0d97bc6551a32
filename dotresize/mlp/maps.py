"""Maps for the removed neurons of an MLP: prune, ridge least squares (lsq) and transport-plan merging (dot).

Convention: kept neurons K and removed neurons S are ascending index tensors; the map ``A`` is |K| x |S| (float64)
with h_S ≈ h_K·A, so the new down projection is W_down[:, K] + W_down[:, S]·Aᵀ (method.md, decision 9). ``lsq``
is ridge regression of the layer's output on h_K towards the original W_down[:, K]; on the calibration data it is
the best linear correction (λ → 0), so any other map can only win by generalising better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..bases.dot import effective_rank, normalize_cost
from ..bases.sinkhorn import sinkhorn_log
# the options live in the config (they are part of a CompressionConfig); re-exported here
from ..config import DOT_COSTS, DOT_MARGINALS, MLP_METHODS, SCALE_RULES, MlpDotOptions, MlpOptions  # noqa: F401
from ..errors import BasisError, InvalidConfigError
from .keep import complement
from .statistics import MlpStats


@dataclass
class MlpReduction:
    """Kept neurons ``keep`` (K), removed ``removed`` (S), both ascending; ``A`` (|K| x |S|, float64): h_S ≈ h_K·A."""

    keep: torch.Tensor
    removed: torch.Tensor
    A: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.keep.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reduction as named tensors (e.g. for safetensors): ``keep``, ``removed`` (int64) and ``A``."""
        return {"keep": self.keep.to(torch.int64).contiguous(), "removed": self.removed.to(torch.int64).contiguous(),
                "A": self.A.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> "MlpReduction":
        return cls(tensors["keep"], tensors["removed"], tensors["A"], dict(info or {}))

    def scalar_info(self) -> dict[str, Any]:
        """``info`` without its tensors (what a JSON record of the reduction can hold)."""
        return {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _blocks(stats: MlpStats, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    removed = complement(keep, stats.dim)
    gram = stats.gram.to(torch.float64).cpu()
    return removed, gram[keep][:, keep], gram[keep][:, removed]


def ridge_solve(g_kk: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G_KK + λI)⁻¹·rhs with λ = ridge · mean diag G_KK (Cholesky); ridge 0 = the minimum-norm least squares."""
    scale = float(torch.diagonal(g_kk).mean()) if g_kk.numel() else 0.0
    lam = ridge * scale
    if lam <= 0:
        return torch.linalg.pinv(g_kk, hermitian=True) @ rhs
    system = g_kk + lam * torch.eye(g_kk.shape[0], dtype=g_kk.dtype)
    factor, failed = torch.linalg.cholesky_ex(system)
    if int(failed) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(system, rhs)


def prune_map(stats: MlpStats, keep: torch.Tensor) -> MlpReduction:
    """Drop the removed neurons: A = 0."""
    removed = complement(keep, stats.dim)
    A = torch.zeros(keep.numel(), removed.numel(), dtype=torch.float64)
    return MlpReduction(keep, removed, A, {"method": "prune"})


def lsq_map(stats: MlpStats, keep: torch.Tensor, ridge: float = 0.1, prior: torch.Tensor | None = None) -> MlpReduction:
    """Ridge least squares A = (G_KK + λI)⁻¹ (G_KS + λ·A₀), λ = ridge · mean diag G_KK, prior A₀ (default 0).

    Exact (ridge 0) when h_S is a linear function of h_K; equivalently the ridge regression of the layer's output
    on h_K shrunk towards the original weights W_down[:, K].
    """
    removed, g_kk, g_ks = _blocks(stats, keep)
    rhs = g_ks
    if prior is not None and ridge > 0:
        lam = ridge * float(torch.diagonal(g_kk).mean())
        rhs = g_ks + lam * prior.to(torch.float64).cpu()
    A = ridge_solve(g_kk, rhs, ridge) if removed.numel() else g_ks.clone()
    return MlpReduction(keep, removed, A, {"method": "lsq", "ridge": ridge, "prior": prior is not None})


def profile_cost(stats: MlpStats, removed: torch.Tensor, keep: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Cost |S| x |K| between activation profiles, from the Gram matrix.

    ``l2``: RMS distance sqrt((G_ss + G_kk − 2 G_sk) / N); ``cosine``: 1 − G_sk / sqrt(G_ss G_kk) (a silent neuron
    has cosine 0 to every other).
    """
    gram = stats.gram.to(torch.float64).cpu()
    diag = torch.diagonal(gram)
    g_sk = gram[removed][:, keep]
    if kind == "l2":
        squared = diag[removed][:, None] + diag[keep][None, :] - 2.0 * g_sk
        return torch.sqrt(torch.clamp(squared, min=0.0) / max(stats.count, 1))
    if kind == "cosine":
        norms = torch.sqrt(torch.clamp(diag, min=0.0))
        denominator = norms[removed][:, None] * norms[keep][None, :]
        cosine = torch.where(denominator > 0, g_sk / torch.where(denominator > 0, denominator, 1.0), 0.0)
        return torch.clamp(1.0 - cosine, min=0.0)
    raise InvalidConfigError(f"mlp dot cost must be one of {', '.join(DOT_COSTS)}; got {kind!r}")


def transport_rows(cost: torch.Tensor, options: MlpDotOptions) -> tuple[torch.Tensor, dict[str, Any]]:
    """Row-stochastic plan P (|S| x |K|, rows sum to 1): each removed neuron's mass over the kept neurons."""
    if options.marginals == "row":
        return torch.softmax(-cost / options.epsilon, dim=1), {}
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64)
    result = sinkhorn_log(a, b, cost, options.epsilon, tol=options.tol, max_iter=options.max_iter)
    plan = result.plan
    if not torch.isfinite(plan).all():
        raise BasisError(f"Sinkhorn produced a non-finite MLP plan: raise mlp dot epsilon (now {options.epsilon})")
    rows = plan / torch.clamp(plan.sum(1, keepdim=True), min=1e-300)
    return rows, {"sinkhorn_iterations": int(result.iterations), "sinkhorn_converged": bool(result.converged),
                  "marginal_error": float(result.marginal_error)}


def row_scales(rows: torch.Tensor, g_kk: torch.Tensor, g_sk: torch.Tensor, g_ss: torch.Tensor,
               rule: str) -> torch.Tensor:
    """Scale c_s of every removed neuron's row p_s so that h_s ≈ c_s·h_K·p_s."""
    if rule == "none":
        return torch.ones(rows.shape[0], dtype=torch.float64)
    merged = ((rows @ g_kk) * rows).sum(1)  # ‖h_K p_s‖²
    safe = torch.where(merged > 0, merged, 1.0)
    if rule == "lsq":
        return torch.where(merged > 0, (rows * g_sk).sum(1) / safe, 0.0)
    if rule == "norm":
        return torch.where(merged > 0, torch.sqrt(torch.clamp(g_ss, min=0.0) / safe), 0.0)
    raise InvalidConfigError(f"mlp dot scale must be one of {', '.join(SCALE_RULES)}; got {rule!r}")


def dot_map(stats: MlpStats, keep: torch.Tensor, options: MlpDotOptions = MlpDotOptions(),
            ridge: float = 0.1) -> MlpReduction:
    """Transport-plan merge: each removed neuron s is carried by its plan row, h_s ≈ c_s·h_K·p_s.

    The plan is entropic OT between S and K over the activation-profile cost (normalised, ε); with
    ``options.prior`` the merged map is the prior of the ridge (``lsq_map`` with ``prior``) instead of the map.
    """
    options.validate()
    removed = complement(keep, stats.dim)
    if removed.numel() == 0:
        return MlpReduction(keep, removed, torch.zeros(keep.numel(), 0, dtype=torch.float64), {"method": "dot"})
    gram = stats.gram.to(torch.float64).cpu()
    g_kk, g_sk = gram[keep][:, keep], gram[removed][:, keep]
    raw = profile_cost(stats, removed, keep, options.cost)
    cost, scale = normalize_cost(raw, options.cost_normalization)
    rows, info = transport_rows(cost, options)
    c = row_scales(rows, g_kk, g_sk, torch.diagonal(gram)[removed], options.scale)
    A = (rows * c[:, None]).T.contiguous()
    row_entropy = -(rows * torch.log(torch.clamp(rows, min=1e-300))).sum(1)
    info.update({
        "method": "dot", "epsilon": options.epsilon, "cost": options.cost, "cost_scale": scale,
        "plan_effective_rank": effective_rank(rows),
        "row_perplexity_mean": float(torch.exp(row_entropy).mean()),   # kept neurons a removed one spreads over
        "row_max_mean": float(rows.max(1).values.mean()),
        "scale_median": float(c.median()), "scale_abs_mean": float(c.abs().mean()),
    })
    if options.prior:
        reduction = lsq_map(stats, keep, ridge, prior=A)
        reduction.info = {**info, "prior": True, "ridge": ridge}
        return reduction
    return MlpReduction(keep, removed, A, info)
