"""Large models on a small machine: memory and time of the layer-streamed pipeline on synthetic checkpoints.

``python -m benchmarks large --shape llama-8b --layers 2,4,8,16,32 --method dot`` writes (or reuses) a synthetic
checkpoint per layer count (:mod:`benchmarks.synthetic`, seeded random weights with real shapes), runs the
public command line on it — ``dotresize compress --model DIR --ratio R --method M --calib-samples 8
--calib-seqlen 128 --run-dir RUN --no-mlflow`` in a fresh run directory — and measures:

* peak RSS of the whole process tree (the CLI, its local Prefect server, everything they start), polled;
* wall time, and per stage the summed task seconds; per layer the capture and absorb seconds and per point the
  solve seconds (from the stage manifests the run wrote);
* disk: the run directory (hard links counted once) against the checkpoint's size;
* a least-squares fit of wall time and of stage time against the number of layers, with R², and the peak
  RSS ratio largest/smallest.

Measurements only: the numbers are printed and written to JSON + Markdown, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from storage import rundir as layout

from .common import TreeRssMonitor, log, machine_info, machine_line, markdown_table, write_json

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
       "TOKENIZERS_PARALLELISM": "false"}


def du_bytes(path: Path) -> int:
    """Bytes on disk under ``path``, hard links counted once (as ``du`` does)."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


def checkpoint_for(shape: str, layers: int, scratch: Path) -> Path:
    """A synthetic checkpoint (reused when already written)."""
    from .synthetic import write_checkpoint

    out = scratch / f"{shape}-{layers}"
    if (out / "synthetic.json").is_file():
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log(f"large: writing the synthetic {shape} checkpoint with {layers} layers to {out}")
    write_checkpoint(shape, out, layers=layers)
    return out


def _manifests(run: Path, stage: str) -> list[dict]:
    single = run / layout.manifest_file(stage)
    if single.is_file():
        return [json.loads(single.read_text())]
    base = run / layout.STAGES / stage
    return [json.loads(p.read_text()) for p in sorted(base.glob("*.json"))] if base.is_dir() else []


def _solve_seconds(run: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((run / layout.BASES).glob("*.json")):
        record = json.loads(path.read_text())
        info = record.get("info", {})
        out[str(record["point"])] = {"seconds": record.get("seconds"), "statistics": info.get("statistics_seconds"),
                                     "basis": info.get("seconds")}
    return out


def run_once(checkpoint: Path, *, method: str, ratio: float, samples: int, seqlen: int, scratch: Path,
             extra: list[str], keep: bool) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    argv = [sys.executable, "-m", "flows.cli", "-q", "compress", "--model", str(checkpoint), "--ratio", str(ratio),
            "--method", method, "--calib-samples", str(samples), "--calib-seqlen", str(seqlen),
            "--run-dir", str(run / "run"), "--no-mlflow", "--json", *extra]
    env = {**os.environ, **ENV, "DOTRESIZE_HOME": str(run / "home")}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    streams: dict[str, str] = {}
    readers = [threading.Thread(target=lambda n=n, s=s: streams.__setitem__(n, s.read()), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()
    with TreeRssMonitor(proc.pid, interval=0.2) as monitor:
        _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    for reader in readers:
        reader.join()
    row: dict[str, Any] = {"returncode": os.waitstatus_to_exitcode(status), "wall_seconds": round(wall, 1),
                           "peak_tree_rss_gb": round(monitor.peak / 2**30, 3)}
    if row["returncode"] != 0:
        row["error"] = (streams.get("stderr") or "").strip().splitlines()[-5:]
        return row
    rundir = run / "run"
    result = json.loads(streams["stdout"][streams["stdout"].find("{"):])
    row["stage_seconds"] = result.get("stage_seconds")
    row["parameters_before"], row["parameters_after"] = result.get("parameters_before"), result.get("parameters_after")
    row["capture_seconds"] = {m["name"]: m["seconds"] for m in _manifests(rundir, "capture")}
    row["absorb_seconds"] = {m["name"]: m["seconds"] for m in _manifests(rundir, "absorb")}
    row["solve_seconds"] = _solve_seconds(rundir)
    row["run_dir_bytes"] = du_bytes(rundir)
    row["checkpoint_bytes"] = du_bytes(checkpoint)
    row["disk_ratio"] = round(row["run_dir_bytes"] / row["checkpoint_bytes"], 3)
    row["model_dir"] = str(rundir / layout.MODEL)
    if not keep:
        import shutil

        shutil.rmtree(run, ignore_errors=True)
    return row


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """y ≈ a + b·x by least squares, with R²."""
    if len(xs) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept": round(a, 2), "slope": round(b, 3), "r2": round(1 - ss_res / ss_tot, 4) if ss_tot else 1.0}


def _median(values) -> float | None:
    values = sorted(float(v["seconds"] if isinstance(v, dict) else v) for v in values)
    if not values:
        return None
    mid = len(values) // 2
    return round(values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2, 1)


def markdown(report: dict) -> str:
    rows = []
    for r in report["rows"]:
        stages = r.get("stage_seconds") or {}
        rows.append([r["layers"], r.get("returncode"), r.get("wall_seconds"), r.get("peak_tree_rss_gb"),
                     *(round(stages.get(s, 0.0), 1) for s in ("capture", "solve", "absorb", "export")),
                     _median((r.get("capture_seconds") or {}).values()),
                     _median((r.get("solve_seconds") or {}).values()),
                     _median((r.get("absorb_seconds") or {}).values()), r.get("disk_ratio")])
    text = [f"**{report['shape']}**, `{report['method']}` at ratio {report['ratio']}, calibration "
            f"{report['samples']}×{report['seqlen']} tokens; {machine_line(report['machine'])}", "",
            markdown_table(["layers", "rc", "wall s", "peak tree RSS GB", "capture s", "solve s", "absorb s",
                            "export s", "capture s / layer (median)", "solve s / point (median)",
                            "absorb s / layer (median)", "run dir / checkpoint"], rows)]
    fit = report.get("fit") or {}
    if fit.get("wall"):
        text.append("")
        stages = "; ".join(f"{stage} ≈ {f['intercept']} + {f['slope']} × layers (R² {f['r2']})"
                           for stage, f in fit.items() if stage != "wall" and f)
        text.append(f"Wall time ≈ {fit['wall']['intercept']} s + {fit['wall']['slope']} s × layers "
                    f"(R² {fit['wall']['r2']}); {stages}; peak RSS largest / smallest = {report['rss_ratio']}.")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks large", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", default="2,4,8,16,32", help="comma-separated layer counts")
    parser.add_argument("--method", default="dot")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--scratch", default=None, help="where checkpoints and runs go (default: a temp dir)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories (verify them later)")
    parser.add_argument("--extra", default="", help="more compress options, space-separated (e.g. --device cuda)")
    parser.add_argument("--out", default=None, help="JSON file for the report (Markdown beside it)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="REPORT",
                        help="merge earlier JSON reports of one shape and method into one table and fit")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dotresize-large-"))
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"shape": args.shape, "method": args.method, "ratio": args.ratio,
                              "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                              "machine": machine_info(), "rows": []}
    for layers in [int(x) for x in args.layers.split(",") if x.strip()]:
        checkpoint = checkpoint_for(args.shape, layers, scratch)
        log(f"large: compressing {checkpoint.name} ({args.method})")
        row = run_once(checkpoint, method=args.method, ratio=args.ratio, samples=args.calib_samples,
                       seqlen=args.calib_seqlen, scratch=scratch, extra=args.extra.split(), keep=args.keep_runs)
        row["layers"] = layers
        report["rows"].append(row)
        log(f"large: {layers} layers: rc {row['returncode']}, {row['wall_seconds']} s, "
            f"peak tree RSS {row['peak_tree_rss_gb']} GB, disk ratio {row.get('disk_ratio')}")
        if args.out:
            write_json(args.out, report)
    finish(report, args.out)
    return 0


def finish(report: dict, out: str | None) -> None:
    """Fit, Markdown, print and write ``report`` (JSON at ``out``, Markdown beside it)."""
    ok = [r for r in report["rows"] if r.get("returncode") == 0]
    if len(ok) >= 2:
        report["fit"] = {"wall": linear_fit([r["layers"] for r in ok], [r["wall_seconds"] for r in ok])}
        for stage in ("capture", "solve", "absorb"):
            report["fit"][stage] = linear_fit([r["layers"] for r in ok],
                                              [(r.get("stage_seconds") or {}).get(stage, 0.0) for r in ok])
        peaks = [r["peak_tree_rss_gb"] for r in ok]
        report["rss_ratio"] = round(max(peaks) / min(peaks), 3)
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if out:
        write_json(out, report)
        Path(out).with_suffix(".md").write_text(report["markdown"] + "\n")


def combine(paths: list[str], out: str | None) -> int:
    """One report from several runs of one shape, method, ratio and calibration (rows sorted by layers; each
    row keeps the machine line of its own run), refitted across all of them."""
    import json

    reports = [json.loads(Path(p).read_text()) for p in paths]
    same = {(r["shape"], r["method"], r["ratio"], r["samples"], r["seqlen"]) for r in reports}
    if len(same) != 1:
        print(f"large: error: the reports differ in shape, method, ratio or calibration: {sorted(same)}",
              file=sys.stderr)
        return 2
    report = {k: reports[0][k] for k in ("shape", "method", "ratio", "samples", "seqlen", "machine")}
    report["rows"] = sorted((dict(row, machine=r["machine"]) for r in reports for row in r["rows"]),
                            key=lambda row: row["layers"])
    report["combined_from"] = [str(p) for p in paths]
    finish(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
