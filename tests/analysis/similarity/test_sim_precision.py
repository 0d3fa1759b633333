"""Float32 chunk products (``precision``): what ``"auto"`` picks, how close the float32 products
come to float64 (stated bounds), independent of chunking and of a large offset, the same through
``BlockMoments`` and over a float16 store; bad values named.

The bound: a float32 product of ``r`` centred rows is off by about ``eps32 sqrt(r)`` (6e-8 x
sqrt(r)) relative to the scale of its sum. Largest relative errors of the metrics measured on
float16 ``simref.pair(1000, 16, 16, offset=3)`` in chunks of 301 rows, over 20 seeds: 2.8e-7
both CKAs, 1.4e-7 CCA, 1.0e-7 SVCCA, 6.3e-7 PWCCA, 5.4e-7 Procrustes, 1.2e-8 cosine. The tests
allow 5e-6 (relative): about ten times what was measured, and four orders of magnitude under
what a bug in the centring, merging or accumulation gives (overlapping or misaligned chunks:
~1e-2).
"""

from __future__ import annotations

import _simdata
import numpy as np
import pytest
import simref
import torch

from strata.analysis import similarity as sim

METRICS = ["linear_cka", "debiased_cka", "cca", "svcca", "pwcca", "procrustes", "cosine"]
TOL = dict.fromkeys(METRICS, 5e-6)


def _half_pair(seed: int = 0, offset: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    x, y = simref.pair(1000, 16, 16, seed=seed, offset=offset)
    return x.astype(np.float16), y.astype(np.float16)


def _references(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Independent float64 values of the same (widened) rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    out = {"linear_cka": simref.linear_cka(x, y), "debiased_cka": simref.debiased_cka(x, y), "cca": simref.cca(x, y),
           "svcca": simref.svcca(x, y, 0.99), "pwcca": sim.pwcca(x, y), "procrustes": simref.procrustes(x, y)}
    return out | ({"cosine": simref.cosine(x, y)} if x.shape[1] == y.shape[1] else {})


def _streamed(x, y, chunk: int, precision: str = "auto") -> sim.Moments:
    m = sim.Moments(x.shape[1], y.shape[1], precision=precision)
    for s in range(0, len(x), chunk):
        m.update(x[s : s + chunk], y[s : s + chunk])
    return m


def _within(got: dict, want: dict, tol: dict) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=tol[k], abs=1e-12), k


@pytest.mark.slow
def test_auto_is_float32_for_16_bit_floats_and_float64_otherwise():
    x, y = _half_pair()
    ref = _references(x, y)
    exact = sim.from_moments(_streamed(x, y, 301, "float64"), METRICS)
    _within(exact, ref, dict.fromkeys(METRICS, 1e-10))  # float64 products: exact as before
    fast = sim.from_moments(_streamed(x, y, 301), METRICS)
    assert any(fast[k] != exact[k] for k in METRICS)  # auto took float32 products ...
    _within(fast, ref, TOL)  # ... within the stated bound
    # Float32 and float64 inputs keep float64 products under auto: exact.
    _within(sim.from_moments(_streamed(x.astype(np.float32), y.astype(np.float32), 301), METRICS), ref, dict.fromkeys(METRICS, 1e-10))
    # torch bfloat16 (values exact in float32) takes float32 products too.
    xb, yb = torch.from_numpy(x.astype(np.float32)).bfloat16(), torch.from_numpy(y.astype(np.float32)).bfloat16()
    _within(sim.from_moments(_streamed(xb, yb, 301), METRICS), _references(xb.float().numpy(), yb.float().numpy()), TOL)


@pytest.mark.parametrize("seed", range(4))
def test_float32_products_are_within_the_bound_for_any_chunking(seed):
    x, y = _half_pair(seed)
    ref = _references(x, y)
    for chunk in (1, 97, 301, 1000):
        _within(sim.from_moments(_streamed(x, y, chunk), METRICS), ref, TOL)
    # Partials merged in any order, as Ray tasks return them.
    parts = [_streamed(x[a:b], y[a:b], 256) for a, b in ((0, 400), (400, 450), (450, 1000))]
    _within(sim.from_moments(sim.Moments.sum(parts[::-1]), METRICS), ref, TOL)


def test_fields_are_float32_close_to_direct_sums():
    x, y = _half_pair(5)
    m = _streamed(x, y, 500, "float32")
    u = x.astype(np.float64) - x.astype(np.float64).mean(0)
    v = y.astype(np.float64) - y.astype(np.float64).mean(0)
    a, b = (u**2).sum(1), (v**2).sum(1)
    want = {"cxx": u.T @ u, "cyy": v.T @ v, "cxy": u.T @ v, "xx_x": u.T @ a, "yy_y": v.T @ b}
    for name, value in want.items():  # relative to the scale of the sum (third-order sums cancel more)
        err = np.abs(getattr(m, name) - value).max() / np.abs(value).max()
        assert err < (1e-6 if name.startswith("c") else 1e-4), (name, err)
    np.testing.assert_allclose(m.mean_x, x.astype(np.float64).mean(0), rtol=1e-12)
    for name, value in {"xxxx": a @ a, "yyyy": b @ b, "xxyy": a @ b}.items():
        assert getattr(m, name) == pytest.approx(value, rel=1e-6), name


def test_float32_products_centre_before_rounding_so_an_offset_costs_nothing():
    # Rows at 1e5 with spread ~1: float32 products of the raw rows would lose every digit, and
    # rows centred at the mean rounded to float32 (off by up to 0.004) would be off by ~1e-5.
    x, y = simref.pair(1000, 8, 6, seed=3, offset=1e5)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    # The references on rows moved back by the offset (exact in float64; every metric here is
    # invariant to translation): their Gram matrices would lose the digits themselves.
    ref = _references(x32.astype(np.float64) - 1e5, y32.astype(np.float64) - 1e5)
    for xs, ys in ((x32, y32), (x32.astype(np.float64), y32.astype(np.float64))):  # float32 rows; float64 rows
        _within(sim.from_moments(_streamed(xs, ys, 333, "float32"), list(ref)), ref, TOL)


@pytest.mark.slow
def test_block_moments_take_float32_products_for_half_blocks():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((1000, 8)) * np.geomspace(3, 0.3, 8)
    blocks = [(base + 0.5 * rng.standard_normal((1000, 8)) + 2.0).astype(np.float16),
              (np.tanh(base) + 0.5 * rng.standard_normal((1000, 8))).astype(np.float16),
              (base[:, :5] * 2 + 40).astype(np.float16)]
    bm = sim.BlockMoments([8, 8, 5])
    for s in range(0, 1000, 300):
        bm.update([b[s : s + 300] for b in blocks])
    exact = sim.BlockMoments([8, 8, 5], precision="float64").update(blocks)
    for h, g in ((0, 1), (0, 2), (1, 2)):
        names = METRICS if h < 2 and g < 2 else [k for k in METRICS if k != "cosine"]
        got, want = sim.from_moments(bm.pair(h, g), names), sim.from_moments(exact.pair(h, g), names)
        assert any(got[k] != want[k] for k in names)
        _within(got, want, TOL)
        _within(want, _references(blocks[h], blocks[g]), dict.fromkeys(METRICS, 1e-10))


def test_compare_over_a_float16_store_is_within_the_bound(tmp_path):
    ds = _simdata.two_hook_dataset(tmp_path, d1=12, d2=12, n_docs=120, dtype="float16")
    h0, h1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    keep = np.flatnonzero(~ds.tokens().column("special").to_numpy(zero_copy_only=False))
    x, y = np.asarray(ds.read(h0), np.float64)[keep], np.asarray(ds.read(h1), np.float64)[keep]
    got = sim.compare((ds, h0), (ds, h1), METRICS, use_ray=False, tasks=2, chunk_rows=100)
    _within(got, _references(x, y), TOL)
    # precision="float64" asks for float64 products: exact to float64 rounding again.
    exact = sim.compare((ds, h0), (ds, h1), METRICS, use_ray=False, tasks=2, chunk_rows=100, precision="float64")
    assert any(exact[k] != got[k] for k in METRICS)
    _within(exact, _references(x, y), dict.fromkeys(METRICS, 1e-10))
    from strata.analysis.similarity.errors import AnalysisError

    with pytest.raises(AnalysisError, match="`precision` must be one of 'auto', 'float32', 'float64', got 'half'"):
        sim.compare((ds, h0), (ds, h1), METRICS, use_ray=False, precision="half")


def test_bad_values_and_settings_are_named():
    x, y = _half_pair()
    bad = y.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"y chunk contains NaN or inf \(first at row 7, column 3\)"):
        sim.Moments(16, 16).update(x, bad)
    with pytest.raises(ValueError, match=r"block 1 contains NaN or inf \(first at row 7, column 3\)"):
        sim.BlockMoments([16, 16]).update([x, bad])
    huge = x.astype(np.float32) * np.float32(1e20)
    with pytest.raises(ValueError, match="x chunk: centred values up to .* overflow float32 products; use precision='float64'"):
        sim.Moments(16, 16, precision="float32").update(huge, y)
    m = sim.Moments(16, 16, precision="float64").update(huge.astype(np.float64), y)  # float64 copes
    assert np.isfinite(m.cxx).all()
    with pytest.raises(ValueError, match="`precision` must be one of 'auto', 'float32', 'float64', got 'half'"):
        sim.Moments(3, 3, precision="half")
