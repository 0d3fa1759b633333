"""Sampled (all-pairs) metrics against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import simref

from strata.analysis import similarity as sim


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("sigma_frac", [0.4, 0.8, 2.0])
def test_rbf_cka_matches_explicit_kernels(sigma_frac, debiased):
    x, y = simref.pair(40, 5, 8, seed=31, offset=3.0)
    got = sim.rbf_cka(x, y, sigma_frac=sigma_frac, debiased=debiased)
    assert got == pytest.approx(simref.rbf_cka(x, y, sigma_frac, debiased), rel=1e-10)


def test_rbf_cka_bandwidth_matters():
    x, y = simref.pair(40, 5, 8, seed=32)
    assert sim.rbf_cka(x, y, 0.2) != pytest.approx(sim.rbf_cka(x, y, 2.0), rel=1e-3)


@pytest.mark.parametrize("batch_size,seed", [(10, 0), (16, 5), (37, 1)])
def test_minibatch_cka_matches_averaged_unbiased_hsic(batch_size, seed):
    x, y = simref.pair(75, 6, 30, seed=33)  # 75 % batch_size rows are dropped for 10 and 16
    got = sim.minibatch_cka(x, y, batch_size=batch_size, seed=seed)
    assert got == pytest.approx(simref.minibatch_cka(x, y, batch_size, seed), rel=1e-10)


def test_minibatch_cka_single_batch_is_debiased_cka():
    x, y = simref.pair(40, 6, 4, seed=34)
    assert sim.minibatch_cka(x, y, batch_size=40, seed=None) == pytest.approx(sim.debiased_cka(x, y), rel=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_mutual_knn_matches_brute_force_sorting(metric, k):
    x, y = simref.pair(45, 6, 5, seed=35, noise=1.0, offset=0.5)
    got = sim.mutual_knn(x, y, k=k, metric=metric)
    assert got == pytest.approx(simref.mutual_knn(x, y, k, metric), abs=1e-15)
    assert 0 < got < 1


def test_mutual_knn_excludes_self_and_handles_blocks(monkeypatch):
    from strata.analysis.similarity import _sampled

    monkeypatch.setattr(_sampled, "_BLOCK", 7)  # several row blocks
    x, y = simref.pair(30, 4, 4, seed=36, noise=2.0)
    assert sim.mutual_knn(x, x, k=29) == 1.0  # would be < 1 if a row could be its own neighbour
    assert sim.mutual_knn(x, y, k=4) == pytest.approx(simref.mutual_knn(x, y, 4, "cosine"), abs=1e-15)


@pytest.mark.parametrize("metric", ["correlation", "cosine", "euclidean"])
def test_rsa_matches_scipy_spearman_of_pdist(metric):
    x, y = simref.pair(35, 7, 4, seed=37, noise=1.0, offset=0.2)
    assert sim.rsa(x, y, metric=metric) == pytest.approx(simref.rsa(x, y, metric), rel=1e-10)


def test_rsa_handles_tied_dissimilarities_like_spearmanr():
    rng = np.random.default_rng(38)
    x = rng.integers(0, 3, size=(20, 2)).astype(float)  # many equal distances
    y = x + rng.integers(0, 2, size=(20, 2))
    assert sim.rsa(x, y, metric="euclidean") == pytest.approx(simref.rsa(x, y, "euclidean"), rel=1e-10)
