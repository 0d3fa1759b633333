"""Storage backends behind one small interface."""

from __future__ import annotations

import os
from typing import Any

from store.errors import StorageError
from store.storage._base import Storage
from store.storage._fsspec import FsspecStorage
from store.storage._local import LocalStorage

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "open_storage"]


def open_storage(
    uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, durable: bool = False, create: bool = True
) -> Storage:
    """A backend for ``uri``: a local folder, ``file://...``, or ``s3://bucket/prefix``.
    ``durable`` (local only) fsyncs each file before it becomes visible; S3 writes are durable
    when acknowledged. ``create=False`` refuses a local root that does not exist (and creates
    nothing)."""
    if not isinstance(uri, (str, os.PathLike)):
        raise StorageError(f"store URI must be a path or a string such as './acts' or 's3://bucket/prefix', got {type(uri).__name__}")
    text = os.fspath(uri)
    if not text.strip():
        raise StorageError("store URI is empty; give a local folder such as './acts' or 's3://bucket/prefix'")
    if "://" not in text:
        return LocalStorage(text, durable=durable, create=create)
    protocol = text.split("://", 1)[0]
    if protocol == "file":
        return LocalStorage(text[len("file://") :], durable=durable, create=create)
    return FsspecStorage(text, storage_options)
