"""Encode and decode Zarr v3 shards (the ``sharding_indexed`` codec) of Strata's arrays.

Strata's activation arrays are ``[rows, d]`` with one shard per unit and inner chunks of
whole rows, uncompressed (activations barely compress, and the write path must run at disk
speed). For that layout a shard is the unit's bytes in C order, chunk after chunk, followed by
the index: per chunk ``(offset, nbytes)`` as little-endian uint64, then the crc32c of the
index. Writing and reading it directly is ten times faster than going through zarr-python's
asyncio codec pipeline, and the files are exactly what zarr writes (tests check that zarr reads
them back).

Integrity: between the chunks and the index, a shard holds a table of ``xxh3_64`` digests of
every 64 KiB block of its chunks and, where rows are narrower than 64 KiB, a fine table of the
digests of every few whole rows (as many as fit in 8 KiB, at least one: two d=768 float32 rows
of 3 KiB share a digest). Zarr readers never look there: the index points at the chunks. The
commit record holds the digests of the tables and of the index (:mod:`store.commit.protocol`). Whole
units and long ranges are checked against the 64 KiB table (fewer hash calls), scattered rows
against the fine one (a row hashes its own bytes, not its 64 KiB block). The commit record
stays small, and the chunks stay one contiguous ``[rows, d]`` array at the start of the file
that can be memory-mapped without a copy:

    [chunk 0 | chunk 1 | ... ]  [64 KiB block digests]  [row block digests]  [zarr index + crc32c]

Shards written before the fine table existed have none; they read as before, checked at 64 KiB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from google_crc32c import value as crc32c

from strata.store import layout
from strata.store.commit.protocol import FileEntry, block_digests
from strata.store.datasets.manifest import DatasetInfo
from strata.store.dtypes import storage_dtype
from strata.store.storage import Storage


def dimension_names(d: int) -> tuple[str, str]:
    """Dimension names of an activation array (xarray and other Zarr readers use them): token
    rows, and the width, named by its size so hooks of different widths open side by side."""
    return ("row", f"d_{d}")

EMPTY = np.uint64(2**64 - 1)
#: Bytes per checked block of a shard's chunks: small, so a read of a few rows hashes little
#: more than it returns.
BLOCK_BYTES = 64 << 10
#: Most bytes per fine block (whole rows; one row when a row is wider). A hash call costs about
#: what hashing 6 KiB does: smaller blocks would make scattered reads barely cheaper and the
#: write's second digest pass (one call per block) dearer.
FINE_BLOCK_BYTES = 8 << 10


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

    def body_nbytes(self, rows: int) -> int:
        return self.chunks_for(rows) * self.chunk_bytes

    @property
    def fine_block_bytes(self) -> int:
        """Bytes per fine checked block (whole rows), or 0 (no fine table) when it would not be
        finer than a 64 KiB block, or than a whole unit."""
        fine = max(1, FINE_BLOCK_BYTES // self.row_bytes) * self.row_bytes
        return fine if fine < min(BLOCK_BYTES, self.unit_rows * self.row_bytes) else 0

    def shard_nbytes(self, rows: int, *, fine: bool = True) -> int:
        """Size of the shard of ``rows`` rows; ``fine=False``: as written before fine tables."""
        body = self.body_nbytes(rows)
        fb = self.fine_block_bytes if fine else 0
        return body + 8 * max(1, -(-body // BLOCK_BYTES)) + (8 * max(1, -(-body // fb)) if fb else 0) + self.index_bytes

    def chunks_for(self, rows: int) -> int:
        return -(-rows // self.chunk_rows)

    @property
    def row_bytes(self) -> int:
        return self.d * self.itemsize

    def encode(self, data: np.ndarray, key: str, *, digest: Callable[..., Future] | None = None) -> tuple[Callable[[], FileEntry], list[Any]]:
        """The shard of ``data`` (``rows <= unit_rows``): a function giving its file entry
        (sizes and checksums, for the commit record) and the buffers that, written one after
        the other, form it. With ``digest`` (an executor's ``submit``), the block checksums are
        computed on another thread while the body is written; the tables after the body wait
        for them."""
        body, index = self._encode(data)
        n = sum(len(memoryview(p).cast("B")) for p in body)
        fb = self.fine_block_bytes

        def digests() -> tuple[np.ndarray, np.ndarray | None]:
            return block_digests(body, BLOCK_BYTES)[1], (block_digests(body, fb)[1] if fb else None)

        if digest is None:
            done: Future = Future()
            done.set_result(digests())
        else:
            done = digest(digests)
        fine_part: list[Any] = [lambda: done.result()[1].tobytes()] if fb else []
        return (
            lambda: FileEntry.with_table(key, n, done.result()[0], index, block_size=BLOCK_BYTES, fine=done.result()[1], fine_block_size=fb),
            [*body, lambda: done.result()[0].tobytes(), *fine_part, index],
        )

    def _encode(self, data: np.ndarray) -> tuple[list[memoryview | bytes], bytes]:
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
        return parts, tail


def shard_layout(info: DatasetInfo, hook: str) -> ShardLayout:
    """The shard layout of one hook of a dataset."""
    h = info.hooks[hook]
    return ShardLayout(info.unit_rows, h.chunk_rows, h.d, storage_dtype(info.dtype).itemsize)


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


def create_hook_array(storage: Storage, info: DatasetInfo, hook: str) -> None:
    """Create the Zarr v3 array of one hook (driver only): ``[capacity_rows, d]``, one shard
    per unit, dimension names ``("row", "d_<width>")``, in a Zarr group per dataset so xarray opens
    every hook of a dataset at once (``xr.open_zarr(root, group="datasets/NAME/acts")``)."""
    h = info.hooks[hook]
    zs = storage.zarr_store()
    group = f"{layout.dataset_dir(info.name)}/acts"
    if not storage.exists(f"{group}/zarr.json"):
        zarr.open_group(store=zs, path=group, mode="a", zarr_format=3)
    arr = zarr.create_array(
        store=zs,
        name=layout.array_path(info.name, hook),
        shape=(info.capacity_rows, h.d),
        shards=(info.unit_rows, h.d),
        chunks=(h.chunk_rows, h.d),
        dtype=storage_dtype(info.dtype),
        compressors=None,
        fill_value=0,
        dimension_names=dimension_names(h.d),
        attributes={"strata": {"dtype": info.dtype, "hook": hook, "dataset": info.name, "unit_rows": info.unit_rows}},
        overwrite=True,
    )
    codecs = json.loads(json.dumps(arr.metadata.to_dict()["codecs"]))  # tuples -> lists
    if codecs[0] != codec_config(h.chunk_rows, h.d):
        raise RuntimeError(f"zarr wrote an unexpected codec configuration for {hook}: {codecs}")


def resize_hook_array(storage: Storage, info: DatasetInfo, hook: str) -> None:
    """Resize a hook's array to the dataset's capacity (driver only)."""
    arr = zarr.open_array(store=storage.zarr_store(), path=layout.array_path(info.name, hook), mode="r+")
    arr.resize((info.capacity_rows, info.hooks[hook].d))
