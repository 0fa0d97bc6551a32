"""The sweep: every cell computed once, a table and plots written, completed cells reused."""

import json

from conftest import write_model_dir
from flows.cli import main


def test_sweep_writes_table_and_plots_and_reuses_cells(capsys, tiny_env):
    src = write_model_dir(tiny_env / "src")
    out = tiny_env / "sweep"
    argv = ["-q", "sweep", "--model", str(src), "--ratios", "0.25,0.5", "--methods", "pca,prune",
            "--calib-samples", "8", "--calib-seqlen", "32", "--ctx", "32", "--max-windows", "10", "--out", str(out),
            "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    cells = {(c["method"], c["ratio"]): c for c in result["cells"]}
    assert set(cells) == {("dense", 0.0), ("pca", 0.25), ("pca", 0.5), ("prune", 0.25), ("prune", 0.5)}
    assert cells[("pca", 0.5)]["width"] == 32 and cells[("pca", 0.25)]["width"] == 48
    assert all(c["ppl"] > 1 and c["tokens_per_second"] > 0 for c in cells.values())
    report = (out / "report.md").read_text()
    assert "| pca | 0.25 | 48 |" in report and "ppl_vs_width.png" in report
    for name in ("ppl_vs_width.png", "tokens_per_second_vs_width.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(argv) == 0
    capsys.readouterr()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before  # nothing recomputed
