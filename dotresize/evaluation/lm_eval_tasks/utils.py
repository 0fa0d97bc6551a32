"""Loaders and prompt helpers for the offline zero-shot tasks (lm-eval ``!function`` targets).

The YAML files next to this module define tasks named ``dotresize_<task>``. Each one loads its
documents with :func:`load_local` (lm-eval's ``custom_dataset`` hook) from the local JSONL files
under ``<data dir>/tasks/``. The data dir comes from the TaskManager metadata key
``dotresize_data_dir`` (set by ``dotresize.evaluation.zeroshot``) or else from the environment
variable ``DOTRESIZE_DATA_DIR``.

This module is loaded by lm-eval from its file path, so it imports nothing from the project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "DOTRESIZE_DATA_DIR"
TASKS_SUBDIR = "tasks"

# Local task name -> files under <data dir>/tasks/ (the first one holds the documents).
TASK_FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa_valid.jsonl", "piqa_valid-labels.lst"),
    "arc_easy": ("arc_easy.jsonl",),
    "arc_challenge": ("arc_challenge.jsonl",),
    "winogrande": ("winogrande.jsonl",),
    "boolq": ("boolq.jsonl",),
    "lambada": ("lambada_openai.jsonl",),
    "copa": ("copa.jsonl",),
    "openbookqa": ("openbook_qa.jsonl",),
    "siqa": ("siqa.jsonl",),
}


class DataFileNotFoundError(FileNotFoundError):
    """A local evaluation data file is missing."""


def data_files(local_task: str, data_dir: str | Path) -> list[Path]:
    """Paths of the data files of ``local_task`` under ``data_dir``."""
    return [Path(data_dir) / TASKS_SUBDIR / name for name in TASK_FILES[local_task]]


def check_files(paths: list[Path]) -> None:
    """Raise a one-line :class:`DataFileNotFoundError` for the first missing path."""
    for path in paths:
        if not path.is_file():
            raise DataFileNotFoundError(
                f"zero-shot data file not found: {path} "
                f"(set {DATA_DIR_ENV} to the data directory that holds {TASKS_SUBDIR}/)"
            )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file, skipping blank lines."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_labels(path: Path) -> list[int]:
    """Read one integer label per non-blank line."""
    with open(path, encoding="utf-8") as fh:
        return [int(line) for line in fh if line.strip()]


def merge_piqa_labels(docs: list[dict[str, Any]], labels: list[int]) -> list[dict[str, Any]]:
    """Attach ``label`` (0/1, from the separate .lst file) to each PIQA doc, line by line."""
    if len(docs) != len(labels):
        raise ValueError(f"PIQA has {len(docs)} docs but {len(labels)} labels")
    return [{**doc, "label": label} for doc, label in zip(docs, labels)]


def read_docs(local_task: str, data_dir: str | Path) -> list[dict[str, Any]]:
    """All documents of ``local_task`` as dicts (PIQA with its labels merged)."""
    paths = data_files(local_task, data_dir)
    check_files(paths)
    docs = read_jsonl(paths[0])
    if local_task == "piqa":
        docs = merge_piqa_labels(docs, read_labels(paths[1]))
    return docs


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$DOTRESIZE_DATA_DIR``, else a one-line error."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    raise DataFileNotFoundError(f"no data directory for the dotresize tasks: set {DATA_DIR_ENV}")


def load_local(
    local_task: str, split: str, dotresize_data_dir: str | None = None, **_metadata: Any
):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with one ``split`` read from local files."""
    import datasets

    docs = read_docs(local_task, resolve_data_dir(dotresize_data_dir))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


# --- prompt helpers (mirror lm-eval's own task definitions) ---------------------------------


def boolq_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval boolq: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``.

    The local query reads ``"Passage: {passage}\\nQuestion: {question}?"``; the ``Passage: `` prefix,
    which lm-eval does not use, is dropped.
    """
    query = doc["query"]
    prefix = "Passage: "
    if query.startswith(prefix):
        query = query[len(prefix):]
    return f"{query}\nAnswer:"


_COPA_CONNECTORS = ("because", "therefore")


def copa_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval copa: premise without its final period + ``" because"``/``" therefore"``.

    The local query reads ``"{premise without period}, therefore"``; the comma is dropped.
    """
    query = doc["query"].strip()
    for connector in _COPA_CONNECTORS:
        if query.endswith(f", {connector}"):
            return f"{query[: -len(connector) - 2]} {connector}"
    return query


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def copa_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """lm-eval copa: ``" " + choice`` with its first letter lower-cased.

    Together with the default target delimiter ``" "`` this gives two spaces before each choice,
    exactly as lm-eval's own ``copa`` task does.
    """
    return [" " + _lower_first(choice) for choice in doc["choices"]]


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """lm-eval winogrande (partial scoring): the index of the correct context."""
    return int(doc["gold"])


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The contexts: the sentence up to the blank, with each option filled in."""
    return list(doc["context_options"])


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The continuation after the blank, scored after each context."""
    return doc["continuation"].strip()
