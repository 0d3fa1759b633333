"""Per-feature statistics against brute force, feature by feature, with ties."""

from __future__ import annotations

import numpy as np
import pytest

from strata.store.features.stats import block_stats, hist_bin, hist_edges, priority


def _sorted_entries(rng: np.random.Generator, lo: int, hi: int, rows: int, p: float):
    dense = np.round(rng.exponential(1.0, (rows, hi - lo)), 1).astype(np.float32) * (rng.random((rows, hi - lo)) < p)
    dense[:, 0] = 0  # a dead feature
    dense[:, 1] = 2.5 * (rng.random(rows) < 0.5)  # every activation tied
    r, f = np.nonzero(dense)
    order = np.lexsort((r, f))
    return dense, (f[order] + lo).astype(np.int32), r[order].astype(np.int64), dense[r, f][order]


@pytest.mark.parametrize("top_k", [1, 5, 1000])
def test_block_stats_equal_brute_force(top_k):
    rng = np.random.default_rng(1)
    lo, hi = 32, 45
    dense, feature, row, value = _sorted_entries(rng, lo, hi, 300, 0.3)
    edges = hist_edges()
    st = block_stats(feature, row, value, lo=lo, hi=hi, top_k=top_k, edges=edges, quantiles=4, per_quantile=3, seed=7)
    for j in range(hi - lo):
        col = dense[:, j]
        nz = np.flatnonzero(col)
        assert st.count[j] == nz.size
        assert st.sum[j] == pytest.approx(float(col[nz].astype(np.float64).sum()), rel=1e-12, abs=0)
        assert st.max[j] == (col.max() if nz.size else 0)
        want_hist = np.zeros(len(edges) + 1, np.int64)
        for v in col[nz]:
            want_hist[int(np.sum(edges <= v))] += 1
        assert np.array_equal(st.hist[j], want_hist)
        # top-k: highest first, ties by the smaller row
        want = sorted(nz.tolist(), key=lambda r: (-col[r], r))[:top_k]
        m = st.top_feature == lo + j
        assert st.top_row[m].tolist() == want
        assert np.array_equal(st.top_value[m], col[want]) and st.top_rank[m].tolist() == list(range(len(want)))
        # the quantile sample: per quantile the per_quantile rows of smallest priority among that quantile's ranks
        ranked = sorted(nz.tolist(), key=lambda r: (-col[r], r))
        pr = priority(7, np.full(len(ranked), lo + j), np.asarray(ranked, np.int64))
        m = st.sample_feature == lo + j
        got = list(zip(st.sample_quantile[m].tolist(), st.sample_row[m].tolist()))
        want_s = []
        for q in range(4):
            members = [i for i in range(len(ranked)) if (i * 4) // len(ranked) == q]
            chosen = sorted(members, key=lambda i: pr[i])[:3]
            want_s += [(q, ranked[i]) for i in sorted(chosen)]
        assert got == want_s
        assert np.array_equal(st.sample_value[m], col[st.sample_row[m]])


def test_sample_is_a_function_of_seed_feature_and_row():
    rng = np.random.default_rng(2)
    _, feature, row, value = _sorted_entries(rng, 0, 6, 400, 0.4)
    kw = dict(lo=0, hi=6, top_k=3, edges=hist_edges(), quantiles=5, per_quantile=2)
    a = block_stats(feature, row, value, seed=3, **kw)
    b = block_stats(feature, row, value, seed=3, **kw)
    c = block_stats(feature, row, value, seed=4, **kw)
    assert np.array_equal(a.sample_row, b.sample_row)
    assert not np.array_equal(a.sample_row, c.sample_row)
    # Each quantile holds min(per_quantile, its size) rows.
    for f in range(2, 6):
        n = int(np.sum(feature == f))
        sizes = np.bincount((np.arange(n) * 5) // n, minlength=5)
        got = np.bincount(a.sample_quantile[a.sample_feature == f], minlength=5)
        assert np.array_equal(got, np.minimum(sizes, 2))
    p = priority(0, np.array([1, 1, 2]), np.array([5, 6, 5]))
    assert len(set(p.tolist())) == 3 and p.dtype == np.uint64


def test_hist_bins_and_edges():
    e = hist_edges(1e-2, 1e2, 4)
    assert np.allclose(e, [1e-2, 1e-1, 1, 10, 100])
    assert hist_bin(np.array([-1.0, 0.0, 0.0099, 0.01, 0.5, 99.9, 100.0, 1e9]), e).tolist() == [0, 0, 0, 1, 2, 4, 5, 5]
    with pytest.raises(ValueError, match="0 < lo < hi"):
        hist_edges(0, 1, 3)
