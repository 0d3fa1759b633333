"""CCA family: mean canonical correlation, SVCCA (Raghu et al. 2017), PWCCA (Morcos et al. 2018).

All three start from the centred co-moments ``Cxx``, ``Cyy``, ``Cxy`` of a
:class:`~analysis.similarity.Moments` (in-memory arrays are one chunk). Each side is whitened
through its eigendecomposition ``C = V diag(w) V^T``: ``W = V_r diag(w_r^{-1/2})`` over the
retained directions ``r``, so ``W^T C W = I``; the canonical correlations are the singular values
of ``Wx^T Cxy Wy``, clipped to [0, 1], and there are ``k = min(rx, ry)`` of them.

Rank deficiency (dead neurons, collinear features, ``d >= n``) is handled by a pseudo-inverse:
directions with eigenvalue ``<= rtol * w_max`` (default ``rtol = 1e-10``) are dropped, i.e. CCA
runs in the numerical column space of each side; nothing is added to the diagonal. When
``rx + ry > n - 1`` at least ``rx + ry - (n - 1)`` correlations equal 1 by construction (two
subspaces of the ``(n-1)``-dimensional centred row space must intersect); this is logged as a
warning, since the number then says more about ``n`` than about the representations.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from ._checks import as_matrix, check_fraction, check_n, check_pair, check_positive
from ._linalg import eigh_desc, svd, svdvals
from ._moments import Moments

__all__ = ["cca", "svcca", "pwcca", "RANK_RTOL"]

logger = logging.getLogger(__name__)

RANK_RTOL = 1e-10
"""Eigenvalues of a covariance at or below ``RANK_RTOL * largest`` count as zero."""


class Spectra:
    """Eigendecompositions of ``Cxx`` and ``Cyy`` and the plain CCA solution, computed once.

    ``from_moments`` shares one instance between ``cca``, ``svcca`` and ``pwcca``: for
    ``d = 4096`` each decomposition costs tens of seconds on a few cores.
    """

    def __init__(self, m: Moments, *, rtol: float = RANK_RTOL) -> None:
        check_positive(rtol, "rtol")
        self.m, self.rtol = m, rtol
        self._eig: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._plain: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # CCA without truncation

    def eig(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (descending) and eigenvectors of ``Cxx`` (side ``"X"``) or ``Cyy``."""
        if side not in self._eig:
            self._eig[side] = eigh_desc(self.m.cxx if side == "X" else self.m.cyy)
        return self._eig[side]

    def whitener(self, side: str, *, keep: float | None, metric: str) -> np.ndarray:
        """``W`` with ``W^T C W = I`` on the retained eigendirections of ``C``, largest first.

        ``keep``: when given, retain only the top directions whose eigenvalues (squared singular
        values of the centred data) sum to at least ``keep`` of the total (SVCCA's 99%).
        """
        w, v = self.eig(side)
        if not w[0] > 0:
            raise ValueError(f"{metric} is undefined: {side} has zero variance (all rows identical); need varying rows")
        r = int(np.count_nonzero(w > self.rtol * w[0]))
        if keep is not None:
            frac = np.cumsum(w[:r]) / w[w > 0].sum()
            r = min(r, int(np.searchsorted(frac, keep, side="left")) + 1)
        return v[:, :r] / np.sqrt(w[:r])

    def correlations(self, *, keep: float | None = None, metric: str = "cca") -> np.ndarray:
        """Canonical correlations only (descending, length ``k = min(rx, ry)``), clipped to [0, 1]."""
        if keep is None and self._plain is not None:
            return self._plain[0]
        wx, wy = self._whiteners(keep, metric)
        s = svdvals(wx.T @ self.m.cxy @ wy)
        return np.clip(s[: min(wx.shape[1], wy.shape[1])], 0.0, 1.0)

    def canonical(self, *, metric: str = "cca") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Canonical correlations ``rho`` (descending, length ``k``) and canonical weights ``A``, ``B``.

        ``A: [d1, k]``, ``B: [d2, k]``; the canonical variates ``Xc A`` and ``Yc B`` have unit
        norm (``A^T Cxx A = I``) and ``A[:, j]^T Cxy B[:, j] = rho_j``.
        """
        if self._plain is None:
            wx, wy = self._whiteners(None, metric)
            u, s, vt = svd(wx.T @ self.m.cxy @ wy)
            k = min(wx.shape[1], wy.shape[1])
            self._plain = (np.clip(s[:k], 0.0, 1.0), wx @ u[:, :k], wy @ vt[:k].T)
        return self._plain

    def _whiteners(self, keep: float | None, metric: str) -> tuple[np.ndarray, np.ndarray]:
        m = self.m
        check_n(m.n, min_n=2, metric=metric)
        wx = self.whitener("X", keep=keep, metric=metric)
        wy = self.whitener("Y", keep=keep, metric=metric)
        rx, ry = wx.shape[1], wy.shape[1]
        if rx + ry > m.n - 1:
            logger.warning(
                "%s: dimensions %d + %d exceed n - 1 = %d rows; at least %d canonical correlations are 1 by construction",
                metric, rx, ry, m.n - 1, rx + ry - (m.n - 1),
            )
        return wx, wy


def cca_from_moments(m: Moments, *, rtol: float = RANK_RTOL, spectra: Spectra | None = None) -> float:
    rho = (spectra or Spectra(m, rtol=rtol)).correlations(metric="cca")
    return float(rho.mean())


def svcca_from_moments(
    m: Moments, *, keep: float = 0.99, rtol: float = RANK_RTOL, spectra: Spectra | None = None
) -> float:
    check_fraction(keep, "keep")
    rho = (spectra or Spectra(m, rtol=rtol)).correlations(keep=keep, metric="svcca")
    return float(rho.mean())


def pwcca_from_moments(
    m: Moments,
    *,
    side: Literal["auto", "x", "y"] = "auto",
    rtol: float = RANK_RTOL,
    spectra: Spectra | None = None,
) -> float:
    if side not in ("auto", "x", "y"):
        raise ValueError(f"`side` must be 'auto', 'x' or 'y', got {side!r}")
    rho, a, b = (spectra or Spectra(m, rtol=rtol)).canonical(metric="pwcca")
    use_x = side == "x" or (side == "auto" and m.d1 <= m.d2)
    c, w = (m.cxx, a) if use_x else (m.cyy, b)
    # <h_j, z_i> for unit-norm variate h_j = Zc w_j and centred neuron column z_i is (C w_j)_i.
    alpha = np.abs(c @ w).sum(axis=0)
    return float(alpha @ rho / alpha.sum())


# ---------------------------------------------------------------------- public, in-memory


def _moments(X: Any, Y: Any, metric: str) -> Moments:
    x, xo = as_matrix(X, "X")
    y, yo = as_matrix(Y, "Y")
    check_pair(x, y, min_n=2, metric=metric)
    return Moments(x.shape[1], y.shape[1])._add_chunk(x, y, xo, yo)


def cca(X: Any, Y: Any, *, rtol: float = RANK_RTOL) -> float:
    """Mean canonical correlation between ``X: [n, d1]`` and ``Y: [n, d2]``, in [0, 1].

    The mean of the ``min(rx, ry)`` canonical correlations (``r`` = numerical rank of each side's
    covariance; directions with eigenvalue ``<= rtol * max`` are dropped, a pseudo-inverse rather
    than a ridge). Invariant to invertible linear maps of either side. See the module docstring
    for the ``d >= n`` caveat.
    """
    return cca_from_moments(_moments(X, Y, "cca"), rtol=rtol)


def svcca(X: Any, Y: Any, keep: float = 0.99, *, rtol: float = RANK_RTOL) -> float:
    """SVCCA (Raghu et al., NeurIPS 2017): mean CCA of the top singular subspaces, in [0, 1].

    Per side the columns are centred, and the data are projected on the fewest top right
    singular vectors whose *squared* singular values (variances) hold at least ``keep`` of the
    total; then :func:`cca` on the two projections. ``keep = 1`` keeps every non-null direction.
    """
    return svcca_from_moments(_moments(X, Y, "svcca"), keep=keep, rtol=rtol)


def pwcca(X: Any, Y: Any, *, side: Literal["auto", "x", "y"] = "auto", rtol: float = RANK_RTOL) -> float:
    """Projection-weighted CCA (Morcos, Raghu & Bengio, NeurIPS 2018), in [0, 1].

    ``PWCCA = sum_j alpha_j rho_j`` with ``alpha_j ∝ sum_i |<h_j, z_i>|``, normalised to sum to
    1, where ``h_j`` is the j-th canonical variate of one side scaled to unit L2 norm over the
    ``n`` rows, and ``z_i`` is that side's i-th neuron: its centred activation column (not
    unit-normalised). ``side="auto"`` weights by the side with fewer neurons (``X`` when
    ``d1 <= d2``), as the reference code does; so PWCCA is not symmetric when ``d1 == d2``.
    Differences from google/svcca's ``compute_pwcca``: neuron means are not added back to the
    variates, and the ``Y`` branch uses ``Y`` (the reference code projects ``acts1`` there).
    """
    return pwcca_from_moments(_moments(X, Y, "pwcca"), side=side, rtol=rtol)
