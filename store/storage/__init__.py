"""Storage backends behind one small interface."""

from __future__ import annotations

import os
from typing import Any

from strata.store.errors import StorageError
from strata.store.storage._auth import auth_failure
from strata.store.storage._base import Buffers, Storage, as_parts
from strata.store.storage._fsspec import FsspecStorage
from strata.store.storage._local import LocalStorage

__all__ = ["Storage", "Buffers", "as_parts", "LocalStorage", "FsspecStorage", "open_storage", "public_options", "auth_failure"]

# fsspec/s3fs options that never carry a secret; everything else (key, secret, token,
# profile names, session objects, ...) is used but never recorded, logged or sent to a
# cluster this job did not start.
_PUBLIC = {"endpoint_url", "region_name", "anon", "use_ssl", "requester_pays", "default_block_size",
           "default_fill_cache", "default_cache_type", "version_aware", "s3_additional_kwargs"}
_PUBLIC_CLIENT = {"endpoint_url", "region_name", "use_ssl", "verify"}


def _strip_userinfo(value: Any) -> Any:
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        host, _, path = rest.partition("/")
        return f"{scheme}://{host.rsplit('@', 1)[1]}" + (f"/{path}" if path else "")
    return value


def public_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The non-secret part of ``storage_options``: what a manifest may record and a foreign
    cluster's workers may receive. URLs lose any ``user:password@``."""
    if options is None:
        return None
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k == "client_kwargs" and isinstance(v, dict):
            kept = {ck: _strip_userinfo(cv) for ck, cv in v.items() if ck in _PUBLIC_CLIENT}
            if kept:
                out[k] = kept
        elif k == "s3_additional_kwargs" and isinstance(v, dict):
            kept = {ck: cv for ck, cv in v.items() if not any(t in ck.lower() for t in ("key", "secret", "token", "password", "sse"))}
            if kept:
                out[k] = kept
        elif k in _PUBLIC:
            out[k] = _strip_userinfo(v)
    return out


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
