"""Benchmark the torch Sinkhorn solver against POT at equal tolerance.

Run ``python -m benchmarks.solver --help`` for options.  For each size ``n x m``
it builds a realistic cost matrix (Euclidean distances between neuron
activation profiles of seeded random activations with a few heavy-tailed
"massive" dimensions; targets are the ``m`` neurons with the largest mean
``|x|``), then times ``sinkhorn_log`` (CPU, and CUDA if available), POT's
``ot.bregman.sinkhorn_log`` (numpy and torch backends) and the reduced QR of
the plan.  Prints a Markdown table and the machine description; ``--json``
writes everything to a file.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _load_sinkhorn():
    """Import dotresize.bases.sinkhorn, or load it by path if the package is incomplete."""
    try:
        from dotresize.bases import sinkhorn  # noqa: PLC0415

        return sinkhorn
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "dotresize" / "bases" / "sinkhorn.py"
        spec = importlib.util.spec_from_file_location("_dotresize_sinkhorn", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


sk = _load_sinkhorn()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_cost(n: int, m: int, *, tokens: int = 2048, seed: int = 0, normalize: str = "median"):
    """Cost (n, m) between all n neurons and the m neurons with largest mean |x|, plus uniform marginals."""
    if m > n:
        raise ValueError(f"need m <= n, got {n}x{m}")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    rank = 64
    # correlated activations: low-rank structure + per-neuron scale + noise
    z = torch.randn(tokens, rank, generator=g, dtype=dt)
    w = torch.randn(rank, n, generator=g, dtype=dt) / rank**0.5
    scale = torch.exp(0.5 * torch.randn(n, generator=g, dtype=dt))
    x = (z @ w + 0.5 * torch.randn(tokens, n, generator=g, dtype=dt)) * scale
    # a few heavy-tailed "massive" dimensions: large spikes on ~1% of tokens
    k = max(2, n // 1000)
    dims = torch.randperm(n, generator=g)[:k]
    spikes = torch.rand(tokens, k, generator=g, dtype=dt) < 0.01
    heavy = torch.randn(tokens, k, generator=g, dtype=dt) * torch.exp(torch.randn(tokens, k, generator=g, dtype=dt))
    x[:, dims] += 100.0 * spikes * heavy.abs() + 3.0 * heavy
    targets = torch.topk(x.abs().mean(0), m).indices.sort().values
    # Euclidean distance from the Gram matrix: |xi|^2 + |xj|^2 - 2 <xi, xj>
    sq = (x * x).sum(0)
    d2 = sq[:, None] + sq[targets][None, :] - 2.0 * (x.T @ x[:, targets])
    cost = d2.clamp_min_(0.0).sqrt_()
    if normalize == "median":
        cost /= cost.median()
    elif normalize == "max":
        cost /= cost.max()
    else:
        raise ValueError(f"normalize must be 'median' or 'max', got {normalize!r}")
    a = torch.full((n,), 1.0 / n, dtype=dt)
    b = torch.full((m,), 1.0 / m, dtype=dt)
    return a, b, cost


def _timed(fn, repeats: int, label: str, cuda: bool = False):
    times, res = [], None
    for r in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        log(f"  {label}: run {r + 1}/{repeats} {times[-1]:.3f}s, {res.iterations} it, converged={res.converged}")
    return statistics.median(times), res


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import ot  # noqa: PLC0415

        pot = ot.__version__
    except ImportError:
        pot = None
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "pot": pot,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


def bench_size(n, m, args) -> dict:
    log(f"[{n}x{m}] building cost (tokens={args.tokens}, normalize={args.normalize})")
    a, b, cost = make_cost(n, m, tokens=args.tokens, seed=args.seed, normalize=args.normalize)
    kw = dict(tol=args.tol, max_iter=args.max_iter)
    row = {"n": n, "m": m, "epsilon": args.epsilon, "tol": args.tol, "max_iter": args.max_iter,
           "cost_max": float(cost.max())}

    t, ours = _timed(lambda: sk.sinkhorn_log(a, b, cost, args.epsilon, **kw), args.repeats, "torch cpu")
    row.update(torch_cpu_s=t, torch_iters=ours.iterations, torch_converged=ours.converged,
               torch_marginal_error=ours.marginal_error)

    row["torch_lse_s"] = None
    if args.lse:
        t, res_l = _timed(lambda: sk.sinkhorn_log(a, b, cost, args.epsilon, method="logsumexp", **kw),
                          args.repeats, "torch cpu (method=logsumexp)")
        row["torch_lse_s"] = t
        row["torch_lse_iters"] = res_l.iterations

    row["torch_cuda_s"] = None
    if torch.cuda.is_available():
        ac, bc, cc = a.cuda(), b.cuda(), cost.cuda()
        sk.sinkhorn_log(ac, bc, cc, args.epsilon, **kw)  # warm-up (CUDA context, kernels)
        t, res_c = _timed(lambda: sk.sinkhorn_log(ac, bc, cc, args.epsilon, **kw), args.repeats, "torch cuda", True)
        row["torch_cuda_s"] = t
        row["cuda_vs_cpu_maxdiff"] = float((res_c.plan.cpu() - ours.plan).abs().max())

    pot_reps = args.pot_repeats or args.repeats
    t, pot = _timed(lambda: sk.sinkhorn_pot(a, b, cost, args.epsilon, backend="numpy", **kw), pot_reps, "pot numpy")
    row.update(pot_numpy_s=t, pot_iters=pot.iterations, pot_converged=pot.converged,
               pot_marginal_error=pot.marginal_error)

    row["pot_torch_s"] = None
    if not args.no_pot_torch:
        t, pot_t = _timed(lambda: sk.sinkhorn_pot(a, b, cost, args.epsilon, backend="torch", **kw), pot_reps,
                          "pot torch")
        row["pot_torch_s"] = t
        row["pot_torch_iters"] = pot_t.iterations

    scale = float(pot.plan.abs().max())
    diff = float((ours.plan - pot.plan).abs().max())
    row.update(ratio_pot_numpy_over_torch=row["pot_numpy_s"] / row["torch_cpu_s"], max_abs_diff=diff,
               plan_max=scale, rel_diff=diff / scale, agree=diff <= 1e-6 * scale)

    qr_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _, r = torch.linalg.qr(ours.plan, mode="reduced")
        qr_times.append(time.perf_counter() - t0)
    row["qr_s"] = statistics.median(qr_times)
    row["cond_R"] = float(torch.linalg.cond(r))
    log(f"[{n}x{m}] ours {row['torch_cpu_s']:.3f}s vs POT numpy {row['pot_numpy_s']:.3f}s "
        f"-> {row['ratio_pot_numpy_over_torch']:.1f}x; max|dT|/max T = {row['rel_diff']:.2e}")
    return row


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def markdown(rows, info) -> str:
    head = ("| size | iters ours/POT | ours CPU (s) | ours CPU logsumexp (s) | ours CUDA (s) | POT numpy (s) "
            "| POT torch (s) | POT-numpy / ours | max abs diff / max T | <= 1e-6? | QR (s) | cond(R) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['n']}x{r['m']} | {r['torch_iters']}/{r['pot_iters']} | {_fmt(r['torch_cpu_s'])} "
            f"| {_fmt(r['torch_lse_s'])} "
            f"| {_fmt(r['torch_cuda_s'])} | {_fmt(r['pot_numpy_s'])} | {_fmt(r['pot_torch_s'])} "
            f"| {r['ratio_pot_numpy_over_torch']:.1f}x | {r['rel_diff']:.1e} | {'yes' if r['agree'] else 'NO'} "
            f"| {_fmt(r['qr_s'])} | {r['cond_R']:.2e} |"
        )
    a = rows[0] if rows else {}
    lines.append("")
    lines.append(
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"POT {info['pot']}, Python {info['python']}" + (f", CUDA: {info['cuda']}" if info["cuda"] else ", no CUDA")
        + f"; 1-min load average {info['loadavg_start']} at start, {info.get('loadavg_end')} at end"
    )
    if a:
        lines.append(f"epsilon={a['epsilon']}, tol={a['tol']}, max_iter={a['max_iter']}, float64, uniform marginals")
    return "\n".join(lines)


def parse_sizes(text: str):
    out = []
    for part in text.split(","):
        try:
            n, m = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad size {part!r}: use NxM, e.g. 576x460") from None
        out.append((n, m))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.solver", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="576x460,2048x1536,4096x3072", help="comma-separated NxM (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per solver; the median is reported")
    p.add_argument("--pot-repeats", type=int, default=None, help="runs for POT solvers (default: --repeats)")
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--tol", type=float, default=1e-9)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=2048, help="activation rows N")
    p.add_argument("--normalize", choices=("median", "max"), default="median", help="divide the cost by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lse", action="store_true", help="also time sinkhorn_log(method='logsumexp')")
    p.add_argument("--no-pot-torch", action="store_true", help="skip POT's torch backend")
    p.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    args = p.parse_args(argv)

    info = machine_info()
    log(f"machine: {info}")
    rows = [bench_size(n, m, args) for n, m in parse_sizes(args.sizes)]
    info["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(markdown(rows, info))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": rows}, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
