"""Held-out R^2 of ridge-regularised linear maps between representations, both directions, streaming.

Convention (for the map ``X -> Y``; ``Y -> X`` swaps the roles):

* Fit on the training part, with an unpenalised intercept (both sides centred at their
  *training* means) and ridge on the raw (not standardised) centred features, scaled to be
  dimensionless: ``W = (Cxx + ridge * (tr(Cxx) / d1) * I)^{-1} Cxy``, where ``Cxx``, ``Cxy`` are
  the training co-moments. ``ridge`` is thus relative to the mean per-feature variance and does
  not depend on ``n`` or on the scale of ``X``; ``ridge = 0`` gives the minimum-norm least-squares
  map (pseudo-inverse).
* Score on the held-out part: variance-weighted R^2 pooled over output dimensions,
  ``1 - sum_i |y_i - yhat_i|^2 / sum_i |y_i - mean_test(y)|^2`` (scikit-learn's
  ``r2_score(..., multioutput="variance_weighted")``). It can be negative.

The held-out residual sum of squares of a fixed affine map is a quadratic form in the held-out
moments: with ``u``, ``v`` centred at the test means and ``e = (mu_y,te - mu_y,tr) - (mu_x,te -
mu_x,tr) W``, ``RSS = tr Cyy - 2 tr(W^T Cxy) + tr(W^T Cxx W) + n_te |e|^2``. So both parts stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import as_matrix, check_n, check_pair, check_positive
from ._moments import Moments

__all__ = ["r2", "r2_from_moments"]


def _fit(cxx: np.ndarray, cxy: np.ndarray, ridge: float) -> np.ndarray:
    if ridge == 0:
        return np.linalg.lstsq(cxx, cxy, rcond=None)[0]
    tx = float(np.trace(cxx))
    a = cxx + np.eye(cxx.shape[0]) * (ridge * tx / cxx.shape[0])
    return np.linalg.solve(a, cxy)


def _score(
    w: np.ndarray,
    *,
    mu_x_tr: np.ndarray,
    mu_y_tr: np.ndarray,
    n_te: int,
    mu_x_te: np.ndarray,
    mu_y_te: np.ndarray,
    cxx: np.ndarray,
    cxy: np.ndarray,
    cyy: np.ndarray,
    direction: str,
) -> float:
    tss = float(np.trace(cyy))
    if not tss > 0:
        raise ValueError(f"r2 {direction} is undefined: the target has zero variance on the held-out part")
    e = (mu_y_te - mu_y_tr) - (mu_x_te - mu_x_tr) @ w
    rss = tss - 2.0 * float(np.vdot(w, cxy)) + float(np.vdot(w, cxx @ w)) + n_te * float(e @ e)
    return 1.0 - max(rss, 0.0) / tss


def r2_from_moments(train: Moments, test: Moments, *, ridge: float = 1e-3) -> dict[str, float]:
    """Ridge maps fit on ``train`` moments and scored on ``test`` moments, both directions.

    Returns ``{"x_to_y": R^2 of predicting Y from X, "y_to_x": R^2 of predicting X from Y}``; see
    the module docstring for the ridge and R^2 conventions.
    """
    check_positive(ridge, "ridge", allow_zero=True)
    if (train.d1, train.d2) != (test.d1, test.d2):
        raise ValueError(
            f"train moments have widths ({train.d1}, {train.d2}) but test moments ({test.d1}, {test.d2}); they must match"
        )
    check_n(train.n, min_n=2, metric="r2 (training part)")
    check_n(test.n, min_n=2, metric="r2 (held-out part)")
    for side, c in (("X", train.cxx), ("Y", train.cyy)):
        if not np.trace(c) > 0:
            raise ValueError(f"r2 is undefined: {side} has zero variance on the training part")
    w_xy = _fit(train.cxx, train.cxy, ridge)
    w_yx = _fit(train.cyy, train.cxy.T, ridge)
    return {
        "x_to_y": _score(
            w_xy, mu_x_tr=train.mean_x, mu_y_tr=train.mean_y, n_te=test.n, mu_x_te=test.mean_x,
            mu_y_te=test.mean_y, cxx=test.cxx, cxy=test.cxy, cyy=test.cyy, direction="x_to_y",
        ),
        "y_to_x": _score(
            w_yx, mu_x_tr=train.mean_y, mu_y_tr=train.mean_x, n_te=test.n, mu_x_te=test.mean_y,
            mu_y_te=test.mean_x, cxx=test.cyy, cxy=test.cxy.T, cyy=test.cxx, direction="y_to_x",
        ),
    }


def _rows(sel: Any, n: int, name: str) -> np.ndarray:
    try:
        idx = np.arange(n)[sel]
    except (IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a slice, integer index array or boolean mask over {n} rows: {exc}") from None
    return np.atleast_1d(idx)


def split_rows(n: int, train: Any, test: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out row indices; see :func:`r2`."""
    if train is None and test is None:
        train = 0.8
    if isinstance(train, float):
        if not 0.0 < train < 1.0:
            raise ValueError(f"`train` as a fraction must be in (0, 1), got {train}")
        if test is not None:
            raise ValueError("`test` must be None when `train` is a fraction (the rest is held out)")
        perm = np.random.default_rng(seed).permutation(n)
        cut = int(round(train * n))
        return np.sort(perm[:cut]), np.sort(perm[cut:])
    tr = _rows(train, n, "train") if train is not None else None
    te = _rows(test, n, "test") if test is not None else None
    if tr is None:
        tr = np.setdiff1d(np.arange(n), te)
    if te is None:
        te = np.setdiff1d(np.arange(n), tr)
    overlap = np.intersect1d(tr, te)
    if overlap.size:
        raise ValueError(f"`train` and `test` share {overlap.size} rows (first: {overlap[0]}); held-out rows must be unseen")
    return tr, te


def r2(X: Any, Y: Any, *, ridge: float = 1e-3, train: Any = None, test: Any = None, seed: int = 0) -> dict[str, float]:
    """Held-out R^2 of ridge linear maps ``X -> Y`` and ``Y -> X``.

    ``train``: a fraction (a random split seeded by ``seed``, the rest held out) or training rows
    (slice, index array or boolean mask); ``test``: held-out rows. A missing side is the other's
    complement; with neither, ``train=0.8``. The two parts must not overlap and need at least 2 rows each.
    ``ridge``: relative ridge, see the module docstring (default ``1e-3``). Returns
    ``{"x_to_y": float, "y_to_x": float}`` of variance-weighted held-out R^2.
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    n = check_pair(x, y, min_n=4, metric="r2")
    tr, te = split_rows(n, train, test, seed)
    m_tr = Moments(x.shape[1], y.shape[1])._add_chunk(x[tr], y[tr], True, True)
    m_te = Moments(x.shape[1], y.shape[1])._add_chunk(x[te], y[te], True, True)
    return r2_from_moments(m_tr, m_te, ridge=ridge)
