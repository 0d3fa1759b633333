"""Metrics that need all pairs of rows: RBF CKA, minibatch CKA, mutual k-NN, RSA.

These hold ``n x n`` matrices (``8 n^2`` bytes each), so they run on a sample of rows that the
caller draws (seeded) and passes in as arrays; a few thousand rows is the intended size.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import rankdata

from ._checks import as_matrix, check_pair, check_positive
from ._cka import KernelStats, hsic_unbiased

__all__ = ["rbf_cka", "minibatch_cka", "mutual_knn", "rsa"]

_BLOCK = 1024  # rows per block in the k-NN search, so memory stays O(block * n)


def _sq_dists(z: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, from column-centred data (less cancellation), zero diagonal."""
    zc = z - z.mean(axis=0)
    g = zc @ zc.T
    a = np.diagonal(g)
    d2 = np.maximum(a[:, None] + a[None, :] - 2.0 * g, 0.0)
    np.fill_diagonal(d2, 0.0)
    return d2


def _centre_gram(k: np.ndarray) -> np.ndarray:
    return k - k.mean(axis=0)[None, :] - k.mean(axis=1)[:, None] + k.mean()


def hsic_unbiased_gram(kx: np.ndarray, ky: np.ndarray) -> float:
    """Unbiased HSIC of Song et al. (2012) from two ``n x n`` symmetric Gram matrices (n >= 4)."""
    n = kx.shape[0]
    kt, lt = kx.copy(), ky.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    k1, l1 = kt.sum(axis=0), lt.sum(axis=0)
    return float(
        (np.vdot(kt, lt) + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))
    )


def rbf_cka(X: Any, Y: Any, sigma_frac: float = 0.8, *, debiased: bool = False) -> float:
    """CKA with Gaussian RBF kernels (Kornblith et al., ICML 2019), on a sample of rows.

    ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`` with ``sigma = sigma_frac * median_{i<j} |x_i - x_j|``,
    chosen per side (so isotropic scaling of a side changes nothing). The median runs over distinct
    pairs; Kornblith et al.'s notebook takes it over the full matrix, zero diagonal included.
    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the biased ``tr(KHLH)``, or with
    Song et al.'s unbiased HSIC when ``debiased=True`` (needs ``n >= 4``).
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    n = check_pair(x, y, min_n=4 if debiased else 3, metric="rbf_cka")
    check_positive(sigma_frac, "sigma_frac")
    iu = np.triu_indices(n, k=1)
    grams = []
    for side, z in (("X", x), ("Y", y)):
        d2 = _sq_dists(z)
        med = float(np.median(np.sqrt(d2[iu])))
        if not med > 0:
            raise ValueError(f"rbf_cka is undefined: the median pairwise distance of {side} is 0 (mostly identical rows)")
        grams.append(np.exp(-d2 / (2.0 * (sigma_frac * med) ** 2)))
    kx, ky = grams
    if debiased:
        hxy, hxx, hyy = hsic_unbiased_gram(kx, ky), hsic_unbiased_gram(kx, kx), hsic_unbiased_gram(ky, ky)
        if not (hxx > 0 and hyy > 0):
            raise ValueError(f"rbf_cka (debiased) is undefined: a self-HSIC estimate is <= 0 with n={n}; use more rows")
    else:
        kc, lc = _centre_gram(kx), _centre_gram(ky)
        hxy, hxx, hyy = float(np.vdot(kc, lc)), float(np.vdot(kc, kc)), float(np.vdot(lc, lc))
    return float(hxy / math.sqrt(hxx * hyy))


def minibatch_cka(X: Any, Y: Any, *, batch_size: int = 256, seed: int | None = 0) -> float:
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith, ICLR 2021).

    Rows are shuffled with ``seed`` (``None``: kept in order) and cut into ``n // batch_size``
    batches of exactly ``batch_size`` rows (a smaller remainder is dropped, so every batch has
    the same estimator variance). For each batch the unbiased linear HSIC of Song et al. (2012)
    is computed; then ``CKA = mean HSIC(X, Y) / sqrt(mean HSIC(X, X) * mean HSIC(Y, Y))``.
    Because the unbiased HSIC is unbiased at any batch size, this converges to the population
    CKA as batches accumulate, unlike averaging per-batch CKA values.
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    if int(batch_size) != batch_size or batch_size < 4:
        raise ValueError(f"`batch_size` must be an integer >= 4 (unbiased HSIC needs 4 rows), got {batch_size!r}")
    batch_size = int(batch_size)
    n = check_pair(x, y, min_n=batch_size, metric=f"minibatch_cka with batch_size={batch_size}")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    sums = np.zeros(3)
    batches = n // batch_size
    for b in range(batches):
        rows = order[b * batch_size : (b + 1) * batch_size]
        st = KernelStats.from_arrays(x[rows], y[rows], x_owned=True, y_owned=True)
        sums += (
            hsic_unbiased(st.hxy, st.tx, st.ty, st.xxyy, st.n),
            hsic_unbiased(st.hxx, st.tx, st.tx, st.xxxx, st.n),
            hsic_unbiased(st.hyy, st.ty, st.ty, st.yyyy, st.n),
        )
    hxy, hxx, hyy = sums / batches
    if not (hxx > 0 and hyy > 0):
        raise ValueError(
            f"minibatch_cka is undefined: mean self-HSIC is <= 0 over {batches} batches (constant data?); use more rows"
        )
    return float(hxy / math.sqrt(hxx * hyy))


def _neighbours(z: np.ndarray, k: int, metric: str, side: str) -> np.ndarray:
    """Indices of the ``k`` nearest other rows of each row; ties go to the lower row index."""
    if metric == "cosine":
        norms = np.linalg.norm(z, axis=1)
        if np.any(norms == 0):
            raise ValueError(f"mutual_knn with metric='cosine': {side} has all-zero rows; drop them or use 'euclidean'")
        z = z / norms[:, None]
        bias = np.zeros(z.shape[0])
    else:
        z = z - z.mean(axis=0)
        bias = -0.5 * np.einsum("ij,ij->i", z, z)  # -|z_j|^2/2 + z_i.z_j ranks like -|z_i - z_j|^2
    out = np.empty((z.shape[0], k), dtype=np.int64)
    for s in range(0, z.shape[0], _BLOCK):
        score = z[s : s + _BLOCK] @ z.T + bias[None, :]
        rows = np.arange(s, s + score.shape[0])
        score[rows - s, rows] = -np.inf
        out[s : s + score.shape[0]] = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return out


def mutual_knn(X: Any, Y: Any, k: int = 10, *, metric: Literal["cosine", "euclidean"] = "cosine") -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al., ICML 2024, "The Platonic Representation Hypothesis").

    ``mean_i |N_X(i) ∩ N_Y(i)| / k`` where ``N_X(i)`` are the ``k`` rows nearest to row ``i`` in
    ``X``, self excluded. ``metric="cosine"`` (default) ranks by cosine similarity, as Huh et al.'s
    code does (L2-normalised features, inner products); ``"euclidean"`` by Euclidean distance.
    Ties are broken towards the lower row index. In [0, 1]; needs ``1 <= k <= n - 1``.
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"mutual_knn `metric` must be 'cosine' or 'euclidean', got {metric!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    k = int(k)
    n = check_pair(x, y, min_n=k + 1, metric=f"mutual_knn with k={k}")
    nx, ny = _neighbours(x, k, metric, "X"), _neighbours(y, k, metric, "Y")
    hits = 0
    for s in range(0, n, _BLOCK):
        a, b = nx[s : s + _BLOCK], ny[s : s + _BLOCK]
        hits += int((a[:, :, None] == b[:, None, :]).sum())
    return hits / (n * k)


def _rdm(z: np.ndarray, metric: str, side: str) -> np.ndarray:
    """Condensed dissimilarities (pairs ``i < j``, row-major). scipy's ``pdist`` works pair by pair,
    so equal dissimilarities come out exactly equal and rank as ties (a Gram-matrix shortcut would
    split them by rounding, which changes Spearman's rho on discrete data)."""
    if metric != "euclidean":
        zc = z - z.mean(axis=1, keepdims=True) if metric == "correlation" else z
        if np.any(~np.any(zc != 0, axis=1)):
            what = "constant" if metric == "correlation" else "all-zero"
            raise ValueError(f"rsa with metric={metric!r}: {side} has {what} rows, whose dissimilarity is undefined")
    return pdist(z, metric=metric)


def rsa(X: Any, Y: Any, metric: Literal["correlation", "cosine", "euclidean"] = "correlation") -> float:
    """Representational similarity analysis (Kriegeskorte et al. 2008), on a sample of rows.

    Builds each side's representational dissimilarity matrix over rows (``"correlation"``:
    ``1 - Pearson r`` between two rows' feature vectors; ``"cosine"``: ``1 - cos``;
    ``"euclidean"``) and returns the Spearman rank correlation (average ranks for ties) of their
    upper triangles. In [-1, 1]; needs ``n >= 3``.
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    if metric not in ("correlation", "cosine", "euclidean"):
        raise ValueError(f"rsa `metric` must be 'correlation', 'cosine' or 'euclidean', got {metric!r}")
    check_pair(x, y, min_n=3, metric="rsa")
    rx = rankdata(_rdm(x, metric, "X"))
    ry = rankdata(_rdm(y, metric, "Y"))
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if not denom > 0:
        raise ValueError("rsa is undefined: all dissimilarities on one side are equal; need varying rows")
    return float(rx @ ry / denom)
