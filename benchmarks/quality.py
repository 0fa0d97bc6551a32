"""Quality benchmark: WikiText-2 perplexity of compressions of one model, side by side.

Parallel-mode statistics are captured once and every basis variant is computed from them, so an ablation over
DOT's options costs one perplexity evaluation per row. Sequential-mode rows run a full compression each.

    python -m benchmarks.quality --ratios 0.2 --variants pca,prune,dot --max-windows 100 --json out.json
    python -m benchmarks.quality --ratios 0.2 --dot-grid epsilon=0.01,0.05,0.2,1.0 cost_normalization=max,median

Prints a Markdown table (ppl, real parameter count, seconds) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dotresize import CompressionConfig, DotOptions  # noqa: E402
from dotresize.adapters import get_adapter  # noqa: E402
from dotresize.api import build_compressed_model, count_parameters, plan_widths  # noqa: E402
from dotresize.api import compress  # noqa: E402
from dotresize.bases import compute_basis  # noqa: E402
from dotresize.calibration import capture_point_stats, iter_batches  # noqa: E402
from dotresize.data import calibration_set, load_text, tokenize  # noqa: E402
from dotresize.evaluation.perplexity import perplexity  # noqa: E402
from dotresize.fusion import fuse_norms  # noqa: E402
from dotresize.sources import load_model, resolve_source  # noqa: E402
from dotresize.statistics import pool_stats  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
           f"Python {platform.python_version()}"


def parse_variant(name: str, ratio: float, base: CompressionConfig) -> CompressionConfig:
    """``pca``, ``prune``, ``dot``, ``dot:epsilon=0.2:cost=l1``, ``pca@sequential``, ``dot@global`` ..."""
    name, _, where = name.partition("@")
    method, *options = name.split(":")
    dot = {}
    for option in options:
        key, value = option.split("=")
        field_type = {f.name: f.type for f in dataclasses.fields(DotOptions)}[key]
        dot[key] = float(value) if field_type in ("float", float) else int(value) if field_type in ("int", int) \
            else value
    changes = dict(method=method, ratio=ratio, dot=dataclasses.replace(base.dot, **dot))
    if where in ("sequential", "parallel"):
        changes["mode"] = where
    elif where == "global":
        changes["layout"] = "global"
    return dataclasses.replace(base, **changes).validate()


def grid_variants(grid: list[str]) -> list[str]:
    keys, values = [], []
    for item in grid:
        key, _, vals = item.partition("=")
        keys.append(key)
        values.append(vals.split(","))
    return ["dot:" + ":".join(f"{k}={v}" for k, v in zip(keys, combo)) for combo in itertools.product(*values)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--variants", default="pca,prune,dot")
    parser.add_argument("--dot-grid", nargs="*", default=[], help="key=v1,v2 ... (DotOptions fields)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    source = resolve_source(args.model)
    model, tokenizer = load_model(source)
    calibration = calibration_set(tokenizer, samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
    test_ids = tokenize(tokenizer, load_text("wikitext2-test").text)
    rows = []

    def ppl(m):
        return perplexity(m, test_ids, ctx=args.ctx, max_windows=args.max_windows, progress=False)["ppl"]

    if not args.no_dense:
        start = time.perf_counter()
        rows.append({"variant": "dense", "ratio": 0.0, "ppl": ppl(model), "parameters": count_parameters(model),
                     "seconds": 0.0, "eval_seconds": round(time.perf_counter() - start, 1)})
        print(f"dense: {rows[-1]['ppl']:.2f}", file=sys.stderr)
    adapter = get_adapter(model)
    fuse_norms(adapter)
    batches = iter_batches(calibration.input_ids, 8)
    start = time.perf_counter()
    stats = capture_point_stats(adapter, batches, progress=False)
    capture_seconds = time.perf_counter() - start
    variants = [v for v in args.variants.split(",") if v] + grid_variants(args.dot_grid)
    base = CompressionConfig()
    for ratio, variant in itertools.product([float(r) for r in args.ratios.split(",")], variants):
        config = parse_variant(variant, ratio, base)
        start = time.perf_counter()
        try:
            if config.mode == "sequential":
                fresh, _ = load_model(source)
                compressed, report = compress(fresh, calibration.input_ids, config, progress=False)
                points = report.points
            else:
                widths = plan_widths(adapter, config)
                if config.layout == "global":
                    shared = compute_basis(pool_stats(stats, config.global_pooling), widths[0], config, point=-1)
                    bases = [shared] * len(stats)
                else:
                    bases = [compute_basis(s, w, config, point=p) for p, (s, w) in enumerate(zip(stats, widths))]
                compressed = build_compressed_model(adapter, bases, config.layout)
                points = [b.info for b in bases]
            seconds = time.perf_counter() - start + (capture_seconds if config.mode == "parallel" else 0.0)
            row = {"variant": variant, "ratio": ratio, "ppl": ppl(compressed),
                   "parameters": count_parameters(compressed), "seconds": round(seconds, 1),
                   "mean_reconstruction_error": sum(p["reconstruction_error"] for p in points) / len(points)}
            conds = [p["cond_r"] for p in points if "cond_r" in p]
            if conds:
                row["max_cond_r"] = max(conds)
                row["mean_sinkhorn_iterations"] = sum(p["sinkhorn_iterations"] for p in points
                                                      if "sinkhorn_iterations" in p) / len(conds)
                row["mean_effective_rank"] = sum(p["effective_rank"] for p in points if "effective_rank" in p) \
                    / len(conds)
        except Exception as error:  # a failing variant is a result too (e.g. rank-deficient plan)
            row = {"variant": variant, "ratio": ratio, "error": f"{type(error).__name__}: {error}"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print(f"\nWikiText-2 test perplexity, ctx {args.ctx}, first {args.max_windows} windows; calibration "
          f"{args.calib_samples} x {args.calib_seqlen} tokens of {calibration.source['id']} (seed {args.seed}); "
          f"model {source.spec}\nmachine: {machine()}\n")
    print("| variant | ratio | ppl | parameters | seconds | mean recon. err | max cond(R) | eff. rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['ratio']} | error: {r['error'][:80]} | | | | | |")
            continue
        print(f"| {r['variant']} | {r['ratio']} | {r['ppl']:.2f} | {r['parameters']:,} | {r['seconds']} | "
              f"{r.get('mean_reconstruction_error', 0):.4f} | {r.get('max_cond_r', '')} | "
              f"{r.get('mean_effective_rank', '')} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
