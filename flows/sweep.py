"""``dotresize sweep``: compress and evaluate a grid of methods x ratios, then report.

Every cell's result is stored as ``cells/<method>-<ratio>.json`` under the sweep directory, keyed by everything
that determines it, so a rerun reuses completed cells and computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dotresize")


@dataclass(frozen=True)
class SweepSpec:
    model: str | None
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    methods: tuple[str, ...] = ("dot", "pca", "prune")
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    calib_data: str = "wikitext2"
    calib_samples: int = 64
    calib_seqlen: int = 256
    seed: int = 42
    ctx: int = 256
    max_windows: int = 100
    speed: bool = True
    speed_batch: int = 8
    overrides: dict = field(default_factory=dict)

    def cell_key(self, method: str, ratio: float) -> str:
        data = {k: v for k, v in self.__dict__.items() if k not in ("ratios", "methods")}
        data.update(method=method, ratio=ratio)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _evaluate(model, tokenizer, spec: SweepSpec, test_ids) -> dict:
    from dotresize.evaluation.perplexity import perplexity
    from dotresize.evaluation.speed import forward_throughput

    result = {"ppl": perplexity(model, test_ids, ctx=spec.ctx, max_windows=spec.max_windows or None,
                                progress=False)["ppl"]}
    if spec.tasks:
        from dotresize.evaluation.zeroshot import evaluate_zero_shot

        result["zero_shot"] = evaluate_zero_shot(model, tokenizer, list(spec.tasks), limit=spec.limit)
    if spec.speed:
        result["tokens_per_second"] = forward_throughput(model, batch=spec.speed_batch, ctx=spec.ctx,
                                                         repeats=3)["tokens_per_second"]
    return result


def run_sweep(spec: SweepSpec, out: Path, *, progress: bool = True) -> dict:
    """Compute every missing cell (dense baseline included), then write the report and plots."""
    from dotresize import CompressionConfig, DotOptions, compress, count_parameters
    from dotresize.data import calibration_set, load_text, tokenize
    from dotresize.sources import load_model, resolve_source

    from .report import write_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    source = resolve_source(spec.model)
    cells, test_ids, tokenizer = [], None, None
    grid = [("dense", 0.0)] + [(m, r) for m in spec.methods for r in spec.ratios]
    for method, ratio in grid:
        path = out / "cells" / f"{method}-{ratio:g}.json"
        key = spec.cell_key(method, ratio)
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                log.info("reused %s at %g (%s)", method, ratio, key[:12])
                cells.append(cached)
                continue
        log.info("computing %s at %g", method, ratio)
        model, tokenizer = load_model(source)
        if test_ids is None:
            test_ids = tokenize(tokenizer, load_text("wikitext2-test").text)
        start = time.perf_counter()
        if method == "dense":
            cell = {"width": int(model.config.hidden_size), "parameters": count_parameters(model),
                    "compress_seconds": 0.0}
        else:
            dot = DotOptions(**{k: v for k, v in spec.overrides.items() if k in DotOptions.__dataclass_fields__})
            rest = {k: v for k, v in spec.overrides.items() if k not in DotOptions.__dataclass_fields__}
            config = CompressionConfig(method=method, ratio=ratio, seed=spec.seed, dot=dot, **rest)
            calibration = calibration_set(tokenizer, spec.calib_data, samples=spec.calib_samples,
                                          seqlen=spec.calib_seqlen, seed=spec.seed)
            model, report = compress(model, calibration.input_ids, config, progress=progress)
            cell = {"width": min(report.widths), "parameters": report.parameters_after,
                    "compress_seconds": round(time.perf_counter() - start, 1), "widths": report.widths}
        cell.update(method=method, ratio=ratio, key=key, **_evaluate(model, tokenizer, spec, test_ids))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cell, indent=2, sort_keys=True))
        tmp.replace(path)
        cells.append(cell)
        del model
    header = (f"# Sweep of {source.spec}\n\nWikiText-2 test perplexity (ctx {spec.ctx}, first {spec.max_windows} "
              f"windows); calibration {spec.calib_samples} x {spec.calib_seqlen} tokens of {spec.calib_data} "
              f"(seed {spec.seed}); zero-shot tasks: {', '.join(spec.tasks) or 'none'}"
              f"{f' (first {spec.limit} examples each)' if spec.limit else ''}.")
    files = write_report(cells, list(spec.tasks), out, header)
    return {"out": str(out), "cells": cells, "files": [str(f) for f in files]}
