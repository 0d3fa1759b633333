"""Token tables: one Parquet file per unit, row-aligned with every hook's activations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.store.commit import parquet
from strata.store.errors import CorruptionError, WriteMismatchError

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
# Optional: each token's character span in its document's text ([char_start, char_end), -1 for
# BOS, separators and padding); extraction writes them, cross-tokenizer alignment needs them.
OPTIONAL_TOKEN_FIELDS = (pa.field("char_start", pa.int32(), nullable=False), pa.field("char_end", pa.int32(), nullable=False))
# Optional: a diffusion context's timestep (one context per (image, timestep); see pipeline.diffusion).
TIMESTEP_FIELD = pa.field("timestep", pa.int32(), nullable=False)
# What a token file holds: the columns above (the optional ones when written) plus `row`, the
# global row index (unit * unit_rows + position in the unit), so the files join with the
# activation arrays without Strata.
ROW_FIELD = pa.field("row", pa.int64(), nullable=False)
STORED_TOKEN_SCHEMA = pa.schema([*TOKEN_SCHEMA, *OPTIONAL_TOKEN_FIELDS, TIMESTEP_FIELD, ROW_FIELD])
_DELTA_COLUMNS = ("row", "context_id", "position", "doc_id", "doc_position", "char_start", "char_end")


def check_tokens(table: pa.Table, *, unit: int, first_context: int, context_size: int, what: str) -> pa.Table:
    """The unit's token table cast to the schema, after checking it is the unit's rows in order."""
    if not isinstance(table, pa.Table):
        raise WriteMismatchError(f"{what}: tokens must be a pyarrow.Table, got {type(table).__name__}")
    missing = [c for c in TOKEN_COLUMNS if c not in table.column_names]
    if missing:
        raise WriteMismatchError(
            f"{what}: token table lacks column(s) {missing}; required: {', '.join(TOKEN_COLUMNS)}"
        )
    optional = [f for f in OPTIONAL_TOKEN_FIELDS if f.name in table.column_names]
    if 0 < len(optional) < len(OPTIONAL_TOKEN_FIELDS):
        raise WriteMismatchError(f"{what}: token table has {optional[0].name} without the other character-span column")
    if TIMESTEP_FIELD.name in table.column_names:
        optional.append(TIMESTEP_FIELD)
    schema = pa.schema([*TOKEN_SCHEMA, *optional])
    try:
        table = table.select(schema.names).cast(schema)
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
    # Delta encoding suits the mostly increasing integer columns (a third the bytes, three
    # times faster than dictionaries, which such columns defeat); every Parquet reader takes it.
    return parquet.to_bytes(
        table.append_column(ROW_FIELD, rows), use_dictionary=False,
        column_encoding={c: "DELTA_BINARY_PACKED" for c in _DELTA_COLUMNS if c in table.column_names or c == "row"},
        write_statistics=True,
    )


def decode_tokens(data: Any, *, where: str) -> pa.Table:
    try:
        t = parquet.read(data)
        names = [f.name for f in STORED_TOKEN_SCHEMA if f.name in t.column_names]
        want = pa.schema([f for f in STORED_TOKEN_SCHEMA if f.name in names])
        if any(c not in names for c in (*TOKEN_COLUMNS, "row")):
            raise pa.ArrowInvalid(f"columns {t.column_names} lack some of {[*TOKEN_COLUMNS, 'row']}")
        return t.select(names).cast(want)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise CorruptionError(f"{where}: token table is not readable Parquet: {e}") from e


def rows_of_docs(table: pa.Table, docs: np.ndarray) -> np.ndarray:
    """Positions in ``table`` of every row belonging to one of ``docs``."""
    mask = pc.is_in(table.column("doc_id"), value_set=pa.array(np.asarray(docs, dtype=np.int64)))
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))
