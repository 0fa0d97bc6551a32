"""The sweep through the pipeline: every cell a run directory, a table and plots, one MLflow run with every number
as a metric and the report as artifacts; a rerun reuses every stage and evaluation."""

import json
import shutil

import numpy as np
import pytest

from conftest import write_model_dir
from flows.cli import main
from test_evaluate import tiny_task_data

METHOD_RGB = {"dot": (31, 119, 180), "pca": (44, 160, 44)}  # matplotlib's tab:blue, tab:green


def _has_colour(path, rgb, tolerance=12) -> bool:
    import matplotlib.image

    image = (matplotlib.image.imread(str(path))[..., :3] * 255).astype(int)
    return bool((np.abs(image - np.array(rgb)).max(axis=-1) <= tolerance).sum() > 50)


def test_sweep_through_the_pipeline_writes_table_plots_and_mlflow_and_reuses_everything(
        capsys, pipeline_env, tiny_data_dir, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(tiny_task_data(pipeline_env / "data", tiny_data_dir)))
    src = write_model_dir(pipeline_env / "src")
    out = pipeline_env / "sweep"
    argv = ["-q", "sweep", "--model", str(src), "--ratios", "0.25,0.5", "--methods", "dot,pca", "--tasks",
            "copa,arc_easy", "--limit", "3", "--calib-samples", "8", "--calib-seqlen", "32", "--ctx", "32",
            "--max-windows", "6", "--speed-batch", "2", "--speed-ctx", "16", "--speed-repeats", "1", "--out",
            str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    cells = {(c["method"], c["ratio"]): c for c in result["cells"]}
    assert set(cells) == {("dense", 0.0), ("dot", 0.25), ("dot", 0.5), ("pca", 0.25), ("pca", 0.5)}
    assert cells[("pca", 0.5)]["width"] == 32 and cells[("dot", 0.25)]["width"] == 48
    assert cells[("dense", 0.0)]["width"] == 64
    for (method, ratio), cell in cells.items():
        assert cell["ppl"] > 1 and cell["tokens_per_second"] > 0 and cell["ms_per_token"] > 0
        assert cell["zero_shot"]["tasks"]["copa"]["n"] == 3 and "acc_norm" in cell["zero_shot"]["tasks"]["arc_easy"]
        if method != "dense":  # a pipeline run per cell, with its evaluations in eval/
            run = out / "runs" / f"{method}-{ratio:g}"
            assert cell["run_dir"] == str(run)
            for name in ("ppl.json", "lm_eval.json", "speed.json"):
                assert (run / "eval" / name).is_file(), (run, name)
            assert json.loads((run / "eval" / "ppl.json").read_text())["ppl"] == cell["ppl"]
    assert {p.name for p in (out / "dense" / "eval").iterdir()} == {"ppl_source.json", "lm_eval_source.json",
                                                                     "speed_source.json"}

    report = (out / "report.md").read_text()
    assert "| pca | 0.25 | 48 |" in report and "| dense | 0.00 | 64 |" in report
    assert "arc_easy acc/acc_norm" in report and "copa acc |" in report and "mean acc" in report
    assert f"| {cells[('dot', 0.5)]['ppl']:.2f} |" in report
    plots = ("ppl_vs_width.png", "accuracy_vs_width.png", "accuracy_by_task_vs_width.png",
             "tokens_per_second_vs_width.png")
    for name in plots:
        assert (out / name).read_bytes().startswith(b"\x89PNG") and f"({name})" in report
        assert _has_colour(out / name, METHOD_RGB["dot"]) and _has_colour(out / name, METHOD_RGB["pca"]), name
    table = json.loads((out / "table.json").read_text())
    assert len(table["cells"]) == 5 and table["spec"]["tasks"] == ["copa", "arc_easy"]

    # the sweep's MLflow run: every number as a metric, the report and plots as artifacts
    record = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    metrics = run.data.metrics
    assert metrics["ppl/dot/0.5"] == pytest.approx(cells[("dot", 0.5)]["ppl"])
    assert metrics["ppl/dense"] == pytest.approx(cells[("dense", 0.0)]["ppl"])
    assert metrics["width/pca/0.25"] == 48 and metrics["tokens_per_second/pca/0.5"] > 0
    assert metrics["acc/copa/dot/0.25"] == cells[("dot", 0.25)]["zero_shot"]["tasks"]["copa"]["acc"]
    assert "acc_norm/arc_easy/dense" in metrics and "mean_acc/pca/0.5" in metrics
    assert len(metrics) == len(result["mlflow"]["metric_keys"])
    artifacts = {a.path for a in client.list_artifacts(record["run_id"], "report")}
    assert {f"report/{n}" for n in ("report.md", "table.json", *plots)} <= artifacts
    assert run.data.tags["cell.dot-0.25.mlflow_run_id"] == cells[("dot", 0.25)]["mlflow_run_id"]
    cell_run = client.get_run(cells[("pca", 0.5)]["mlflow_run_id"])  # each cell's compression run has its numbers
    assert cell_run.data.metrics["ppl"] == pytest.approx(cells[("pca", 0.5)]["ppl"])
    assert cell_run.data.metrics["speed/tokens_per_second"] == pytest.approx(cells[("pca", 0.5)]["tokens_per_second"])

    # a rerun recomputes nothing: every stage, evaluation and speed measurement is read back
    speed_before = (out / "runs" / "dot-0.5" / "eval" / "speed.json").read_bytes()
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(c["stages_computed"] == 0 for c in again["cells"] if c["method"] != "dense")
    assert (out / "runs" / "dot-0.5" / "eval" / "speed.json").read_bytes() == speed_before
    assert [c["ppl"] for c in again["cells"]] == [c["ppl"] for c in result["cells"]]
    assert json.loads((out / "sweep.json").read_text())["run_id"] == record["run_id"]
    assert again["mlflow"]["new_metrics"] == 0

    # another evaluation precision: the compressions are reused, only the evaluations run again, in bfloat16
    bf16_out = pipeline_env / "sweep-bf16"
    argv_bf16 = argv[:argv.index("--out")] + ["--out", str(bf16_out), "--ratios", "0.5", "--methods", "pca",
                                              "--no-speed", "--no-mlflow", "--eval-dtype", "bfloat16", "--json"]
    shutil.copytree(out / "runs" / "pca-0.5", bf16_out / "runs" / "pca-0.5")  # the finished run, reused
    assert main(argv_bf16) == 0
    reduced = json.loads(capsys.readouterr().out)
    pca = next(c for c in reduced["cells"] if c["method"] == "pca")
    assert pca["stages_computed"] == 2  # perplexity and zero-shot; the compression is read back
    assert pca["ppl"] == pytest.approx(cells[("pca", 0.5)]["ppl"], rel=0.05) and pca["ppl"] != cells[("pca", 0.5)]["ppl"]
    evaluated = bf16_out / "runs" / "pca-0.5" / "eval"
    assert json.loads((evaluated / "ppl.json").read_text())["dtype"] == "bfloat16"
    assert {t["dtype"] for t in json.loads((evaluated / "lm_eval.json").read_text())["tasks"].values()} == {"bfloat16"}
    assert "evaluated in bfloat16" in (bf16_out / "report.md").read_text()


def test_sweep_over_mlp_ratios_reports_size_and_the_pareto_front(capsys, pipeline_env):
    src = write_model_dir(pipeline_env / "src")
    out = pipeline_env / "sweep-mlp"
    argv = ["-q", "sweep", "--model", str(src), "--ratios", "0,0.25", "--methods", "pca", "--mlp-ratios", "0,0.3",
            "--calib-samples", "8", "--calib-seqlen", "32", "--ctx", "32", "--max-windows", "4", "--no-speed",
            "--no-mlflow", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    cells = {(c["method"], c["ratio"], c.get("mlp_ratio", 0.0)): c for c in result["cells"]}
    # ratio 0 without the MLP axis is the dense model: no cell; ratio 0 with it is the MLPs alone
    assert set(cells) == {("dense", 0.0, 0.0), ("pca", 0.25, 0.0), ("mlp", 0.0, 0.3), ("pca", 0.25, 0.3)}
    assert cells[("mlp", 0.0, 0.3)]["mlp_width"] == 72 and cells[("mlp", 0.0, 0.3)]["width"] == 64
    assert (out / "runs" / "mlp-0-mlp0.3").is_dir() and (out / "runs" / "pca-0.25-mlp0.3").is_dir()
    both, alone = cells[("pca", 0.25, 0.3)], cells[("pca", 0.25, 0.0)]
    assert both["parameters"] < alone["parameters"]
    report = (out / "report.md").read_text()
    assert "| MLP ratio | m |" in report and "× dense" in report and "★" in report
    assert (out / "ppl_vs_parameters.png").read_bytes().startswith(b"\x89PNG")


def test_pareto_front_keeps_only_cells_nothing_beats():
    from flows.report import pareto_front

    cells = [{"method": "dense", "parameters": 100, "ppl": 10.0},
             {"method": "a", "parameters": 80, "ppl": 20.0}, {"method": "b", "parameters": 90, "ppl": 15.0},
             {"method": "c", "parameters": 85, "ppl": 25.0}, {"method": "d", "parameters": 70, "ppl": 40.0}]
    assert [c["method"] for c in pareto_front(cells)] == ["d", "a", "b"]
