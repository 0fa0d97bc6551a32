"""Zero-shot accuracy through lm-eval, on local (offline) copies of the standard task data.

The tasks ``LOCAL_TASKS`` are defined as lm-eval YAML files in ``lm_eval_tasks/`` (named
``dotresize_<task>``) and read the JSONL files under ``<data dir>/tasks/``. They mirror lm-eval's
own definitions of the same tasks (prompts, target delimiter, metrics) as far as the local data
format allows; see the comments in the YAML files and ``lm_eval_tasks/utils.py``.
Any other task name is passed to lm-eval's own registry (which needs its data from the hub).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Offline by default: set before lm_eval / datasets / huggingface_hub read them (setdefault: a
# caller's explicit setting, e.g. HF_DATASETS_OFFLINE=0 for hub tasks, wins).
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
for _key, _value in _OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

from ..digests import sha256_file  # noqa: E402
from .lm_eval_tasks import utils as task_utils  # noqa: E402  (after the environment defaults)

LOCAL_TASKS = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "boolq",
    "lambada",
    "copa",
    "openbookqa",
    "siqa",
)
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_PREFIX = "dotresize_"
DATA_DIR_ENV = task_utils.DATA_DIR_ENV
DataFileNotFoundError = task_utils.DataFileNotFoundError
NUM_FEWSHOT = 0
BOOTSTRAP_ITERS = 100_000  # lm-eval's default; only perplexity's stderr is bootstrapped here

# lm-eval messages that are expected here and carry no information for the caller.
_NOISE = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)


def default_data_dir() -> Path:
    """The data directory: the same setting as for calibration data (:func:`dotresize.data.resolve_data_dir`).

    ``$DOTRESIZE_DATA_DIR``, else the first existing ``../shared/data`` (beside the working directory, then
    beside the checkout); the task files are read from its ``tasks/`` folder.
    """
    from ..data import resolve_data_dir

    try:
        found = resolve_data_dir()
    except FileNotFoundError as error:
        raise DataFileNotFoundError(str(error)) from None
    if found is None:
        raise DataFileNotFoundError(
            f"no data directory found (looked for ../shared/data): set {DATA_DIR_ENV}"
        )
    return found


def lm_eval_version() -> str:
    """The installed lm-eval version (read from the package metadata, without importing lm-eval)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "absent"


def lm_eval_task_name(name: str) -> str:
    """The lm-eval task name of a local task (``piqa`` -> ``dotresize_piqa``)."""
    return TASK_PREFIX + name


def _definition_files(task_dir: Path) -> list[Path]:
    return sorted(p for p in task_dir.iterdir() if p.suffix in (".yaml", ".py") and p.is_file())


def task_config_hash(
    tasks: Sequence[str], data_dir: str | Path | None = None, *, task_dir: str | Path = TASK_DIR
) -> str:
    """sha256 over the task definition files, the requested names and the local data files' sha256s."""
    local, other = _split_tasks(tasks)
    digest = hashlib.sha256()
    for path in _definition_files(Path(task_dir)):
        digest.update(f"def {path.name} {sha256_file(path)}\n".encode())
    data_root = Path(data_dir) if data_dir is not None else (default_data_dir() if local else None)
    for name in sorted(local):
        for path in task_utils.data_files(name, data_root):
            task_utils.check_files([path])
            digest.update(f"data {name} {path.name} {sha256_file(path)}\n".encode())
    for name in sorted(other):
        digest.update(f"lm_eval {name}\n".encode())
    return digest.hexdigest()


def _split_tasks(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(local, other) task names, duplicates dropped, order kept."""
    names = list(dict.fromkeys(tasks))
    return [n for n in names if n in LOCAL_TASKS], [n for n in names if n not in LOCAL_TASKS]


def _make_task_manager(data_dir: Path | None, include_defaults: bool = False):
    """A TaskManager over the project's task definitions (and lm-eval's, if asked)."""
    from lm_eval.tasks import TaskManager

    metadata = {"dotresize_data_dir": str(data_dir)} if data_dir is not None else None
    if include_defaults:
        return TaskManager(include_defaults=True)
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata)


def _check_known(other: list[str], task_manager) -> None:
    unknown = [name for name in other if name not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}: not in lm-eval's registry; "
            f"local tasks: {', '.join(LOCAL_TASKS)}"
        )


def _load_local_tasks(local: list[str], data_dir: Path) -> list[Any]:
    """lm-eval Task objects of the local tasks, reading from ``data_dir``."""
    for name in local:
        task_utils.check_files(task_utils.data_files(name, data_dir))
    if not local:
        return []
    loaded = _make_task_manager(data_dir).load([lm_eval_task_name(n) for n in local])
    return list(loaded["tasks"].values())


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(noise in message for noise in _NOISE)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs at WARNING and without its expected noise; progress bars stay."""
    root = logging.getLogger("lm_eval")
    noisy = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.api.task")]
    old_level, noise = root.level, _DropNoise()
    root.setLevel(logging.WARNING)
    for logger in noisy:
        logger.addFilter(noise)
    try:
        yield
    finally:
        root.setLevel(old_level)
        for logger in noisy:
            logger.removeFilter(noise)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """lm-eval's progress bars (tqdm) off while ``enabled`` is False, and its prints (``bootstrapping for
    stddev``) sent to stderr: stdout stays clean for ``--json``."""
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        if enabled:
            yield
            return
        from tqdm import std

        original = std.tqdm.__init__

        def quiet_init(self, *args, **kwargs):
            kwargs["disable"] = True
            original(self, *args, **kwargs)

        std.tqdm.__init__ = quiet_init
        try:
            yield
        finally:
            std.tqdm.__init__ = original


def _build_lm(model, tokenizer, batch_size: int):
    """An in-memory HFLM; its model info is filled in locally (no hub lookup)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    # every model here is a causal decoder (also the compressed per-point class lm-eval cannot look up)
    # log-softmax in float32 whatever the model's dtype (a bfloat16 log-softmax would round every log-likelihood)
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size,
              softmax_dtype=torch.float32)
    info = {
        "model_num_parameters": sum(p.numel() for p in model.parameters()),
        "model_dtype": str(getattr(model, "dtype", "")),
    }
    lm.get_model_info = lambda: dict(info)
    return lm


def _json_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metrics(task_result: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s}``."""
    out: dict[str, float | None] = {}
    for key, value in task_result.items():
        if "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else key] = _json_number(value)
    return out


def _num_docs(results: dict[str, Any], lm_name: str) -> int:
    """Docs evaluated for a task, or summed over a group's subtasks."""
    n_samples = results.get("n-samples", {})
    if lm_name in n_samples:
        return int(n_samples[lm_name]["effective"])
    subtasks = results.get("group_subtasks", {}).get(lm_name, [])
    return sum(_num_docs(results, sub) for sub in subtasks)


def _summarise(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name in names:
        lm_name = lm_eval_task_name(name) if name in LOCAL_TASKS else name
        entry = _metrics(results["results"].get(lm_name, {}))
        entry["n"] = _num_docs(results, lm_name)
        summary[name] = entry
    return summary


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    device: str | None = None,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot lm-eval metrics of ``model`` on ``tasks``.

    Local task names (``LOCAL_TASKS``) read ``<data_dir>/tasks/*.jsonl`` (``data_dir`` defaults to
    :func:`default_data_dir`); other names go to lm-eval's registry. ``limit`` takes the first
    ``limit`` docs of each task. ``device``, if given, moves ``model`` there (in place); the
    model's train/eval mode is restored afterwards. ``progress=False`` hides lm-eval's progress bars.

    Returns a JSON-serialisable dict: ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", ...,
    "perplexity" (lambada), "n"}}, "lm_eval_version", "task_config_hash", "limit", "num_fewshot"}``.
    Raises ValueError for an unknown task and DataFileNotFoundError for a missing data file.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    local, other = _split_tasks(tasks)
    if not local and not other:
        raise ValueError(f"no tasks given; local tasks: {', '.join(LOCAL_TASKS)}")
    data_root = Path(data_dir) if data_dir is not None else (default_data_dir() if local else None)

    import lm_eval
    from lm_eval import simple_evaluate

    with _quiet_lm_eval(), _progress_bars(progress):
        std_manager = None
        if other:
            std_manager = _make_task_manager(None, include_defaults=True)
            _check_known(other, std_manager)
        config_hash = task_config_hash(tasks, data_root)
        task_specs = _load_local_tasks(local, data_root) + other
        was_training = model.training
        try:
            if device is not None:
                model.to(device)
            results = simple_evaluate(
                model=_build_lm(model, tokenizer, batch_size),
                tasks=task_specs,
                num_fewshot=NUM_FEWSHOT,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                task_manager=std_manager or _make_task_manager(data_root),
            )
        finally:
            model.train(was_training)

    return {
        "tasks": _summarise(results, local + other),
        "lm_eval_version": lm_eval.__version__,
        "task_config_hash": config_hash,
        "limit": limit,
        "num_fewshot": NUM_FEWSHOT,
    }
