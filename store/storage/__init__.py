"""Storage backends behind one small interface."""

from __future__ import annotations

import os
from typing import Any

from store.storage._base import Storage
from store.storage._fsspec import FsspecStorage
from store.storage._local import LocalStorage

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "open_storage"]


def open_storage(
    uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, durable: bool = False
) -> Storage:
    """A backend for ``uri``: a local folder, ``file://...``, or ``s3://bucket/prefix``.
    ``durable`` (local only) fsyncs each file before it becomes visible; S3 writes are durable
    when acknowledged."""
    text = os.fspath(uri)
    if "://" not in text:
        return LocalStorage(text, durable=durable)
    protocol = text.split("://", 1)[0]
    if protocol == "file":
        return LocalStorage(text[len("file://") :], durable=durable)
    return FsspecStorage(text, storage_options)
