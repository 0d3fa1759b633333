"""Input conversion and validation shared by every similarity metric.

Every metric computes in float64 NumPy. Inputs may be NumPy arrays (any real dtype) or torch
tensors (any float dtype, any device, bfloat16 included); a torch tensor is converted with
``.detach().cpu().double().numpy()``. Problems raise a one-line :class:`ValueError` that names the
problem and what would be valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_matrix",
    "check_features",
    "check_fraction",
    "check_metric_names",
    "check_n",
    "check_pair",
    "check_positive",
]


def is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach")


def as_matrix(x: Any, name: str = "X", *, finite: bool = True) -> tuple[np.ndarray, bool]:
    """``x`` as a 2-D float64 NumPy array, plus whether that array is a private copy.

    The flag lets callers centre in place without touching the caller's memory: it is true only
    when a dtype or device conversion produced a new buffer.
    """
    if is_torch(x):
        if x.is_complex():
            raise ValueError(f"{name} is a complex tensor ({x.dtype}); similarity metrics need real values")
        owned = str(x.dtype) != "torch.float64" or x.device.type != "cpu"
        arr = x.detach().cpu().double().numpy()
    else:
        src = np.asarray(x)
        if not (np.issubdtype(src.dtype, np.floating) or np.issubdtype(src.dtype, np.integer) or src.dtype == np.bool_):
            raise ValueError(f"{name} has dtype {src.dtype}; expected a real numeric array (float, int or bool)")
        owned = src.dtype != np.float64
        arr = src.astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(arr.shape)}")
    if finite and arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} contains NaN or inf (first at row {bad[0]}, column {bad[1]}); every value must be finite"
        )
    return arr, owned


def check_pair(x: np.ndarray, y: np.ndarray, *, min_n: int, metric: str) -> int:
    """Check that two matrices have the same number of rows and at least ``min_n`` of them."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{metric}: X has {x.shape[0]} rows but Y has {y.shape[0]}; rows must be aligned (same n)"
        )
    return check_n(x.shape[0], min_n=min_n, metric=metric)


def check_n(n: int, *, min_n: int, metric: str) -> int:
    """Raise when ``n`` rows are too few for ``metric``."""
    if n < min_n:
        raise ValueError(f"{metric} needs at least {min_n} rows, got n={n}")
    return int(n)


def check_features(x: np.ndarray, name: str, metric: str) -> None:
    """Raise when a matrix has no feature columns."""
    if x.shape[1] < 1:
        raise ValueError(f"{metric}: {name} has 0 features; need at least 1 column")


def check_metric_names(metrics: Iterable[str] | str, valid: Sequence[str]) -> list[str]:
    """Names as a list, each checked against ``valid``."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in names:
        if m not in valid:
            raise ValueError(f"unknown metric {m!r}; valid metrics are: {', '.join(valid)}")
    return names


def check_fraction(value: float, name: str, *, low_open: bool = True) -> float:
    """A float in (0, 1] (or [0, 1] when ``low_open`` is false)."""
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok or not np.isfinite(v):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}")
    return v


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """A finite float > 0 (or >= 0)."""
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        rel = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {rel}, got {value!r}")
    return v
