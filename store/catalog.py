"""The catalog: a Parquet file per dataset with its identity fields. Derived data: rebuilt from
the manifests whenever an entry is missing or out of date."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from store import layout
from store.manifest import IDENTITY_META_KEYS, DatasetInfo

if TYPE_CHECKING:
    from store.core import Store
    from store.storage import Storage

SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("fingerprint", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("tokenizer", pa.string()),
        ("corpus_fingerprint", pa.string()),
        ("packing", pa.string()),
        ("prepend_bos", pa.bool_()),
        ("context_size", pa.int64()),
        ("dtype", pa.string()),
        ("unit_contexts", pa.int64()),
        ("num_units", pa.int64()),
        ("hooks", pa.list_(pa.string())),
        ("created_at", pa.string()),
    ]
)


def _row(info: DatasetInfo) -> dict:
    s = info.summary()
    for k in IDENTITY_META_KEYS:
        if k != "prepend_bos":
            s[k] = None if s[k] is None else str(s[k])
    s["prepend_bos"] = None if s["prepend_bos"] is None else bool(s["prepend_bos"])
    return s


def write_entry(storage: Storage, info: DatasetInfo) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([_row(info)], schema=SCHEMA), buf)
    storage.write(layout.catalog_key(info.name), buf.getvalue())


def read(store: Store, *, rebuild: bool = False) -> pa.Table:
    rows = []
    for name in store.datasets():
        info = store._load_info(name)
        row = None
        if not rebuild:
            try:
                t = pq.read_table(pa.BufferReader(store.storage.read(layout.catalog_key(name))), schema=SCHEMA)
                row = t.to_pylist()[0] if t.num_rows == 1 else None
            except (FileNotFoundError, pa.ArrowInvalid, OSError):
                row = None
        if row is None or row != _row(info):
            write_entry(store.storage, info)
            row = _row(info)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)
