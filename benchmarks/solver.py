"""Solver benchmark: the Sinkhorn + QR stage alone, our torch log-domain solver against POT's ``sinkhorn_log``.

For each size ``n x m`` a realistic cost matrix is built (distances between activation profiles of seeded
random activations with a few heavy-tailed "massive" dimensions, targets = the ``m`` neurons of largest mean
|x|, normalised by the median as DotOptions does), then these are timed, interleaved, medians of repeats:

* ``torch`` — ``dotresize.bases.sinkhorn.sinkhorn_log`` on the CPU, and on CUDA whenever it is available;
* ``pot-numpy`` / ``pot-torch`` — POT's ``ot.bregman.sinkhorn_log`` (skipped when POT is not installed);
* the reduced QR of the plan (what the DOT basis does next), on each device.

All solvers get the same tolerance and iteration cap and use the same stopping rule (POT's: every 10
iterations, starting with the first, stop once ``||T.sum(0) - b||_2 < tol``), so they run the same number of
iterations; the plans are compared entrywise (max |T_ours - T_ref| must be <= 1e-6; the relative difference
to max T is printed too). If our solver is less than 5x faster than POT's numpy backend on the largest size,
a profile of both is printed (``--profile auto``).

Needs only torch and numpy (POT optional): the module loads ``dotresize/bases/sinkhorn.py`` by path, so it
runs from a bare checkout, e.g. on a GPU machine:

    python -m benchmarks solver --device cuda --json solver-cuda.json
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import (SHARED_MACHINE_NOTE, fmt, log, machine_info, machine_line, markdown_table, median,
                     ratio, emit_result)


def _load_sinkhorn():
    """``dotresize/bases/sinkhorn.py`` by path: it imports nothing but torch (and POT lazily)."""
    path = Path(__file__).resolve().parents[1] / "dotresize/bases/sinkhorn.py"
    name = "_dotresize_bench_sinkhorn"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sk = _load_sinkhorn()

SIZES: dict[str, dict[str, Any]] = {
    # the issue's sizes at DotOptions' tolerance; POT numpy on 4096x3072 takes minutes per solve on 2 cores
    "full": dict(sizes="576x460,2048x1536,4096x3072", repeats=5, pot_repeats=3, tol=1e-9, max_iter=2000,
                 budget_s=900.0),
    # the same sizes with an iteration cap (both solvers stop at the cap: identical iterates, per-iteration cost)
    "reduced": dict(sizes="576x460,2048x1536,4096x3072", repeats=3, pot_repeats=1, tol=1e-9, max_iter=20,
                    budget_s=60.0, qr_repeats=1),
    "tiny": dict(sizes="48x40,96x72", repeats=2, pot_repeats=1, tol=1e-9, max_iter=200, budget_s=10.0,
                 profile="never"),
}


def pot_available() -> bool:
    return importlib.util.find_spec("ot") is not None


def make_cost(n: int, m: int, *, tokens: int = 2048, seed: int = 0, normalize: str = "median"):
    """Cost (n, m) between all n neurons and the m neurons with largest mean |x|, plus uniform marginals."""
    if m > n:
        raise ValueError(f"need m <= n, got {n}x{m}")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    rank = 64
    z = torch.randn(tokens, rank, generator=g, dtype=dt)  # correlated activations: low rank + scale + noise
    w = torch.randn(rank, n, generator=g, dtype=dt) / rank**0.5
    scale = torch.exp(0.5 * torch.randn(n, generator=g, dtype=dt))
    x = (z @ w + 0.5 * torch.randn(tokens, n, generator=g, dtype=dt)) * scale
    k = max(2, n // 1000)  # a few heavy-tailed "massive" dimensions: large spikes on ~1% of tokens
    dims = torch.randperm(n, generator=g)[:k]
    spikes = torch.rand(tokens, k, generator=g, dtype=dt) < 0.01
    heavy = torch.randn(tokens, k, generator=g, dtype=dt) * torch.exp(torch.randn(tokens, k, generator=g, dtype=dt))
    x[:, dims] += 100.0 * spikes * heavy.abs() + 3.0 * heavy
    targets = torch.topk(x.abs().mean(0), m).indices.sort().values
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def solvers_for(devices: list[str], with_pot: bool, pot_torch: bool,
                only: list[str] | None = None) -> list[tuple[str, str]]:
    """(solver, device) pairs to time: ours on every device, POT numpy on the CPU, POT torch on every device;
    ``only`` ("torch:cuda", "pot-torch", ...) keeps the pairs it names (a bare solver name: on every device)."""
    pairs = _default_pairs(devices, with_pot, pot_torch)
    if only:
        pairs = [(s, d) for s, d in pairs if s in only or f"{s}:{d}" in only]
    return pairs


def _default_pairs(devices: list[str], with_pot: bool, pot_torch: bool) -> list[tuple[str, str]]:
    out = [("torch", d) for d in devices]
    if with_pot:
        if "cpu" in devices:
            out.append(("pot-numpy", "cpu"))
            if pot_torch:
                out.append(("pot-torch", "cpu"))
        if pot_torch:
            out += [("pot-torch", d) for d in devices if d.startswith("cuda")]
    return out


def _solve(solver: str, device: str, problem, epsilon: float, tol: float, max_iter: int):
    a, b, cost = problem[device]
    if solver == "torch":
        return sk.sinkhorn_log(a, b, cost, epsilon, tol=tol, max_iter=max_iter)
    return sk.sinkhorn_pot(a, b, cost, epsilon, tol=tol, max_iter=max_iter, backend=solver.split("-")[1])


def load_costs(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Cost matrices saved by the quality benchmark (``real_costs.safetensors``: one tensor per slice point)."""
    from safetensors.torch import load_file

    return {name: t.to(torch.float64) for name, t in sorted(load_file(str(path)).items())}


def bench_size(n: int, m: int, args, devices: list[str], with_pot: bool) -> dict[str, Any]:
    log(f"solver [{n}x{m}]: building the cost (tokens {args.tokens}, normalised by the {args.normalize})")
    a, b, cost = make_cost(n, m, tokens=args.tokens, seed=args.seed, normalize=args.normalize)
    return bench_problem(f"{n}x{m}", a, b, cost, args, devices, with_pot)


def bench_problem(label: str, a, b, cost, args, devices: list[str], with_pot: bool) -> dict[str, Any]:
    n, m = cost.shape
    problem = {d: (a.to(d), b.to(d), cost.to(d)) for d in set(devices) | {"cpu"}}
    pairs = solvers_for(devices, with_pot, not args.no_pot_torch, args.solvers)
    for solver, device in pairs:  # warm-up on CUDA (context, kernels, allocator): 20 iterations, untimed
        if device.startswith("cuda"):
            _solve(solver, device, problem, args.epsilon, args.tol, 20)
            _sync(device)
    times: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    results: dict[tuple[str, str], Any] = {}
    spent: dict[tuple[str, str], float] = {p: 0.0 for p in pairs}
    for rep in range(max(args.repeats, args.pot_repeats)):
        for pair in pairs:
            solver, device = pair
            wanted = args.repeats if solver == "torch" else args.pot_repeats
            if rep >= wanted or (rep > 0 and spent[pair] > args.budget_s):
                continue
            _sync(device)
            start = time.perf_counter()
            result = _solve(solver, device, problem, args.epsilon, args.tol, args.max_iter)
            _sync(device)
            elapsed = time.perf_counter() - start
            spent[pair] += elapsed
            times[pair].append(elapsed)
            results[pair] = result
            log(f"  {solver} on {device}: run {rep + 1}: {elapsed:.3f} s, {result.iterations} iterations, "
                f"converged {result.converged}")
    reference_pair = ("pot-numpy", "cpu") if ("pot-numpy", "cpu") in results else None
    if reference_pair is None:  # no POT: the CPU torch solver is the reference (computed once if not timed)
        if ("torch", "cpu") not in results:
            results[("torch", "cpu-reference")] = sk.sinkhorn_log(*problem["cpu"], args.epsilon, tol=args.tol,
                                                                  max_iter=args.max_iter)
            reference_pair = ("torch", "cpu-reference")
        else:
            reference_pair = ("torch", "cpu")
    reference = results[reference_pair].plan.cpu()
    plan_max = float(reference.abs().max())
    rows = []
    pot_numpy_s = median(times.get(("pot-numpy", "cpu"), []))
    for pair in pairs:
        solver, device = pair
        if not times[pair]:
            continue
        result = results[pair]
        diff = float((result.plan.cpu() - reference).abs().max())
        t = median(times[pair])
        rows.append({"solver": solver, "device": device, "seconds": t, "seconds_all": times[pair],
                     "iterations": result.iterations, "converged": result.converged,
                     "seconds_per_iteration": t / max(result.iterations, 1),
                     "marginal_error": result.marginal_error, "max_abs_diff": diff, "rel_diff": diff / plan_max,
                     "agree": diff <= 1e-6, "speedup_vs_pot_numpy": ratio(pot_numpy_s, t)})
    qr = []
    plan_cpu = results[("torch", "cpu")].plan if ("torch", "cpu") in results else reference
    for device in devices:
        plan = plan_cpu.to(device)
        torch.linalg.qr(plan[: min(64, n), : min(48, m)], mode="reduced")  # warm-up (LAPACK / cuSOLVER)
        qt = []
        for _ in range(args.qr_repeats or args.repeats):
            _sync(device)
            start = time.perf_counter()
            _, r = torch.linalg.qr(plan, mode="reduced")
            _sync(device)
            qt.append(time.perf_counter() - start)
        qr.append({"device": device, "seconds": median(qt), "seconds_all": qt,
                   "cond_r": float(torch.linalg.cond(r.cpu()))})
    torch_cpu = next((r for r in rows if r["solver"] == "torch" and r["device"] == "cpu"), None)
    out = {"label": label, "n": n, "m": m, "epsilon": args.epsilon, "tol": args.tol, "max_iter": args.max_iter,
           "reference": "/".join(reference_pair), "plan_max": plan_max, "rows": rows, "qr": qr,
           "same_iterations": len({r["iterations"] for r in rows}) == 1,
           "speedup_torch_cpu_vs_pot_numpy": torch_cpu["speedup_vs_pot_numpy"] if torch_cpu else None}
    log(f"solver [{label}]: POT numpy / ours (CPU) = {fmt(out['speedup_torch_cpu_vs_pot_numpy'], '.1f')}x")
    return out


def profile_size(n: int, m: int, args, with_pot: bool, iterations: int = 60) -> dict[str, str]:
    """torch.profiler of our solver and cProfile of POT numpy on the same problem, ``iterations`` each."""
    a, b, cost = make_cost(n, m, tokens=args.tokens, seed=args.seed, normalize=args.normalize)
    out = {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sk.sinkhorn_log(a, b, cost, args.epsilon, tol=args.tol, max_iter=iterations)
    out["torch"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    if with_pot:
        profiler = cProfile.Profile()
        profiler.enable()
        sk.sinkhorn_pot(a, b, cost, args.epsilon, tol=args.tol, max_iter=iterations, backend="numpy")
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
        out["pot-numpy"] = stream.getvalue()
    return out


def run_solver(*, sizes: str, repeats: int, pot_repeats: int, tol: float, max_iter: int, budget_s: float,
               epsilon: float = 0.05, tokens: int = 2048, normalize: str = "median", seed: int = 0,
               device: str = "auto", no_pot_torch: bool = False, profile: str = "auto",
               threads: int | None = None, qr_repeats: int | None = None,
               solvers: str | None = None, cost_file: str | os.PathLike | None = None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    args = argparse.Namespace(repeats=repeats, pot_repeats=pot_repeats, tol=tol, max_iter=max_iter,
                              budget_s=budget_s, epsilon=epsilon, tokens=tokens, normalize=normalize, seed=seed,
                              no_pot_torch=no_pot_torch, qr_repeats=qr_repeats,
                              solvers=[v.strip() for v in solvers.split(",") if v.strip()] if solvers else None)
    if device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in device.split(",") if d.strip()]
        if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    with_pot = pot_available()
    if not with_pot:
        log("solver: POT is not installed: the POT rows are skipped")
    info = machine_info()
    started = time.perf_counter()
    results = [bench_size(n, m, args, devices, with_pot) for n, m in parse_sizes(sizes)] if sizes else []
    real = []
    if cost_file:
        for name, cost in load_costs(cost_file).items():
            n, m = cost.shape
            log(f"solver [{name}]: a real cost matrix {n}x{m} from {cost_file}")
            a = torch.full((n,), 1.0 / n, dtype=torch.float64)
            b = torch.full((m,), 1.0 / m, dtype=torch.float64)
            real.append(bench_problem(f"{name} ({n}x{m})", a, b, cost, args, devices, with_pot))
    info["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    largest = max(results or real, key=lambda r: r["n"] * r["m"])
    speedup = largest["speedup_torch_cpu_vs_pot_numpy"]
    profiles = None
    if profile == "always" or (profile == "auto" and speedup is not None and speedup < 5.0):
        log("solver: profiling the largest size")
        profiles = profile_size(largest["n"], largest["m"], args, with_pot)
    result = {"benchmark": "solver", "machine": info, "devices": devices, "pot": with_pot,
              "settings": {"epsilon": epsilon, "tol": tol, "max_iter": max_iter, "tokens": tokens,
                           "normalize": normalize, "seed": seed, "repeats": repeats, "pot_repeats": pot_repeats,
                           "budget_s": budget_s},
              "sizes": results + real, "real_costs": str(cost_file) if cost_file else None,
              "largest": largest["label"],
              "speedup_largest_torch_cpu_vs_pot_numpy": speedup, "target_5x_met": None if speedup is None
              else speedup >= 5.0, "profiles": profiles, "seconds": round(time.perf_counter() - started, 1)}
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    header = ["size", "solver", "device", "iterations", "converged", "median s", "ms / iteration",
              "runs", "× faster than POT numpy", "max |ΔT|", "max |ΔT| / max T", "≤ 1e-6"]
    table = []
    for size in result["sizes"]:
        for r in size["rows"]:
            table.append([size["label"], r["solver"], r["device"], r["iterations"],
                          "yes" if r["converged"] else "no", f"{r['seconds']:.3f}",
                          f"{1000 * r['seconds_per_iteration']:.2f}", len(r["seconds_all"]),
                          fmt(r["speedup_vs_pot_numpy"], ".1f"), f"{r['max_abs_diff']:.1e}",
                          f"{r['rel_diff']:.1e}", "yes" if r["agree"] else "NO"])
    qr = [[size["label"], q["device"], f"{q['seconds']:.3f}", f"{q['cond_r']:.3g}"]
          for size in result["sizes"] for q in size["qr"]]
    speedup = result["speedup_largest_torch_cpu_vs_pot_numpy"]
    verdict = ("POT numpy not run here: no ratio" if speedup is None else
               f"torch (CPU) is **{speedup:.1f}×** faster than POT numpy `sinkhorn_log` on {result['largest']} "
               f"({'meets' if speedup >= 5 else 'misses'} the 5× target)")
    lines = ["### Solver: Sinkhorn (log domain, float64) + QR", "",
             f"ε = {s['epsilon']} on a cost normalised by its {s['normalize']}, uniform marginals, tol {s['tol']:g}, "
             f"max_iter {s['max_iter']}, POT's stopping rule for every solver; medians of up to {s['repeats']} "
             f"(ours) / {s['pot_repeats']} (POT) interleaved runs, fewer once a solver has used {s['budget_s']:.0f} s "
             f"on a size. Reference plan for |ΔT|: POT numpy when it ran, else ours on the CPU. NxM rows: synthetic "
             f"costs (seeded activations with massive dimensions); `point_<p>` rows: SmolLM2's real cost at slice point "
             f"p (from the quality benchmark's calibration statistics, normalised like DotOptions).", "",
             markdown_table(header, table), "", "Reduced QR of the plan:", "",
             markdown_table(["size", "device", "median s", "cond(R)"], qr), "", verdict + ".", "",
             f"Machine: {machine_line(result['machine'])}; {SHARED_MACHINE_NOTE}."]
    if result.get("profiles"):
        lines += ["", "Profile of the largest size (60 iterations each):", ""]
        for name, text in result["profiles"].items():
            lines += [f"{name}:", "```", text.strip(), "```"]
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            n, m = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad size {part!r}: use NxM, e.g. 576x460") from None
        out.append((n, m))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="preset (default: full)")
    p.add_argument("--sizes", default=None, help="comma-separated NxM, e.g. 576x460,4096x3072")
    p.add_argument("--device", default="auto",
                   help="auto (CPU, plus CUDA when available), cpu, cuda, or a comma-separated list")
    p.add_argument("--repeats", type=int, default=None, help="runs of our solver per size (median reported)")
    p.add_argument("--pot-repeats", type=int, default=None, help="runs of each POT solver per size")
    p.add_argument("--budget-s", type=float, default=None, help="stop repeating a solver after this many seconds")
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--max-iter", type=int, default=None)
    p.add_argument("--tokens", type=int, default=2048, help="activation rows behind the cost")
    p.add_argument("--normalize", choices=("median", "max"), default="median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-pot-torch", action="store_true", help="skip POT's torch backend")
    p.add_argument("--solvers", default=None,
                   help="only these solver[:device] pairs, e.g. torch:cpu,torch:cuda,pot-torch:cuda "
                        "(solvers: torch, pot-numpy, pot-torch)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default=None,
                   help="profile the largest size (auto: when ours is < 5x faster than POT numpy)")
    p.add_argument("--cost-file", default=None,
                   help="also time these real cost matrices (safetensors, one tensor per point; the quality "
                        "benchmark writes real_costs.safetensors)")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    p.add_argument("--markdown", type=Path, default=None)


def options_from_args(args) -> dict[str, Any]:
    preset = dict(SIZES[args.size])
    for key in ("sizes", "repeats", "pot_repeats", "budget_s", "tol", "max_iter"):
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    preset.setdefault("profile", "auto")
    if args.profile is not None:
        preset["profile"] = args.profile
    return dict(preset, epsilon=args.epsilon, tokens=args.tokens, normalize=args.normalize, seed=args.seed,
                device=args.device, no_pot_torch=args.no_pot_torch, threads=args.threads, solvers=args.solvers,
                cost_file=args.cost_file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks solver", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    result = run_solver(**options_from_args(args))
    emit_result(result, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
