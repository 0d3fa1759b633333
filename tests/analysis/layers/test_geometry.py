"""Layer geometry against direct computations on the non-special rows, any number of tasks; the
sampled estimators against independent implementations and planted dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from conftest import write_docs_dataset
from scipy.spatial.distance import cdist

from strata.analysis import layers
from strata.analysis.similarity import AnalysisError, Executor

HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    rng = np.random.default_rng(0)
    lens = list(rng.integers(5, 40, size=40))
    a = rng.standard_normal((8, 8))

    def acts(doc, pos):
        n = doc.size
        pre = rng.standard_normal((n, 8)) + 1.5
        attn = 0.3 * rng.standard_normal((n, 8))
        mlp = 0.2 * rng.standard_normal((n, 8))
        post = pre + attn + mlp
        nxt = np.tanh(post @ a) + 0.1 * rng.standard_normal((n, 8))
        return dict(zip(HOOKS, (pre, attn, mlp, post, nxt)))

    ds = write_docs_dataset(tmp_path_factory.mktemp("geo"), "geo", lens, acts)
    keep = ~ds.tokens().column("special").to_numpy(zero_copy_only=False)
    return ds, {h: np.asarray(ds.read(h), np.float64)[keep] for h in HOOKS}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _linearity(x: np.ndarray, y: np.ndarray) -> float:
    """Razzhigaev et al.: centre, divide by the Frobenius norm, 1 - min_A |XA - Y|_F^2."""
    xn, yn = x - x.mean(0), y - y.mean(0)
    xn, yn = xn / np.linalg.norm(xn), yn / np.linalg.norm(yn)
    a = scipy.linalg.lstsq(xn, yn)[0]
    return 1.0 - float(np.linalg.norm(xn @ a - yn) ** 2)


@pytest.mark.parametrize("tasks", [1, 3])
def test_streamed_metrics_equal_direct_computations(geo, tasks):
    ds, x = geo
    streamed = ["norm", "write_ratio", "anisotropy", "cos_next", "linearity_next"]
    table, prov = layers.geometry(ds, HOOKS, streamed, tasks=tasks, executor=Executor())
    got = {c: np.asarray(table.column(c).to_numpy(zero_copy_only=False), float) for c in streamed}
    n = len(x[HOOKS[0]])
    assert prov["n"] == n
    np.testing.assert_allclose(got["norm"], [np.linalg.norm(x[h], axis=1).mean() for h in HOOKS], rtol=1e-12)
    pre = np.linalg.norm(x[HOOKS[0]], axis=1)
    want_write = [np.nan, (np.linalg.norm(x[HOOKS[1]], axis=1) / pre).mean(), (np.linalg.norm(x[HOOKS[2]], axis=1) / pre).mean(), np.nan, np.nan]
    np.testing.assert_allclose(got["write_ratio"], want_write, rtol=1e-12)
    for i, h in enumerate(HOOKS):
        u = x[h] / np.linalg.norm(x[h], axis=1, keepdims=True)
        pair = u @ u.T
        assert got["anisotropy"][i] == pytest.approx((pair.sum() - np.trace(pair)) / (n * (n - 1)), rel=1e-9)
    for i in range(len(HOOKS) - 1):
        assert got["cos_next"][i] == pytest.approx(_cos(x[HOOKS[i]], x[HOOKS[i + 1]]).mean(), rel=1e-12)
        assert got["linearity_next"][i] == pytest.approx(_linearity(x[HOOKS[i]], x[HOOKS[i + 1]]), rel=1e-9)
    assert np.isnan(got["cos_next"][-1]) and np.isnan(got["linearity_next"][-1])
    assert got["linearity_next"][0] < 0.05 < 0.5 < got["linearity_next"][3]  # independent noise vs a smooth map


def test_twonn_matches_an_independent_implementation_and_a_planted_dimension():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1500, 3)) @ rng.standard_normal((3, 12))  # a 3-dimensional plane in 12 dimensions
    d = cdist(z, z)
    np.fill_diagonal(d, np.inf)
    r = np.sort(d, axis=1)[:, :2]
    mu = r[:, 1] / r[:, 0]
    assert layers.twonn(z) == pytest.approx((mu.size - 1) / np.log(mu).sum(), rel=1e-9)
    assert layers.twonn(z) == pytest.approx(3.0, rel=0.12)
    assert layers.twonn(rng.standard_normal((1500, 6))) == pytest.approx(6.0, rel=0.15)


def test_twonn_ignores_duplicate_rows():
    # The same token embedded identically (hook_embed) repeats a row; kept in, r1 = r2 = 0 up to
    # rounding and the estimate blew up (424 for d = 128). Duplicates are kept once, so the
    # estimate is that of the distinct rows, whatever the number of copies and their order.
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2000, 5)) @ rng.standard_normal((5, 50))  # a 5-dimensional subspace of 50 dimensions
    est = layers.twonn(z)
    # TwoNN's standard error here is about d / sqrt(N) = 0.11 (2%); seeds 0..7 gave 4.81..5.25.
    assert est == pytest.approx(5.0, rel=0.1)
    tripled = np.repeat(z, 3, axis=0)[rng.permutation(3 * len(z))]
    assert layers.twonn(tripled) == est  # the same distinct rows: the same computation
    assert layers.twonn(np.vstack([z, z[:700]])) == est
    assert np.isnan(layers.twonn(np.repeat(z[:2], 5, axis=0)))  # two distinct rows: undefined


def test_prompt_entropy_and_curvature_match_their_definitions():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((20, 6))
    s = np.linalg.svd(z, compute_uv=False) ** 2  # the non-zero eigenvalues of Z Z^T
    p = s / s.sum()
    assert layers.prompt_entropy(z) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-10)
    assert layers.prompt_entropy(np.outer(np.arange(1, 6), np.ones(4))) == pytest.approx(0.0, abs=1e-10)  # rank one
    steps = np.diff(z, axis=0)
    angles = [np.degrees(np.arccos(np.clip(steps[k] @ steps[k + 1] / np.linalg.norm(steps[k]) / np.linalg.norm(steps[k + 1]), -1, 1)))
              for k in range(len(steps) - 1)]
    assert layers.curvature(z) == pytest.approx(np.mean(angles), rel=1e-10)
    line = np.outer(np.arange(10.0), rng.standard_normal(5))
    assert layers.curvature(line) == pytest.approx(0.0, abs=1e-5)  # a straight trajectory


def test_sampled_metrics_run_on_stated_samples(geo):
    ds, _ = geo
    table, prov = layers.geometry(ds, HOOKS[:2], ["intrinsic_dim", "prompt_entropy", "curvature"], sample_rows=300, sample_contexts=7,
                                  executor=Executor())
    assert prov["intrinsic_dim_rows"] == 300 and prov["sample_contexts"] == 7
    ids = table.column("intrinsic_dim").to_pylist()
    assert 5 < ids[0] < 11  # 8-dimensional Gaussian rows
    with pytest.raises(AnalysisError, match="unknown layer metric 'entropy'"):
        layers.geometry(ds, HOOKS, ["entropy"])
