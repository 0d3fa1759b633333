"""Per-feature statistics of a feature table, exact by construction.

The feature-major pass (:mod:`store.features.merge`) holds every activation of a block of
features at once, sorted by ``(feature, row)``, so each statistic is computed from a feature's
activations whole rather than merged from per-unit partials. That keeps every statistic exact
(no merge algebra to get wrong) and makes the quantile sample possible at all: quantiles need
the feature's global ranks, which no per-unit summary holds. Growth re-runs the pass over the
old feature-major copy plus the new units (see the merge module), never the SAE.

What is computed, per feature:

* ``count`` (activations, i.e. non-zero latents), ``sum`` (float64, in row order, so the
  result is the same whatever the unit grid), ``max``;
* a histogram on fixed log-spaced bins (:func:`hist_edges`): ``bins + 2`` counts, the first
  for values below the lowest edge (zero or negative included), the last for values at or above
  the highest;
* the top ``k`` rows by activation, ties broken by the smaller row;
* a seeded sample from activation quantiles: the feature's activations ranked highest first
  (ties by row) are cut into ``quantiles`` equal-count groups (quantile 0 holds the highest),
  and from each group the ``per_quantile`` rows of smallest seeded hash priority are taken.
  The priority is a pure function of ``(seed, feature, row)``, so the sample does not depend on
  how rows were split into units or on the order they were encoded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from strata.store.commit import artifacts, parquet

if TYPE_CHECKING:
    from strata.store.storage import Storage

HIST_LO = 1e-4
HIST_HI = 1e4
HIST_BINS = 64  # 8 per decade
# The store folder of SAEs (store.saes.handles.SAES; not imported: the handles import the feature views).
_SAES = "saes"
#: The stats table's column of a multi-source dictionary (a crosscoder): ``||W_dec[s, i]||`` per source.
DECODER_NORMS = "decoder_norms"
DECODER_NORMS_TYPE = pa.list_(pa.float32())


def decoder_norms(storage: Storage, sae: str, sae_lineage: dict[str, Any]) -> pa.Array | None:
    """The ``decoder_norms`` column (list<float32>, one value per source, one row per feature) of
    a multi-source dictionary's stats, from its committed ``latents.parquet``; None for an SAE."""
    if sae_lineage.get("architecture") != "crosscoder":
        return None
    art = artifacts.get(storage, _SAES, sae)
    if art is None or "latents.parquet" not in art.files:
        return None
    return parquet.read(art.read("latents.parquet")).column(DECODER_NORMS).combine_chunks().cast(DECODER_NORMS_TYPE)


def hist_edges(lo: float = HIST_LO, hi: float = HIST_HI, bins: int = HIST_BINS) -> np.ndarray:
    """The ``bins + 1`` log-spaced edges of the activation histogram."""
    if not (0 < lo < hi) or bins <= 0:
        raise ValueError(f"histogram needs 0 < lo < hi and bins > 0, got lo={lo}, hi={hi}, bins={bins}")
    return np.logspace(np.log10(lo), np.log10(hi), bins + 1)


def hist_bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram bin of each value: 0 below ``edges[0]``, ``i`` for ``[edges[i-1], edges[i])``,
    ``len(edges)`` at or above the last edge."""
    return np.searchsorted(edges, values.astype(np.float64, copy=False), side="right")


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (wrapping uint64 arithmetic): a well-spread hash of ``x``."""
    with np.errstate(over="ignore"):
        x = x + _M1
        x = (x ^ (x >> np.uint64(30))) * _M2
        x = (x ^ (x >> np.uint64(27))) * _M3
        return x ^ (x >> np.uint64(31))


def priority(seed: int, feature: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The sampling priority of each activation: a hash of ``(seed, feature, row)``."""
    s = _mix(np.asarray([seed], dtype=np.uint64))[0]
    key = row.astype(np.uint64) ^ (feature.astype(np.uint64) << np.uint64(40))
    return _mix(_mix(key) ^ s)


@dataclass
class BlockStats:
    """Statistics of the features ``[lo, hi)``: arrays indexed by ``feature - lo``, and the
    top-k and sample rows as flat arrays sorted by feature."""

    lo: int
    count: np.ndarray  # int64 [n]
    sum: np.ndarray  # float64 [n]
    max: np.ndarray  # float32 [n]
    hist: np.ndarray  # int64 [n, bins + 2]
    top_feature: np.ndarray  # int32
    top_rank: np.ndarray  # int32: 0 is the highest activation
    top_row: np.ndarray  # int64
    top_value: np.ndarray  # float32
    sample_feature: np.ndarray  # int32
    sample_quantile: np.ndarray  # int16: 0 is the top quantile
    sample_row: np.ndarray  # int64
    sample_value: np.ndarray  # float32


def block_stats(
    feature: np.ndarray,
    row: np.ndarray,
    value: np.ndarray,
    *,
    lo: int,
    hi: int,
    top_k: int,
    edges: np.ndarray,
    quantiles: int,
    per_quantile: int,
    seed: int,
) -> BlockStats:
    """Statistics of features ``[lo, hi)`` from their activations, sorted by ``(feature, row)``."""
    n = hi - lo
    local = (feature - lo).astype(np.int64)
    bounds = np.searchsorted(local, np.arange(n + 1))
    count = np.diff(bounds).astype(np.int64)
    total = np.bincount(local, weights=value.astype(np.float64), minlength=n)
    mx = np.zeros(n, np.float32)
    live = np.flatnonzero(count)
    if live.size:
        mx[live] = np.maximum.reduceat(value, bounds[live])
    nb = len(edges) + 1
    hist = np.bincount(local * nb + hist_bin(value, edges), minlength=n * nb).reshape(n, nb)
    prio = priority(seed, feature, row) if per_quantile and quantiles else None

    tops: list[tuple[np.ndarray, ...]] = []
    samples: list[tuple[np.ndarray, ...]] = []
    for i in live:
        a, b = int(bounds[i]), int(bounds[i + 1])
        f = lo + int(i)
        v = value[a:b]
        # Highest first; a stable sort keeps equal values in row order (rows ascend within a feature).
        order = np.argsort(-v, kind="stable")
        t = order[:top_k]
        tops.append((np.full(t.size, f, np.int32), np.arange(t.size, dtype=np.int32), row[a:b][t], v[t]))
        if prio is None:
            continue
        m = b - a
        q = (np.arange(m, dtype=np.int64) * quantiles) // m  # quantile of each rank
        by = np.lexsort((prio[a:b][order], q))  # by quantile, then by priority
        qs = q[by]
        first = np.searchsorted(qs, qs, side="left")
        pick = np.sort(by[(np.arange(m) - first) < per_quantile])  # ranks chosen, highest first
        sel = order[pick]
        samples.append((np.full(sel.size, f, np.int32), q[pick].astype(np.int16), row[a:b][sel], v[sel]))

    def cat(parts: list[tuple[np.ndarray, ...]], j: int, dtype: type) -> np.ndarray:
        return np.concatenate([p[j] for p in parts]) if parts else np.zeros(0, dtype)

    return BlockStats(
        lo=lo, count=count, sum=total, max=mx, hist=hist,
        top_feature=cat(tops, 0, np.int32), top_rank=cat(tops, 1, np.int32), top_row=cat(tops, 2, np.int64),
        top_value=cat(tops, 3, np.float32),
        sample_feature=cat(samples, 0, np.int32), sample_quantile=cat(samples, 1, np.int16),
        sample_row=cat(samples, 2, np.int64), sample_value=cat(samples, 3, np.float32),
    )
