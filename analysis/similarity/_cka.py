"""Linear CKA (biased and debiased), orthogonal Procrustes distance and aligned-row cosine.

Every metric here is a function of a few scalars of the centred data, which come either from a
:class:`~analysis.similarity.Moments` (primal, ``d x d`` co-moments, any ``n``) or, for in-memory
arrays with fewer rows than features, from the centred ``n x n`` Gram matrices (dual). Both give
the same numbers up to rounding: ``||Xc^T Yc||_F^2 = tr(Kc Lc)`` with ``Kc = Xc Xc^T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import as_matrix, check_n, check_pair
from ._linalg import svdvals
from ._moments import Moments, row_cosine_sum

__all__ = ["linear_cka", "debiased_cka", "procrustes", "cosine"]


@dataclass(frozen=True)
class KernelStats:
    """Scalars of centred data that determine linear CKA and the unbiased linear HSIC.

    ``hxy = ||Cxy||_F^2 = tr(Kc Lc)``, ``hxx = ||Cxx||_F^2``, ``hyy = ||Cyy||_F^2``,
    ``tx = tr Cxx = sum |u_i|^2``, ``ty``, and the fourth-order sums
    ``xxxx = sum |u_i|^4``, ``yyyy = sum |v_i|^4``, ``xxyy = sum |u_i|^2 |v_i|^2``.
    """

    n: int
    hxy: float
    hxx: float
    hyy: float
    tx: float
    ty: float
    xxxx: float
    yyyy: float
    xxyy: float

    @classmethod
    def from_moments(cls, m: Moments) -> KernelStats:
        return cls(
            n=m.n,
            hxy=float(np.vdot(m.cxy, m.cxy)),
            hxx=float(np.vdot(m.cxx, m.cxx)),
            hyy=float(np.vdot(m.cyy, m.cyy)),
            tx=float(np.trace(m.cxx)),
            ty=float(np.trace(m.cyy)),
            xxxx=m.xxxx,
            yyyy=m.yyyy,
            xxyy=m.xxyy,
        )

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, *, x_owned: bool = False, y_owned: bool = False) -> KernelStats:
        """Primal (co-moments) or dual (Gram matrices), whichever is cheaper for this shape."""
        n, d1 = x.shape
        d2 = y.shape[1]
        if n >= d1 + d2:
            return cls.from_moments(_moments_of(x, y, x_owned, y_owned))
        u = np.subtract(x, x.mean(axis=0), out=x if x_owned else None)
        v = np.subtract(y, y.mean(axis=0), out=y if y_owned else None)
        kx, ky = u @ u.T, v @ v.T
        a, b = np.diagonal(kx), np.diagonal(ky)
        return cls(
            n=n,
            hxy=float(np.vdot(kx, ky)),
            hxx=float(np.vdot(kx, kx)),
            hyy=float(np.vdot(ky, ky)),
            tx=float(a.sum()),
            ty=float(b.sum()),
            xxxx=float(a @ a),
            yyyy=float(b @ b),
            xxyy=float(a @ b),
        )


def _moments_of(x: np.ndarray, y: np.ndarray, x_owned: bool, y_owned: bool) -> Moments:
    m = Moments(x.shape[1], y.shape[1])
    return m._add_chunk(x, y, x_owned, y_owned)


def _require_variance(tx: float, ty: float, metric: str) -> None:
    for side, t in (("X", tx), ("Y", ty)):
        if not t > 0:
            raise ValueError(f"{metric} is undefined: {side} has zero variance (all rows identical); need varying rows")


def cka_from_stats(st: KernelStats) -> float:
    """Linear CKA (Kornblith et al. 2019): ``||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F)``."""
    _require_variance(st.tx, st.ty, "linear_cka")
    return float(st.hxy / math.sqrt(st.hxx * st.hyy))


def hsic_unbiased(h: float, t1: float, t2: float, q: float, n: int) -> float:
    """Song et al. (2012) unbiased HSIC for linear kernels, written in centred sums.

    With ``K~ = K - diag(K)`` the estimator is
    ``[tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``. It is invariant
    to translating either side, so it may be evaluated on centred rows, where
    ``tr(K~L~) = ||Cxy||_F^2 - sum a_i b_i``, ``1'K~1 = -tr Cxx`` and ``1'K~L~1 = sum a_i b_i``
    (``a_i = |u_i|^2``, ``b_i = |v_i|^2``).
    """
    return (h - q * n / (n - 2) + t1 * t2 / ((n - 1) * (n - 2))) / (n * (n - 3))


def debiased_cka_from_stats(st: KernelStats) -> float:
    """Debiased linear CKA: CKA with every HSIC replaced by the unbiased estimator."""
    check_n(st.n, min_n=4, metric="debiased_cka")
    _require_variance(st.tx, st.ty, "debiased_cka")
    hxy = hsic_unbiased(st.hxy, st.tx, st.ty, st.xxyy, st.n)
    hxx = hsic_unbiased(st.hxx, st.tx, st.tx, st.xxxx, st.n)
    hyy = hsic_unbiased(st.hyy, st.ty, st.ty, st.yyyy, st.n)
    for side, h in (("X", hxx), ("Y", hyy)):
        if not h > 0:
            raise ValueError(
                f"debiased_cka is undefined: the unbiased HSIC of {side} with itself is {h:.3g} <= 0 "
                f"(n={st.n} too small for this data); use more rows"
            )
    return float(hxy / math.sqrt(hxx * hyy))


def procrustes_from_parts(cxy_nuclear: float, tx: float, ty: float) -> float:
    """``2 - 2 ||Xc^T Yc||_* / (||Xc||_F ||Yc||_F)``, clipped at 0 against rounding."""
    _require_variance(tx, ty, "procrustes")
    return float(max(0.0, 2.0 - 2.0 * cxy_nuclear / math.sqrt(tx * ty)))


def procrustes_from_moments(m: Moments) -> float:
    check_n(m.n, min_n=2, metric="procrustes")
    nuc = float(svdvals(m.cxy).sum())
    return procrustes_from_parts(nuc, float(np.trace(m.cxx)), float(np.trace(m.cyy)))


def cosine_from_parts(cos_sum: float | None, zero: int, n: int, d1: int, d2: int) -> float:
    if d1 != d2:
        raise ValueError(f"cosine needs the same width on both sides (d1 == d2), got d1={d1}, d2={d2}")
    if cos_sum is None:
        raise ValueError("cosine was not accumulated: these moments were made with cosine=False")
    check_n(n, min_n=1, metric="cosine")
    if zero:
        raise ValueError(
            f"cosine is undefined for zero vectors: {zero} of {n} rows are all-zero in X or Y; drop them first"
        )
    return float(cos_sum / n)


# ---------------------------------------------------------------------- public, in-memory


def linear_cka(X: Any, Y: Any) -> float:
    """Linear centred kernel alignment (Kornblith et al., ICML 2019), in float64.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X X^T``, ``L = Y Y^T`` and the
    biased estimator ``HSIC = tr(K H L H) / (n-1)^2``; equivalently
    ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centred data. In [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either side. ``X: [n, d1]``,
    ``Y: [n, d2]`` (NumPy or torch), ``n >= 2``. Biased upwards for small ``n`` and large ``d``;
    see :func:`debiased_cka`.
    """
    x, xo = as_matrix(X, "X")
    y, yo = as_matrix(Y, "Y")
    check_pair(x, y, min_n=2, metric="linear_cka")
    return cka_from_stats(KernelStats.from_arrays(x, y, x_owned=xo, y_owned=yo))


def debiased_cka(X: Any, Y: Any) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al., JMLR 2012), as in Kornblith et al. 2019.

    ``HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``
    with ``K~``, ``L~`` the linear Gram matrices with zeroed diagonals; the result is
    ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))``. Close to 0 for independent
    representations at any ``n`` (the biased CKA is not) and may be slightly negative. Needs
    ``n >= 4``; raises when a self-HSIC estimate is not positive.
    """
    x, xo = as_matrix(X, "X")
    y, yo = as_matrix(Y, "Y")
    check_pair(x, y, min_n=4, metric="debiased_cka")
    return debiased_cka_from_stats(KernelStats.from_arrays(x, y, x_owned=xo, y_owned=yo))


def procrustes(X: Any, Y: Any) -> float:
    """Orthogonal Procrustes distance (Ding, Denain & Steinhardt, NeurIPS 2021), in [0, 2].

    Columns are centred and each side is divided by its Frobenius norm; then
    ``d = min_Q ||X - Y Q||_F^2 = 2 - 2 ||X^T Y||_*`` over orthogonal ``Q`` (nuclear norm ``||.||_*``).
    This is the *squared* distance; take the square root for a metric. When ``d1 != d2`` the
    narrower side is implicitly zero-padded to the wider width (as Ding et al. do): the nuclear
    norm of the ``d1 x d2`` cross product is unchanged by padding, so no padding is materialised.
    Symmetric; 0 iff ``Y`` is an orthogonal transform of ``X`` (after centring and scaling).
    """
    x, xo = as_matrix(X, "X")
    y, yo = as_matrix(Y, "Y")
    n = check_pair(x, y, min_n=2, metric="procrustes")
    u = np.subtract(x, x.mean(axis=0), out=x if xo else None)
    v = np.subtract(y, y.mean(axis=0), out=y if yo else None)
    if n < min(u.shape[1], v.shape[1]):
        # Xc^T Yc = Q (R Yc) with Xc^T = Q R (thin QR): the nuclear norm is that of R Yc (n x d2).
        r = np.linalg.qr(u.T, mode="r")
        cross = r @ v
    else:
        cross = u.T @ v
    nuc = float(svdvals(cross).sum())
    return procrustes_from_parts(nuc, float(np.vdot(u, u)), float(np.vdot(v, v)))


def cosine(X: Any, Y: Any) -> float:
    """Mean cosine similarity of aligned rows, ``mean_i x_i.y_i / (|x_i| |y_i|)``, on raw (uncentred) rows.

    Needs ``d1 == d2`` (the same basis on both sides, e.g. the residual stream of one model);
    raises for all-zero rows, where the cosine is undefined.
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    n = check_pair(x, y, min_n=1, metric="cosine")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cosine needs the same width on both sides (d1 == d2), got d1={x.shape[1]}, d2={y.shape[1]}")
    total, zero = row_cosine_sum(x, y)
    return cosine_from_parts(total, zero, n, x.shape[1], y.shape[1])
