"""The whole benchmark suite in one command: quality, solver, compression time and memory, model speed.

    python -m benchmarks suite --size reduced --out benchmarks/results/reduced
    python -m benchmarks suite --size full --out benchmarks/results/full --parts quality

Writes ``<out>/suite.json`` (everything, including every run's raw timings) and ``<out>/summary.md`` (the
tables), prints the tables, and writes each part's JSON as soon as it finishes (``<out>/<part>.json``), so a
long run that is interrupted keeps what finished. Quality rows are also appended to ``<out>/quality_rows.jsonl``
and reused when the same command is run again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import SHARED_MACHINE_NOTE, log, machine_info, machine_line, write_json

PARTS = ("quality", "solver", "speed", "compression")


def run_suite(size: str = "reduced", out: str | os.PathLike = "benchmarks/results/reduced", *,
              model: str | None = None, parts: tuple[str, ...] = PARTS, progress: bool = False,
              quality_overrides: dict[str, Any] | None = None, solver_overrides: dict[str, Any] | None = None,
              compression_overrides: dict[str, Any] | None = None,
              speed_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``parts`` at preset ``size`` (tiny | reduced | full); returns the suite's dict and writes ``out``."""
    from . import compression, quality, solver, speed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    suite: dict[str, Any] = {"benchmark": "suite", "size": size, "model": model or "smollm2-135m-instruct",
                             "machine": machine_info(), "parts": {}, "part_seconds": {}}

    def finish(name: str, result: dict[str, Any], seconds: float) -> None:
        suite["parts"][name] = result
        suite["part_seconds"][name] = round(seconds, 1)
        write_json(out / f"{name}.json", result)
        print(result["markdown"] + "\n", flush=True)

    if "quality" in parts:
        start = time.perf_counter()
        spec = quality.spec_for(size, model=model, **(quality_overrides or {}))
        result = quality.run_quality(spec, rows_file=out / "quality_rows.jsonl", progress=progress,
                                     cost_file=out / "real_costs.safetensors")
        finish("quality", result, time.perf_counter() - start)

    if "solver" in parts:
        start = time.perf_counter()
        options = dict(solver.SIZES[size])
        if (out / "real_costs.safetensors").exists():  # written by the quality part
            options["cost_file"] = out / "real_costs.safetensors"
        options.update(solver_overrides or {})
        finish("solver", solver.run_solver(**options), time.perf_counter() - start)

    if "speed" in parts:
        start = time.perf_counter()
        options = dict(speed.SIZES[size])
        options.update(speed_overrides or {})
        calib_seqlen = options.pop("calib_seqlen")
        ratios = quality.spec_for(size, **(quality_overrides or {})).ratios
        models = speed.build_models(model, ratios, ("per-point", "global"), calib_seqlen=calib_seqlen)
        rows = suite["parts"].get("quality", {}).get("rows", [])
        methods = {}
        for label, m in models.items():
            if label == "original":
                continue
            signature = quality._shape_signature(m)
            methods[label] = sorted({f"{r['label']} {r['setting'].split('/')[0]}"
                                     for r in rows if r.get("shapes") == signature and r["group"] == "main"})
        finish("speed", speed.run_speed(models, methods=methods, **options), time.perf_counter() - start)
        models.clear()

    if "compression" in parts:
        start = time.perf_counter()
        options = dict(compression.SIZES[size])
        options.update(compression_overrides or {})
        finish("compression", compression.run_compression(model=model, **options), time.perf_counter() - start)

    suite["seconds"] = round(time.perf_counter() - started, 1)
    suite["markdown"] = summary_markdown(suite)
    write_json(out / "suite.json", suite)
    (out / "summary.md").write_text(suite["markdown"] + "\n")
    log(f"suite: {size} size done in {suite['seconds']:.0f} s; wrote {out / 'suite.json'} and {out / 'summary.md'}")
    return suite


def summary_markdown(suite: dict[str, Any]) -> str:
    lines = [f"# dotresize benchmark suite ({suite['size']} size, {suite['model']})", "",
             f"Machine: {machine_line(suite['machine'])}. {SHARED_MACHINE_NOTE[0].upper()}{SHARED_MACHINE_NOTE[1:]}.",
             f"Wall time: {suite.get('seconds', 0):.0f} s in total; per part: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in suite["part_seconds"].items()) + ".", ""]
    for name in ("quality", "solver", "compression", "speed"):
        if name in suite["parts"]:
            lines += [suite["parts"][name]["markdown"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "reduced", "full"), default="reduced")
    parser.add_argument("--model", default=None, help="model spec (default: the packaged SmolLM2-135M)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results/<size>)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {','.join(PARTS)}")
    parser.add_argument("--progress", action="store_true", help="progress bars of capture and compression")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    out = args.out or f"benchmarks/results/{args.size}"
    run_suite(args.size, out, model=args.model, parts=parts, progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
