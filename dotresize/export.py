"""The compressed model's directory format: ``save_pretrained``-style, written atomically.

A directory holds ``config.json``, ``model.safetensors``, the tokenizer, ``dotresize.json`` (the versioned
compression config, widths and the package version) and, for the per-point layout, the modeling code
(``configuration_dotresize.py``, ``modeling_dotresize.py``) that ``trust_remote_code=True`` loading uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .errors import OutputExistsError
from .permissions import apply_umask, apply_umask_tree
from .modeling import FORMAT_VERSION, MODELING_FILES

COMPRESSION_FILE = "dotresize.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``path`` exists and is not an empty directory, unless ``overwrite``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {out} exists and is not empty: choose another --out or pass "
                                "--overwrite")
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        apply_umask(tmp)  # mkstemp's 0600 -> what open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_per_point(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "dotresize", None))


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling directory to fill; on success it is renamed to ``out_dir`` (replacing it when
    ``overwrite``), on failure removed: a reader never sees a half-written directory."""
    out = check_output_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask_tree(tmp)  # mkdtemp's 0700 and files copied from 0600 ones -> what mkdir/open would give
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(model: PreTrainedModel, out_dir: str | os.PathLike, *, tokenizer=None,
                    compression: dict[str, Any] | None = None, extra_json: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Export ``model`` to ``out_dir``: written under a temporary name, renamed into place when complete.

    ``compression`` (the compression config as a dict) goes to ``dotresize.json``; ``extra_json`` maps file
    names to JSON-serialisable objects written alongside (e.g. the compression report).
    """
    from . import __version__

    with staged_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if is_per_point(model):
            for source in MODELING_FILES:
                shutil.copyfile(source, tmp / source.name)
        write_json_atomic(tmp / COMPRESSION_FILE, {
            "format_version": FORMAT_VERSION,
            "dotresize_version": __version__,
            "layout": "per-point" if is_per_point(model) else "global",
            "widths": (model.config.dotresize["widths"] if is_per_point(model)
                       else [model.config.hidden_size] * (2 * model.config.num_hidden_layers + 1)),
            "compression": compression or {},
            **_mlp_record(model, compression or {}),
        })
        for name, data in (extra_json or {}).items():
            write_json_atomic(tmp / name, data)
    return Path(out_dir).resolve()


def _mlp_record(model: PreTrainedModel, compression: dict[str, Any]) -> dict[str, Any]:
    """``intermediate_sizes`` of a model whose MLPs were reduced (nothing for any other: their record is as before)."""
    if is_per_point(model):
        sizes = model.config.dotresize.get("intermediate_sizes")
    elif compression.get("mlp_ratio") or compression.get("mlp_widths"):
        from .adapters import adapter_class_for_config

        size = adapter_class_for_config(model.config).layout.intermediate_size_of(model.config)
        sizes = [size] * model.config.num_hidden_layers
    else:
        sizes = None
    return {} if sizes is None else {"intermediate_sizes": [int(m) for m in sizes]}


def load_compressed(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """Load an exported directory (per-point through the registered classes, global as a stock model)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                use_safetensors=True).eval()
