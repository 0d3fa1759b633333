"""CKNNA: centered kernel nearest-neighbour alignment (Huh et al., ICML 2024, "The Platonic
Representation Hypothesis"), the kernel-alignment metric REPA (Yu et al. 2025) reports between a
diffusion transformer's hidden states and DINOv2.

Computed as the authors' ``AlignmentMetrics.cknna`` does with its defaults (``unbiased=True``,
``distance_agnostic=False``), in float64:

1. inner-product kernels ``K = X Xᵀ`` and ``L = Y Yᵀ`` (no centring, no normalisation of rows:
   L2-normalise the features first for cosine neighbours);
2. each row's ``k`` nearest other rows by kernel value, the diagonal left out (``k <= n - 1``);
   ``M_K[i, j] = 1`` when ``j`` is one of row ``i``'s neighbours in ``K`` (not symmetric);
3. ``HSIC(K, L)`` is Song et al.'s unbiased HSIC of ``M ⊙ K`` and ``M ⊙ L`` with ``M = M_K ⊙ M_L``
   (the neighbours both spaces share), ``HSIC(K, K)`` that of ``M_K ⊙ K`` with itself;
4. ``CKNNA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

The unbiased HSIC of two ``n x n`` matrices (diagonals zeroed to ``K~``, ``L~``) is
``[Σ_ij K~_ij L~_ji + (1ᵀK~1)(1ᵀL~1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀK~L~1] / (n(n-3))``, written for
matrices that a neighbour mask makes non-symmetric (the first term is ``tr(K~ L~)``).

Two departures, both where the authors' code cannot run or is not scale-free: ``k`` has no default
(theirs, ``None``, fails), and the denominator has no ``+ 1e-6`` (it would make the value depend on
the features' scale); a self-HSIC that is not positive raises instead. Ties between equal kernel
values go to the lower row index (``torch.topk`` leaves them unspecified). The value is not
symmetric in ``X`` and ``Y`` in general (``1ᵀK~L~1`` is not, for masked kernels). With
``k = n - 1`` every off-diagonal pair is kept and CKNNA is the debiased linear CKA (uncentred
kernels: the unbiased HSIC does not depend on the features' mean).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._checks import as_matrix, check_pair

__all__ = ["cknna", "check_k"]


def check_k(k: Any, n: int | None = None, *, metric: str = "cknna") -> int:
    """``k`` as an int in ``[2, n - 1]`` (the authors require ``k >= 2``); one-line ValueError otherwise."""
    if k is None or isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"{metric} needs an explicit integer `k` (neighbours per row, >= 2; Huh et al. and REPA use 10), got {k!r}")
    k = int(k)
    if k < 2:
        raise ValueError(f"{metric} needs `k` >= 2 neighbours per row, got {k}")
    if n is not None and k > n - 1:
        raise ValueError(f"{metric} with k={k} needs at least k + 1 = {k + 1} rows (a row is not its own neighbour), got n={n}")
    return k


def _neighbour_mask(kernel: np.ndarray, k: int) -> np.ndarray:
    """``M[i, j]``: ``j`` is among the ``k`` largest off-diagonal values of row ``i`` (ties: lower ``j``)."""
    n = kernel.shape[0]
    score = kernel.copy()
    np.fill_diagonal(score, -np.inf)
    # The k-th largest value of each row (a partition, not a sort: O(n) a row); everything above
    # it is in, and of the values equal to it the lowest-index ones fill the remaining places.
    top = np.argpartition(score, n - k, axis=1)[:, n - k :]
    kth = np.take_along_axis(score, top, axis=1).min(axis=1, keepdims=True)
    mask = score > kth
    tied = score == kth
    return mask | (tied & (np.cumsum(tied, axis=1) <= k - mask.sum(axis=1, keepdims=True)))


def _hsic_masked(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC of ``mask ⊙ a`` and ``mask ⊙ b`` (see the module docstring), from
    the mask's ``n k`` entries (the diagonal is never in it) rather than dense ``n x n`` products."""
    n = mask.shape[0]
    rows, cols = np.nonzero(mask)
    va, vb = a[rows, cols], b[rows, cols]
    ma = sp.csr_matrix((va, (rows, cols)), shape=(n, n))
    mb = sp.csr_matrix((vb, (cols, rows)), shape=(n, n))  # transposed: tr(A B) = Σ_ij A_ij B_ji
    trace = float(ma.multiply(mb).sum())
    sums = float(va.sum()) * float(vb.sum()) / ((n - 1) * (n - 2))
    cross = float(np.bincount(cols, va, n) @ np.bincount(rows, vb, n))  # 1ᵀ A B 1: column sums of A, row sums of B
    return (trace + sums - 2.0 * cross / (n - 2)) / (n * (n - 3))


def cknna(X: Any, Y: Any, k: int) -> float:
    """CKNNA of row-aligned ``X [n, d1]`` and ``Y [n, d2]`` with ``k`` neighbours per row (see the
    module docstring); needs ``n >= max(4, k + 1)``. NumPy arrays or torch tensors; float64 inside.

    ``n x n`` matrices (a few of ``8 n^2`` bytes): pass a sample of rows (``compare`` draws a seeded one).
    """
    x, _ = as_matrix(X, "X")
    y, _ = as_matrix(Y, "Y")
    k = check_k(k)
    n = check_pair(x, y, min_n=4, metric="cknna")
    check_k(k, n)
    kx, ky = x @ x.T, y @ y.T
    mx, my = _neighbour_mask(kx, k), _neighbour_mask(ky, k)
    hxy, hxx, hyy = _hsic_masked(mx & my, kx, ky), _hsic_masked(mx, kx, kx), _hsic_masked(my, ky, ky)
    for side, h in (("X", hxx), ("Y", hyy)):
        if not h > 0:
            raise ValueError(f"cknna is undefined: the masked self-HSIC of {side} is {h:.3g} <= 0 (n={n}, k={k}); "
                             "use more rows or a larger k")
    return float(hxy / math.sqrt(hxx * hyy))
