"""Stored dtypes. bfloat16 has no NumPy or Zarr dtype: its bits are stored as uint16 and the
logical dtype is recorded in the array's attributes; torch gets ``.view(torch.bfloat16)`` back."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from strata.store.errors import WriteMismatchError

# torch is imported only when tensors are involved: `strata ls` and readers that want NumPy
# should not pay its ~3 s import.

STORED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def _torch():  # noqa: ANN202
    import torch  # lazy: only torch conversions need it, and `import strata.store` must not pay its import

    return torch


def is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_dtype(dtype: str) -> str:
    if dtype not in STORED_DTYPES:
        raise ValueError(f"unknown stored dtype {dtype!r}; valid: {', '.join(STORED_DTYPES)}")
    return dtype


def storage_dtype(dtype: str) -> np.dtype:
    return _STORAGE[check_dtype(dtype)]


def to_storage(values: Any, dtype: str, *, what: str) -> np.ndarray:
    """Values (NumPy or torch, any floating dtype) as a C-contiguous array of storage dtype.

    Floating inputs are rounded to the stored dtype (round to nearest even, as torch does);
    anything else is refused, since an integer or boolean array here is always a mistake.
    """
    if is_tensor(values):
        torch = _torch()
        t = values.detach()
        if not t.is_floating_point():
            raise WriteMismatchError(f"{what}: dtype {t.dtype} is not floating point; expected float32, float16 or bfloat16")
        t = t.to(device="cpu", dtype=getattr(torch, dtype)).contiguous()
        if dtype == "bfloat16":
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    arr = np.asarray(values)
    if arr.dtype.kind != "f":
        raise WriteMismatchError(f"{what}: dtype {arr.dtype} is not floating point; expected float32, float16 or bfloat16")
    if dtype == "bfloat16":
        torch = _torch()
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # values beyond float16's range round to inf, as in torch
        return np.ascontiguousarray(arr, dtype=_STORAGE[dtype])


def to_torch(stored: np.ndarray, dtype: str) -> Any:
    """Stored values as a torch tensor of the logical dtype (bfloat16 exactly)."""
    torch = _torch()
    arr = np.ascontiguousarray(stored)
    if not arr.flags.writeable:  # torch refuses to share read-only memory (bytes from S3)
        arr = arr.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
