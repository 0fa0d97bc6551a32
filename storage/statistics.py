"""Sufficient statistics of a point's stored activations, computed out of core with ``dask.array``.

The capture stage stores each slice point's raw signal (``acts``: tokens x D float32) and nothing derived from
it; the Gram matrix and the sums every basis is computed from are reduced here from the Zarr chunks, in float64,
block by block (a block is a whole number of chunks of at most :data:`BLOCK_BYTES` in float64), with the
synchronous scheduler: the same store always gives the same bytes. Rows excluded as outliers at capture
(``kept`` = false) count for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import ActivationStore

#: float64 bytes of activation rows reduced at once (the Gram of one block is D x D float64 beside it)
BLOCK_BYTES = 256 << 20


@dataclass
class StoredStats:
    """What a basis needs from a point: ``gram`` = XᵀX, ``abs_sum`` = Σ|x|, ``sum`` = Σx (float64), ``count``
    rows, ``excluded`` rows dropped as outliers, and the reservoir ``sample`` of raw rows when one was kept."""

    gram: np.ndarray
    abs_sum: np.ndarray
    sum: np.ndarray
    count: int
    excluded: int
    sample: np.ndarray | None


def block_rows(chunk: int, dim: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows reduced at once: a multiple of the stored chunk's rows, at most ``block_bytes`` in float64."""
    return max(chunk, (block_bytes // (dim * 8)) // chunk * chunk)


def point_statistics(store: ActivationStore, point: int | str) -> StoredStats:
    """The statistics of ``point``'s stored activations (see the module docstring)."""
    import dask
    import dask.array as da

    acts = da.from_zarr(store.array(point, "acts"))
    rows = block_rows(int(acts.chunks[0][0]), int(acts.shape[1]))
    x = acts.rechunk((rows, acts.shape[1])).astype(np.float64)
    count = acts.shape[0]
    if store.has(point, "kept"):
        kept = da.from_zarr(store.array(point, "kept")).rechunk(rows)
        x = da.where(kept[:, None], x, 0.0)
        count = kept.sum()
    with dask.config.set(scheduler="synchronous"):  # inside a worker: no nested scheduling, a fixed order
        gram, abs_sum, total, count = dask.compute(x.T @ x, da.absolute(x).sum(axis=0), x.sum(axis=0), count)
    attrs = store.attrs(point) or {}
    sample = store.read(point, "sample") if store.has(point, "sample") else None
    return StoredStats(np.ascontiguousarray(gram), abs_sum, total, int(count), int(attrs.get("excluded", 0)), sample)


__all__ = ["StoredStats", "point_statistics", "block_rows", "BLOCK_BYTES"]
