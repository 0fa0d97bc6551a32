"""Issue 4, done-when 3: ``dotresize verify`` and ``dotresize lineage`` on a fresh compressed artifact.

One tiny compression through the pipeline (with MLflow and perplexity); verify passes on it, on its run
directory and on its registered version; changing one byte of any file (weights, config, tokenizer,
lineage.json) fails naming that file and both digests, and restoring the byte makes it pass again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import write_model_dir
from flows.cli import main


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def artifact(pipeline_env):
    from flows.compress import compress_flow

    src = write_model_dir(pipeline_env / "ckpt" / "checkpoint-7", seed=7)
    result = compress_flow(model=str(src), run_dir=str(pipeline_env / "runs" / "tiny"), ratio=0.25,
                           calib_samples=8, calib_seqlen=32, seed=5, ppl=True, ppl_ctx=32, ppl_max_windows=8,
                           register_name="tiny-lineage", progress=False, n_workers=1,
                           tags={"dotresize.checkpoint": "checkpoint-7"})
    return result


def test_verify_passes_then_fails_naming_the_changed_file(artifact, capsys, pipeline_env):
    model_dir = Path(artifact["model_dir"])
    code, out, err = _run(capsys, "verify", str(model_dir))
    assert code == 0, out + err
    assert "verified: every digest matches" in out
    assert f"matches MLflow run {artifact['mlflow_run_id']}" in out
    # the run directory, a copy of the model (found in MLflow by its digest) and the registered version verify too
    assert _run(capsys, "verify", str(model_dir.parent))[0] == 0
    copy = pipeline_env / "copy"
    shutil.copytree(model_dir, copy)
    code, out, err = _run(capsys, "verify", str(copy))
    assert code == 0 and f"matches MLflow run {artifact['mlflow_run_id']}" in out, out + err
    code, out, err = _run(capsys, "verify", f"models:/tiny-lineage/{artifact['model_version']}")
    assert code == 0, out + err

    weights = json.loads((model_dir / "lineage.json").read_text()).get("weights_file", "model.safetensors")
    for name, where in ((weights, 0.5), ("config.json", 0.5), ("tokenizer.json", 0.5),
                        ("lineage.json", 0.5), ("lineage.json", 0.0)):  # the last one leaves invalid JSON
        path = model_dir / name
        original = path.read_bytes()
        changed = bytearray(original)
        changed[int(len(changed) * where)] ^= 0x01
        path.write_bytes(bytes(changed))
        try:
            code, out, err = _run(capsys, "verify", str(model_dir))
        finally:
            path.write_bytes(original)
        assert code != 0, name
        lines = [line for line in err.splitlines() if line.startswith("dotresize: error:")]
        assert len(lines) == 1 and name in lines[0], err
        assert hashlib.sha256(original).hexdigest() in err + out  # the recorded digest
        assert hashlib.sha256(bytes(changed)).hexdigest() in lines[0]  # and the one found
    assert _run(capsys, "verify", str(model_dir))[0] == 0

    # changing a file *and* its digest in lineage.json is caught by the MLflow record
    config = model_dir / "config.json"
    config.write_text(config.read_text() + " ")
    lineage = json.loads((model_dir / "lineage.json").read_text())
    lineage["model"]["config.json"] = _sha(config)
    (model_dir / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    code, out, err = _run(capsys, "verify", str(model_dir))
    assert code != 0 and "lineage.json" in err and "config.json: MLflow run" in out
    code, out, err = _run(capsys, "verify", str(model_dir), "--no-mlflow")
    assert code == 0, out + err  # lineage.json alone cannot tell


def test_lineage_shows_the_chain(artifact, capsys):
    model_dir = Path(artifact["model_dir"])
    source = artifact["source"]
    code, out, err = _run(capsys, "lineage", str(model_dir))
    assert code == 0, err
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert source["weights_sha256"]["model.safetensors"] in out  # source digests
    assert source["digest"] in out
    assert lineage["calibration"]["sha256"] in out and lineage["calibration"]["input_ids_sha256"] in out
    assert lineage["recipe_sha256"] in out  # recipe hash
    assert f"perplexity {artifact['ppl']['ppl']:.4f}" in out  # evaluation results
    assert artifact["model_sha256"] in out and "tiny-lineage/1" in out
    assert "dotresize.checkpoint = checkpoint-7" in out
    assert out.index("source") < out.index("calibration") < out.index("recipe") < out.index("artifact")

    code, out, err = _run(capsys, "lineage", f"models:/tiny-lineage/{artifact['model_version']}", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["lineage"]["source"]["digest"] == source["digest"]
    assert data["lineage_sha256"] == _sha(model_dir / "lineage.json")
    assert data["mlflow"]["run_id"] == artifact["mlflow_run_id"]

    # lineage.json records everything the issue lists
    lineage = json.loads((Path(artifact["model_dir"]) / "lineage.json").read_text())
    run_copy = Path(artifact["run_dir"]) / "lineage.json"
    assert run_copy.read_bytes() == (Path(artifact["model_dir"]) / "lineage.json").read_bytes()
    assert _sha(run_copy) == artifact["lineage_sha256"]
    assert {"spec", "revision", "weights_sha256", "digest"} <= set(lineage["source"])
    assert {"id", "sha256", "tokens", "seed"} <= set(lineage["calibration"])
    assert lineage["recipe"]["config"]["method"] == "dot" and len(lineage["recipe_sha256"]) == 64
    assert lineage["code"]["version"] and "git_commit" in lineage["code"]
    assert {"torch", "transformers", "POT", "lm-eval"} <= set(lineage["versions"])
    stages = set(lineage["stage_outputs"])
    assert {"calibration", "export"} <= stages and any(s.split("/")[0] == "capture" for s in stages), stages
    assert lineage["evaluation"]["ppl"]["result"]["ppl"] == pytest.approx(artifact["ppl"]["ppl"])
    model_files = {p.name for p in Path(artifact["model_dir"]).iterdir() if p.name != "lineage.json"}
    assert set(lineage["model"]) == model_files
    from mlflow import MlflowClient

    client = MlflowClient(artifact["mlflow_tracking_uri"])
    run = client.get_run(artifact["mlflow_run_id"])
    assert run.data.tags["dotresize.lineage_sha256"] == artifact["lineage_sha256"]
    assert run.data.tags["dotresize.checkpoint"] == "checkpoint-7"
    version = client.get_model_version("tiny-lineage", str(artifact["model_version"]))
    assert version.tags["dotresize.lineage_sha256"] == artifact["lineage_sha256"]


def test_verify_errors_are_one_line(capsys, tmp_path, pipeline_env):
    code, _, err = _run(capsys, "verify", str(tmp_path / "nowhere"))
    assert code != 0 and err.strip().splitlines()[-1].startswith("dotresize: error:") and "does not exist" in err
    code, _, err = _run(capsys, "lineage", "models:/no-such-model/1")
    assert code != 0 and "not a registered model version" in err
