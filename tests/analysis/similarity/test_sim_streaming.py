"""Streaming co-moments: exact fields, any chunking, any merge order, large offsets, serialisation."""

from __future__ import annotations

import numpy as np
import pytest
import simref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.analysis import similarity as sim

METRICS = ["linear_cka", "debiased_cka", "cca", "svcca", "pwcca", "procrustes", "cosine"]
IN_MEMORY = {
    "linear_cka": sim.linear_cka, "debiased_cka": sim.debiased_cka, "cca": sim.cca, "svcca": sim.svcca,
    "pwcca": sim.pwcca, "procrustes": sim.procrustes, "cosine": sim.cosine,
}
X, Y = simref.pair(97, 6, 6, seed=21, offset=1.5)
WHOLE = {name: f(X, Y) for name, f in IN_MEMORY.items()}


def assert_close(got: dict, want: dict, rel: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-13), k


def split_points(draw_cuts: list[int], n: int) -> list[int]:
    return sorted({0, n, *[c % (n + 1) for c in draw_cuts]})


def test_fields_equal_direct_sums():
    x, y = simref.pair(50, 4, 3, seed=22, offset=7.0)
    m = sim.Moments(4, 3)
    for s in range(0, 50, 13):
        m.update(x[s : s + 13], y[s : s + 13])
    u, v = x - x.mean(0), y - y.mean(0)
    a, b = (u**2).sum(1), (v**2).sum(1)
    want = {
        "mean_x": x.mean(0), "mean_y": y.mean(0), "cxx": u.T @ u, "cyy": v.T @ v, "cxy": u.T @ v,
        "xxxx": a @ a, "yyyy": b @ b, "xxyy": a @ b, "xx_x": u.T @ a, "yy_x": u.T @ b, "xx_y": v.T @ a, "yy_y": v.T @ b,
    }
    assert m.n == 50 and m.cos_sum is None
    for name, value in want.items():
        np.testing.assert_allclose(getattr(m, name), value, rtol=1e-11, atol=1e-11, err_msg=name)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, 200), max_size=8))
def test_any_chunking_equals_in_memory(cuts):
    pts = split_points(cuts, len(X))
    m = sim.Moments(6, 6)
    for a, b in zip(pts[:-1], pts[1:]):
        m.update(X[a:b], Y[a:b])
    assert_close(sim.from_moments(m, METRICS), WHOLE)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, 200), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_merging_partials_in_any_order_equals_one_pass(cuts, seed):
    pts = split_points(cuts, len(X))
    parts = [sim.Moments(6, 6).update(X[a:b], Y[a:b]) for a, b in zip(pts[:-1], pts[1:])]
    rng = np.random.default_rng(seed)
    # A random merge tree: repeatedly merge two random parts, as nested Ray reductions would.
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), size=2, replace=False))
        right = parts.pop(j)
        parts[i] = parts[i].copy().merge(right) if rng.random() < 0.5 else right.copy().merge(parts[i])
    assert_close(sim.from_moments(parts[0], METRICS), WHOLE)


def test_sum_of_parts_equals_update_sequence_and_leaves_parts_alone():
    parts = [sim.Moments(6, 6).update(X[a : a + 20], Y[a : a + 20]) for a in range(0, 97, 20)]
    before = [p.to_dict() for p in parts]
    total = sim.Moments.sum(parts)
    assert total.n == 97
    assert_close(sim.from_moments(total, METRICS), WHOLE)
    for p, state in zip(parts, before):
        for k, v in p.to_dict().items():
            np.testing.assert_array_equal(v, state[k])
    assert sim.Moments.sum([sim.Moments(6, 6), parts[0]]).n == parts[0].n  # empty parts are neutral


def test_large_offset_keeps_full_accuracy():
    # Mean 1e4, unit spread: raw second moments would cancel ~8 digits. X - 1e4 is exact, and
    # every metric here is translation invariant, so the reference is computed from it.
    z, w = simref.pair(400, 5, 5, seed=23)
    x, y = z + 1e4, w - 1e4
    m = sim.Moments(5, 5)
    for s in range(0, 400, 7):
        m.update(x[s : s + 7], y[s : s + 7])
    ref = {k: IN_MEMORY[k](x - 1e4, y + 1e4) for k in METRICS if k != "cosine"}
    assert_close(sim.from_moments(m, list(ref)), ref, rel=1e-10)
    assert sim.linear_cka(x, y) == pytest.approx(simref.linear_cka(x - 1e4, y + 1e4), rel=1e-10)
    # The naive one-pass formula fails this bar, so the test has teeth.
    sxx = x.T @ x - 400 * np.outer(x.mean(0), x.mean(0))
    syy = y.T @ y - 400 * np.outer(y.mean(0), y.mean(0))
    sxy = x.T @ y - 400 * np.outer(x.mean(0), y.mean(0))
    naive = np.sum(sxy**2) / np.sqrt(np.sum(sxx**2) * np.sum(syy**2))
    assert abs(naive - ref["linear_cka"]) > 1e-10


def test_merging_parts_with_very_different_means():
    # Non-stationary stream: each part has its own large mean, so every merge shifts centres a lot.
    z, w = simref.pair(240, 5, 5, seed=26)
    shifts = np.repeat(np.array([3e4, -2e4, 5e3, 0.0, 1e4, -7e3]), 40)[:, None] * np.linspace(1, -1, 5)
    x, y = z + shifts, w - 0.5 * shifts
    parts = [sim.Moments(5, 5).update(x[s : s + 40], y[s : s + 40]) for s in range(0, 240, 40)]
    order = np.random.default_rng(0).permutation(len(parts))
    got = sim.from_moments(sim.Moments.sum([parts[i] for i in order]), METRICS[:-1])
    xc, yc = x - x.mean(0), y - y.mean(0)  # an accurate two-pass centring for the reference
    assert got["linear_cka"] == pytest.approx(simref.linear_cka(xc, yc), rel=1e-12)
    assert got["debiased_cka"] == pytest.approx(simref.debiased_cka(xc, yc), rel=1e-12)
    assert got["procrustes"] == pytest.approx(simref.procrustes(xc, yc), rel=1e-10)
    # The drift makes the covariances ill-conditioned (~1e9), which bounds the accuracy of any
    # CCA computation (the in-memory value is no closer); the merge adds no error of its own.
    assert got["cca"] == pytest.approx(simref.cca(xc, yc), rel=1e-6)
    assert got["svcca"] == pytest.approx(simref.svcca(xc, yc), rel=1e-6)


def test_r2_from_streamed_train_and_test_moments():
    x, y = simref.pair(300, 5, 4, seed=24, offset=50.0)
    train, test = np.arange(200), np.arange(200, 300)
    m_tr, m_te = sim.Moments(5, 4), sim.Moments(5, 4)
    for s in range(0, 200, 33):
        m_tr.update(x[s : min(s + 33, 200)], y[s : min(s + 33, 200)])
    for s in range(200, 300, 17):
        m_te.update(x[s : s + 17], y[s : s + 17])
    got = sim.r2_from_moments(m_tr, m_te, ridge=0.05)
    assert got["x_to_y"] == pytest.approx(simref.ridge_r2(x, y, train, test, 0.05), rel=1e-10)
    assert got["y_to_x"] == pytest.approx(simref.ridge_r2(y, x, train, test, 0.05), rel=1e-10)
    in_memory = sim.r2(x, y, ridge=0.05, train=train, test=test)
    assert all(got[k] == pytest.approx(v, rel=1e-10) for k, v in in_memory.items())


def test_torch_chunks_and_mixed_widths():
    x, y = simref.pair(60, 4, 9, seed=25)
    m = sim.Moments(4, 9)
    for s in range(0, 60, 16):
        m.update(torch.from_numpy(x[s : s + 16]).float(), y[s : s + 16])
    got = sim.from_moments(m)
    assert set(got) == set(METRICS) - {"cosine"}  # no cosine when d1 != d2
    x32 = x.astype(np.float32).astype(np.float64)
    assert got["linear_cka"] == pytest.approx(simref.linear_cka(x32, y), rel=1e-10)


def test_dict_and_npz_round_trip_without_pickle(tmp_path):
    m = sim.Moments(6, 6).update(X, Y)
    state = m.to_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    assert_close(sim.from_moments(sim.Moments.from_dict(state)), WHOLE, rel=0)
    as_python = {k: v.tolist() for k, v in state.items()}  # e.g. after JSON
    assert_close(sim.from_moments(sim.Moments.from_dict(as_python)), WHOLE, rel=0)
    path = tmp_path / "m.npz"
    m.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert "cxy" in data.files
    assert_close(sim.from_moments(sim.Moments.load(path)), WHOLE, rel=0)


def test_bad_states_and_merges_raise():
    state = sim.Moments(3, 2).to_dict()
    with pytest.raises(ValueError, match="format"):
        sim.Moments.from_dict({**state, "format": np.array("other")})
    with pytest.raises(ValueError, match="`cxx` has shape"):
        sim.Moments.from_dict({**state, "cxx": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="missing keys: cyy"):
        sim.Moments.from_dict({k: v for k, v in state.items() if k != "cyy"})
    with pytest.raises(ValueError, match="cannot merge"):
        sim.Moments(3, 2).merge(sim.Moments(2, 3))
    with pytest.raises(ValueError, match="chunk widths"):
        sim.Moments(3, 2).update(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="unknown metric 'cka'; valid metrics are: linear_cka, debiased_cka"):
        sim.from_moments(sim.Moments(6, 6).update(X, Y), ["cka"])
    with pytest.raises(ValueError, match="d1 == d2"):
        sim.from_moments(sim.Moments(3, 2).update(np.eye(4, 3), np.eye(4, 2)), ["cosine"])
    with pytest.raises(ValueError, match="at least 2 rows, got n=0"):
        sim.from_moments(sim.Moments(3, 3), ["linear_cka"])


@pytest.mark.parametrize("dtype", [np.float64, np.float16])  # the float64 and the float32-product paths
def test_cosine_false_skips_only_the_cosines(dtype):
    x, y = X.astype(dtype), Y.astype(dtype)
    on = sim.Moments(6, 6).update(x[:40], y[:40]).update(x[40:], y[40:])
    off = sim.Moments(6, 6, cosine=False).update(x[:40], y[:40]).update(x[40:], y[40:])
    assert on.cos_sum is not None and off.cos_sum is None
    for name in ("mean_x", "mean_y", "cxx", "cyy", "cxy", "xx_x", "yy_x", "xx_y", "yy_y", "xxxx", "yyyy", "xxyy", "n"):
        np.testing.assert_array_equal(getattr(off, name), getattr(on, name), err_msg=name)
    linear = [m for m in METRICS if m != "cosine"]
    assert sim.from_moments(off, linear) == sim.from_moments(on, linear)
    with pytest.raises(ValueError, match="cosine was not accumulated"):
        sim.from_moments(off, ["cosine"])
    # Untracked anywhere means untracked in the union, whatever the order; serialisation keeps it.
    assert on.copy().merge(off).cos_sum is None and off.copy().merge(on).cos_sum is None
    assert sim.Moments.sum([on, off]).cos_sum is None and sim.Moments.sum([on, on]).cos_sum == pytest.approx(2 * on.cos_sum)
    assert sim.Moments.from_dict(off.to_dict()).cos_sum is None
    assert sim.Moments.from_dict(on.to_dict()).cos_sum == on.cos_sum
