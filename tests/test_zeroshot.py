"""Tests for dotresize.evaluation.zeroshot (offline lm-eval zero-shot tasks).

Unit parts use small JSONL fixtures written to tmp_path; one integration test uses the real data
directory (skipped when absent). The model is a tiny random Llama with a byte-level BPE tokenizer
trained in code: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from dotresize.evaluation import zeroshot
from dotresize.evaluation.lm_eval_tasks import utils as task_utils

LIMIT = 3
MC_WITH_NORM = {"piqa", "arc_easy", "arc_challenge", "openbookqa"}  # lm-eval defines acc_norm

# First rows of the real files (boolq shortened), in the same formats.
FIXTURE_ROWS = {
    "piqa_valid.jsonl": [
        {"goal": "How do I ready a guinea pig cage for it's new occupants?",
         "sol1": "Provide the guinea pig with a cage full of bedding made of ripped paper strips.",
         "sol2": "Provide the guinea pig with a cage full of bedding made of ripped jeans material."},
        {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "},
        {"goal": "To cut a cake", "sol1": "use a knife.", "sol2": "use a spoon."},
        {"goal": "To dry hair", "sol1": "use a towel.", "sol2": "use a rock."},
    ],
    "arc_easy.jsonl": [
        {"choices": ["Sunlight is the source of energy for nearly all ecosystems.",
                     "Most ecosystems are found on land instead of in water.",
                     "Carbon dioxide is more available than other gases.",
                     "The producers in all ecosystems are plants."],
         "query": "Question: Which statement best explains why photosynthesis is the foundation of most food webs?",
         "gold": 0},
        {"choices": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
         "query": "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory system?",
         "gold": 1},
        {"choices": ["red", "blue", "green", "black"], "query": "Question: What colour is the sky?", "gold": 1},
    ],
    "arc_challenge.jsonl": [
        {"choices": ["Planetary density will decrease.", "Planetary years will become longer.",
                     "Planetary days will become shorter.", "Planetary gravity will become stronger."],
         "query": "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                  "Which is the most likely effect of this increase in rotation?",
         "gold": 2},
        {"choices": ["a", "b", "c", "d"], "query": "Question: Pick b.", "gold": 1},
        {"choices": ["a", "b", "c", "d"], "query": "Question: Pick d.", "gold": 3},
    ],
    "boolq.jsonl": [
        {"query": "Passage: Ethanol fuel energy balance is modest for corn.\nQuestion: does ethanol take more energy make that produces?",
         "choices": ["no", "yes"], "gold": 0},
        {"query": "Passage: Water boils at 100 degrees at sea level.\nQuestion: does water boil at 100 degrees?",
         "choices": ["no", "yes"], "gold": 1},
        {"query": "Passage: Cats are mammals.\nQuestion: is a cat a mammal?", "choices": ["no", "yes"], "gold": 1},
    ],
    "winogrande.jsonl": [
        {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"],
         "continuation": "always got the easier cases.", "gold": 1},
        {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"],
         "continuation": "always got the harder cases.", "gold": 0},
        {"context_options": ["The cup fit in the box because the cup", "The cup fit in the box because the box"],
         "continuation": "was small.", "gold": 0},
    ],
    "lambada_openai.jsonl": [
        {"context": "I look at him, feeling stunned. But as I stare at Harlin, I don't care about", "continuation": "signs"},
        {"context": "\"I can make it there on my own,", "continuation": "Shane"},
        {"context": "She opened the door and saw her", "continuation": "mother"},
    ],
    "copa.jsonl": [
        {"query": "The man turned on the faucet, therefore", "gold": 1,
         "choices": ["the toilet filled with water.", "water flowed from the spout."]},
        {"query": "The girl found a bug in her cereal, therefore", "gold": 1,
         "choices": ["she poured milk in the bowl.", "she lost her appetite."]},
        {"query": "The woman fell asleep, because", "gold": 0, "choices": ["She was tired.", "she was hungry."]},
    ],
    "openbook_qa.jsonl": [
        {"query": "There is most likely going to be fog around:", "choices": ["a marsh", "a tundra", "the plains", "a desert"], "gold": 0},
        {"query": "Predators eat", "choices": ["lions", "humans", "bunnies", "grass"], "gold": 2},
        {"query": "Oak tree seeds are planted", "choices": ["in water", "in soil", "in air", "on rock"], "gold": 1},
    ],
    "siqa.jsonl": [
        {"query": "Context: Tracy didn't go home that evening and resisted Riley's attacks.\n"
                  "Question: What does Tracy need to do before this?\nChoices:\nA. make a new plan\n"
                  "B. Find somewhere to go\nAnswer:", "gold": 1, "choices": ["A", "B"]},
        {"query": "Context: Sydney felt bad.\nQuestion: How would you describe Sydney?\nChoices:\n"
                  "A. sympathetic\nB. unable to help\nAnswer:", "gold": 0, "choices": ["A", "B"]},
        {"query": "Context: Jan ran.\nQuestion: Why?\nChoices:\nA. late\nB. early\nAnswer:", "gold": 0, "choices": ["A", "B"]},
    ],
}
PIQA_LABELS = [0, 1, 0, 0]


# --- the expected requests: lm-eval's own prompt formats, written from the raw rows -----------

def expected_requests(task: str, row: dict) -> list[tuple[str, str]]:
    """(context, continuation) pairs lm-eval's own task would score for this row."""
    if task == "piqa":
        return [(f"Question: {row['goal']}\nAnswer:", f" {row[s]}") for s in ("sol1", "sol2")]
    if task in ("arc_easy", "arc_challenge"):
        return [(f"{row['query']}\nAnswer:", f" {c}") for c in row["choices"]]
    if task == "boolq":
        assert row["query"].startswith("Passage: ")
        return [(row["query"][len("Passage: "):] + "\nAnswer:", f" {c}") for c in ("no", "yes")]
    if task == "winogrande":
        return [(ctx, " " + row["continuation"]) for ctx in row["context_options"]]
    if task == "lambada":
        return [(row["context"], " " + row["continuation"])]
    if task == "copa":
        head, _, connector = row["query"].rpartition(", ")
        return [(f"{head} {connector}", "  " + c[0].lower() + c[1:]) for c in row["choices"]]
    if task in ("openbookqa", "siqa"):
        return [(row["query"], f" {c}") for c in row["choices"]]
    raise AssertionError(task)


def expected_gold(task: str, row: dict) -> int:
    return row["label"] if task == "piqa" else row["gold"]


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """Offline HF settings, a private HF cache, and no internet connections at all."""
    real_connect = socket.socket.connect

    def guarded_connect(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"test tried to open a network connection to {address}")
        return real_connect(sock, address, *args)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.fixture
def fixture_dir(tmp_path) -> Path:
    """A data dir with small task files in the local formats."""
    root = tmp_path / "data"
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    for name, rows in FIXTURE_ROWS.items():
        (tasks / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tasks / "piqa_valid-labels.lst").write_text("".join(f"{x}\n" for x in PIQA_LABELS))
    return root


def _real_data_dir() -> Path | None:
    try:
        path = zeroshot.default_data_dir()
    except FileNotFoundError:
        return None
    return path if (path / "tasks" / "piqa_valid.jsonl").is_file() else None


REAL_DATA = _real_data_dir()
needs_real_data = pytest.mark.skipif(REAL_DATA is None, reason="no shared data dir (set DOTRESIZE_DATA_DIR)")


@pytest.fixture(scope="module")
def tiny_lm():
    """(model, tokenizer): random 2-layer Llama, byte-level BPE trained on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = [json.dumps(r) for rows in FIXTURE_ROWS.values() for r in rows] * 3
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


@pytest.fixture(scope="module")
def standard_task_manager():
    return zeroshot._make_task_manager(None, include_defaults=True)


def _requests(task_obj, limit: int) -> list[list[tuple[str, str]]]:
    """Per doc, the (context, continuation) pairs lm-eval builds for the first ``limit`` docs."""
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    per_doc: dict[int, list] = {}
    for inst in task_obj.instances:
        per_doc.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
    return [per_doc[i] for i in sorted(per_doc)]


def _check_prompts(data_dir: Path, limit: int) -> None:
    objs = zeroshot._load_local_tasks(list(zeroshot.LOCAL_TASKS), data_dir)
    by_name = {o.config.task: o for o in objs}
    for task in zeroshot.LOCAL_TASKS:
        obj = by_name[zeroshot.lm_eval_task_name(task)]
        rows = task_utils.read_docs(task, data_dir)[:limit]
        assert _requests(obj, limit) == [expected_requests(task, r) for r in rows], task
        docs = list(obj.eval_docs)[:limit]
        if task == "winogrande":  # partial scoring: the gold index is doc_to_text
            assert [obj.doc_to_text(d) for d in docs] == [r["gold"] for r in rows]
            assert obj.doc_to_target(docs[0]) == rows[0]["continuation"]
        elif task != "lambada":
            assert [obj.doc_to_target(d) for d in docs] == [expected_gold(task, r) for r in rows]


# --- tests -----------------------------------------------------------------------------------

def test_default_data_dir(monkeypatch, tmp_path):
    """The task data directory is the calibration data setting (DOTRESIZE_DATA_DIR, else ../shared/data)."""
    from dotresize import data

    (tmp_path / "x").mkdir()
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(tmp_path / "x"))
    assert zeroshot.default_data_dir() == (tmp_path / "x").resolve() == data.resolve_data_dir()

    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="DOTRESIZE_DATA_DIR"):
        zeroshot.default_data_dir()

    monkeypatch.delenv("DOTRESIZE_DATA_DIR")
    (tmp_path / "ws" / "shared" / "data").mkdir(parents=True)
    (tmp_path / "ws" / "main").mkdir()
    monkeypatch.chdir(tmp_path / "ws" / "main")
    assert zeroshot.default_data_dir() == (tmp_path / "ws" / "shared" / "data").resolve()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "default_data_dirs", lambda: [tmp_path / "nowhere" / "shared" / "data"])
    with pytest.raises(FileNotFoundError, match="DOTRESIZE_DATA_DIR") as err:
        zeroshot.default_data_dir()
    assert "\n" not in str(err.value)


def test_piqa_labels_merged(fixture_dir):
    docs = task_utils.read_docs("piqa", fixture_dir)
    assert [d["label"] for d in docs] == PIQA_LABELS
    assert docs[0]["goal"] == FIXTURE_ROWS["piqa_valid.jsonl"][0]["goal"]
    with pytest.raises(ValueError, match="labels"):
        task_utils.merge_piqa_labels(docs, PIQA_LABELS[:-1])


def test_prompts_match_lm_eval_format(fixture_dir):
    _check_prompts(fixture_dir, limit=LIMIT)
    # A few literal spot checks of lm-eval's formats.
    objs = {o.config.task: o for o in zeroshot._load_local_tasks(["copa", "boolq", "siqa"], fixture_dir)}
    copa = _requests(objs["dotresize_copa"], 3)
    assert copa[0] == [("The man turned on the faucet therefore", "  the toilet filled with water."),
                       ("The man turned on the faucet therefore", "  water flowed from the spout.")]
    assert copa[2][0] == ("The woman fell asleep because", "  she was tired.")
    boolq = _requests(objs["dotresize_boolq"], 1)[0]
    assert boolq[0] == ("Ethanol fuel energy balance is modest for corn.\n"
                        "Question: does ethanol take more energy make that produces?\nAnswer:", " no")
    assert _requests(objs["dotresize_siqa"], 1)[0][1][1] == " B"


def test_unknown_task_one_line_error(tiny_lm, fixture_dir, standard_task_manager):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError) as err:
        zeroshot.evaluate_zero_shot(model, tokenizer, ["no_such_task_xyz"], data_dir=fixture_dir)
    message = str(err.value)
    assert "\n" not in message and "no_such_task_xyz" in message
    assert all(t in message for t in zeroshot.LOCAL_TASKS)
    zeroshot._check_known(["hellaswag", "lambada_openai"], standard_task_manager)  # lm-eval's own


def test_missing_data_file(tiny_lm, fixture_dir):
    model, tokenizer = tiny_lm
    (fixture_dir / "tasks" / "piqa_valid-labels.lst").unlink()
    with pytest.raises(FileNotFoundError) as err:
        zeroshot.evaluate_zero_shot(model, tokenizer, ["piqa"], data_dir=fixture_dir)
    assert isinstance(err.value, zeroshot.DataFileNotFoundError)
    message = str(err.value)
    assert "\n" not in message and "piqa_valid-labels.lst" in message and "DOTRESIZE_DATA_DIR" in message


def test_config_hash(tmp_path, fixture_dir):
    task_dir = tmp_path / "task_defs"
    shutil.copytree(zeroshot.TASK_DIR, task_dir, ignore=shutil.ignore_patterns("__pycache__"))
    base = zeroshot.task_config_hash(["piqa", "lambada"], fixture_dir, task_dir=task_dir)
    assert base == zeroshot.task_config_hash(["lambada", "piqa"], fixture_dir, task_dir=task_dir)
    assert base != zeroshot.task_config_hash(["piqa"], fixture_dir, task_dir=task_dir)

    yaml_file = task_dir / "dotresize_piqa.yaml"
    yaml_file.write_text(yaml_file.read_text() + "\n# changed\n")
    changed_def = zeroshot.task_config_hash(["piqa", "lambada"], fixture_dir, task_dir=task_dir)
    assert changed_def != base

    labels = fixture_dir / "tasks" / "piqa_valid-labels.lst"
    labels.write_text(labels.read_text().replace("1", "0"))
    assert zeroshot.task_config_hash(["piqa", "lambada"], fixture_dir, task_dir=task_dir) != changed_def


def _check_result(result: dict, tasks, limit: int) -> None:
    json.dumps(result, allow_nan=False)
    assert set(result) == {"tasks", "lm_eval_version", "task_config_hash", "limit", "num_fewshot"}
    assert result["limit"] == limit and result["num_fewshot"] == 0
    assert len(result["task_config_hash"]) == 64
    assert list(result["tasks"]) == list(tasks)
    for task, metrics in result["tasks"].items():
        assert metrics["n"] == limit, task
        assert 0.0 <= metrics["acc"] <= 1.0, task
        assert metrics["acc_stderr"] is not None and metrics["acc_stderr"] >= 0.0, task
        assert ("acc_norm" in metrics) == (task in MC_WITH_NORM), task
        if task in MC_WITH_NORM:
            assert 0.0 <= metrics["acc_norm"] <= 1.0, task
        assert ("perplexity" in metrics) == (task == "lambada"), task
    assert result["tasks"]["lambada"]["perplexity"] > 1.0


def test_evaluate_zero_shot_fixtures(tiny_lm, fixture_dir):
    model, tokenizer = tiny_lm
    model.train()
    tasks = list(zeroshot.LOCAL_TASKS)
    result = zeroshot.evaluate_zero_shot(
        model, tokenizer, tasks, limit=LIMIT, batch_size=4, data_dir=fixture_dir, bootstrap_iters=100
    )
    _check_result(result, tasks, LIMIT)
    assert model.training  # mode restored
    assert result["task_config_hash"] == zeroshot.task_config_hash(tasks, fixture_dir)
    again = zeroshot.evaluate_zero_shot(
        model, tokenizer, ["copa", "lambada"], limit=LIMIT, data_dir=fixture_dir, bootstrap_iters=100
    )
    for task in ("copa", "lambada"):  # deterministic, and independent of batch size / task mix
        assert again["tasks"][task]["acc"] == result["tasks"][task]["acc"]
    assert again["tasks"]["lambada"]["perplexity"] == pytest.approx(result["tasks"]["lambada"]["perplexity"])


@needs_real_data
def test_real_data_integration(tiny_lm, monkeypatch):
    """The real task files: first rows build lm-eval's prompts; every task evaluates."""
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(REAL_DATA))
    labels = (REAL_DATA / "tasks" / "piqa_valid-labels.lst").read_text().split()
    assert task_utils.read_docs("piqa", REAL_DATA)[0]["label"] == int(labels[0])
    _check_prompts(REAL_DATA, limit=2)

    model, tokenizer = tiny_lm
    tasks = list(zeroshot.LOCAL_TASKS)
    result = zeroshot.evaluate_zero_shot(model, tokenizer, tasks, limit=4, batch_size=8, bootstrap_iters=100)
    _check_result(result, tasks, 4)


# --- the metrics, by hand: our own forward passes on the requests built from the raw rows -------------------------

def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal-LM split: trailing spaces of the context move to the continuation; the pair is encoded
    whole and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def _hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | everything before), whether greedy decoding gives the continuation)."""
    context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    targets = continuation_ids
    total = sum(float(logprobs[p, t]) for p, t in zip(positions, targets))
    greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, targets))
    return total, greedy


def _hand_metrics(model, tokenizer, task: str, rows: list[dict]) -> dict[str, float]:
    """acc (and acc_norm: log-likelihood over the choice's length in characters) computed from scratch."""
    acc, acc_norm = [], []
    for row in rows:
        requests = expected_requests(task, row)
        scored = [_hand_loglikelihood(model, tokenizer, c, t) for c, t in requests]
        if task == "lambada":
            acc.append(float(scored[0][1]))
            continue
        lls = [s[0] for s in scored]
        gold = expected_gold(task, row)
        acc.append(float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == gold))
        choices = [t[1:] for _, t in requests]  # the target delimiter " " comes off; the rest is doc_to_choice
        normed = [ll / len(c) for ll, c in zip(lls, choices)]
        acc_norm.append(float(max(range(len(normed)), key=lambda i: (normed[i], -i)) == gold))
    out = {"acc": sum(acc) / len(acc)}
    if task in MC_WITH_NORM:
        out["acc_norm"] = sum(acc_norm) / len(acc_norm)
    return out


def test_accuracies_match_a_hand_computation_on_a_few_rows_of_every_task(tiny_lm, fixture_dir):
    """Every task definition, end to end on its fixture rows: lm-eval's acc / acc_norm equal those computed here
    from our own forward passes over the (context, continuation) pairs written from the raw rows."""
    model, tokenizer = tiny_lm
    model.eval()
    tasks = list(zeroshot.LOCAL_TASKS)
    result = zeroshot.evaluate_zero_shot(model, tokenizer, tasks, limit=LIMIT, batch_size=2, data_dir=fixture_dir,
                                         bootstrap_iters=10, progress=False)
    seen = set()
    for task in tasks:
        rows = task_utils.read_docs(task, fixture_dir)[:LIMIT]
        expected = _hand_metrics(model, tokenizer, task, rows)
        got = result["tasks"][task]
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value), (task, metric, got, expected)
            seen.add(round(value, 3))
    assert len(seen) > 1  # the rows discriminate: not every task scores the same
