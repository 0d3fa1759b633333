"""In-memory linear metrics against the independent references in ``simref``."""

from __future__ import annotations

import numpy as np
import pytest
import simref
import torch

from strata.analysis import similarity as sim

SHAPES = [(60, 8, 5), (30, 40, 25), (120, 3, 60)]  # n > d1+d2 (primal), n < d (dual / rank-deficient), mixed


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_linear_cka_matches_explicit_centred_grams(n, d1, d2):
    x, y = simref.pair(n, d1, d2, seed=1)
    assert sim.linear_cka(x, y) == pytest.approx(simref.linear_cka(x, y), rel=1e-12)


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_debiased_cka_matches_song_formula(n, d1, d2):
    x, y = simref.pair(n, d1, d2, seed=2)
    assert sim.debiased_cka(x, y) == pytest.approx(simref.debiased_cka(x, y), rel=1e-10)


def test_song_formula_is_the_u_statistic():
    # Checks the reference itself (and so the library) against the brute-force U-statistic.
    x, y = simref.pair(7, 3, 4, seed=3)
    k, l = x @ x.T, y @ y.T
    assert simref.hsic_unbiased(k, l) == pytest.approx(simref.hsic_ustatistic(k, l), rel=1e-10)
    ref = simref.hsic_ustatistic(k, l) / np.sqrt(simref.hsic_ustatistic(k, k) * simref.hsic_ustatistic(l, l))
    assert sim.debiased_cka(x, y) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("n,d1,d2", [(80, 6, 9), (80, 9, 6), (40, 12, 12)])
def test_cca_matches_qr_principal_angles(n, d1, d2):
    x, y = simref.pair(n, d1, d2, seed=4)
    assert sim.cca(x, y) == pytest.approx(simref.cca(x, y), rel=1e-10)


@pytest.mark.parametrize("keep", [0.9, 0.99, 1.0])
def test_svcca_matches_truncated_svd_then_cca(keep):
    x, y = simref.pair(150, 20, 14, seed=5, noise=0.3)
    kx = simref.svd_reduce(x, keep).shape[1]
    if keep < 1:
        assert kx < 20  # the truncation really happens, so a wrong variance rule shows
    assert sim.svcca(x, y, keep=keep) == pytest.approx(simref.svcca(x, y, keep), rel=1e-10)


def test_svcca_uses_squared_singular_values():
    # Spectrum chosen so that 99% of sum(s) and 99% of sum(s^2) need different ranks.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 10)) * np.geomspace(10, 0.1, 10)
    y = x + 0.5 * rng.standard_normal((300, 10))
    _, s, _ = np.linalg.svd(x - x.mean(0))
    assert np.argmax(np.cumsum(s) / s.sum() >= 0.99) != np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.99)
    assert sim.svcca(x, y) == pytest.approx(simref.svcca(x, y, 0.99), rel=1e-10)


@pytest.mark.parametrize(
    "d1,d2,side,use_x", [(6, 10, "auto", True), (10, 6, "auto", False), (8, 8, "auto", True), (8, 8, "y", False)]
)
def test_pwcca_matches_projection_weighting(d1, d2, side, use_x):
    x, y = simref.pair(100, d1, d2, seed=7, noise=1.0)
    got = sim.pwcca(x, y, side=side)
    assert got == pytest.approx(simref.pwcca(x, y, use_x), rel=1e-10)
    assert got != pytest.approx(sim.cca(x, y), rel=1e-3)  # the weighting matters on this data


@pytest.mark.parametrize("n,d1,d2", [(50, 6, 6), (50, 4, 9), (12, 30, 20)])
def test_procrustes_matches_scipy_orthogonal_procrustes(n, d1, d2):
    x, y = simref.pair(n, d1, d2, seed=8)
    assert sim.procrustes(x, y) == pytest.approx(simref.procrustes(x, y), rel=1e-10, abs=1e-12)


def test_r2_matches_explicit_ridge_both_directions():
    x, y = simref.pair(200, 7, 5, seed=9)
    train, test = np.arange(0, 150), np.arange(150, 200)
    got = sim.r2(x, y, ridge=0.1, train=train, test=test)
    assert got["x_to_y"] == pytest.approx(simref.ridge_r2(x, y, train, test, 0.1), rel=1e-10)
    assert got["y_to_x"] == pytest.approx(simref.ridge_r2(y, x, train, test, 0.1), rel=1e-10)
    assert got["x_to_y"] != pytest.approx(simref.ridge_r2(x, y, train, test, 0.0), rel=1e-6)  # ridge is applied


def test_r2_splits_and_unregularised_fit():
    x, y = simref.pair(100, 4, 3, seed=10)
    mask = np.zeros(100, bool)
    mask[::3] = True
    got = sim.r2(x, y, ridge=0.0, test=mask)  # train = the complement
    train, test = np.flatnonzero(~mask), np.flatnonzero(mask)
    assert got["x_to_y"] == pytest.approx(simref.ridge_r2(x, y, train, test, 0.0), rel=1e-10)
    frac = sim.r2(x, y, train=0.7, seed=3)
    perm = np.random.default_rng(3).permutation(100)
    assert frac["y_to_x"] == pytest.approx(simref.ridge_r2(y, x, perm[:70], perm[70:], 1e-3), rel=1e-10)


def test_cosine_matches_row_loop():
    x, y = simref.pair(40, 6, 6, seed=11, offset=0.3)
    assert sim.cosine(x, y) == pytest.approx(simref.cosine(x, y), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_inputs_match_numpy(dtype):
    x, y = simref.pair(50, 5, 7, seed=12)
    tx, ty = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    xn, yn = tx.double().numpy(), ty.detach().double().numpy()
    for f in (sim.linear_cka, sim.debiased_cka, sim.cca, sim.procrustes):
        assert f(tx, ty) == pytest.approx(f(xn, yn), rel=1e-12)
    assert ty.dtype == dtype and tx.dtype == dtype  # inputs untouched


def test_inputs_are_not_modified():
    x, y = simref.pair(50, 5, 7, seed=13, offset=2.0)
    x32 = x.astype(np.float32)
    before = (x.copy(), y.copy(), x32.copy())
    for f in (sim.linear_cka, sim.debiased_cka, sim.cca, sim.svcca, sim.pwcca, sim.procrustes, sim.r2):
        f(x, y)
        f(x32, y)
    for a, b in zip((x, y, x32), before):
        np.testing.assert_array_equal(a, b)


def test_cca_family_with_dead_and_duplicate_neurons_runs_in_the_column_space():
    x, y = simref.pair(90, 5, 7, seed=14, noise=1.0)
    dead = np.hstack([x, np.full((90, 1), 3.0), x[:, :1]])  # a constant neuron and a copy of neuron 0
    assert sim.cca(dead, y) == pytest.approx(simref.cca(x, y), rel=1e-9)
    assert sim.svcca(dead, y, keep=1.0) == pytest.approx(simref.cca(x, y), rel=1e-9)
    # A dead neuron carries no projection weight.
    with_dead = np.hstack([x, np.zeros((90, 1))])
    assert sim.pwcca(with_dead, y, side="x") == pytest.approx(simref.pwcca(x, y, use_x=True), rel=1e-9)


def test_cca_with_more_features_than_rows_is_finite_and_warns(caplog):
    x, y = simref.pair(20, 30, 25, seed=15)
    with caplog.at_level("WARNING", logger="strata.analysis.similarity._cca"):
        values = [sim.cca(x, y), sim.svcca(x, y), sim.pwcca(x, y)]
    assert all(np.isfinite(v) and 0 <= v <= 1 + 1e-12 for v in values)
    assert sim.cca(x, y) == pytest.approx(1.0, abs=1e-6)  # 19 + 19 > 19: all correlations are 1
    assert "by construction" in caplog.text
