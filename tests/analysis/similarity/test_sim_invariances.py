"""Invariances, identities and known values that any correct implementation satisfies."""

from __future__ import annotations

import numpy as np
import pytest
import simref
from scipy.stats import ortho_group

from strata.analysis import similarity as sim

X, Y = simref.pair(80, 6, 9, seed=41, noise=1.0, offset=0.7)
Q6 = ortho_group.rvs(6, random_state=1)
Q9 = ortho_group.rvs(9, random_state=2)
CKAS = {
    "linear_cka": sim.linear_cka,
    "debiased_cka": sim.debiased_cka,
    "rbf_cka": sim.rbf_cka,
    "minibatch_cka": lambda a, b: sim.minibatch_cka(a, b, batch_size=20, seed=0),
}


@pytest.mark.parametrize("name", list(CKAS))
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(name):
    f = CKAS[name]
    base = f(X, Y)
    assert f(X @ Q6, Y) == pytest.approx(base, rel=1e-10)
    assert f(X, 3.5 * Y @ Q9) == pytest.approx(base, rel=1e-10)
    assert f(0.01 * X, Y) == pytest.approx(base, rel=1e-10)
    # ...but not to a general invertible map.
    a = np.diag(np.geomspace(5, 0.2, 6)) @ np.random.default_rng(3).standard_normal((6, 6))
    assert abs(f(X @ a, Y) - base) > 1e-3


@pytest.mark.parametrize("f", [sim.cca, lambda a, b: sim.svcca(a, b, keep=1.0)], ids=["cca", "svcca_keep1"])
def test_cca_invariant_to_invertible_maps(f):
    a = np.random.default_rng(4).standard_normal((6, 6)) + 3 * np.eye(6)
    b = np.random.default_rng(5).standard_normal((9, 9)) + 3 * np.eye(9)
    assert f(X @ a + 100.0, Y @ b) == pytest.approx(f(X, Y), rel=1e-9)


def test_procrustes_zero_for_rotations_symmetric_and_scale_free():
    assert sim.procrustes(X, X @ Q6) == pytest.approx(0.0, abs=1e-12)
    assert sim.procrustes(X, 4.0 * X @ Q6 + 2.0) == pytest.approx(0.0, abs=1e-12)
    d = sim.procrustes(X, Y)
    assert d == pytest.approx(sim.procrustes(Y, X), rel=1e-12)
    assert 0.05 < d < 2
    # Zero-padding convention: appending zero columns changes nothing.
    assert sim.procrustes(X, np.hstack([X @ Q6, np.zeros((80, 3))])) == pytest.approx(0.0, abs=1e-12)


def test_identical_inputs():
    for f in (sim.linear_cka, sim.debiased_cka, sim.cca, sim.svcca, sim.pwcca, sim.rbf_cka, sim.rsa, sim.cosine):
        assert f(X, X) == pytest.approx(1.0, abs=1e-12), f.__name__
    assert sim.mutual_knn(X, X, k=5) == 1.0
    assert sim.procrustes(X, X) == pytest.approx(0.0, abs=1e-12)
    assert sim.r2(X, X, ridge=1e-9) == pytest.approx({"x_to_y": 1.0, "y_to_x": 1.0}, abs=1e-7)


def test_joint_row_permutation_changes_nothing():
    p = np.random.default_rng(6).permutation(80)
    xs, ys = X[:, :6], Y[:, :6]
    for f in (sim.linear_cka, sim.debiased_cka, sim.cca, sim.svcca, sim.pwcca, sim.procrustes, sim.cosine,
              sim.rbf_cka, sim.rsa, lambda a, b: sim.mutual_knn(a, b, k=7),
              lambda a, b: sim.minibatch_cka(a, b, batch_size=80, seed=None)):
        assert f(xs[p], ys[p]) == pytest.approx(f(xs, ys), rel=1e-10)
    got = sim.r2(X[p], Y[p], train=np.argsort(p)[:60])  # the same training rows, permuted
    assert got == pytest.approx(sim.r2(X, Y, train=np.arange(60)), rel=1e-10)


def test_debiased_cka_near_zero_for_independent_gaussians_where_biased_is_not():
    rng = np.random.default_rng(7)
    pairs = [(rng.standard_normal((50, 500)), rng.standard_normal((50, 500))) for _ in range(5)]
    biased = np.mean([sim.linear_cka(a, b) for a, b in pairs])
    debiased = np.mean([sim.debiased_cka(a, b) for a, b in pairs])
    assert biased > 0.8
    assert abs(debiased) < 0.06


def test_known_extremes():
    rng = np.random.default_rng(8)
    z = rng.standard_normal((400, 3))
    # Exact linear relation: every canonical correlation is 1, CKA < 1 for a non-orthogonal map.
    a = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.1]])
    assert sim.cca(z, z @ a) == pytest.approx(1.0, abs=1e-10)
    assert sim.linear_cka(z, z @ a) < 0.95
    # Independent large-n data: CCA near 0, cosine of independent rows near 0.
    w = rng.standard_normal((400, 3))
    assert sim.cca(z, w) < 0.12
    assert abs(sim.cosine(z, w)) < 0.1
    assert sim.cosine(z, -z) == pytest.approx(-1.0)
