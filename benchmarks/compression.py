"""Compression time and memory: the same job through the in-memory API and the orchestrated pipeline,
in parallel and sequential calibration mode.

Every variant runs the public command line in its own subprocess — ``dotresize compress --in-memory --out DIR``
or ``dotresize compress --run-dir DIR --no-mlflow`` (a fresh run directory each time, so nothing is reused) —
with the same model, calibration and config. The parent measures the wall time, polls the resident memory of
the child's whole process tree (the orchestrated run's Prefect server included; sum of the processes' RSS).
Repeats are interleaved (every round runs every variant, in a rotated order) and
the medians are compared as ratios measured in the same run.

The orchestrated wall time includes Python start-up, imports and Prefect's start (an ephemeral API server per
process unless ``PREFECT_API_URL`` points at a running one); the flow's own seconds and its per-stage compute
seconds (summed over the stage's tasks, which overlap in parallel mode) are reported beside it.

    python -m benchmarks compression --repeats 3 --calib-samples 64 --calib-seqlen 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import (SHARED_MACHINE_NOTE, TreeRssMonitor, fmt, log, machine_info, machine_line,  # noqa: F401
                     markdown_table, median, ratio, emit_result)

VARIANTS = ("in-memory/parallel", "orchestrated/parallel", "in-memory/sequential", "orchestrated/sequential")
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(calib_samples=64, calib_seqlen=256, repeats=3),
    # the orchestrated sequential run is left out of the reduced size to keep the suite within 20 minutes
    # (parallel vs sequential is still compared in memory there; the full size has all four)
    "reduced": dict(calib_samples=16, calib_seqlen=128, repeats=1, variants=VARIANTS[:3]),
    "tiny": dict(calib_samples=8, calib_seqlen=32, repeats=1),
}


def command(variant: str, out: Path, *, model: str | None, ratio_: float, method: str, calib_samples: int,
            calib_seqlen: int, seed: int, extra: list[str] | None = None) -> list[str]:
    runner, mode = variant.split("/")
    argv = [sys.executable, "-m", "flows.cli", "-q", "compress", "--ratio", str(ratio_), "--method", method,
            "--mode", mode, "--calib-samples", str(calib_samples), "--calib-seqlen", str(calib_seqlen),
            "--seed", str(seed), "--json"]
    if model:
        argv += ["--model", model]
    if runner == "in-memory":
        argv += ["--in-memory", "--out", str(out / "exported")]
    else:
        argv += ["--run-dir", str(out / "run"), "--no-mlflow"]
    return argv + list(extra or [])


def _last_json(text: str) -> dict | None:
    """The JSON object the CLI printed last (``--json``)."""
    start = text.rfind("\n{")
    for candidate in ([text[start + 1:]] if start >= 0 else []) + [text]:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    index = text.find("{")
    return json.loads(text[index:]) if index >= 0 else None


def _error_line(text: str) -> str:
    """The most telling line of a failed run's output: the last ``...Error: ...`` line, else the last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "dotresize: error" in line or "Error:" in line or "Exception:" in line:
            return line[:400]
    return lines[-1][:400] if lines else "failed"


def run_variant(variant: str, argv_of, env: dict[str, str], cwd: Path, scratch: Path) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=variant.replace("/", "-") + "-", dir=scratch))
    argv = argv_of(variant, out)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    streams: dict[str, str] = {}

    def drain(name, stream):
        streams[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()
    # (the child's own ru_maxrss is no use here: Linux carries the parent's RSS at fork over into it)
    with TreeRssMonitor(proc.pid, interval=0.1) as monitor:
        _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join()
    stdout, stderr = streams.get("stdout", ""), streams.get("stderr", "")
    row: dict[str, Any] = {"variant": variant, "runner": variant.split("/")[0], "mode": variant.split("/")[1],
                           "returncode": proc.returncode, "wall_seconds": round(wall, 2),
                           "peak_tree_rss_mb": round(monitor.peak / 2**20, 1), "rss_samples": monitor.samples}
    if proc.returncode != 0:
        row["error"] = _error_line(stderr or stdout)
        row["stderr_tail"] = (stderr or "").strip().splitlines()[-40:]
        log(f"compression: {variant} failed: {row['error']}")
    else:
        result = _last_json(stdout) or {}
        row["process_seconds"] = result.get("seconds")       # measured inside the child (flow body / API call)
        row["stage_seconds"] = result.get("stage_seconds")
        row["parameters_after"] = result.get("parameters_after")
        row["widths"] = sorted(set(result.get("widths") or []))
        if row["process_seconds"] is not None:
            row["startup_seconds"] = round(wall - float(row["process_seconds"]), 2)
    shutil.rmtree(out, ignore_errors=True)
    log(f"compression: {variant}: {row['wall_seconds']:.1f} s wall, peak tree RSS {row['peak_tree_rss_mb']:.0f} MB")
    return row


def run_compression(*, model: str | None = None, ratio_: float = 0.2, method: str = "dot", calib_samples: int = 64,
                    calib_seqlen: int = 256, seed: int = 42, repeats: int = 3,
                    variants: tuple[str, ...] = VARIANTS, extra: list[str] | None = None,
                    scratch: str | os.PathLike | None = None) -> dict[str, Any]:
    info = machine_info()
    repo = Path(__file__).resolve().parents[1]
    scratch_dir = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="dotresize-bench-compression-"))
    scratch_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()}}
    env.setdefault("PREFECT_HOME", str(scratch_dir / "prefect-home"))
    # on a loaded machine the ephemeral API server can take longer than Prefect's default wait to come up
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])

    def argv_of(variant, out):
        return command(variant, out, model=model, ratio_=ratio_, method=method, calib_samples=calib_samples,
                       calib_seqlen=calib_seqlen, seed=seed, extra=extra)

    started = time.perf_counter()
    runs: list[dict] = []
    for rep in range(repeats):
        order = list(variants[rep % len(variants):]) + list(variants[:rep % len(variants)])
        for variant in order:
            row = run_variant(variant, argv_of, env, repo, scratch_dir)
            row["repeat"] = rep
            runs.append(row)
    summary = {}
    for variant in variants:
        ok = [r for r in runs if r["variant"] == variant and r["returncode"] == 0]
        stages: dict[str, list[float]] = {}
        for r in ok:
            for k, v in (r.get("stage_seconds") or {}).items():
                stages.setdefault(k, []).append(float(v))
        summary[variant] = {
            "runs": len(ok), "failed": sum(1 for r in runs if r["variant"] == variant and r["returncode"] != 0),
            "wall_seconds": median(r["wall_seconds"] for r in ok),
            "process_seconds": median(r.get("process_seconds") for r in ok),
            "startup_seconds": median(r.get("startup_seconds") for r in ok),
            "peak_tree_rss_mb": median(r["peak_tree_rss_mb"] for r in ok),
            "stage_seconds": {k: median(v) for k, v in stages.items()},
        }

    def pair(a, b, key):
        return ratio(summary.get(a, {}).get(key), summary.get(b, {}).get(key))

    comparisons = [(f"orchestrated/in-memory ({mode})", f"orchestrated/{mode}", f"in-memory/{mode}")
                   for mode in ("parallel", "sequential")]
    comparisons += [(f"sequential/parallel ({runner})", f"{runner}/sequential", f"{runner}/parallel")
                    for runner in ("in-memory", "orchestrated")]
    ratios = {name: {"wall": pair(a, b, "wall_seconds"), "process": pair(a, b, "process_seconds"),
                     "peak_rss": pair(a, b, "peak_tree_rss_mb")}
              for name, a, b in comparisons if a in variants and b in variants}
    result = {"benchmark": "compression", "machine": info,
              "job": {"model": model or "smollm2-135m-instruct", "ratio": ratio_, "method": method,
                      "calib_samples": calib_samples, "calib_seqlen": calib_seqlen, "seed": seed,
                      "extra": extra or [], "prefect_api_url": env.get("PREFECT_API_URL")},
              "repeats": repeats, "runs": runs, "summary": summary, "ratios": ratios,
              "seconds": round(time.perf_counter() - started, 1)}
    if scratch is None:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    job, summary = result["job"], result["summary"]
    header = ["variant", "runs", "wall s (median)", "in-process s", "start-up + imports s", "peak RSS MB (tree)",
              "stage seconds (median; orchestrated: summed task compute time)"]
    table = []
    for variant, s in summary.items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items())
        table.append([variant, f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else ""),
                      fmt(s["wall_seconds"], ".1f"), fmt(s["process_seconds"], ".1f"), fmt(s["startup_seconds"], ".1f"),
                      fmt(s["peak_tree_rss_mb"], ".0f"), stages])
    rtable = [[name, fmt(r["wall"], ".2f") + "×", fmt(r["process"], ".2f") + "×", fmt(r["peak_rss"], ".2f") + "×"]
              for name, r in result["ratios"].items()]
    server = ("an existing Prefect API (" + job["prefect_api_url"] + ")") if job.get("prefect_api_url") else \
        "an ephemeral Prefect API server started by each orchestrated process (included in its wall time)"
    return "\n".join([
        "### Compression time and memory", "",
        f"Job: `dotresize compress --method {job['method']} --ratio {job['ratio']} --calib-samples "
        f"{job['calib_samples']} --calib-seqlen {job['calib_seqlen']} --seed {job['seed']}` on {job['model']}, "
        f"each variant in its own subprocess (in-memory: `--in-memory --out`; orchestrated: fresh `--run-dir`, "
        f"`--no-mlflow`, {server}); {result['repeats']} interleaved repeat(s), medians. Wall = process start to "
        "exit (model load, calibration, compression and export included); in-process = the CLI's own `seconds` "
        "(in-memory: load to export; orchestrated: the flow body).", "",
        markdown_table(header, table), "",
        "Ratios (same run):", "",
        markdown_table(["comparison", "wall", "in-process", "peak RSS"], rtable), "",
        f"Machine: {machine_line(result['machine'])}; {SHARED_MACHINE_NOTE}.",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compression", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="dot")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-seqlen", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)} "
                                                          "(default: the size's)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args, extra = parser.parse_known_args(argv)
    size = dict(SIZES[args.size])
    for key in ("calib_samples", "calib_seqlen", "repeats"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if args.variants:
        size["variants"] = tuple(v for v in args.variants.split(",") if v)
        unknown = sorted(set(size["variants"]) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    result = run_compression(model=args.model, ratio_=args.ratio, method=args.method, seed=args.seed, extra=extra,
                             **size)
    emit_result(result, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
