"""The document index of a dataset: where each document's rows are.

Written by the job's driver when it plans the corpus (shared metadata, before workers start),
so a reader can tell, for any document id, whether the document exists, which rows it has and
which units hold them, without reading every token table: ``ds.read(hook, docs=[...])`` raises
for an unknown id or a document that is not wholly committed instead of returning part of it.

Every row of a document lies in one contiguous span ``[row_start, row_end)`` (both packings
keep a document's tokens together; a BOS row inside the span belongs to the document after
it), so the index is one row per document. ``dropped_tokens`` counts tokens that no context
holds (the concat tail shorter than one context); a document with no rows at all has
``row_start == row_end == -1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from strata.store.commit import parquet
from strata.store.errors import CorruptionError, UnknownDocumentError, WriteMismatchError

DOC_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("row_start", pa.int64(), nullable=False),
        pa.field("row_end", pa.int64(), nullable=False),
        pa.field("dropped_tokens", pa.int64(), nullable=False),
    ]
)
DOC_COLUMNS = tuple(DOC_SCHEMA.names)


def check_documents(table: pa.Table, *, capacity_rows: int | None = None) -> pa.Table:
    """The index cast to its schema and sorted by ``doc_id``, after checking it is one."""
    if not isinstance(table, pa.Table):
        raise WriteMismatchError(f"document index must be a pyarrow.Table, got {type(table).__name__}")
    missing = [c for c in DOC_COLUMNS if c not in table.column_names]
    if missing:
        raise WriteMismatchError(f"document index lacks column(s) {missing}; required: {', '.join(DOC_COLUMNS)}")
    extra = [c for c in table.column_names if c not in DOC_COLUMNS]
    try:
        table = table.select([*DOC_COLUMNS, *extra]).cast(pa.schema([*DOC_SCHEMA, *(table.schema.field(c) for c in extra)]))
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise WriteMismatchError(f"document index does not cast to its schema: {e}") from None
    table = table.sort_by("doc_id")
    ids = table.column("doc_id").to_numpy()
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        raise WriteMismatchError("document index: doc_id values are not unique")
    start, end = table.column("row_start").to_numpy(), table.column("row_end").to_numpy()
    none = (start == -1) & (end == -1)
    if ((start < 0) & ~none).any() or (end < start).any():
        raise WriteMismatchError("document index: every span needs 0 <= row_start <= row_end (or -1, -1 for no rows)")
    return table


def encode_documents(table: pa.Table) -> bytes:
    return parquet.to_bytes(table)


def decode_documents(data: Any, *, where: str) -> pa.Table:
    try:
        return parquet.read(data)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptionError(f"{where}: document index is not readable Parquet: {e}") from None


def as_doc_ids(docs: Iterable[Any]) -> np.ndarray:
    """``docs`` as an int64 array; anything but integer ids is a clear ``TypeError``."""
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Iterable):
        raise TypeError(f"`docs` must be a sequence of integer document ids, got {type(docs).__name__}")
    values = docs if isinstance(docs, np.ndarray) else list(docs)
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        items = values.tolist() if isinstance(values, np.ndarray) else values
        bad = next((d for d in items if not isinstance(d, (int, np.integer)) or isinstance(d, (bool, np.bool_))), items[0])
        raise TypeError(f"`docs` must be integer document ids, got {bad!r} ({type(bad).__name__})")
    return arr.astype(np.int64)


def spans_of(index: pa.Table, docs: np.ndarray, *, dataset: str, total: int | None = None,
             id_range: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    """``(doc, row_start, row_end)`` of each document, in the order given. Unknown ids, and
    documents that no row holds, raise :class:`UnknownDocumentError` naming them. ``total`` and
    ``id_range`` describe the whole index when ``index`` is only the part that can hold ``docs``."""
    ids = index.column("doc_id").to_numpy()
    at = np.searchsorted(ids, docs)
    found = (at < ids.size) & (ids[np.minimum(at, max(ids.size - 1, 0))] == docs) if ids.size else np.zeros(docs.size, bool)
    if not found.all():
        unknown = [int(d) for d in docs[~found]]
        lo, hi = id_range if id_range is not None else ((int(ids[0]), int(ids[-1])) if ids.size else (0, -1))
        raise UnknownDocumentError(
            f"dataset {dataset!r} has no document(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''}; "
            f"it holds {ids.size if total is None else total} documents with ids from {lo} to {hi} (see ds.docs())"
        )
    start = index.column("row_start").to_numpy()[at]
    end = index.column("row_end").to_numpy()[at]
    empty = docs[start < 0]
    if empty.size:
        raise UnknownDocumentError(
            f"dataset {dataset!r}: document(s) {[int(d) for d in empty[:10]]} have no rows: the concat tail "
            "shorter than one context dropped them (see `plan.dropped_docs` in ds.info.meta)"
        )
    return [(int(d), int(a), int(b)) for d, a, b in zip(docs, start, end)]
