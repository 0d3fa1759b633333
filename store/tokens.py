"""Token tables: one Parquet file per unit, row-aligned with every hook's activations."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.errors import CorruptionError, WriteMismatchError

TOKEN_SCHEMA = pa.schema(
    [
        pa.field("context_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("doc_position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("special", pa.bool_(), nullable=False),
    ]
)
TOKEN_COLUMNS = tuple(TOKEN_SCHEMA.names)
# What a token file holds: the columns above plus `row`, the global row index (unit * unit_rows
# + position in the unit), so the files join with the activation arrays without Strata.
STORED_TOKEN_SCHEMA = TOKEN_SCHEMA.append(pa.field("row", pa.int64(), nullable=False))
_DELTA_COLUMNS = ("row", "context_id", "position", "doc_id", "doc_position")


def check_tokens(table: pa.Table, *, unit: int, first_context: int, context_size: int, what: str) -> pa.Table:
    """The unit's token table cast to the schema, after checking it is the unit's rows in order."""
    if not isinstance(table, pa.Table):
        raise WriteMismatchError(f"{what}: tokens must be a pyarrow.Table, got {type(table).__name__}")
    missing = [c for c in TOKEN_COLUMNS if c not in table.column_names]
    if missing:
        raise WriteMismatchError(
            f"{what}: token table lacks column(s) {missing}; required: {', '.join(TOKEN_COLUMNS)}"
        )
    try:
        table = table.select(list(TOKEN_COLUMNS)).cast(TOKEN_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise WriteMismatchError(f"{what}: token table does not cast to the token schema: {e}") from e
    n = table.num_rows
    r = np.arange(n, dtype=np.int64)
    ctx = table.column("context_id").to_numpy()
    pos = table.column("position").to_numpy()
    if not (np.array_equal(ctx, first_context + r // context_size) and np.array_equal(pos, r % context_size)):
        raise WriteMismatchError(
            f"{what}: token rows are not contexts {first_context}.. of unit {unit} in order "
            f"(row r must be position r % {context_size} of context {first_context} + r // {context_size})"
        )
    return table


def encode_tokens(table: pa.Table, *, first_row: int) -> bytes:
    """The unit's token file: the checked table plus its global ``row`` column."""
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    buf = io.BytesIO()
    # Delta encoding suits the mostly increasing integer columns (a third the bytes, three
    # times faster than dictionaries, which such columns defeat); every Parquet reader takes it.
    pq.write_table(
        table.append_column(STORED_TOKEN_SCHEMA.field("row"), rows), buf, compression="zstd", use_dictionary=False,
        column_encoding=dict.fromkeys(_DELTA_COLUMNS, "DELTA_BINARY_PACKED"), write_statistics=True,
    )
    return buf.getvalue()


def decode_tokens(data: Any, *, where: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data), schema=STORED_TOKEN_SCHEMA)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptionError(f"{where}: token table is not readable Parquet: {e}") from e


def rows_of_docs(table: pa.Table, docs: np.ndarray) -> np.ndarray:
    """Positions in ``table`` of every row belonging to one of ``docs``."""
    mask = pc.is_in(table.column("doc_id"), value_set=pa.array(np.asarray(docs, dtype=np.int64)))
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))
