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
  ``d1 == d2`` and the moments were made with ``cosine=True`` (the default; ``compare`` asks
  for them only when the ``cosine`` metric is requested: they cost a pass over each chunk).

The third-order sums vanish from the metric formulas once everything is centred, but they are
needed to re-centre the fourth-order sums exactly when two accumulators are merged.

**Precision of the per-chunk products** (``Moments(d1, d2, precision=...)``). The running sums
and every merge are always float64; ``precision`` says how one chunk's products are formed:

- ``"float64"``: the chunk is widened to float64, centred, and its products are float64 GEMMs.
  Every field equals the float64 sums over the rows to rounding (relative ~1e-15).
- ``"float32"``: the chunk is centred at its own float64 mean in two float32 steps (subtract the
  mean rounded to float32, then the rounding remainder: the rows are then centred to
  ``eps32 |u| + eps32^2 |mean|``, so a large offset still never enters a product), and
  ``X^T X``, ``Y^T Y``, ``X^T Y``, the row norms and the third-order sums are float32 BLAS
  products, added into the float64 sums. A float64 chunk is centred in float64 before it is
  rounded. The error is the float32 rounding of the centred products and does not depend on
  the data's offset. Measured on d = 768, 65,536 float16 rows in chunks of 16,384 (offsets 0.5
  and 1000): the co-moment matrices within 1e-7..6e-7 of float64 products, relative to their
  largest entry; relative error of the metrics: linear and debiased CKA 7e-10, Procrustes
  3e-8..8e-8, CCA 7e-8..1.4e-7, PWCCA 6e-7, SVCCA 7e-7..2.3e-6, cosine 1e-7..3e-7. Directions
  of near-zero variance get the same absolute error, so metrics that weight every direction
  equally (``cca``, ``pwcca``) move most when the data is nearly rank-deficient: on
  layer-norm-like float16 rows (exactly rank d - 1 before rounding to float16), CCA moved by
  4.5e-4 and PWCCA by 5e-5 relative, SVCCA and the CKAs by <= 4e-8; that direction is float16
  rounding noise either way. The three products cost 2.2x one float32 ``X^T Y`` (measured),
  about half of float64; the chunk buffers are float32 and reused.
- ``"auto"`` (default): ``"float32"`` for chunks whose two sides are both 16-bit floats (NumPy
  ``float16``, torch ``float16``/``bfloat16``: what a store read of float16 data returns). Such
  values are exact in float32 and carry ~3 significant digits (rounding ~5e-4 relative), far
  coarser than the products' rounding. Anything else (float32, float64, integers) uses
  ``"float64"``, so in-memory inputs keep float64 exactness. The in-memory metric functions
  (``linear_cka`` ...) always use float64.

Non-finite values raise a one-line ``ValueError`` either way; with float32 products, so do
centred values too large for float32 (``|x - mean|`` beyond ~1e19), naming ``"float64"`` as the
way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from typing import Any, Literal

import numpy as np
import torch

from ._checks import as_matrix, is_torch

__all__ = ["PRECISIONS", "Moments", "row_cosine_sum"]

Precision = Literal["auto", "float32", "float64"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "float64")

FORMAT = "strata.similarity.moments/1"
_MATRICES = ("cxx", "cyy", "cxy")
_VECTORS = ("mean_x", "mean_y", "xx_x", "yy_x", "xx_y", "yy_y")
_SCALARS = ("xxxx", "yyyy", "xxyy")


def row_cosine_sum(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Sum of ``cos(x_i, y_i)`` over rows where both rows are non-zero, and the count of the others.

    Float32 rows are summed in float32 (cosines to ~1e-7), in float64 if their squares overflow."""
    dots, xx, yy = np.einsum("ij,ij->i", x, y), np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    if x.dtype == np.float32 and not (np.isfinite(xx).all() and np.isfinite(yy).all() and np.isfinite(dots).all()):
        return row_cosine_sum(x.astype(np.float64), y.astype(np.float64))
    norms = np.sqrt(xx.astype(np.float64, copy=False) * yy)
    ok = norms > 0
    return float(np.sum(dots[ok] / norms[ok])), int(np.count_nonzero(~ok))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def is_half(x: Any) -> bool:
    """Whether ``x`` holds 16-bit floats (NumPy float16, torch float16 or bfloat16): exact in float32."""
    if is_torch(x):
        return str(x.dtype) in ("torch.float16", "torch.bfloat16")
    return getattr(x, "dtype", None) == np.float16


def fill32(out: np.ndarray, x: Any) -> bool:
    """Copy ``x`` (NumPy float16/float32 or a torch float tensor, any device) into the float32
    buffer ``out``, exactly. Returns False, copying nothing, when ``x`` is float64 (or not a float
    array): the caller centres it in float64 first."""

    if is_torch(x):
        if x.is_complex() or not x.is_floating_point() or x.dtype == torch.float64:
            return False
        torch.from_numpy(out).copy_(x.detach())  # vectorised half -> float conversion
        return True
    if x.dtype not in (np.float16, np.float32):
        return False
    if x.dtype == np.float16 and x.flags.writeable and all(s >= 0 for s in x.strides):
        torch.from_numpy(out).copy_(torch.from_numpy(x))  # ~4x faster than NumPy's float16 cast
    else:
        np.copyto(out, x)
    return True


def centre32(buf: np.ndarray, x: Any, filled: bool, name: str) -> np.ndarray:
    """Make ``buf`` hold ``x`` minus its column means, in float32; returns the float64 means.

    ``filled``: ``buf`` already holds ``x`` exactly (:func:`fill32`). Those rows are centred in
    two float32 steps: the mean rounded to float32, then what that rounding left, so they end up
    centred to ``eps32 |u| + eps32^2 |mean|``. Other rows (float64) are centred in float64 and
    then rounded.
    """
    if filled:
        mean = buf.mean(axis=0, dtype=np.float64)
        centre = mean.astype(np.float32)
        buf -= centre
        rest = (mean - centre).astype(np.float32)  # the float32 rounding of the mean, ~eps32 |mean|
        if rest.any():
            buf -= rest
        return mean
    wide, _ = as_matrix(x, name, finite=False)
    mean = wide.mean(axis=0)
    np.subtract(wide, mean, out=buf, casting="same_kind")
    return mean


def not_finite_error(sides: list[tuple[Any, str]]) -> ValueError:
    """The error for a chunk whose float32 products came out non-finite: the first side holding
    NaN or inf, else (every value finite: float32 overflowed) the side of the largest centred value."""
    largest, worst = -1.0, ""
    for x, name in sides:
        wide, _ = as_matrix(x, name, finite=False)
        bad = np.argwhere(~np.isfinite(wide))
        if bad.size:
            return ValueError(f"{name} contains NaN or inf (first at row {bad[0][0]}, column {bad[0][1]}); every value must be finite")
        big = float(np.max(np.abs(wide - wide.mean(axis=0)), initial=0.0))
        if big > largest:
            largest, worst = big, name
    return ValueError(f"{worst}: centred values up to {largest:.3g} overflow float32 products; use precision='float64'")


class Moments:
    """Running float64 co-moments of aligned row pairs ``(x_i, y_i)``; see the module docstring.

    ::

        m = Moments(d1, d2)
        for x, y in chunks:
            m.update(x, y)                      # numpy or torch chunks, any row count
        total = Moments.sum([m_task1, m_task2])  # partials from parallel tasks
        Moments.from_dict(m.to_dict())          # plain arrays, no pickle

    Memory is about ``8 (d1^2 + d2^2 + d1 d2)`` bytes (400 MB for ``d1 = d2 = 4096``), plus, with
    float32 products, two reused float32 chunk buffers (``4 rows (d1 + d2)`` bytes);
    :meth:`update` costs three products per chunk (``X^T X`` and ``Y^T Y`` as ``syrk``, ``X^T Y``)
    plus O(rows * d) work, and never modifies its inputs. ``precision`` (``"auto"``,
    ``"float32"``, ``"float64"``) is how each chunk's products are formed: see the module
    docstring.
    """

    def __init__(self, d1: int, d2: int, *, precision: Precision = "auto", cosine: bool = True) -> None:
        if int(d1) < 1 or int(d2) < 1:
            raise ValueError(f"Moments needs d1 >= 1 and d2 >= 1 features, got d1={d1}, d2={d2}")
        self.precision = check_precision(precision)
        self._bufs: tuple[np.ndarray, np.ndarray] | None = None  # float32 chunk buffers, reused
        self.d1, self.d2 = int(d1), int(d2)
        self.n = 0
        self.mean_x, self.mean_y = np.zeros(self.d1), np.zeros(self.d2)
        self.cxx = np.zeros((self.d1, self.d1))
        self.cyy = np.zeros((self.d2, self.d2))
        self.cxy = np.zeros((self.d1, self.d2))
        self.xx_x, self.yy_x = np.zeros(self.d1), np.zeros(self.d1)
        self.xx_y, self.yy_y = np.zeros(self.d2), np.zeros(self.d2)
        self.xxxx = self.yyyy = self.xxyy = 0.0
        self.cos_sum: float | None = 0.0 if self.d1 == self.d2 and cosine else None
        self.cos_zero = 0

    # ------------------------------------------------------------------ building

    @classmethod
    def from_arrays(cls, x: Any, y: Any, *, chunk_size: int | None = None, precision: Precision = "auto") -> Moments:
        """Moments of whole arrays (one chunk, or chunks of ``chunk_size`` rows)."""
        if check_precision(precision) == "float32" or (precision == "auto" and is_half(x) and is_half(y)):
            m = cls(*_widths(x, y), precision="float32")
            step = int(chunk_size or max(1, len(x)))
            for s in range(0, max(1, len(x)), step):
                m.update(x[s : s + step], y[s : s + step])
            return m
        xa, x_owned = as_matrix(x, "X")
        ya, y_owned = as_matrix(y, "Y")
        if xa.shape[0] != ya.shape[0]:
            raise ValueError(f"X has {xa.shape[0]} rows but Y has {ya.shape[0]}; rows must be aligned (same n)")
        m = cls(xa.shape[1], ya.shape[1], precision=precision)
        if chunk_size is None or chunk_size >= xa.shape[0]:
            return m._add_chunk(xa, ya, x_owned, y_owned)
        for s in range(0, xa.shape[0], int(chunk_size)):
            # Chunks of a private buffer are disjoint, so centring them in place is safe.
            m._add_chunk(xa[s : s + chunk_size], ya[s : s + chunk_size], x_owned, y_owned)
        return m

    def update(self, x: Any, y: Any) -> Moments:
        """Add a chunk of aligned rows, ``x: [rows, d1]``, ``y: [rows, d2]``; returns ``self``."""
        if self.precision == "float32" or (self.precision == "auto" and is_half(x) and is_half(y)):
            return self._add_chunk32(x, y)
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

    def _add_chunk32(self, x: Any, y: Any) -> Moments:
        """:meth:`update` with float32 products (see the module docstring)."""
        x, y = (t if is_torch(t) else np.asarray(t) for t in (x, y))
        (rows, w1), (rows_y, w2) = rows_and_width(x, "x chunk"), rows_and_width(y, "y chunk")
        if rows != rows_y:
            raise ValueError(f"x chunk has {rows} rows but y chunk has {rows_y}; rows must be aligned (same n)")
        if (w1, w2) != (self.d1, self.d2):
            raise ValueError(f"chunk widths ({w1}, {w2}) do not match these Moments' (d1, d2) = ({self.d1}, {self.d2})")
        if rows == 0:
            return self
        if self._bufs is None or self._bufs[0].shape[0] < rows:
            self._bufs = (np.empty((rows, self.d1), np.float32), np.empty((rows, self.d2), np.float32))
        u, v = self._bufs[0][:rows], self._bufs[1][:rows]  # leading rows: still C-contiguous
        fx, fy = fill32(u, x), fill32(v, y)
        cos: tuple[float, int] | None = None
        if self.cos_sum is not None:  # on the raw rows, before centring
            if fx and fy:
                cos = row_cosine_sum(u, v)
            else:  # a float64 side: in float64
                cos = row_cosine_sum(as_matrix(x, "x chunk", finite=False)[0], as_matrix(y, "y chunk", finite=False)[0])
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are checked below
            mean_x, mean_y = centre32(u, x, fx, "x chunk"), centre32(v, y, fy, "y chunk")
            cxx, cyy, cxy = u.T @ u, v.T @ v, u.T @ v  # syrk, syrk, gemm: float32 BLAS
            a, b = np.einsum("ij,ij->i", u, u), np.einsum("ij,ij->i", v, v)
            ab = np.stack([a, b])  # [2, rows] float32: the third-order sums as two small GEMMs
            tx, ty = ab @ u, ab @ v
            a, b = a.astype(np.float64), b.astype(np.float64)
            xxxx, yyyy, xxyy = float(a @ a), float(b @ b), float(a @ b)
        # NaN or inf in a row spreads to its column's mean, so to the diagonal and the third-order
        # sums; an overflow of the float32 products shows there too.
        checks = (mean_x, mean_y, np.diagonal(cxx), np.diagonal(cyy), tx, ty, [xxxx, yyyy, xxyy])
        if not all(np.isfinite(c).all() for c in checks):
            raise not_finite_error([(x, "x chunk"), (y, "y chunk")])
        chunk = Moments.__new__(Moments)
        chunk.d1, chunk.d2, chunk.precision, chunk._bufs = self.d1, self.d2, self.precision, None
        chunk.n, chunk.mean_x, chunk.mean_y = rows, mean_x, mean_y
        chunk.cxx, chunk.cyy, chunk.cxy = cxx.astype(np.float64), cyy.astype(np.float64), cxy.astype(np.float64)
        chunk.xxxx, chunk.yyyy, chunk.xxyy = xxxx, yyyy, xxyy
        chunk.xx_x, chunk.yy_x = tx.astype(np.float64)
        chunk.xx_y, chunk.yy_y = ty.astype(np.float64)
        chunk.cos_sum, chunk.cos_zero = (None, 0) if cos is None else cos
        if self.n == 0:
            self._assign(chunk, copy=False)
            return self
        return self.merge(chunk)

    def _add_chunk(self, x: np.ndarray, y: np.ndarray, x_owned: bool, y_owned: bool) -> Moments:
        rows = x.shape[0]
        if rows == 0:
            return self
        chunk = Moments(self.d1, self.d2, cosine=self.cos_sum is not None)
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
        # Cosines are known for the union only if both parts tracked them.
        self.cos_sum = None if self.cos_sum is None or other.cos_sum is None else self.cos_sum + other.cos_sum
        self.cos_zero += other.cos_zero
        return self

    @classmethod
    def sum(cls, parts: Iterable[Moments]) -> Moments:
        """A new accumulator holding the rows of every part (e.g. partials returned by Ray tasks)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Moments.sum needs at least one part, got none")
        total = cls(parts[0].d1, parts[0].d2, cosine=all(p.cos_sum is not None for p in parts))
        for p in parts:
            total.merge(p)
        return total

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bufs": None}  # the chunk buffers are scratch: never pickled

    def copy(self) -> Moments:
        """An independent copy."""
        out = Moments(self.d1, self.d2, precision=self.precision)
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
        # No `cos_sum`: made with cosine=False (or d1 != d2).
        m.cos_sum = float(np.asarray(state["cos_sum"])) if m.d1 == m.d2 and "cos_sum" in state else None
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
        return f"Moments(d1={self.d1}, d2={self.d2}, n={self.n}, precision={self.precision!r})"


def rows_and_width(x: Any, name: str) -> tuple[int, int]:
    """``(rows, width)`` of a 2-D NumPy array or torch tensor of real numbers."""
    if not is_torch(x):
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            raise ValueError(f"{name} has dtype {x.dtype}; expected a real numeric array (float, int or bool)")
    elif x.is_complex():
        raise ValueError(f"{name} is a complex tensor ({x.dtype}); similarity metrics need real values")
    if len(x.shape) != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


def _widths(x: Any, y: Any) -> tuple[int, int]:
    (rx, dx), (ry, dy) = rows_and_width(x, "X"), rows_and_width(y, "Y")
    if rx != ry:
        raise ValueError(f"X has {rx} rows but Y has {ry}; rows must be aligned (same n)")
    return dx, dy


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
