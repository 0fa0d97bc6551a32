"""Evaluation precision (``--dtype``): the model cast for evaluation, the optional float32 output head, and the
precision recorded beside the results."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model, write_model_dir
from dotresize.evaluation.precision import precision_label, set_evaluation_precision
from flows.cli import main


def _ids(model, n: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied"])
def test_bfloat16_casts_the_model_and_stays_close_to_float32(family):
    model = make_tiny_model(family, seed=3).eval()
    ids = _ids(model)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    cast = copy.deepcopy(model)
    assert set_evaluation_precision(cast, "bfloat16") == "bfloat16"
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = cast(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    assert not torch.equal(logits.float(), reference)  # really computed in bfloat16
    assert torch.allclose(logits.float().log_softmax(-1), reference.log_softmax(-1), atol=0.1)


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied"])
def test_float32_head_uses_a_float32_copy_of_the_weight_taken_before_the_cast(family):
    model = make_tiny_model(family, seed=4).eval()
    weight = model.get_output_embeddings().weight.detach().clone()
    ids = _ids(model)
    cast = copy.deepcopy(model)
    assert set_evaluation_precision(cast, "bfloat16", float32_head=True) == "bfloat16 (output head float32)"
    assert cast.get_output_embeddings().weight.dtype == torch.bfloat16  # tied embeddings go with the body
    with torch.no_grad():
        hidden = cast.model(input_ids=ids).last_hidden_state
        logits = cast(input_ids=ids).logits
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(hidden.float(), weight))
    assert not torch.equal(logits, F.linear(hidden.float(), weight.to(torch.bfloat16).float()))


def test_unknown_precision_is_refused_and_float32_is_a_no_op():
    model = make_tiny_model("llama-untied")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        set_evaluation_precision(model, "int8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_evaluation_precision(model, "float32") == precision_label("float32") == "float32"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_records_the_precision_and_refuses_a_head_without_a_dtype(capsys, tiny_env):
    src = write_model_dir(tiny_env / "src")
    argv = ["-q", "evaluate", str(src), "--ppl", "--ctx", "32", "--max-windows", "4", "--json"]
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(argv + ["--dtype", "bfloat16", "--float32-head"]) == 0
    reduced = json.loads(capsys.readouterr().out)
    assert full["dtype"] == "float32" and reduced["ppl"]["dtype"] == "bfloat16 (output head float32)"
    assert reduced["ppl"]["ppl"] != full["ppl"]["ppl"]
    assert reduced["ppl"]["ppl"] == pytest.approx(full["ppl"]["ppl"], rel=0.05)
    assert main(argv[:-1] + ["--dtype", "bfloat16"]) == 0  # the text output names the precision
    assert "tokens, in bfloat16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--float32-head"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--dtype bfloat16" in err and "Traceback" not in err


def test_reduced_precision_metrics_get_their_own_names():
    from flows.eval_logging import eval_metrics

    zero_shot = {"tasks": {"piqa": {"acc": 0.5}}}
    assert set(eval_metrics(ppl={"ppl": 9.0}, zero_shot=zero_shot)) == {"ppl", "zeroshot/piqa/acc",
                                                                        "zeroshot/mean_acc"}
    assert set(eval_metrics(ppl={"ppl": 9.0, "dtype": "bfloat16"},
                            zero_shot={**zero_shot, "dtype": precision_label("bfloat16", True)})) == {
        "bfloat16/ppl", "bfloat16-head32/zeroshot/piqa/acc", "bfloat16-head32/zeroshot/mean_acc"}


def test_compress_in_memory_refuses_an_evaluation_precision(capsys, tiny_env):
    src = write_model_dir(tiny_env / "src")
    out = tiny_env / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "compress", "--model", str(src), "--ratio", "0.25", "--method", "pca", "--in-memory", "--out",
              str(out), "--ppl", "--eval-dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--eval-dtype" in err and "dotresize evaluate" in err
    assert not out.exists()
