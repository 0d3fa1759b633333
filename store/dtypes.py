"""Stored dtypes. bfloat16 has no NumPy or Zarr dtype: its bits are stored as uint16 and the
logical dtype is recorded in the array's attributes; torch gets ``.view(torch.bfloat16)`` back."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from store.errors import WriteMismatchError

StoredDType = Literal["float32", "float16", "bfloat16"]
STORED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(dtype: str) -> str:
    if dtype not in STORED_DTYPES:
        raise ValueError(f"unknown stored dtype {dtype!r}; valid: {', '.join(STORED_DTYPES)}")
    return dtype


def storage_dtype(dtype: str) -> np.dtype:
    return _STORAGE[check_dtype(dtype)]


def torch_dtype(dtype: str) -> torch.dtype:
    return _TORCH[check_dtype(dtype)]


def to_storage(values: Any, dtype: str, *, what: str) -> np.ndarray:
    """Values (NumPy or torch, any floating dtype) as a C-contiguous array of storage dtype.

    Floating inputs are rounded to the stored dtype (round to nearest even, as torch does);
    anything else is refused, since an integer or boolean array here is always a mistake.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if not t.is_floating_point():
            raise WriteMismatchError(f"{what}: dtype {t.dtype} is not floating point; expected float32, float16 or bfloat16")
        t = t.to(device="cpu", dtype=_TORCH[dtype]).contiguous()
        if dtype == "bfloat16":
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    arr = np.asarray(values)
    if arr.dtype.kind != "f":
        raise WriteMismatchError(f"{what}: dtype {arr.dtype} is not floating point; expected float32, float16 or bfloat16")
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # values beyond float16's range round to inf, as in torch
        return np.ascontiguousarray(arr, dtype=_STORAGE[dtype])


def to_torch(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a torch tensor of the logical dtype (bfloat16 exactly)."""
    arr = np.ascontiguousarray(stored)
    if not arr.flags.writeable:  # torch refuses to share read-only memory (bytes from S3)
        arr = arr.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
