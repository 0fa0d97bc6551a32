"""Smoke test of the benchmark suite: every part runs on a tiny in-code model and writes measured values.

No timing is asserted (performance targets live in benchmarks/, as measurements): only that the JSON and the
Markdown summary the suite writes hold real numbers.
"""

from __future__ import annotations

import json
import math

from conftest import write_model_dir


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_suite_writes_measured_json_and_markdown(tiny_env, tmp_path):
    from benchmarks.suite import run_suite

    model = write_model_dir(tmp_path / "model")
    out = tmp_path / "bench"
    suite = run_suite(
        "tiny", out, model=str(model),
        quality_overrides=dict(epsilons=(0.05, 1.0), normalization_variants=(), rms_targets=False, mass_marginals=False,
                               settings=("parallel/per-point", "sequential/per-point", "parallel/global"),
                               methods=("pca", "prune", "dot", "dot+prune-keep")),
        solver_overrides=dict(sizes="40x32", repeats=1, max_iter=50),
        compression_overrides=dict(variants=("in-memory/parallel",)),
        speed_overrides=dict(repeats=1),
    )
    data = json.loads((out / "suite.json").read_text())
    summary = (out / "summary.md").read_text()
    assert set(data["parts"]) == {"quality", "solver", "compression", "speed"}
    assert data["machine"]["cores"] >= 1 and suite["seconds"] > 0

    quality = data["parts"]["quality"]
    rows = {r["key"]: r for r in quality["rows"]}
    assert _finite(rows["dense"]["ppl"])
    for setting in ("parallel/per-point", "sequential/per-point", "parallel/global"):
        for method in ("pca", "prune", "dot", "dot+prune-keep"):
            row = rows[f"{setting}|0.25|{method}"]
            assert _finite(row.get("ppl")), row
            assert row["parameters"] > 0
    # in the parallel settings the prune keep-set is DOT's own target set: the same row by construction
    assert rows["parallel/per-point|0.25|dot+prune-keep"]["same_as"] == "parallel/per-point|0.25|dot"
    ablations = [r for r in quality["rows"] if r["group"].startswith("ablation")]
    assert {r["group"] for r in ablations} >= {"ablation:epsilon", "ablation:cost", "ablation:decompression",
                                               "ablation:outliers"}
    assert quality["choice"]["per_axis"]
    assert "| parallel/per-point | dot |" in summary and "Chosen defaults" in summary

    solver = data["parts"]["solver"]
    labels = [s["label"] for s in solver["sizes"]]
    assert labels[0] == "40x32" and any(label.startswith("point_") for label in labels[1:])  # real costs too
    for size in solver["sizes"]:
        torch_row = next(r for r in size["rows"] if r["solver"] == "torch")
        assert torch_row["seconds"] > 0 and torch_row["max_abs_diff"] <= 1e-6
        if solver["pot"]:
            assert size["same_iterations"]
    if solver["pot"]:
        assert _finite(solver["speedup_largest_torch_cpu_vs_pot_numpy"])
    assert "### Solver" in summary

    compression = data["parts"]["compression"]
    run = compression["summary"]["in-memory/parallel"]
    assert run["runs"] == 1 and run["wall_seconds"] > 0 and run["peak_tree_rss_mb"] > 0
    assert "capture" in run["stage_seconds"]
    assert "### Compression time and memory" in summary

    speed = data["parts"]["speed"]
    labels = [r["model"] for r in speed["rows"]]
    assert labels[0] == "original" and "per-point 25 %" in labels and "global 25 %" in labels
    for row in speed["rows"]:
        assert row["tokens_per_second"] > 0 and row["decode_ms_per_token_median"] > 0
        assert _finite(row["forward_speedup"])
    assert "### Compressed-model speed" in summary


def test_quality_benchmark_has_the_mlp_axis(tiny_env, tmp_path):
    """Rows with MLP neurons removed (with and without the residual axis) beside the residual rows, their size
    relative to dense, and a Pareto table."""
    from benchmarks.quality import run_quality, spec_for

    model = write_model_dir(tmp_path / "model")
    spec = spec_for("tiny", model=str(model), ratios=(0.0, 0.25), methods=("pca",), mlp_ratios=(0.0, 0.3),
                    mlp_methods=("lsq", "prune"), settings=("parallel/per-point", "sequential/per-point"),
                    ablations=False)
    result = run_quality(spec)
    rows = {r["key"]: r for r in result["rows"]}
    residual = rows["parallel/per-point|0.25|pca"]
    both = rows["parallel/per-point|0.25|pca mlp=lsq@0.3"]
    only = rows["sequential/per-point|0.0|mlp-only mlp=prune@0.3"]
    for row in (residual, both, only, rows["parallel/per-point|0.0|mlp-only mlp=lsq@0.3"]):
        assert _finite(row.get("ppl")), row
    assert both["parameters"] < residual["parameters"] and only["parameters"] < rows["dense"]["parameters"]
    assert both["mlp_ratio"] == 0.3 and both["mlp_method"] == "lsq" and "mlp_ratio" not in residual
    assert "| parallel/per-point | pca 25 % | lsq 30 % |" in result["markdown"]
    assert "Pareto front" in result["markdown"] and "** *" in result["markdown"]
