"""The narrow seam between dataset logic and where bytes live.

A backend is a handful of byte operations on keys (``/``-separated paths relative to the
store root) plus a Zarr store rooted at the same place. Everything above this module is
written once for every backend.
"""

from __future__ import annotations

import abc
from typing import Any

from zarr.abc.store import Store as ZarrStore

# Data to write: one buffer, or several written one after the other (a shard's body, its table
# of checksums and its index). A part may be a callable returning the buffer: it is called when
# the writer gets to it, so a part can still be computed while the parts before it are written.
Buffers = bytes | bytearray | memoryview | list


def as_parts(data: Buffers) -> list:
    return list(data) if isinstance(data, list) else [data]


def resolved(part: object) -> object:
    return part() if callable(part) else part


class Storage(abc.ABC):
    """Byte storage under one root URI."""

    uri: str

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; ``FileNotFoundError`` when missing."""

    def map(self, key: str) -> Any:
        """The whole object as a read-only buffer: memory-mapped where the backend can (no copy,
        pages come from the OS cache as they are touched), else read."""
        return self.read(key)

    def fetch(self, key: str, nbytes: int) -> Any:
        """The first ``nbytes`` of an object whose size is known (a committed file), as
        :meth:`map` gives it; remote backends fetch it as parallel ranged reads."""
        return self.map(key)

    def read_into(self, key: str, out: memoryview) -> int:
        """Fill ``out`` with the object's first bytes; returns how many there were."""
        if len(out) == 0:
            return 0
        data = self.read_range(key, 0, len(out))
        out[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object."""

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[Any]:
        """Several byte ranges of one object (backends batch them: one map, one request)."""
        return [self.read_range(key, a, b) for a, b in ranges]

    @abc.abstractmethod
    def write(self, key: str, data: Buffers) -> None:
        """Write an object atomically: readers see the old bytes or the new, never a part."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: Buffers) -> bool:
        """Create an object only if none exists, whole or not at all. True if this call created it."""

    @abc.abstractmethod
    def modified(self, key: str) -> float:
        """When the object was last written (seconds since the epoch); ``FileNotFoundError`` when missing."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; ``FileNotFoundError`` when missing."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted, fresh (no cached listing)."""

    def list_temporary(self, prefix: str) -> list[str]:
        """Temporary files under ``prefix`` that writers left (none on backends whose writes are
        atomic requests, such as S3)."""
        return []

    def links(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` that are symbolic links, which listings leave out and nothing
        follows (none on backends without links, such as S3)."""
        return []

    @abc.abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; no error when missing."""

    @abc.abstractmethod
    def zarr_store(self) -> ZarrStore:
        """A Zarr v3 store rooted at the same place."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
