"""Cutting partial computations into tasks of whole units.

Tasks run on :class:`pipeline.executor.Executor` (in this process or as Ray tasks). Each opens
the store itself (from a :class:`~pipeline.executor.StoreRef`, which carries the storage
options the executor's credentials rule allows) and returns a small dict of NumPy arrays
(co-moments are ``O(d^2)``: about 14 MB for ``d = 768``), so activation data never travels
through Ray's object store.
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_ranges"]


def split_ranges(units: np.ndarray, parts: int) -> list[np.ndarray]:
    """Pair indices cut into at most ``parts`` contiguous ranges of whole units of roughly equal
    size (``units[i]``: the side-0 unit of pair ``i``, non-decreasing)."""
    n = units.size
    if n == 0:
        return []
    starts = np.r_[0, np.flatnonzero(np.diff(units)) + 1]
    parts = max(1, min(int(parts), starts.size))
    # Cut at the unit start nearest each ideal boundary, so every range holds whole units.
    cuts = sorted({int(starts[np.argmin(np.abs(starts - n * p / parts))]) for p in range(1, parts)} - {0})
    bounds = [0, *cuts, n]
    return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
