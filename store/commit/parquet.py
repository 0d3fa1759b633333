"""Whole Parquet files to and from bytes.

Reads go through ``pq.ParquetFile(...).read()``, not ``pq.read_table``: ``read_table`` builds a
dataset scanner whose read-ahead tasks run on Arrow's thread pools and can still be running when
the call has returned; a process that exits just then aborts with "terminate called without an
active exception" (apache/arrow#34314, #39862). That happened to a Ray job that found nothing to
do and exited right after reading the store's small tables. ``ParquetFile.read`` has finished
when it returns, and it decodes in the calling thread alone (``use_threads=False``): with its
decoding on Arrow's CPU pool, one of the 64 processes of ``tests/store/test_parquet.py`` still
aborted at exit under load, in two suite runs of one session. The store's tables are small (a
unit's tokens, an index); readers that want parallelism run several reads at once.
"""

from __future__ import annotations

import io
from os import PathLike
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def to_bytes(table: pa.Table, **options: Any) -> bytes:
    """``table`` as a zstd-compressed Parquet file; ``options`` go to ``pq.write_table``."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", **options)
    return buf.getvalue()


def read(source: Any) -> pa.Table:
    """A whole Parquet file (a local path, or its bytes: anything with the buffer protocol) as a
    table. Raises what pyarrow raises for bytes that are not Parquet (``ArrowInvalid``, ``OSError``)."""
    if not isinstance(source, (str, PathLike)):
        source = pa.BufferReader(source)
    return pq.ParquetFile(source).read(use_threads=False)
