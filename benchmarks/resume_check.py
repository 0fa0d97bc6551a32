"""Kill -9 and resume: the pipeline's crash-safety check on a real or synthetic model.

    python -m benchmarks.resume_check [--model smollm2-135m-instruct] [--ratio 0.2] [--method dot] [--out DIR]
    python -m benchmarks.resume_check --model DIR_OF_A_SYNTHETIC_8B_CUT_TO_4_LAYERS --calib-samples 8 \
        --calib-seqlen 128 --no-in-memory

1. An uninterrupted ``dotresize compress`` run (the reference).
2. The same command in a second run directory, killed with SIGKILL during the capture of layer 2 (after its
   first point's marker is written), run again and killed during the last layer's absorb, then run to the end.
3. Checks: each resumed run reused the layers that were complete (from its log), and every file of the exported
   model (each shard and the index) has the reference's sha256; unless ``--no-in-memory``, the model's logits
   equal the in-memory API's for the same config and seed.
4. Prints the per-point task intervals of the reference run (their overlap shows the fan-out is parallel).

Writes ``<out>/resume_check.json``. Takes about 10-20 minutes on a 2-core machine for SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dotresize.digests import sha256_file
from storage import rundir as layout


def _argv(args, run: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "-q", "compress", "--model", args.model, "--ratio", str(args.ratio),
            "--method", args.method, "--calib-samples", str(args.calib_samples), "--calib-seqlen",
            str(args.calib_seqlen), "--seed", str(args.seed), "--run-dir", str(run), "--no-mlflow", "--json"]


def _start(args, run: Path, pause: str | None, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("DOTRESIZE_TEST_PAUSE_AT", None)
    if pause:
        env["DOTRESIZE_TEST_PAUSE_AT"] = pause
    print(f"$ {' '.join(_argv(args, run))}" + (f"   (pausing at {pause})" if pause else ""), flush=True)
    return subprocess.Popen(_argv(args, run), env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            start_new_session=True)


def _kill_at(process: subprocess.Popen, marker: Path, timeout: float) -> float:
    start, deadline = time.time(), time.time() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise SystemExit(f"the run ended (code {process.returncode}) before reaching {marker.name}")
        if time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise SystemExit(f"the run did not reach {marker.name} within {timeout} s")
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    marker.unlink()
    print(f"  killed with SIGKILL after {time.time() - start:.0f} s (exit {process.returncode})", flush=True)
    return time.time() - start


def _finish(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the run failed with code {process.returncode}")
    return json.loads(out)


def _grep(log: Path, *needles: str) -> list[str]:
    return [line.strip() for line in log.read_text().splitlines() if any(n in line for n in needles)]


def _overlap(timings: dict) -> dict:
    """Per-point task intervals and how many of them ran at the same time as another."""
    spans = {name: (a, b) for name, (a, b) in timings["intervals"].items()
             if name.startswith(("capture[", "solve[", "absorb[")) and a is not None}
    overlapping = sorted(n for n, (a, b) in spans.items()
                         if any(o != n and a < ob and oa < b for o, (oa, ob) in spans.items()))
    return {"tasks": len(spans), "overlapping": len(overlapping), "intervals": spans}


def _in_memory_difference(args, model_dir: Path) -> float:
    import torch

    from dotresize import CompressionConfig, compress, load_compressed
    from dotresize.data import calibration_set
    from dotresize.sources import load_model, resolve_source

    model, tokenizer = load_model(resolve_source(args.model))
    calibration = calibration_set(tokenizer, "wikitext2", samples=args.calib_samples, seqlen=args.calib_seqlen,
                                  seed=args.seed)
    config = CompressionConfig(method=args.method, ratio=args.ratio, seed=args.seed)
    reference, _ = compress(model, calibration.input_ids, config, progress=False)
    exported = load_compressed(model_dir)
    ids = calibration.input_ids[:2, :128]
    with torch.no_grad():
        return float((exported(ids).logits - reference(ids).logits).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="dot")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="runs/resume-check")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--no-in-memory", action="store_true",
                        help="skip the comparison with the in-memory API (a model larger than memory)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: pass another --out (the check needs fresh run directories)")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": args.model, "ratio": args.ratio, "method": args.method}

    print("1. uninterrupted reference run", flush=True)
    started = time.time()
    reference = _finish(_start(args, out / "reference", None, out / "reference.log"))
    report["reference"] = {"sha256": reference["model_sha256"], "seconds": round(time.time() - started, 1),
                           "stage_seconds": reference["stage_seconds"]}
    print(f"  model sha256 {reference['model_sha256']} in {report['reference']['seconds']} s", flush=True)

    run = out / "killed"
    print("2. the same command, killed during the capture of layer 2", flush=True)
    _kill_at(_start(args, run, "capture", out / "kill-capture.log"), run / ".paused-capture", args.timeout)
    print("   again, killed during the last layer's absorb", flush=True)
    _kill_at(_start(args, run, "absorb", out / "kill-absorb.log"), run / ".paused-absorb", args.timeout)
    print("   again, to the end", flush=True)
    resumed = _finish(_start(args, run, None, out / "resume.log"))
    report["resume_after_capture_kill"] = _grep(out / "kill-absorb.log", "reused capture", "computing capture")
    report["resume_after_absorb_kill"] = _grep(out / "resume.log", "reused absorb", "computing absorb")
    report["resumed"] = {"sha256": resumed["model_sha256"], "stages": resumed["stages"]}
    files = {p.name: sha256_file(p) for p in sorted((out / "reference" / layout.MODEL).glob("model*.safetensors*"))}
    again = {p.name: sha256_file(p) for p in sorted((run / layout.MODEL).glob("model*.safetensors*"))}
    same = resumed["model_sha256"] == reference["model_sha256"] and files == again
    report["weight_files"] = {"reference": files, "resumed": again}
    report["byte_identical"] = same
    for line in report["resume_after_capture_kill"][:8] + report["resume_after_absorb_kill"][-4:]:
        print(f"   | {line}")
    print(f"  resumed model: {len(again)} weight files, {'identical to' if same else 'DIFFERENT from'} the "
          f"reference's (index sha256 {resumed['model_sha256'][:16]})", flush=True)

    if not args.no_in_memory:
        print("3. logits of the pipeline's model vs the in-memory API", flush=True)
        report["max_abs_logit_difference_vs_in_memory"] = _in_memory_difference(args, out / "reference" / layout.MODEL)
        print(f"  max |difference| = {report['max_abs_logit_difference_vs_in_memory']:.3g}", flush=True)

    overlap = _overlap(json.loads((out / "reference" / layout.TIMINGS).read_text()))
    report["per_point_tasks"] = overlap
    first = sorted(overlap["intervals"].items(), key=lambda kv: kv[1][0])[:8]
    t0 = first[0][1][0] if first else 0.0
    print(f"4. per-point tasks of the reference run: {overlap['overlapping']} of {overlap['tasks']} overlap another")
    for name, (a, b) in first:
        print(f"   {name:>10}  {a - t0:8.2f} s -> {b - t0:8.2f} s")
    (out / "resume_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {out / 'resume_check.json'}")
    return 0 if same and report.get("max_abs_logit_difference_vs_in_memory", 0.0) <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
