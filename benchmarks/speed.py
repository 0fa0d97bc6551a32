"""Compressed-model speed: batched-forward tokens/s and per-token generation latency, original vs compressions.

Speed depends on the architecture only (widths, layout, shortcut matrices), not on the basis values, so the
compressed models are built from cheap PCA bases unless the caller hands models in (the suite passes the ones
its quality rows built). All models are timed in one process, interleaved: every repeat times every model once
(forward, then decoding), in a rotated order, and the medians over repeats are reported with the ratio to the
original model measured in the same run.

    python -m benchmarks speed --ratios 0.1,0.2,0.3 --layouts per-point,global --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from .common import (SHARED_MACHINE_NOTE, fmt, log, machine_info, machine_line, markdown_table,  # noqa: E402
                     median, quiet_libraries, ratio, emit_result)

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(batch=8, ctx=256, prompt=64, new_tokens=32, repeats=7, calib_seqlen=128),
    "reduced": dict(batch=4, ctx=128, prompt=32, new_tokens=16, repeats=3, calib_seqlen=128),
    "tiny": dict(batch=2, ctx=16, prompt=8, new_tokens=4, repeats=3, calib_seqlen=32),
}


def build_models(model_spec: str | None, ratios, layouts, *, calib_samples: int = 8, calib_seqlen: int = 128,
                 seed: int = 42) -> dict[str, Any]:
    """{"original": source model, "<layout> <ratio>": compressed model (PCA bases)} for every layout and ratio."""
    import copy

    from dotresize import CompressionConfig
    from dotresize.api import build_compressed_model, plan_widths
    from dotresize.bases import compute_basis
    from dotresize.calibration import capture_point_stats, iter_batches
    from dotresize.data import calibration_set
    from dotresize.layerwise import ResidentModel
    from dotresize.sources import load_model, resolve_source
    from dotresize.statistics import pool_stats

    quiet_libraries()
    source = resolve_source(model_spec)
    original, tokenizer = load_model(source)
    fused = copy.deepcopy(original)
    adapter = ResidentModel(fused)  # fuses the copy's norms in place
    calibration = calibration_set(tokenizer, samples=calib_samples, seqlen=calib_seqlen, seed=seed)
    stats = capture_point_stats(adapter, iter_batches(calibration.input_ids, 8), progress=False)
    models: dict[str, Any] = {"original": original}
    for layout in layouts:
        for r in ratios:
            config = CompressionConfig(method="pca", ratio=r, layout=layout).validate()
            widths = plan_widths(adapter, config)
            if layout == "global":
                bases = [compute_basis(pool_stats(stats), widths[0], config, point=-1)] * len(stats)
            else:
                bases = [compute_basis(s, w, config, point=p) for p, (s, w) in enumerate(zip(stats, widths))]
            models[label_of(layout, r)] = build_compressed_model(adapter, bases, layout)
    del fused
    return models


def label_of(layout: str, ratio_: float) -> str:
    return f"{layout} {int(round(100 * ratio_))} %"


def run_speed(models: dict[str, Any], *, batch: int, ctx: int, prompt: int, new_tokens: int, repeats: int,
              methods: dict[str, list[str]] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Interleaved timings of every model; ``models`` must contain "original"."""
    from dotresize.evaluation.speed import forward_throughput, generation_latency

    if threads:
        torch.set_num_threads(threads)
    info = machine_info()
    labels = list(models)
    forward: dict[str, list[float]] = {k: [] for k in labels}
    decode: dict[str, list[float]] = {k: [] for k in labels}
    started = time.perf_counter()
    for label in labels:  # warm-up: one forward and one short decode per model
        forward_throughput(models[label], batch=batch, ctx=ctx, repeats=1, warmup=0)
        generation_latency(models[label], prompt=prompt, new_tokens=2, repeats=1, warmup=0)
    for rep in range(repeats):
        order = labels[rep % len(labels):] + labels[:rep % len(labels)]
        for label in order:
            f = forward_throughput(models[label], batch=batch, ctx=ctx, repeats=1, warmup=0)
            forward[label].append(f["seconds_median"])
            g = generation_latency(models[label], prompt=prompt, new_tokens=new_tokens, repeats=1, warmup=0)
            decode[label].append(g["seconds_per_token"])
        log(f"speed: repeat {rep + 1}/{repeats} done")
    rows = []
    base_f, base_d = median(forward["original"]), median(decode["original"])
    for label in labels:
        model = models[label]
        f, d = median(forward[label]), median(decode[label])
        rows.append({
            "model": label, "methods": (methods or {}).get(label),
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_widths": _widths(model),
            "forward_seconds": forward[label], "forward_seconds_median": f,
            "tokens_per_second": batch * ctx / f, "decode_seconds_per_token": decode[label],
            "decode_ms_per_token_median": 1000 * d,
            "forward_speedup": ratio(base_f, f), "decode_speedup": ratio(base_d, d),
        })
    result = {"benchmark": "speed", "machine": info, "batch": batch, "ctx": ctx, "prompt": prompt,
              "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
              "device": str(next(models["original"].parameters()).device), "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    result["markdown"] = markdown(result)
    return result


def _widths(model) -> str:
    cfg = model.config
    widths = getattr(cfg, "dotresize", None)
    if isinstance(widths, dict) and widths.get("widths"):
        w = widths["widths"]
        return f"{min(w)}-{max(w)}" if min(w) != max(w) else str(w[0])
    return str(cfg.hidden_size)


def markdown(result: dict[str, Any]) -> str:
    header = ["model", "same shapes as", "parameters", "hidden width", f"forward tokens/s (b{result['batch']}x"
              f"{result['ctx']})", "× original", "decode ms/token", "× original (speed-up)"]
    table = []
    for r in result["rows"]:
        shared = ", ".join(r["methods"]) if r.get("methods") else ("" if r["model"] == "original" else "–")
        table.append([r["model"], shared, f"{r['parameters'] / 1e6:.1f} M",
                      r["hidden_widths"], f"{r['tokens_per_second']:.0f}", fmt(r["forward_speedup"], ".2f"),
                      f"{r['decode_ms_per_token_median']:.2f}", fmt(r["decode_speedup"], ".2f")])
    return "\n".join([
        "### Compressed-model speed", "",
        f"Medians of {result['repeats']} interleaved repeats in one process on {result['device']} "
        f"({result['threads']} threads); decoding: batch 1, prompt {result['prompt']}, {result['new_tokens']} new "
        "tokens with a KV cache; × original = speed-up against the original model in the same run (> 1 = faster). "
        "Speed depends only on the architecture, so every method at one layout and ratio shares its row.", "",
        markdown_table(header, table), "",
        f"Machine: {machine_line(result['machine'])}; {SHARED_MACHINE_NOTE}.",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--layouts", default="per-point,global")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.repeats:
        size["repeats"] = args.repeats
    ratios = [float(r) for r in args.ratios.split(",") if r]
    layouts = [v for v in args.layouts.split(",") if v]
    models = build_models(args.model, ratios, layouts, calib_seqlen=size.pop("calib_seqlen"))
    methods = {k: ["dot", "pca", "prune"] for k in models if k != "original"}
    result = run_speed(models, methods=methods, threads=args.threads, **size)
    emit_result(result, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
