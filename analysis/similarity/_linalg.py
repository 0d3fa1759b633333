"""Dense float64 linear algebra for the metrics, through ``torch.linalg``.

Why not NumPy/SciPy: on the machines this project runs on (OpenBLAS LAPACK), singular values of
a 2048 x 2048 matrix take 12-17 s through ``np.linalg.svd(compute_uv=False)`` or
``scipy.linalg.svdvals`` but 2.6 s through ``torch.linalg.svdvals`` (MKL); a full SVD 4.2 s vs
3.3 s. Every call here takes and returns float64 NumPy arrays, so callers never see torch.
The routines are the same LAPACK algorithms (divide and conquer), with the same accuracy.

Threads: matrices up to ``_ONE_THREAD_MAX`` (1024) wide run with torch on one thread. Measured on
2 cores shared with another process (d = 768): ``eigh`` 0.13-0.19 s and ``svdvals`` 0.11-0.16 s
on one thread; on two, 0.10 s at best but 1-8 s in runs where the other process held a core
(OpenMP threads wait for each other). At d = 2048: 2.3-2.6 s on one thread, 1.4-17 s on two.
Wider matrices keep torch's thread count, where many cores pay off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["eigh_desc", "svd", "svdvals"]

_ONE_THREAD_MAX = 1024


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


@contextmanager
def _threads_for(a: np.ndarray) -> Iterator[None]:
    """One torch thread for matrices up to ``_ONE_THREAD_MAX`` wide (see the module docstring)."""
    before = torch.get_num_threads()
    one = min(a.shape) <= _ONE_THREAD_MAX and before > 1
    if one:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one:
            torch.set_num_threads(before)


def svdvals(a: np.ndarray) -> np.ndarray:
    """Singular values, descending."""
    if a.size == 0:
        return np.zeros(0)
    with _threads_for(a):
        return torch.linalg.svdvals(_t(a)).numpy()


def svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``a = u diag(s) vt``, singular values descending."""
    with _threads_for(a):
        u, s, vt = torch.linalg.svd(_t(a), full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


def eigh_desc(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns, in the same order) of a symmetric matrix."""
    with _threads_for(c):
        w, v = torch.linalg.eigh(_t(c))
    return w.flip(0).numpy(), v.flip(1).numpy()
