"""Degenerate input raises one-line ValueErrors that name the problem and what would be valid."""

from __future__ import annotations

import numpy as np
import pytest
import simref
import torch

from strata.analysis import similarity as sim

X, Y = simref.pair(20, 4, 4, seed=51)
NAN = X.copy()
NAN[3, 2] = np.nan
INF = X.copy()
INF[5, 0] = -np.inf
CONST = np.ones((20, 4))
ALL = [sim.linear_cka, sim.debiased_cka, sim.cca, sim.svcca, sim.pwcca, sim.procrustes, sim.r2, sim.cosine,
       sim.rbf_cka, sim.minibatch_cka, sim.mutual_knn, sim.rsa]

CASES = [
    (sim.linear_cka, (X, Y[:19]), "X has 20 rows but Y has 19; rows must be aligned"),
    (sim.linear_cka, (X[:1], Y[:1]), "linear_cka needs at least 2 rows, got n=1"),
    (sim.debiased_cka, (X[:3], Y[:3]), "debiased_cka needs at least 4 rows, got n=3"),
    (sim.cca, (X[:, 0], Y), r"X must be 2-D \[rows, features\], got shape \(20,\)"),
    (sim.svcca, (X, torch.zeros(20, 4, 2)), r"Y must be 2-D .*got shape \(20, 4, 2\)"),
    (sim.pwcca, (NAN, Y), "X contains NaN or inf \\(first at row 3, column 2\\)"),
    (sim.procrustes, (X, INF), "Y contains NaN or inf \\(first at row 5, column 0\\)"),
    (sim.cosine, (X, Y[:, :3]), r"d1 == d2\), got d1=4, d2=3"),
    (sim.cosine, (np.vstack([X[:19], np.zeros(4)]), Y), "1 of 20 rows are all-zero"),
    (sim.linear_cka, (CONST, Y), "X has zero variance"),
    (sim.debiased_cka, (X, CONST), "Y has zero variance"),
    (sim.cca, (CONST, Y), "X has zero variance"),
    (sim.procrustes, (X, CONST), "Y has zero variance"),
    (sim.rbf_cka, (CONST, Y), "median pairwise distance of X is 0"),
    (lambda a, b: sim.svcca(a, b, keep=0.0), (X, Y), r"`keep` must be in \(0, 1\]"),
    (lambda a, b: sim.svcca(a, b, keep=1.5), (X, Y), r"`keep` must be in \(0, 1\]"),
    (lambda a, b: sim.cca(a, b, rtol=0), (X, Y), "`rtol` must be a finite number > 0"),
    (lambda a, b: sim.pwcca(a, b, side="z"), (X, Y), "`side` must be 'auto', 'x' or 'y'"),
    (lambda a, b: sim.mutual_knn(a, b, k=20), (X, Y), "mutual_knn with k=20 needs at least 21 rows, got n=20"),
    (lambda a, b: sim.mutual_knn(a, b, metric="l1"), (X, Y), "must be 'cosine' or 'euclidean'"),
    (lambda a, b: sim.minibatch_cka(a, b, batch_size=32), (X, Y), "batch_size=32 needs at least 32 rows, got n=20"),
    (lambda a, b: sim.minibatch_cka(a, b, batch_size=3), (X, Y), "integer >= 4"),
    (lambda a, b: sim.rsa(a, b, metric="correlation"), (np.vstack([np.ones(4), X[1:]]), Y), "X has constant rows"),
    (lambda a, b: sim.rsa(a, b, metric="manhattan"), (X, Y), "'correlation', 'cosine' or 'euclidean'"),
    (lambda a, b: sim.r2(a, b, train=np.arange(12), test=np.arange(10, 20)), (X, Y), "share 2 rows"),
    (lambda a, b: sim.r2(a, b, train=1.5), (X, Y), r"fraction must be in \(0, 1\)"),
    (lambda a, b: sim.r2(a, b, ridge=-1.0), (X, Y), "`ridge` must be a finite number >= 0"),
    (lambda a, b: sim.r2(a, b, test=np.arange(19, 20)), (X, Y), r"r2 \(held-out part\) needs at least 2 rows"),
    (sim.linear_cka, (np.array([["a", "b"], ["c", "d"]]), Y[:2]), "expected a real numeric array"),
]


@pytest.mark.parametrize("f,args,match", CASES)
def test_degenerate_input_raises_clear_value_error(f, args, match):
    with pytest.raises(ValueError, match=match) as err:
        f(*args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("f", ALL, ids=lambda f: f.__name__)
def test_every_metric_rejects_misaligned_rows_and_nan(f):
    with pytest.raises(ValueError, match="rows must be aligned"):
        f(X, Y[:-1])
    with pytest.raises(ValueError, match="NaN or inf"):
        f(X, NAN)


def test_streaming_rejects_bad_chunks_and_reports_undefined_metrics():
    m = sim.Moments(4, 4)
    with pytest.raises(ValueError, match="x chunk contains NaN or inf"):
        m.update(NAN, Y)
    assert m.n == 0  # a rejected chunk leaves the accumulator untouched
    m.update(X[:3], Y[:3])
    with pytest.raises(ValueError, match="debiased_cka needs at least 4 rows, got n=3"):
        sim.from_moments(m, ["debiased_cka"])
    with pytest.raises(ValueError, match="r2 .*training part.* needs at least 2 rows"):
        sim.r2_from_moments(sim.Moments(4, 4).update(X[:1], Y[:1]), m)
    with pytest.raises(ValueError, match="widths"):
        sim.r2_from_moments(sim.Moments(4, 3), m)
    with pytest.raises(ValueError, match="at least one part"):
        sim.Moments.sum([])
    with pytest.raises(ValueError, match="d1 >= 1"):
        sim.Moments(0, 3)
