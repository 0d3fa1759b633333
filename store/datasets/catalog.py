"""The catalog: a Parquet file per dataset (``catalog/NAME.parquet``), queryable without
Strata (``SELECT * FROM 'STORE/catalog/*.parquet'`` in DuckDB).

Entries are written by drivers (when a job creates, grows or finishes a dataset, after a
repair) and removed with their dataset. Reading the catalog never writes: entries of datasets
that no longer exist are left out, and ``live=True`` recounts committed units from the commit
records instead of trusting the counts of the last entry written.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from strata.store import layout
from strata.store.commit import parquet
from strata.store.commit.protocol import utcnow
from strata.store.datasets.manifest import IDENTITY_META_KEYS, dataset_names, load_manifest
from strata.store.datasets.reader import ActivationDataset, open_dataset
from strata.store.datasets.writer import dataset_lease
from strata.store.errors import StrataError
from strata.store.root import StoreRoot

SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("fingerprint", pa.string()),
        ("model", pa.string()),
        ("model_path", pa.string()),
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
        ("committed_units", pa.int64()),  # units committed for every hook and the token table
        ("rows", pa.int64()),  # token rows of those units
        ("complete", pa.bool_()),
        ("created_at", pa.string()),
        ("updated_at", pa.string()),
    ]
)


def entry(ds: ActivationDataset) -> dict[str, Any]:
    """The catalog row of an open dataset, counted from its commit records."""
    s = ds.info.summary()
    row: dict[str, Any] = {k: s.get(k) for k in SCHEMA.names if k in s}
    for k in IDENTITY_META_KEYS:
        if k != "prepend_bos":
            row[k] = None if s.get(k) is None else str(s[k])
    row["prepend_bos"] = None if s.get("prepend_bos") is None else bool(s["prepend_bos"])
    row["model_path"] = ds.info.meta.get("model_path")
    units = set(ds.committed_units(None))
    for h in ds.info.hooks:
        units &= set(ds.committed_units(h))
    row["committed_units"] = len(units)
    row["rows"] = sum(ds.unit_counts(None, u)[0] for u in units)
    row["complete"] = len(units) == ds.info.num_units
    row["updated_at"] = utcnow()
    return row


def write_entry(ds: ActivationDataset) -> None:
    """Write (replace) the dataset's catalog entry: drivers only."""
    ds.storage.write(layout.catalog_key(ds.name), parquet.to_bytes(pa.Table.from_pylist([entry(ds)], schema=SCHEMA)))


def delete_dataset(store: StoreRoot, name: str) -> None:
    """Delete a dataset and its catalog entry, holding its write lease. The manifest goes
    first, so readers never see a half-deleted dataset."""
    with dataset_lease(store.storage, name, owner="delete") as lease:
        load_manifest(store.storage, layout.check_name(name))
        lease.check()
        store.storage.delete(layout.manifest_key(name))
        delete_entry(store, name)
        for key in store.storage.list(layout.dataset_dir(name)):
            if not key.startswith(f"{layout.lease_dir(layout.dataset_dir(name))}/"):
                store.storage.delete(key)


def delete_entry(store: StoreRoot, name: str) -> None:
    store.storage.delete(layout.catalog_key(name))


def read(store: StoreRoot, *, live: bool = False) -> pa.Table:
    """One row per dataset that exists. Entries are read as written; a dataset whose entry is
    missing, damaged or older than its manifest (or every dataset, with ``live``) is counted
    from its commit records. Never writes."""
    rows = []
    for name in dataset_names(store.storage):
        row = None
        if not live:
            try:
                t = parquet.read(store.storage.read(layout.catalog_key(name)))
                row = t.cast(SCHEMA).to_pylist()[0] if t.num_rows == 1 and set(t.column_names) == set(SCHEMA.names) else None
                info = load_manifest(store.storage, name)
                if row is not None and (row["fingerprint"], row["num_units"], sorted(row["hooks"] or [])) != (
                    info.fingerprint, info.num_units, sorted(info.hooks)
                ):
                    row = None  # written before the dataset last changed: count it now
            except (FileNotFoundError, pa.ArrowInvalid, OSError, ValueError, StrataError):
                row = None
        if row is None:
            try:
                row = entry(open_dataset(store, name))
            except StrataError:
                continue  # damaged or deleted meanwhile: `strata verify` reports it
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)
