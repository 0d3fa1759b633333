"""Independent reference implementations, written from the papers' formulas.

Deliberately naive and shares no code with ``analysis.similarity``: explicit n x n Gram and
centring matrices, scipy.linalg QR/SVD, scipy.spatial/scipy.stats, brute-force loops.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg
from scipy.spatial.distance import cdist, pdist, squareform  # pdist: rbf reference only
from scipy.stats import spearmanr


def centring(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """tr(K H L H) / (n - 1)^2 (Gretton et al. 2005)."""
    h = centring(k.shape[0])
    return float(np.trace(k @ h @ l @ h)) / (k.shape[0] - 1) ** 2


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return hsic_biased(k, l) / np.sqrt(hsic_biased(k, k) * hsic_biased(l, l))


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, with explicit zero-diagonal Gram matrices."""
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    return float(
        (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one @ kt @ lt @ one))
        / (n * (n - 3))
    )


def hsic_ustatistic(k: np.ndarray, l: np.ndarray) -> float:
    """The U-statistic itself: average over ordered distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return hsic_unbiased(k, l) / np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Björck & Golub (1973): cosines of principal angles between the centred column spaces."""
    qx, _ = scipy.linalg.qr(x - x.mean(0), mode="economic")
    qy, _ = scipy.linalg.qr(y - y.mean(0), mode="economic")
    return scipy.linalg.svdvals(qx.T @ qy)[: min(x.shape[1], y.shape[1])]


def cca(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(canonical_correlations(x, y)))


def svd_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    """Raghu et al. (2017): project centred data on the top singular directions holding `keep` of sum(s^2)."""
    u, s, _ = scipy.linalg.svd(x - x.mean(0), full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(frac >= keep)) + 1
    return u[:, :k] * s[:k]


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    return cca(svd_reduce(x, keep), svd_reduce(y, keep))


def pwcca(x: np.ndarray, y: np.ndarray, use_x: bool) -> float:
    """Morcos et al. (2018) as in google/svcca's compute_pwcca, on centred neurons."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    qx, _ = scipy.linalg.qr(xc, mode="economic")
    qy, _ = scipy.linalg.qr(yc, mode="economic")
    u, s, vt = scipy.linalg.svd(qx.T @ qy)
    k = min(x.shape[1], y.shape[1])
    variates = qx @ u[:, :k] if use_x else qy @ vt[:k].T  # canonical variates of the chosen side, n x k
    p, _ = np.linalg.qr(variates)
    acts = xc if use_x else yc
    weights = np.abs(p.T @ acts).sum(axis=1)
    weights = weights / weights.sum()
    return float(weights @ s[:k])


def procrustes(x: np.ndarray, y: np.ndarray) -> float:
    """Ding et al. (2021): min over orthogonal R of ||A - B R||_F^2, centred, unit Frobenius norm, zero-padded."""
    a, b = x - x.mean(0), y - y.mean(0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    d = max(a.shape[1], b.shape[1])
    a = np.pad(a, ((0, 0), (0, d - a.shape[1])))
    b = np.pad(b, ((0, 0), (0, d - b.shape[1])))
    r, _ = scipy.linalg.orthogonal_procrustes(b, a)
    return float(np.linalg.norm(a - b @ r) ** 2)


def ridge_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, ridge: float) -> float:
    """Fit y ~ x on train rows (intercept unpenalised, penalty ridge * mean feature sum of squares), R^2 on test."""
    xt, yt = x[train], y[train]
    mx, my = xt.mean(0), yt.mean(0)
    xc = xt - mx
    lam = ridge * np.sum(xc**2) / x.shape[1]
    if ridge == 0:
        w = scipy.linalg.lstsq(xc, yt - my)[0]
    else:
        w = scipy.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (yt - my), assume_a="pos")
    pred = (x[test] - mx) @ w + my
    resid = y[test] - pred
    return float(1 - np.sum(resid**2) / np.sum((y[test] - y[test].mean(0)) ** 2))


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([xi @ yi / (np.linalg.norm(xi) * np.linalg.norm(yi)) for xi, yi in zip(x, y)]))


def rbf_gram(x: np.ndarray, sigma_frac: float) -> np.ndarray:
    dist = pdist(x)
    sigma = sigma_frac * np.median(dist)
    return np.exp(-squareform(dist) ** 2 / (2 * sigma**2))


def rbf_cka(x: np.ndarray, y: np.ndarray, sigma_frac: float, debiased: bool) -> float:
    k, l = rbf_gram(x, sigma_frac), rbf_gram(y, sigma_frac)
    h = hsic_unbiased if debiased else hsic_biased
    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def minibatch_cka(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> float:
    """Nguyen et al. (2021): average the unbiased HSICs over batches, then form CKA."""
    order = np.random.default_rng(seed).permutation(x.shape[0])
    hs = []
    for b in range(x.shape[0] // batch_size):
        rows = order[b * batch_size : (b + 1) * batch_size]
        k, l = x[rows] @ x[rows].T, y[rows] @ y[rows].T
        hs.append((hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l)))
    hxy, hxx, hyy = np.mean(hs, axis=0)
    return hxy / np.sqrt(hxx * hyy)


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int, metric: str) -> float:
    def neighbours(z: np.ndarray) -> list[set[int]]:
        d = cdist(z, z, metric=metric)
        out = []
        for i in range(z.shape[0]):
            order = [j for j in sorted(range(z.shape[0]), key=lambda j: (d[i, j], j)) if j != i]
            out.append(set(order[:k]))
        return out

    nx, ny = neighbours(x), neighbours(y)
    return float(np.mean([len(a & b) / k for a, b in zip(nx, ny)]))


def rdm_loop(z: np.ndarray, metric: str) -> np.ndarray:
    """Upper-triangle dissimilarities, one pair at a time."""
    out = []
    for i in range(z.shape[0]):
        for j in range(i + 1, z.shape[0]):
            a, b = z[i], z[j]
            if metric == "euclidean":
                out.append(np.sqrt(np.sum((a - b) ** 2)))
            elif metric == "cosine":
                out.append(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            else:
                out.append(1 - np.corrcoef(a, b)[0, 1])
    return np.array(out)


def rsa(x: np.ndarray, y: np.ndarray, metric: str) -> float:
    return float(spearmanr(rdm_loop(x, metric), rdm_loop(y, metric)).statistic)


def pair(n: int, d1: int, d2: int, *, seed: int = 0, noise: float = 0.5, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Related representations: anisotropic X, Y = X A + noise, both shifted by `offset`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d1)) * np.geomspace(3.0, 0.3, d1)
    y = x @ rng.standard_normal((d1, d2)) / np.sqrt(d1) + noise * rng.standard_normal((n, d2))
    return x + offset, y + offset
