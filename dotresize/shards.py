"""A compressed model written shard by shard: the layer-streamed export's format.

The directory is what ``save_pretrained`` writes for a sharded checkpoint — ``model-0000k-of-0000n.safetensors``
files and ``model.safetensors.index.json`` — plus the compressed model's own files (``dotresize.json``, and for
the per-point layout its modeling code). The index also records every shard's sha256 (under ``metadata``, which
loaders ignore), so the sha256 of the index alone identifies all the weights: :func:`model_digest`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_FILE
from .digests import sha256_file

#: what one digest of a model directory's weights is taken of, in order of preference
SINGLE_FILE = "model.safetensors"


def _tensor_bytes(path: Path) -> dict[str, int]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: int(meta["data_offsets"][1]) - int(meta["data_offsets"][0])
            for name, meta in header.items() if name != "__metadata__"}


def write_index(directory: str | os.PathLike, shards: list[str]) -> str:
    """Write ``model.safetensors.index.json`` for ``shards`` (file names in ``directory``); returns its sha256."""
    directory = Path(directory)
    weight_map: dict[str, str] = {}
    total = 0
    digests = {}
    for shard in shards:
        for name, size in _tensor_bytes(directory / shard).items():
            weight_map[name] = shard
            total += size
        digests[shard] = sha256_file(directory / shard)
    index = {"metadata": {"total_size": total, "format": "dotresize-shards", "shard_sha256": digests},
             "weight_map": dict(sorted(weight_map.items()))}
    path = directory / INDEX_FILE
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sha256_file(path)


def model_digest(directory: str | os.PathLike) -> str:
    """One sha256 for a model directory's weights: of the shard index when sharded (it lists every shard's
    sha256), else of ``model.safetensors``."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    return sha256_file(index if index.is_file() else directory / SINGLE_FILE)


def weights_file(directory: str | os.PathLike) -> str:
    """The file :func:`model_digest` is taken of (relative name)."""
    return INDEX_FILE if (Path(directory) / INDEX_FILE).is_file() else SINGLE_FILE


def write_model_files(directory: str | os.PathLike, *, config, generation_config=None, tokenizer=None,
                      per_point: bool, widths: list[int], compression: dict[str, Any] | None = None,
                      extra_json: dict[str, Any] | None = None) -> None:
    """Everything of a compressed model directory but its weights: config, generation config, tokenizer,
    ``dotresize.json``, the per-point modeling code and ``extra_json`` files (as :func:`save_compressed`)."""
    from . import __version__
    from .export import COMPRESSION_FILE, write_json_atomic
    from .modeling import FORMAT_VERSION, MODELING_FILES

    directory = Path(directory)
    config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if per_point:
        for source in MODELING_FILES:
            shutil.copyfile(source, directory / source.name)
    write_json_atomic(directory / COMPRESSION_FILE, {
        "format_version": FORMAT_VERSION, "dotresize_version": __version__,
        "layout": "per-point" if per_point else "global", "widths": [int(w) for w in widths],
        "compression": compression or {},
    })
    for name, data in (extra_json or {}).items():
        write_json_atomic(directory / name, data)


__all__ = ["write_index", "model_digest", "weights_file", "write_model_files", "SINGLE_FILE"]
