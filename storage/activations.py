"""The Zarr v3 activation store: per slice point a tokens x D array plus its sufficient statistics.

Layout of one point group (``activations.zarr/point_<p>``)::

    acts      (tokens, D) float32, pre-created at its final shape, chunks of whole rows of >= 1 MB each,
              written in disjoint chunk-aligned regions as batches stream through the model
    gram      (D, D) float64   XᵀX accumulated batch by batch
    abs_sum   (D,)   float64   Σ|x|        sum (D,) float64  Σx        mean (D,) float64  Σx / N
    sample    (k, D) float32   optional reservoir of raw rows (L1 costs)
    attrs     key, dim, tokens, count, excluded, chunk_rows, digests {array: sha256 | [sha256 per chunk]},
              complete  (written last, in its own update: a point without ``complete: true`` is never used)

Every chunk of ``acts`` and every statistic array has its sha256 recorded, so a flipped byte or a truncated
chunk is detected by :meth:`ActivationStore.status` and the point is recomputed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .digests import digest_of_digests, sha256_array
from .errors import StorageError
from .records import ACTIVATIONS_FORMAT
from .rundir import ACTIVATIONS, RunDir, point_name

log = logging.getLogger("dotresize.storage")

#: a chunk of activations holds at least this many bytes (whole rows)
MIN_CHUNK_BYTES = 1 << 20
#: rows per chunk are rounded up to a multiple of this
ROW_MULTIPLE = 64
FORMAT = ACTIVATIONS_FORMAT  # (storage/records.py holds every schema version)


def chunk_rows(dim: int, itemsize: int = 4, min_bytes: int = MIN_CHUNK_BYTES, multiple: int = ROW_MULTIPLE) -> int:
    """Rows per chunk so that one chunk of ``dim`` columns holds at least ``min_bytes``."""
    rows = max(1, math.ceil(min_bytes / (dim * itemsize)))
    return int(math.ceil(rows / multiple) * multiple)


class PointWriter:
    """Streams rows of one point into its pre-created ``acts`` array, one whole chunk at a time.

    Rows arrive in order (batch after batch); a chunk is written once it is full (and the last one at
    :meth:`finish`), so every write covers a disjoint, chunk-aligned region and peak memory is one chunk.
    """

    def __init__(self, group, *, tokens: int, dim: int, rows_per_chunk: int, dtype: str = "float32"):
        self.group = group
        self.tokens, self.dim, self.rows_per_chunk = int(tokens), int(dim), int(rows_per_chunk)
        self.acts = group.create_array("acts", shape=(self.tokens, self.dim), chunks=(self.rows_per_chunk, self.dim),
                                       dtype=dtype, compressors=None, fill_value=0.0, overwrite=True)
        self._buffer = np.empty((min(self.rows_per_chunk, max(self.tokens, 1)), self.dim), dtype=dtype)
        self._filled = 0
        self._chunk = 0
        self._written = 0
        self.chunk_digests: list[str] = []

    @property
    def rows_written(self) -> int:
        return self._written + self._filled

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self._buffer.dtype).reshape(-1, self.dim)
        if self.rows_written + rows.shape[0] > self.tokens:
            raise ValueError(f"{point_name_of(self.group)}: more rows than the {self.tokens} pre-created")
        start = 0
        while start < rows.shape[0]:
            take = min(self._buffer.shape[0] - self._filled, rows.shape[0] - start)
            self._buffer[self._filled:self._filled + take] = rows[start:start + take]
            self._filled += take
            start += take
            if self._filled == self._buffer.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if self._filled == 0:
            return
        begin = self._chunk * self.rows_per_chunk
        block = self._buffer[:self._filled]
        self.acts[begin:begin + self._filled] = block
        self.chunk_digests.append(sha256_array(block))
        self._chunk += 1
        self._written += self._filled
        self._filled = 0

    def finish(self, stats: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the last chunk and the statistics, record every digest, then mark the point complete."""
        self._flush()
        if self.rows_written != self.tokens:
            raise ValueError(f"{point_name_of(self.group)}: {self.rows_written} rows written, {self.tokens} expected")
        digests: dict[str, Any] = {"acts": list(self.chunk_digests), **write_arrays(self.group, stats)}
        self.group.attrs.update({**dict(attrs or {}), "digests": digests, "chunk_rows": self.rows_per_chunk})
        self.group.attrs["complete"] = True  # last, in its own write
        return digests


def write_arrays(group, arrays: Mapping[str, np.ndarray | None]) -> dict[str, str]:
    """Store every array of ``arrays`` (None ones skipped) whole in ``group``, in chunks of whole rows; returns
    ``{name: sha256 of its values}``."""
    digests: dict[str, str] = {}
    for name, value in arrays.items():
        if value is None:
            continue
        value = np.ascontiguousarray(value)
        rows = chunk_rows(value.shape[1], value.dtype.itemsize) if value.ndim == 2 else max(value.shape[0], 1)
        chunks = (min(rows, max(value.shape[0], 1)),) + tuple(value.shape[1:])
        array = group.create_array(name, shape=value.shape, chunks=chunks, dtype=value.dtype, compressors=None,
                                   fill_value=0, overwrite=True)
        if value.size:
            array[...] = value
        digests[name] = sha256_array(value)
    return digests


def point_name_of(group) -> str:
    return getattr(group, "path", "point") or "point"


_ROOT_WAIT_SECONDS = 30.0


def _open_or_create_root(store):
    """The store's root group, created if missing; safe when several tasks open the same store at once."""
    import zarr
    from zarr.errors import ContainsGroupError, GroupNotFoundError

    try:
        return zarr.open_group(store, mode="r+", zarr_format=3)
    except (FileNotFoundError, GroupNotFoundError):
        pass
    try:
        return zarr.open_group(store, mode="w-", zarr_format=3)
    except (ContainsGroupError, FileExistsError):  # another task is creating it: wait until its metadata is whole
        deadline = time.monotonic() + _ROOT_WAIT_SECONDS
        while True:
            try:
                return zarr.open_group(store, mode="r+", zarr_format=3)
            except (FileNotFoundError, GroupNotFoundError):
                if time.monotonic() > deadline:
                    raise StorageError(f"{store} holds files but no readable root group after "
                                       f"{_ROOT_WAIT_SECONDS:.0f} s: delete that directory and run again") from None
                time.sleep(0.05)


class ActivationStore:
    """The run's ``activations.zarr`` (or another Zarr store of point groups, e.g. ``costs.zarr``)."""

    def __init__(self, run: RunDir, name: str = ACTIVATIONS):
        self.run, self.name = run, name
        self._store = run.zarr_store(name)
        self.root = _open_or_create_root(self._store)

    def _group(self, point: int | str):
        import zarr

        return zarr.open_group(self._store, path=point_name(point), mode="r")

    def create_point(self, point: int | str, *, key: str, tokens: int, dim: int,
                     attrs: Mapping[str, Any] | None = None, rows_per_chunk: int | None = None) -> PointWriter:
        """(Re)create the group of ``point`` with ``acts`` pre-created at (tokens, dim); ``complete`` is false."""
        group = self.root.create_group(point_name(point), overwrite=True)
        group.attrs.update({"key": key, "complete": False, "format": FORMAT, "tokens": int(tokens), "dim": int(dim),
                            **dict(attrs or {})})
        return PointWriter(group, tokens=tokens, dim=dim, rows_per_chunk=rows_per_chunk or chunk_rows(dim))

    def create_stats_group(self, point: int | str, *, key: str, stats: Mapping[str, np.ndarray],
                           attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A group holding only statistics (no activations), e.g. the pooled statistics of the global layout."""
        group = self.root.create_group(point_name(point), overwrite=True)
        group.attrs.update({"key": key, "complete": False, "format": FORMAT, **dict(attrs or {})})
        digests = write_arrays(group, stats)
        group.attrs["digests"] = digests
        group.attrs["complete"] = True
        return digests

    def attrs(self, point: int | str) -> dict[str, Any] | None:
        try:
            return dict(self._group(point).attrs)
        except Exception as error:  # no such group (zarr's errors differ by store and version), unreadable metadata
            log.debug("%s: no readable group %s (%s)", self.name, point_name(point), type(error).__name__)
            return None

    def status(self, point: int | str, key: str, verify: bool = True) -> tuple[bool, str]:
        """(True, "ok") when the point is complete, has ``key`` and (with ``verify``) every digest matches."""
        name = point_name(point)
        try:
            group = self._group(point)
            attrs = dict(group.attrs)
        except Exception as error:  # no such group, or its metadata cannot be read: either way not usable
            log.debug("%s: %s is missing (%s: %s)", self.name, name, type(error).__name__, error)
            return False, f"{name} is missing"
        if attrs.get("complete") is not True:
            return False, f"{name} is incomplete (no complete marker)"
        if attrs.get("key") != key:
            return False, f"{name} was computed for another key"
        if not verify:
            return True, "ok"
        try:
            for array_name, expected in attrs.get("digests", {}).items():
                array = group[array_name]
                if isinstance(expected, list):
                    rows = int(array.chunks[0])
                    if len(expected) != math.ceil(array.shape[0] / rows):
                        return False, f"{name}/{array_name} has a wrong number of chunk digests"
                    for index, digest in enumerate(expected):
                        block = array[index * rows:(index + 1) * rows]
                        if sha256_array(block) != digest:
                            return False, f"{name}/{array_name} chunk {index} does not match its digest (corrupted)"
                elif sha256_array(array[...]) != expected:
                    return False, f"{name}/{array_name} does not match its digest (corrupted)"
        except Exception as error:  # undecodable chunk, missing file, bad metadata
            return False, f"{name} cannot be read ({type(error).__name__}: {error})"
        return True, "ok"

    def digest(self, point: int | str) -> str:
        """One digest of a complete point (all its array digests)."""
        attrs = self.attrs(point) or {}
        return digest_of_digests(attrs.get("digests", {}))

    def array(self, point: int | str, name: str):
        return self._group(point)[name]

    def read(self, point: int | str, name: str) -> np.ndarray:
        return np.asarray(self._group(point)[name][...])

    def read_rows(self, point: int | str, start: int, stop: int, name: str = "acts") -> np.ndarray:
        return np.asarray(self._group(point)[name][start:stop])

    def iter_rows(self, point: int | str, sizes: list[int], name: str = "acts"):
        """The stored rows in consecutive blocks of ``sizes`` rows (e.g. the calibration batches), one at a time."""
        array, start = self._group(point)[name], 0
        for size in sizes:
            yield np.asarray(array[start:start + size])
            start += size

    def has(self, point: int | str, name: str) -> bool:
        try:
            self._group(point)[name]
            return True
        except Exception as error:  # no such group or array
            log.debug("%s: %s/%s not stored (%s)", self.name, point_name(point), name, type(error).__name__)
            return False

    def load_stats(self, point: int | str) -> dict[str, Any]:
        """The statistics of a point: gram, abs_sum, sum (numpy float64), count, excluded, optional sample."""
        group = self._group(point)
        attrs = dict(group.attrs)
        out = {name: np.asarray(group[name][...]) for name in ("gram", "abs_sum", "sum")}
        out["sample"] = np.asarray(group["sample"][...]) if "sample" in attrs.get("digests", {}) else None
        out["count"] = int(attrs["count"])
        out["excluded"] = int(attrs.get("excluded", 0))
        return out
