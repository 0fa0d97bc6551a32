"""Entropic optimal transport (Sinkhorn) solvers in float64.

Two implementations that solve the same problem

    min_T <T, C> - eps * H(T)   s.t.  T 1 = a,  T^T 1 = b,

and return a :class:`SinkhornResult`:

* :func:`sinkhorn_log` -- pure torch, log-domain, runs on the device of the
  inputs (CPU or CUDA);
* :func:`sinkhorn_pot` -- thin wrapper around POT's ``ot.bregman.sinkhorn_log``
  (numpy or torch backend), used as a reference.

Both use POT's stopping rule: every ``check_every`` (POT: 10) iterations,
starting with the first, stop once ``||T.sum(0) - b||_2 < tol``.  With equal
``tol``/``max_iter`` they therefore run the same iterations and return the same
plan up to rounding.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SOLVERS",
    "SinkhornResult",
    "sinkhorn_log",
    "sinkhorn_pot",
    "solve",
]

SOLVERS = ("torch", "pot-numpy", "pot-torch")

# Scaling factors accumulated between two log-domain "absorptions" are kept in
# [1/_SCALE_LIMIT, _SCALE_LIMIT], and kernel entries are floored at
# exp(log(min mass) - _LOG_K_MARGIN) (but never below exp(-700)).  This keeps the
# products in the kernel matrix-vector updates normal float64 numbers (no
# subnormals: imprecise and very slow on x86) while the floor changes any row or
# column sum by a relative ~m * exp(-460) * 1e80 < 1e-100.  The returned plan is
# always exp(-C/eps + f + g) from the log potentials, without the floor.
_SCALE_LIMIT = 1e40
_LOG_K_MARGIN = 460.0
_LOG_K_MIN = -700.0


@dataclass(frozen=True)
class SinkhornResult:
    """Output of a Sinkhorn solve.

    ``plan`` is the (n, m) float64 transport plan on the inputs' device;
    ``marginal_error`` is ``max(|T.sum(1)-a|_1, |T.sum(0)-b|_1)``; ``converged``
    says whether the stopping criterion was met before ``max_iter``.
    """

    plan: torch.Tensor
    iterations: int
    marginal_error: float
    converged: bool
    solver: str


# ---------------------------------------------------------------------------
# validation


def _as_f64(x, name: str, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if device is not None and t.device != device:
            t = t.to(device)
        return t.to(torch.float64)
    try:
        return torch.as_tensor(x, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a tensor or array of numbers ({exc})") from None


def _validate(a, b, cost, epsilon, tol, max_iter):
    """Return float64 (a, b, cost, eps) on cost's device or raise ValueError."""
    cost = _as_f64(cost, "cost", None)
    device = cost.device
    a = _as_f64(a, "a", device)
    b = _as_f64(b, "b", device)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D (n, m) matrix, got shape {tuple(cost.shape)}")
    n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"cost must be non-empty, got shape {tuple(cost.shape)}")
    if a.shape != (n,):
        raise ValueError(f"a must have shape ({n},) to match cost {tuple(cost.shape)}, got {tuple(a.shape)}")
    if b.shape != (m,):
        raise ValueError(f"b must have shape ({m},) to match cost {tuple(cost.shape)}, got {tuple(b.shape)}")
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (float(tol) > 0):
        raise ValueError(f"tol must be positive, got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("cost must be finite: replace NaN/inf entries (e.g. torch.nan_to_num) before solving")
    for name, x in (("a", a), ("b", b)):
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
            raise ValueError(f"{name} must be finite and nonnegative (a histogram of masses)")
    sa, sb = float(a.sum()), float(b.sum())
    if not sa > 0:
        raise ValueError("a and b must have positive total mass")
    if abs(sa - sb) > 1e-8 * max(1.0, sa, sb):
        raise ValueError(
            f"a and b must have the same total mass (got {sa!r} vs {sb!r}); normalise both, e.g. a / a.sum()"
        )
    return a, b, cost, eps


def _marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    ea = (plan.sum(1) - a).abs().sum()
    eb = (plan.sum(0) - b).abs().sum()
    return float(torch.maximum(ea, eb))


# ---------------------------------------------------------------------------
# torch solver


def _lse_step(Mr, pot, axis, logmass, buf):
    """Exact log-domain half step.

    ``axis=0``: g = log b - logsumexp_i(Mr[i, :] + f[i]) (``pot`` = f).
    ``axis=1``: f = log a - logsumexp_j(Mr[:, j] + g[j]) (``pot`` = g).
    Uses ``buf`` (same shape as ``Mr``) as scratch; ``-inf`` safe.
    """
    if axis == 0:
        torch.add(Mr, pot[:, None], out=buf)
    else:
        torch.add(Mr, pot[None, :], out=buf)
    mx = buf.amax(axis, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    buf.sub_(mx)
    buf.exp_()
    lse = buf.sum(axis).log_().add_(mx.squeeze(axis))
    return logmass - lse


def _absorb(Mr, pot, scaling, axis, logmass, buf):
    """A scaling that left its range, absorbed into its potential ``pot`` (``pot + log scaling``), and the other
    potential redone exactly (:func:`_lse_step` along ``axis``); returns both (the caller rebuilds the kernel)."""
    pot = pot + scaling.log()
    return pot, _lse_step(Mr, pot, axis, logmass, buf)


def _build_kernel(Mr, f, g, K, log_floor):
    """K <- exp(max(Mr + f_i + g_j, log_floor)) in place."""
    torch.add(Mr, f[:, None], out=K)
    K.add_(g[None, :])
    K.clamp_(min=log_floor)
    K.exp_()


def _in_range(x: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: all entries finite and within the scaling limits."""
    lo, hi = torch.aminmax(x)
    return (lo >= 1.0 / _SCALE_LIMIT) & (hi <= _SCALE_LIMIT)  # NaN -> False


def _solve_positive(a, b, Mr, tol, max_iter, check_every, method):
    """Sinkhorn on strictly positive a, b; returns (f, g, iterations, converged).

    Potentials follow POT's convention (``log_u``, ``log_v``): plan = exp(Mr + f_i + g_j).

    ``method="absorb"`` (default) is the log-stabilised scaling scheme
    (Schmitzer 2019): the kernel ``K = exp(Mr + f + g)`` is formed from the
    current log potentials, and iterations update scaling vectors u, v with two
    matrix-vector products (``v = b / K^T u``, ``u = a / K v``).  Whenever a
    scaling leaves [1e-40, 1e40] or is non-finite, it is absorbed into the
    potentials, the half step is redone exactly with logsumexp, and ``K`` is
    rebuilt.  The iterates are mathematically identical to the plain
    log-domain iteration; only rounding differs.

    ``method="logsumexp"`` runs every half step with logsumexp (reference path,
    ~10x slower on CPU).
    """
    n, m = Mr.shape
    loga, logb = a.log(), b.log()
    buf = torch.empty_like(Mr)
    f = torch.zeros(n, dtype=Mr.dtype, device=Mr.device)
    converged = False
    ii = 0

    if method == "logsumexp":
        for ii in range(max_iter):
            g = _lse_step(Mr, f, 0, logb, buf)
            f = _lse_step(Mr, g, 1, loga, buf)
            if ii % check_every == 0:
                # buf = exp(Mr + g_j - mx_i); plan = buf * exp(mx_i + f_i) = buf * a_i / s_i
                # so the column sums are one matrix-vector product.
                s = buf.sum(1)
                col = buf.T @ (a / s)
                if float(torch.linalg.vector_norm(col - b)) < tol:
                    converged = True
                    break
        return f, g, ii + 1, converged

    # --- absorb / kernel-scaling path -----------------------------------------
    K = buf  # K = exp(Mr + f + g) (floored), valid once built
    log_floor = max(min(float(loga.min()), float(logb.min())) - _LOG_K_MARGIN, _LOG_K_MIN)
    # First half step exactly in log domain (f = 0 -> never exp(-C/eps) directly).
    g = _lse_step(Mr, f, 0, logb, buf)
    _build_kernel(Mr, f, g, K, log_floor)
    u = torch.ones(n, dtype=Mr.dtype, device=Mr.device)
    v = torch.ones(m, dtype=Mr.dtype, device=Mr.device)
    ktu = None  # cached K^T u for the current u (from the marginal check)
    first = True
    for ii in range(max_iter):
        if not first:
            # v-step: v = b / (K^T u)
            if ktu is None:
                ktu = torch.mv(K.T, u)
            v_new = b / ktu
            ktu = None
            if not bool(_in_range(v_new)):
                f, g = _absorb(Mr, f, u, 0, logb, buf)
                _build_kernel(Mr, f, g, K, log_floor)
                u, v_new = torch.ones_like(u), torch.ones_like(v)
            v = v_new
        first = False
        # u-step: u = a / (K v)
        u_new = a / torch.mv(K, v)
        if not bool(_in_range(u_new)):
            g, f = _absorb(Mr, g, v, 1, loga, buf)
            _build_kernel(Mr, f, g, K, log_floor)
            v, u_new = torch.ones_like(v), torch.ones_like(u)
        u = u_new
        if ii % check_every == 0:
            ktu = torch.mv(K.T, u)  # reused by the next v-step
            err = torch.linalg.vector_norm(ktu * v - b)
            if float(err) < tol:
                converged = True
                break
    return f + u.log(), g + v.log(), ii + 1, converged


def sinkhorn_log(
    a,
    b,
    cost,
    epsilon: float,
    *,
    tol: float = 1e-9,
    max_iter: int = 2000,
    check_every: int = 10,
    method: str = "absorb",
) -> SinkhornResult:
    """Log-domain entropic OT in pure torch (float64, inputs' device).

    Stops when ``||T.sum(0) - b||_2 < tol``, checked every ``check_every``
    iterations starting at the first (POT's rule with ``check_every=10``).
    ``method``: ``"absorb"`` (default, log-stabilised kernel scaling with
    logsumexp fallback; fast) or ``"logsumexp"`` (every update a logsumexp).
    Zero-mass entries of ``a``/``b`` get zero plan rows/columns.
    Deterministic: identical inputs give a bitwise identical plan.
    """
    a, b, cost, eps = _validate(a, b, cost, epsilon, tol, max_iter)
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every!r}")
    if method not in ("absorb", "logsumexp"):
        raise ValueError(f"method must be 'absorb' or 'logsumexp', got {method!r}")

    rows = cols = None
    a_s, b_s, cost_s = a, b, cost
    if bool((a == 0).any()) or bool((b == 0).any()):
        rows = torch.nonzero(a > 0).squeeze(1)
        cols = torch.nonzero(b > 0).squeeze(1)
        a_s, b_s = a[rows], b[cols]
        cost_s = cost[rows][:, cols]

    Mr = cost_s / (-eps)
    f, g, iters, converged = _solve_positive(a_s, b_s, Mr, float(tol), int(max_iter), int(check_every), method)
    plan_s = Mr.add_(f[:, None]).add_(g[None, :]).exp_()  # Mr no longer needed

    if rows is None:
        plan = plan_s
    else:
        plan = torch.zeros_like(cost)
        plan[rows[:, None], cols[None, :]] = plan_s
    return SinkhornResult(
        plan=plan,
        iterations=iters,
        marginal_error=_marginal_error(plan, a, b),
        converged=converged,
        solver="torch",
    )


# ---------------------------------------------------------------------------
# POT reference


def import_pot():
    """POT, imported lazily and without scikit-learn: POT's optional k-means start of low-rank Sinkhorn (unused
    here) imports scikit-learn, pandas and scipy.stats at import time (~90 MB resident and seconds per process);
    it degrades to its own initialisation when scikit-learn is absent, so it is hidden while POT is imported."""
    import sys

    if "ot" in sys.modules:
        return sys.modules["ot"]
    hide = "sklearn" not in sys.modules
    if hide:
        sys.modules["sklearn"] = None  # an import of it raises ImportError, which POT handles
    try:
        import ot  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError("sinkhorn_pot needs POT: install it with `pip install pot`") from exc
    finally:
        if hide and sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]
    return ot


def sinkhorn_pot(
    a,
    b,
    cost,
    epsilon: float,
    *,
    tol: float = 1e-9,
    max_iter: int = 2000,
    backend: str = "numpy",
) -> SinkhornResult:
    """POT's ``ot.bregman.sinkhorn_log`` with the numpy or torch backend.

    Inputs are converted to float64 (numpy arrays, or torch tensors on the
    cost's device); the plan is returned as a float64 torch tensor on the
    cost's device.  Requires the optional dependency POT (``pip install pot``).
    """
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    a, b, cost, eps = _validate(a, b, cost, epsilon, tol, max_iter)
    ot = import_pot()

    kw = dict(numItermax=int(max_iter), stopThr=float(tol), log=True, warn=False)
    if backend == "numpy":
        plan_np, log = ot.bregman.sinkhorn_log(
            a.cpu().numpy(), b.cpu().numpy(), cost.cpu().numpy(), eps, **kw
        )
        plan = torch.from_numpy(plan_np).to(device=cost.device, dtype=torch.float64)
    else:
        plan, log = ot.bregman.sinkhorn_log(a, b, cost, eps, **kw)
        plan = plan.to(torch.float64)
    errs = log.get("err", [])
    converged = bool(len(errs) > 0 and float(errs[-1]) < tol)
    return SinkhornResult(
        plan=plan,
        iterations=int(log["niter"]) + 1,
        marginal_error=_marginal_error(plan, a, b),
        converged=converged,
        solver=f"pot-{backend}",
    )


# ---------------------------------------------------------------------------
# dispatch


def solve(
    a,
    b,
    cost,
    epsilon: float,
    *,
    solver: str = "torch",
    tol: float = 1e-9,
    max_iter: int = 2000,
) -> SinkhornResult:
    """Solve entropic OT with ``solver`` in ``SOLVERS`` ("torch", "pot-numpy", "pot-torch")."""
    if solver == "torch":
        return sinkhorn_log(a, b, cost, epsilon, tol=tol, max_iter=max_iter)
    if solver == "pot-numpy":
        return sinkhorn_pot(a, b, cost, epsilon, tol=tol, max_iter=max_iter, backend="numpy")
    if solver == "pot-torch":
        return sinkhorn_pot(a, b, cost, epsilon, tol=tol, max_iter=max_iter, backend="torch")
    raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
