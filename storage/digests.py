"""Digests and content keys: sha256 of bytes, files and arrays; canonical JSON; stage keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from dotresize.data import sha256_bytes  # the project's one sha256 of bytes

from .records import KEY_SCHEME  # the version of the key scheme itself (with every other schema version)


def sha256_array(array: np.ndarray) -> str:
    """sha256 of an array's values: dtype, shape and the C-ordered bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{tuple(array.shape)}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot put {type(value).__name__} into a content key")


def content_key(stage: str, code_version: str, **parts: Any) -> str:
    """The key of a stage: sha256 over the stage name, its code version and everything that determines it.

    ``parts`` hold the source and calibration digests, the relevant part of the config and the keys of the
    stage's inputs. Same parts => same key => the stored output is reused.
    """
    return sha256_bytes(canonical_json({"scheme": KEY_SCHEME, "stage": stage, "code": code_version,
                                        "parts": parts}).encode())


def digest_of_digests(digests: Any) -> str:
    """One digest summarising a structure of digests (e.g. every chunk of every array of a point)."""
    return sha256_bytes(canonical_json(digests).encode())
