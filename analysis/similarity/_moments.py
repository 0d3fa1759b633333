"""Streaming float64 co-moments of two aligned representations: one pass, O(d^2) memory.

A :class:`Moments` holds everything the linear metrics (CKA, debiased CKA, CCA, SVCCA, PWCCA,
Procrustes, cosine, ridge R^2) need, for any number of rows ``n``. Every statistic is kept *about
the running mean* and two accumulators are combined with the pairwise update of Chan, Golub &
LeVeque (1979), extended to the third- and fourth-order sums that the unbiased HSIC estimator
needs. Each chunk is centred at its own mean before any product is formed, so a large common
offset (activations with mean 1e4) never enters a product; merging only re-expresses sums about a
shifted centre through exact polynomial identities. The result is the same for any chunking and
any number of merged parts, up to float64 rounding.

Fields (``u_i = x_i - mean_x``, ``v_i = y_i - mean_y``; all sums over the ``n`` rows seen):

- ``n``: rows (int);
- ``mean_x [d1]``, ``mean_y [d2]``: column means;
- ``cxx [d1, d1]``, ``cyy [d2, d2]``, ``cxy [d1, d2]``: co-moments ``sum u u^T``, ``sum v v^T``,
  ``sum u v^T`` (covariances times ``n - 1``);
- ``xxxx``, ``yyyy``, ``xxyy`` (scalars): ``sum |u|^4``, ``sum |v|^4``, ``sum |u|^2 |v|^2``;
- ``xx_x [d1]``, ``yy_x [d1]``: ``sum |u|^2 u``, ``sum |v|^2 u``;
- ``xx_y [d2]``, ``yy_y [d2]``: ``sum |u|^2 v``, ``sum |v|^2 v``;
- ``cos_sum``, ``cos_zero``: ``sum cos(x_i, y_i)`` of the raw (uncentred) rows over rows where
  both are non-zero, and the count of rows where one is zero; ``cos_sum`` is ``None`` unless
  ``d1 == d2``.

The third-order sums vanish from the metric formulas once everything is centred, but they are
needed to re-centre the fourth-order sums exactly when two accumulators are merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from typing import Any

import numpy as np

from ._checks import as_matrix

__all__ = ["Moments", "row_cosine_sum"]

FORMAT = "strata.similarity.moments/1"
_MATRICES = ("cxx", "cyy", "cxy")
_VECTORS = ("mean_x", "mean_y", "xx_x", "yy_x", "xx_y", "yy_y")
_SCALARS = ("xxxx", "yyyy", "xxyy")


def row_cosine_sum(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Sum of ``cos(x_i, y_i)`` over rows where both rows are non-zero, and the count of the others."""
    dots = np.einsum("ij,ij->i", x, y)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
    ok = norms > 0
    return float(np.sum(dots[ok] / norms[ok])), int(np.count_nonzero(~ok))


class Moments:
    """Running float64 co-moments of aligned row pairs ``(x_i, y_i)``; see the module docstring.

    ::

        m = Moments(d1, d2)
        for x, y in chunks:
            m.update(x, y)                      # numpy or torch chunks, any row count
        total = Moments.sum([m_task1, m_task2])  # partials from parallel tasks
        Moments.from_dict(m.to_dict())          # plain arrays, no pickle

    Memory is about ``8 (d1^2 + d2^2 + d1 d2)`` bytes (400 MB for ``d1 = d2 = 4096``);
    :meth:`update` costs three GEMMs per chunk (``X^T X``, ``Y^T Y``, ``X^T Y``) plus O(rows * d)
    work, and never modifies its inputs.
    """

    def __init__(self, d1: int, d2: int) -> None:
        if int(d1) < 1 or int(d2) < 1:
            raise ValueError(f"Moments needs d1 >= 1 and d2 >= 1 features, got d1={d1}, d2={d2}")
        self.d1, self.d2 = int(d1), int(d2)
        self.n = 0
        self.mean_x, self.mean_y = np.zeros(self.d1), np.zeros(self.d2)
        self.cxx = np.zeros((self.d1, self.d1))
        self.cyy = np.zeros((self.d2, self.d2))
        self.cxy = np.zeros((self.d1, self.d2))
        self.xx_x, self.yy_x = np.zeros(self.d1), np.zeros(self.d1)
        self.xx_y, self.yy_y = np.zeros(self.d2), np.zeros(self.d2)
        self.xxxx = self.yyyy = self.xxyy = 0.0
        self.cos_sum: float | None = 0.0 if self.d1 == self.d2 else None
        self.cos_zero = 0

    # ------------------------------------------------------------------ building

    @classmethod
    def from_arrays(cls, x: Any, y: Any, *, chunk_size: int | None = None) -> Moments:
        """Moments of whole arrays (one chunk, or chunks of ``chunk_size`` rows)."""
        xa, x_owned = as_matrix(x, "X")
        ya, y_owned = as_matrix(y, "Y")
        if xa.shape[0] != ya.shape[0]:
            raise ValueError(f"X has {xa.shape[0]} rows but Y has {ya.shape[0]}; rows must be aligned (same n)")
        m = cls(xa.shape[1], ya.shape[1])
        if chunk_size is None or chunk_size >= xa.shape[0]:
            return m._add_chunk(xa, ya, x_owned, y_owned)
        for s in range(0, xa.shape[0], int(chunk_size)):
            # Chunks of a private buffer are disjoint, so centring them in place is safe.
            m._add_chunk(xa[s : s + chunk_size], ya[s : s + chunk_size], x_owned, y_owned)
        return m

    def update(self, x: Any, y: Any) -> Moments:
        """Add a chunk of aligned rows, ``x: [rows, d1]``, ``y: [rows, d2]``; returns ``self``."""
        xa, x_owned = as_matrix(x, "x chunk")
        ya, y_owned = as_matrix(y, "y chunk")
        if xa.shape[0] != ya.shape[0]:
            raise ValueError(
                f"x chunk has {xa.shape[0]} rows but y chunk has {ya.shape[0]}; rows must be aligned (same n)"
            )
        if xa.shape[1] != self.d1 or ya.shape[1] != self.d2:
            raise ValueError(
                f"chunk widths ({xa.shape[1]}, {ya.shape[1]}) do not match these Moments' (d1, d2) = ({self.d1}, {self.d2})"
            )
        return self._add_chunk(xa, ya, x_owned, y_owned)

    def _add_chunk(self, x: np.ndarray, y: np.ndarray, x_owned: bool, y_owned: bool) -> Moments:
        rows = x.shape[0]
        if rows == 0:
            return self
        chunk = Moments(self.d1, self.d2)
        chunk.n = rows
        if chunk.cos_sum is not None:  # on the raw rows, before centring
            chunk.cos_sum, chunk.cos_zero = row_cosine_sum(x, y)
        # Two-pass within the chunk: centre first, so products never see the common offset.
        chunk.mean_x, chunk.mean_y = x.mean(axis=0), y.mean(axis=0)
        u = np.subtract(x, chunk.mean_x, out=x if x_owned else None)
        v = np.subtract(y, chunk.mean_y, out=y if y_owned else None)
        chunk.cxx, chunk.cyy, chunk.cxy = u.T @ u, v.T @ v, u.T @ v
        a, b = np.einsum("ij,ij->i", u, u), np.einsum("ij,ij->i", v, v)
        chunk.xxxx, chunk.yyyy, chunk.xxyy = float(a @ a), float(b @ b), float(a @ b)
        chunk.xx_x, chunk.yy_x, chunk.xx_y, chunk.yy_y = u.T @ a, u.T @ b, v.T @ a, v.T @ b
        if self.n == 0:
            self._assign(chunk, copy=False)  # the chunk is ours: take its arrays
            return self
        return self.merge(chunk)

    def _assign(self, other: Moments, *, copy: bool = True) -> None:
        self.n = other.n
        for name in (*_MATRICES, *_VECTORS):
            setattr(self, name, np.array(getattr(other, name), dtype=np.float64, copy=copy))
        self.xxxx, self.yyyy, self.xxyy = other.xxxx, other.yyyy, other.xxyy
        self.cos_sum, self.cos_zero = other.cos_sum, other.cos_zero

    # ------------------------------------------------------------------ combining

    def merge(self, other: Moments) -> Moments:
        """Add another accumulator's rows into this one (in place; ``other`` is untouched); returns ``self``.

        Both sides are re-expressed about the combined mean and summed. The centre shifts are
        computed from the difference of the two means (never from large absolute values), so
        merging stays exact to rounding whatever the offset of the data.
        """
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments, got {type(other).__name__}")
        if (other.d1, other.d2) != (self.d1, self.d2):
            raise ValueError(
                f"cannot merge Moments of widths (d1, d2) = ({other.d1}, {other.d2}) into ({self.d1}, {self.d2})"
            )
        if other.n == 0:
            return self
        if self.n == 0:
            self._assign(other)
            return self
        na, nb = self.n, other.n
        n = na + nb
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        # Shift of each part's centre relative to the combined mean: x - new_mean = u + delta.
        da, ea = -dx * (nb / n), -dy * (nb / n)
        db, eb = dx * (na / n), dy * (na / n)
        sa = _shift_corrections(self, da, ea)
        sb = _shift_corrections(other, db, eb)
        self.mean_x = self.mean_x + dx * (nb / n)
        self.mean_y = self.mean_y + dy * (nb / n)
        for name in ("xx_x", "yy_x", "xx_y", "yy_y"):
            setattr(self, name, getattr(self, name) + sa[name] + getattr(other, name) + sb[name])
        for name in _SCALARS:
            setattr(self, name, getattr(self, name) + sa[name] + getattr(other, name) + sb[name])
        # Chan et al.: C = Ca + Cb + na*da*da^T + nb*db*db^T = Ca + Cb + (na*nb/n) dx*dx^T, in place.
        w = na * nb / n
        self.cxx += other.cxx
        self.cxx += np.outer(dx * w, dx)
        self.cyy += other.cyy
        self.cyy += np.outer(dy * w, dy)
        self.cxy += other.cxy
        self.cxy += np.outer(dx * w, dy)
        self.n = n
        if self.cos_sum is not None and other.cos_sum is not None:
            self.cos_sum += other.cos_sum
        self.cos_zero += other.cos_zero
        return self

    @classmethod
    def sum(cls, parts: Iterable[Moments]) -> Moments:
        """A new accumulator holding the rows of every part (e.g. partials returned by Ray tasks)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Moments.sum needs at least one part, got none")
        total = cls(parts[0].d1, parts[0].d2)
        for p in parts:
            total.merge(p)
        return total

    def copy(self) -> Moments:
        """An independent copy."""
        out = Moments(self.d1, self.d2)
        out._assign(self)
        return out

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain NumPy arrays (scalars as 0-d arrays): safe for Ray, ``np.savez`` and Parquet blobs.

        No pickle is needed to read it back (``np.load(..., allow_pickle=False)`` works).
        """
        out: dict[str, np.ndarray] = {"format": np.array(FORMAT), "n": np.array(self.n, dtype=np.int64)}
        for name in (*_MATRICES, *_VECTORS):
            out[name] = np.array(getattr(self, name), dtype=np.float64, copy=True)
        for name in _SCALARS:
            out[name] = np.array(getattr(self, name), dtype=np.float64)
        if self.cos_sum is not None:
            out["cos_sum"] = np.array(self.cos_sum, dtype=np.float64)
        out["cos_zero"] = np.array(self.cos_zero, dtype=np.int64)
        return out

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Moments:
        """Rebuild from :meth:`to_dict` output (arrays or plain Python values); shapes are checked."""
        fmt = str(np.asarray(state.get("format", "")))
        if fmt != FORMAT:
            raise ValueError(f"not a Moments state: `format` is {fmt!r}, expected {FORMAT!r}")
        missing = [k for k in ("n", *_MATRICES, *_VECTORS, *_SCALARS) if k not in state]
        if missing:
            raise ValueError(f"Moments state is missing keys: {', '.join(missing)}")
        cxy = np.asarray(state["cxy"], dtype=np.float64)
        if cxy.ndim != 2:
            raise ValueError(f"Moments state `cxy` must be 2-D, got shape {cxy.shape}")
        m = cls(*cxy.shape)
        shapes = {"cxx": (m.d1, m.d1), "cyy": (m.d2, m.d2), "cxy": (m.d1, m.d2), "mean_x": (m.d1,),
                  "mean_y": (m.d2,), "xx_x": (m.d1,), "yy_x": (m.d1,), "xx_y": (m.d2,), "yy_y": (m.d2,)}
        for name, shape in shapes.items():
            arr = np.array(state[name], dtype=np.float64, copy=True)
            if arr.shape != shape:
                raise ValueError(f"Moments state `{name}` has shape {arr.shape}, expected {shape}")
            setattr(m, name, arr)
        m.n = int(np.asarray(state["n"]))
        if m.n < 0:
            raise ValueError(f"Moments state `n` must be >= 0, got {m.n}")
        for name in _SCALARS:
            setattr(m, name, float(np.asarray(state[name])))
        if m.cos_sum is not None:
            if "cos_sum" not in state:
                raise ValueError("Moments state with d1 == d2 is missing `cos_sum`")
            m.cos_sum = float(np.asarray(state["cos_sum"]))
        m.cos_zero = int(np.asarray(state.get("cos_zero", 0)))
        return m

    def save(self, path: str | PathLike[str]) -> None:
        """Write :meth:`to_dict` as an uncompressed ``.npz`` (no pickled objects)."""
        np.savez(path, **self.to_dict())

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Moments:
        """Read a file written by :meth:`save`, refusing pickled content."""
        with np.load(path, allow_pickle=False) as data:
            return cls.from_dict({k: data[k] for k in data.files})

    def __repr__(self) -> str:
        return f"Moments(d1={self.d1}, d2={self.d2}, n={self.n})"


def _shift_corrections(m: Moments, d: np.ndarray, e: np.ndarray) -> dict[str, Any]:
    """Increments that re-express ``m``'s third/fourth-order sums about a centre moved by ``-d, -e``.

    With ``m`` centred (``sum u = 0``) and ``u' = u + d``, ``v' = v + e``, ``a = |u|^2``,
    ``b = |v|^2``, expanding ``|u'|^2 = a + 2 u.d + |d|^2`` gives (``n`` rows, ``Tx = tr cxx``)::

        sum |u'|^2 u'    = xx_x + Tx d + 2 cxx d + n|d|^2 d
        sum |v'|^2 u'    = yy_x + Ty d + 2 cxy e + n|e|^2 d
        sum |u'|^4       = xxxx + 4 d.cxx.d + 4 xx_x.d + 2|d|^2 Tx + n|d|^4
        sum |u'|^2|v'|^2 = xxyy + 2 xx_y.e + 2 yy_x.d + 4 d.cxy.e + |e|^2 Tx + |d|^2 Ty + n|d|^2|e|^2

    and the mirror images for ``y``. Computed from ``m``'s values before it is changed.
    """
    n = float(m.n)
    tx, ty = float(np.trace(m.cxx)), float(np.trace(m.cyy))
    dd, ee = float(d @ d), float(e @ e)
    cxx_d, cyy_e = m.cxx @ d, m.cyy @ e
    cxy_e, cyx_d = m.cxy @ e, m.cxy.T @ d
    return {
        "xx_x": tx * d + 2 * cxx_d + n * dd * d,
        "yy_x": ty * d + 2 * cxy_e + n * ee * d,
        "xx_y": tx * e + 2 * cyx_d + n * dd * e,
        "yy_y": ty * e + 2 * cyy_e + n * ee * e,
        "xxxx": 4 * float(d @ cxx_d) + 4 * float(m.xx_x @ d) + 2 * dd * tx + n * dd * dd,
        "yyyy": 4 * float(e @ cyy_e) + 4 * float(m.yy_y @ e) + 2 * ee * ty + n * ee * ee,
        "xxyy": 2 * float(m.xx_y @ e) + 2 * float(m.yy_x @ d) + 4 * float(d @ cxy_e) + ee * tx + dd * ty + n * dd * ee,
    }
