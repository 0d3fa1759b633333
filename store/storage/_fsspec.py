"""A store on any fsspec file system; S3 (through s3fs) is the one Strata tests.

Credentials, endpoint and options come from the usual AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...) or ``storage_options``; none of them is
ever written into the store.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
from zarr.storage import FsspecStore

from strata.store.errors import StorageError
from strata.store.storage._base import Buffers, Storage, as_parts, resolved


def _join(data: Buffers) -> bytes:
    # botocore takes bytes (not memoryviews), and one body per request.
    parts = [resolved(p) for p in as_parts(data)]
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(bytes(p) if not isinstance(p, (bytes, bytearray)) else p for p in parts)


class FsspecStorage(Storage):
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        protocol, _, rest = self.uri.partition("://")
        self.protocol = protocol
        self.fs = fsspec.filesystem(protocol, **self.storage_options)
        self.root = rest.strip("/")
        bucket = self.root.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"store URI {uri!r} names no bucket; expected {protocol}://bucket/prefix")
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError as e:
            raise StorageError(f"bucket {bucket!r} of store {uri!r} does not exist") from e
        except PermissionError as e:
            raise StorageError(f"no access to bucket {bucket!r} of store {uri!r}: {e}") from e

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:  # S3 answers an empty Range with the whole object
            return b""
        return self.fs.cat_file(self._path(key), start=start, end=end)

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        # One call: s3fs fetches the ranges concurrently.
        ranges = [(a, b) for a, b in ranges]
        wanted = [(a, b) for a, b in ranges if b > a]
        if not wanted:
            return [b"" for _ in ranges]
        path = self._path(key)
        got = iter(self.fs.cat_ranges([path] * len(wanted), [a for a, _ in wanted], [b for _, b in wanted], on_error="raise"))
        return [next(got) if b > a else b"" for a, b in ranges]

    FETCH_PART = 8 << 20  # ranged GETs of this size, fetched concurrently by s3fs

    def fetch(self, key: str, nbytes: int) -> Any:
        if nbytes <= self.FETCH_PART:
            return self.read_range(key, 0, nbytes) if nbytes > 0 else self.read(key)
        out = np.empty(nbytes, dtype=np.uint8)
        edges = list(range(0, nbytes, self.FETCH_PART)) + [nbytes]
        try:
            parts = self.read_ranges(key, list(zip(edges[:-1], edges[1:])))
        except OSError as e:
            if "not satisfiable" not in str(e):
                raise
            return self.read(key)  # shorter than its record says: the caller's size check names it
        at = 0
        for part in parts:
            n = len(part)
            out[at : at + n] = np.frombuffer(part, dtype=np.uint8)
            at += n
            if n == 0:
                break
        return out[:at]

    def write(self, key: str, data: Buffers) -> None:
        # A single PUT (or a completed multipart upload) is atomic on S3: readers see the old
        # object or the new one.
        self.fs.pipe_file(self._path(key), _join(data))

    def put_if_absent(self, key: str, data: Buffers) -> bool:
        # `mode="create"` sends `If-None-Match: *`; S3 answers 412 when the key exists.
        try:
            self.fs.pipe_file(self._path(key), _join(data), mode="create")
        except FileExistsError:
            return False
        except OSError as e:
            if "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def modified(self, key: str) -> float:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return self.fs.info(path)["LastModified"].timestamp()

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def size(self, key: str) -> int:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return int(self.fs.info(path)["size"])

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix).rstrip("/")
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        n = len(self.root) + 1
        return sorted(p[n:] for p in found)

    def list_dirs(self, prefix: str) -> list[str]:
        path = self._path(prefix).rstrip("/")
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def zarr_store(self) -> FsspecStore:
        return FsspecStore.from_url(self.uri, storage_options=self.storage_options)
