"""``similarity.cknna``: equal to a direct formula written here with plain loops (neighbour lists by
``sorted``, the unbiased HSIC as explicit sums over index pairs and triples); the debiased linear
CKA when every other row is a neighbour; invariant to an orthogonal map and an isotropic scale of
either side; one-line errors for a missing or bad ``k``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from strata.analysis import similarity as sim


def _neighbours(x: np.ndarray, k: int) -> list[set[int]]:
    """Row i's k other rows of largest inner product (ties: lower index), by sorting each row."""
    n = len(x)
    out = []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(x[i] @ x[j]), j))
        out.append(set(others[:k]))
    return out


def _hsic(a: list[list[float]], b: list[list[float]]) -> float:
    """Song et al. (2012) eq. 5 as sums over indices, the diagonals left out: tr(A~B~), the
    product of the off-diagonal totals, and 1ᵀA~B~1."""
    n = len(a)
    off = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
    trace = sum(a[i][j] * b[j][i] for i, j in off)
    totals = sum(a[i][j] for i, j in off) * sum(b[i][j] for i, j in off)
    cross = sum(a[i][j] * b[j][m] for i, j in off for m in range(n) if m != j)
    return (trace + totals / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def _direct(x: np.ndarray, y: np.ndarray, k: int) -> float:
    n = len(x)
    nx, ny = _neighbours(x, k), _neighbours(y, k)

    def masked(z: np.ndarray, keep: list[set[int]]) -> list[list[float]]:
        return [[float(z[i] @ z[j]) if j in keep[i] else 0.0 for j in range(n)] for i in range(n)]

    shared = [nx[i] & ny[i] for i in range(n)]
    hxy = _hsic(masked(x, shared), masked(y, shared))
    hxx = _hsic(masked(x, nx), masked(x, nx))
    hyy = _hsic(masked(y, ny), masked(y, ny))
    return hxy / math.sqrt(hxx * hyy)


def _pair(n: int, d1: int, d2: int, seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, d1))
    y = np.tanh(x @ r.standard_normal((d1, d2))) + noise * r.standard_normal((n, d2))
    return x, y


@pytest.mark.parametrize(("n", "k", "seed"), [(9, 2, 0), (12, 3, 1), (14, 5, 2), (10, 9, 3)])
def test_cknna_equals_the_direct_formula(n, k, seed):
    x, y = _pair(n, 4, 6, seed)
    got = sim.cknna(x, y, k=k)
    assert got == pytest.approx(_direct(x, y, k), rel=1e-10, abs=1e-12)
    # the masks matter: with fewer neighbours the value moves away from the all-pairs one
    if k < n - 1:
        assert abs(got - sim.cknna(x, y, k=n - 1)) > 1e-6


def test_cknna_ties_go_to_the_lower_row_index():
    """Small-integer features: many equal inner products; the neighbour lists must be the direct
    formula's (sorted by value, then index)."""
    r = np.random.default_rng(14)
    for seed in range(5):
        x = r.integers(-1, 2, size=(13, 3)).astype(float)
        y = r.integers(-1, 2, size=(13, 4)).astype(float)
        try:
            want = _direct(x, y, 4)
        except (ValueError, ZeroDivisionError):
            continue
        if not np.isfinite(want):
            continue
        assert sim.cknna(x, y, k=4) == pytest.approx(want, rel=1e-10, abs=1e-12), seed


def test_cknna_is_not_symmetric_but_direct_both_ways():
    x, y = _pair(11, 3, 5, seed=4)
    xy, yx = sim.cknna(x, y, k=3), sim.cknna(y, x, k=3)
    assert xy == pytest.approx(_direct(x, y, 3), rel=1e-10)
    assert yx == pytest.approx(_direct(y, x, 3), rel=1e-10)
    assert xy != pytest.approx(yx, rel=1e-6)  # 1ᵀK~L~1 of masked (non-symmetric) kernels is not symmetric


def test_cknna_with_every_neighbour_is_debiased_linear_cka():
    x, y = _pair(40, 8, 5, seed=5)
    x += 3.0  # uncentred kernels: the unbiased HSIC does not see a shift of the features
    assert sim.cknna(x, y, k=39) == pytest.approx(sim.debiased_cka(x, y), rel=1e-9)


def test_cknna_identical_sides_is_one_and_independent_sides_are_near_zero():
    x, _ = _pair(200, 16, 4, seed=6)
    assert sim.cknna(x, x, k=10) == pytest.approx(1.0, abs=1e-12)
    r = np.random.default_rng(7)
    far = sim.cknna(r.standard_normal((200, 16)), r.standard_normal((200, 16)), k=10)
    near = sim.cknna(*_pair(200, 16, 16, seed=8, noise=0.1), k=10)
    assert abs(far) < 0.2 < near


def test_cknna_invariances():
    """An orthogonal map of either side and an isotropic scale leave the kernels' order and the ratio unchanged."""
    x, y = _pair(60, 6, 9, seed=9)
    base = sim.cknna(x, y, k=10)
    r = np.random.default_rng(10)
    qx, _ = np.linalg.qr(r.standard_normal((6, 6)))
    qy, _ = np.linalg.qr(r.standard_normal((9, 9)))
    assert sim.cknna(x @ qx, y @ qy, k=10) == pytest.approx(base, rel=1e-9)
    assert sim.cknna(37.0 * x, 0.002 * y, k=10) == pytest.approx(base, rel=1e-9)
    # not invariant to a shift: the kernels are uncentred inner products, so the neighbours change
    assert sim.cknna(x + 5.0, y, k=10) != pytest.approx(base, rel=1e-3)


def test_cknna_takes_torch_tensors_of_any_float_dtype():
    x, y = _pair(30, 5, 7, seed=11)
    want = sim.cknna(x.astype(np.float32), y.astype(np.float32), k=4)
    assert sim.cknna(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), k=4) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("k", "n", "msg"), [
    (None, 12, r"cknna needs an explicit integer `k` .* got None"),
    (2.5, 12, r"explicit integer `k` .* got 2\.5"),
    (True, 12, r"explicit integer `k` .* got True"),
    (1, 12, r"cknna needs `k` >= 2 neighbours per row, got 1"),
    (12, 12, r"cknna with k=12 needs at least k \+ 1 = 13 rows .* got n=12"),
    (3, 3, r"cknna needs at least 4 rows, got n=3"),
])
def test_cknna_bad_k_or_too_few_rows_is_one_line(k, n, msg):
    x, y = _pair(n, 3, 3, seed=12)
    with pytest.raises(ValueError, match=msg) as e:
        sim.cknna(x, y, k=k)
    assert "\n" not in str(e.value)


def test_cknna_needs_k():
    x, y = _pair(12, 3, 3, seed=13)
    with pytest.raises(TypeError, match="k"):
        sim.cknna(x, y)  # type: ignore[call-arg]


def test_cknna_rows_must_pair():
    with pytest.raises(ValueError, match="X has 12 rows but Y has 11"):
        sim.cknna(np.ones((12, 3)), np.ones((11, 3)), k=3)
