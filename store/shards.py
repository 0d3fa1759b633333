"""Encode and decode Zarr v3 shards (the ``sharding_indexed`` codec) of Strata's arrays.

Strata's activation arrays are ``[rows, d]`` with one shard per unit and inner chunks of
whole rows, uncompressed (activations barely compress, and the write path must run at disk
speed). For that layout a shard is the unit's bytes in C order, chunk after chunk, followed by
the index: per chunk ``(offset, nbytes)`` as little-endian uint64, then the crc32c of the
index. Writing and reading it directly is ten times faster than going through zarr-python's
asyncio codec pipeline, and the files are exactly what zarr writes (tests check that zarr reads
them back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from google_crc32c import value as crc32c

from store.errors import CorruptionError

EMPTY = np.uint64(2**64 - 1)


def codec_config(chunk_rows: int, d: int) -> dict[str, Any]:
    """The ``sharding_indexed`` configuration this module reads and writes."""
    return {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [chunk_rows, d],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end",
        },
    }


@dataclass(frozen=True)
class ShardLayout:
    unit_rows: int
    chunk_rows: int
    d: int
    itemsize: int

    @property
    def n_chunks(self) -> int:
        return self.unit_rows // self.chunk_rows

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.d * self.itemsize

    @property
    def index_bytes(self) -> int:
        return 16 * self.n_chunks + 4

    def shard_nbytes(self, rows: int) -> int:
        return self.chunks_for(rows) * self.chunk_bytes + self.index_bytes

    def chunks_for(self, rows: int) -> int:
        return -(-rows // self.chunk_rows)

    def encode(self, data: np.ndarray) -> list[memoryview | bytes]:
        """Buffers that, written one after the other, form the shard of ``data`` (``rows <= unit_rows``)."""
        rows = data.shape[0]
        n = self.chunks_for(rows)
        body = memoryview(np.ascontiguousarray(data)).cast("B")
        pad = n * self.chunk_rows - rows
        index = np.full((self.n_chunks, 2), EMPTY, dtype="<u8")
        index[:n, 0] = np.arange(n, dtype=np.uint64) * np.uint64(self.chunk_bytes)
        index[:n, 1] = self.chunk_bytes
        raw = index.tobytes()
        tail = raw + int(crc32c(raw)).to_bytes(4, "little")
        parts: list[memoryview | bytes] = [body]
        if pad:
            # The last chunk is partly outside the unit's rows: zarr stores whole chunks,
            # so the rows past the end hold the fill value (zero).
            parts.append(bytes(pad * self.d * self.itemsize))
        parts.append(tail)
        return parts

    def decode_index(self, tail: bytes, *, where: str) -> np.ndarray:
        if len(tail) != self.index_bytes:
            raise CorruptionError(f"{where}: shard index has {len(tail)} bytes, expected {self.index_bytes}")
        raw, check = tail[:-4], int.from_bytes(tail[-4:], "little")
        if int(crc32c(raw)) != check:
            raise CorruptionError(f"{where}: shard index checksum mismatch (file truncated or overwritten)")
        return np.frombuffer(raw, dtype="<u8").reshape(self.n_chunks, 2)

    def check_contiguous(self, index: np.ndarray, rows: int, file_size: int, *, where: str) -> None:
        """Strata writes chunks in order with no gaps; anything else is not a file it wrote."""
        n = self.chunks_for(rows)
        expect_off = np.arange(n, dtype=np.uint64) * np.uint64(self.chunk_bytes)
        if not (np.array_equal(index[:n, 0], expect_off) and np.all(index[:n, 1] == self.chunk_bytes)):
            raise CorruptionError(f"{where}: shard index does not describe {rows} contiguous rows")
        if file_size != self.shard_nbytes(rows):
            raise CorruptionError(
                f"{where}: shard has {file_size} bytes, expected {self.shard_nbytes(rows)} for {rows} rows"
            )


def pick_chunk_rows(unit_rows: int, d: int, itemsize: int, target_bytes: int = 1 << 20) -> int:
    """The largest divisor of ``unit_rows`` whose chunk stays within ``target_bytes`` (at least one row)."""
    limit = max(1, target_bytes // (d * itemsize))
    best = 1
    i = 1
    while i * i <= unit_rows:
        if unit_rows % i == 0:
            for c in (i, unit_rows // i):
                if c <= limit and c > best:
                    best = c
        i += 1
    return best
