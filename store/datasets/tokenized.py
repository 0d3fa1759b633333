"""Tokenized corpus shards: each shard's token stream and its part of the document index, in the store.

A dataset of a sharded corpus (``corpus.plan: sharded``) is planned from shards, not from
documents. A task tokenizes one corpus shard where it runs and commits, beside the dataset, an
artifact folder (the commit protocol of :mod:`strata.store.commit.artifacts`)::

    datasets/NAME/shards/KEY/tokens.bin      int32 token ids, then their character starts, then ends
    datasets/NAME/shards/KEY/docs.parquet    the shard's part of the document index
    datasets/NAME/shards/KEY/commit.json     sizes, block checksums, and the shard's counts

``KEY`` names the shard as listed (its URL, size, ETag or modification time, row groups) and every
setting the files depend on (tokenizer, fields, packing), so a rerun, or a run after ``--dry-run``,
finds the work done. The part holds, per document of the shard, a shard-local ``doc_id`` (the
record's ordinal within the shard, or the id of ``corpus.id_field``), ``n_tokens``, and its rows
``[row_start, row_end)`` counted from the shard's first row (``-1, -1``: no rows), plus the
document fields the extraction keeps. The driver records only per-shard counts: the dataset's
``shards`` table (:data:`SHARDS_SCHEMA`) places each shard at a first unit and a document-id
offset, so the whole document index is the parts shifted, by arithmetic
(:class:`ShardedDocuments`), and no process ever holds it whole unless a reader asks for all of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.store import layout
from strata.store.commit import artifacts, parquet
from strata.store.commit.artifacts import Artifact
from strata.store.commit.lease import Fence, Lease
from strata.store.commit.protocol import read_checked
from strata.store.datasets.documents import DOC_COLUMNS, DOC_SCHEMA, spans_of
from strata.store.errors import CorruptionError
from strata.store.storage import Storage

TOKENS = "tokens.bin"
DOCS = "docs.parquet"
#: Bytes per checksum block of a token stream: a unit's range read checks little more than it uses.
TOKEN_BLOCK = 256 << 10

PART_COLUMNS = ("doc_id", "n_tokens", "row_start", "row_end", "dropped_tokens")

#: The dataset's plan of a sharded corpus, one row per shard, in corpus order (an aux file).
SHARDS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the tokenized shard's artifact name
    pa.field("name", pa.string(), nullable=False),  # the shard as listed: URL (credentials never), "#row-groups a-b"
    pa.field("fingerprint", pa.string(), nullable=False),  # of its bytes, or its ETag/version and size
    pa.field("listing", pa.string(), nullable=False),  # JSON: what the listing said (size, ETag, mtime, row groups)
    pa.field("records", pa.int64(), nullable=False),  # records read, empty ones included (ordinal ids count them)
    pa.field("docs", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("contexts", pa.int64(), nullable=False),
    pa.field("first_unit", pa.int64(), nullable=False),
    pa.field("units", pa.int64(), nullable=False),
    pa.field("id_offset", pa.int64(), nullable=False),  # added to the part's doc ids (ordinal ids); 0 for id_field ids
    pa.field("id_min", pa.int64(), nullable=False),  # of the shifted ids: which parts a document lookup reads
    pa.field("id_max", pa.int64(), nullable=False),
    pa.field("skipped_empty", pa.int64(), nullable=False),
    pa.field("chars", pa.int64(), nullable=False),
    pa.field("dropped_tokens", pa.int64(), nullable=False),  # tokens no context holds (each shard's concat tail)
    pa.field("dropped_docs", pa.int64(), nullable=False),
    pa.field("partial_docs", pa.int64(), nullable=False),
    pa.field("doc_set", pa.string(), nullable=False),  # the shard's term of the corpus's document set hash (store.datasets.pairing)
])


def shards_kind(dataset: str) -> str:
    """The artifact kind holding a dataset's tokenized shards."""
    return f"{layout.dataset_dir(dataset)}/shards"


def write_shard(
    storage: Storage, dataset: str, key: str, *, ids: np.ndarray, start: np.ndarray, end: np.ndarray, docs: pa.Table,
    meta: Mapping[str, Any], lease: Lease | Fence,
) -> Artifact:
    """Commit one tokenized shard (a task, fenced with the dataset's lease): the token stream
    (three int32 arrays of one length) and its document-index part. Writing the same shard again
    (a retried task) is harmless: identical files commit as the same artifact."""
    n = len(ids)
    if not (len(start) == len(end) == n):
        raise ValueError(f"tokenized shard {key!r}: ids, starts and ends differ in length ({n}, {len(start)}, {len(end)})")
    missing = [c for c in PART_COLUMNS if c not in docs.column_names]
    if missing:
        raise ValueError(f"tokenized shard {key!r}: its document part lacks {missing}")
    held = int(pc.sum(docs.column("n_tokens")).as_py() or 0)
    if held != n:
        raise ValueError(f"tokenized shard {key!r}: its documents hold {held} tokens, the stream {n}")
    body = b"".join(np.ascontiguousarray(a, dtype="<i4").tobytes() for a in (ids, start, end))
    files = {TOKENS: body, DOCS: parquet.to_bytes(docs)}
    return artifacts.put(storage, shards_kind(dataset), key, files, meta={**meta, "tokens": n, "docs": docs.num_rows},
                         lease=lease, block_size=TOKEN_BLOCK)


@dataclass(frozen=True)
class TokenizedShard:
    """A committed tokenized shard: its counts, its document part, checked range reads of its tokens."""

    art: Artifact
    dataset: str

    @classmethod
    def open(cls, storage: Storage, dataset: str, key: str) -> TokenizedShard | None:
        """The committed shard ``key`` of ``dataset``, or None when there is none."""
        art = artifacts.get(storage, shards_kind(dataset), key)
        return None if art is None else cls(art, dataset)

    @property
    def key(self) -> str:
        return self.art.name

    @property
    def meta(self) -> dict[str, Any]:
        return self.art.meta

    @property
    def n_tokens(self) -> int:
        return int(self.meta["tokens"])

    def docs(self) -> pa.Table:
        """The shard's document part (shard-local ids and rows), checked."""
        where = f"dataset {self.dataset!r} tokenized shard {self.key}"
        try:
            t = parquet.read(self.art.read(DOCS))
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptionError(f"{where}: its document part is not readable Parquet ({e})") from None
        if t.num_rows != int(self.meta["docs"]) or any(c not in t.column_names for c in PART_COLUMNS):
            raise CorruptionError(f"{where}: its document part has {t.num_rows} rows and columns {t.column_names}; "
                                  f"the record says {self.meta['docs']} documents with {', '.join(PART_COLUMNS)}")
        return t

    def read(self, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens ``[t0, t1)`` of the stream: ids, character starts, character ends (int32), each
        checked against the commit record."""
        n = self.n_tokens
        if not 0 <= t0 <= t1 <= n:
            raise ValueError(f"tokenized shard {self.key}: tokens [{t0}, {t1}) are outside its {n}")
        entry = self.art._entry(TOKENS)
        where = f"dataset {self.dataset!r} tokenized shard {self.key} ({entry.key})"
        out = []
        for i in range(3):
            lo = 4 * (i * n + t0)
            buf = read_checked(self.art.storage, entry, lo, lo + 4 * (t1 - t0), where=where) if t1 > t0 else np.zeros(0, np.uint8)
            out.append(buf.view("<i4").astype(np.int32, copy=False))
        return out[0], out[1], out[2]


# -- the dataset's plan: the shards table, and the document index in parts ---------------------


def check_shards_table(table: pa.Table) -> pa.Table:
    try:
        return table.select(SHARDS_SCHEMA.names).cast(SHARDS_SCHEMA)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise ValueError(f"a shards table needs the columns {', '.join(SHARDS_SCHEMA.names)}: {e}") from None


def decode_shards_table(data: Any, *, where: str) -> pa.Table:
    try:
        t = parquet.read(data)
        return t.select(SHARDS_SCHEMA.names).cast(SHARDS_SCHEMA)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as e:
        raise CorruptionError(f"{where}: the shards table is damaged ({e})") from None


class ShardedDocuments:
    """The document index of a sharded dataset, read part by part: ``table()`` assembles every
    part (what ``ds.docs()`` returns), ``spans(ids)`` reads only the parts whose id range can hold
    those ids."""

    def __init__(self, storage: Storage, dataset: str, shards: pa.Table, *, unit_rows: int) -> None:
        self.storage, self.dataset, self.shards, self.unit_rows = storage, dataset, shards, unit_rows
        self._keys = shards.column("key").to_pylist()
        self._first = shards.column("first_unit").to_numpy()
        self._offset = shards.column("id_offset").to_numpy()
        self._min = shards.column("id_min").to_numpy()
        self._max = shards.column("id_max").to_numpy()
        self._docs = shards.column("docs").to_numpy()
        self._parts: dict[int, pa.Table] = {}
        self._index: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        held = np.flatnonzero(self._docs > 0)
        order = held[np.argsort(self._min[held], kind="stable")]
        disjoint = bool((self._min[order][1:] > self._max[order][:-1]).all())
        self._disjoint = (order, self._min[order]) if disjoint else None

    def part(self, i: int) -> pa.Table:
        """Shard ``i``'s part with dataset ids and rows."""
        t = self._parts.get(i)
        if t is None:
            sh = TokenizedShard.open(self.storage, self.dataset, self._keys[i])
            if sh is None:
                raise CorruptionError(f"dataset {self.dataset!r}: tokenized shard {self._keys[i]} (shard {i} of its plan) is missing")
            raw = sh.docs()
            base = int(self._first[i]) * self.unit_rows
            rs, re_ = raw.column("row_start").to_numpy(), raw.column("row_end").to_numpy()
            has = rs >= 0
            cols = {
                "doc_id": raw.column("doc_id").to_numpy() + np.int64(self._offset[i]),
                "row_start": np.where(has, rs + base, -1).astype(np.int64),
                "row_end": np.where(has, re_ + base, -1).astype(np.int64),
                "dropped_tokens": raw.column("dropped_tokens").to_numpy().astype(np.int64),
            }
            t = pa.table(cols)
            for c in raw.column_names:
                if c not in PART_COLUMNS:
                    t = t.append_column(c, raw.column(c))
            self._parts[i] = t
        return t

    def table(self) -> pa.Table:
        with ThreadPoolExecutor(8) as pool:  # parts are independent reads: overlap their latency (S3)
            parts = list(pool.map(self.part, [i for i in range(len(self._keys)) if self._docs[i] > 0]))
        if not parts:
            return pa.table({c: pa.array([], pa.int64()) for c in DOC_COLUMNS})
        t = pa.concat_tables(parts, promote_options="permissive").combine_chunks()
        t = t.cast(pa.schema([*DOC_SCHEMA, *(f for f in t.schema if f.name not in DOC_COLUMNS)]))  # as the one-file index reads
        ids = t.column("doc_id").to_numpy()
        return t if ids.size < 2 or bool((np.diff(ids) > 0).all()) else t.sort_by("doc_id")

    def _candidates(self, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(part, positions in ids)`` for the parts that can hold some of ``ids``. Parts of
        disjoint id ranges (ordinal ids: every shard's range follows the one before) are found by
        one binary search; overlapping ones (hashed ``id_field`` ids) by checking each."""
        if self._disjoint is not None:
            order, mins = self._disjoint
            j = np.searchsorted(mins, ids, side="right") - 1
            part = order[np.maximum(j, 0)]
            ok = (j >= 0) & (ids <= self._max[part])
            if ok.all() and part.size and (part == part[0]).all():
                yield int(part[0]), np.arange(ids.size)
                return
            for i in np.unique(part[ok]):
                yield int(i), np.flatnonzero(ok & (part == i))
            return
        for i in range(len(self._keys)):
            if self._docs[i] > 0:
                pos = np.flatnonzero((ids >= self._min[i]) & (ids <= self._max[i]))
                if pos.size:
                    yield i, pos

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Part ``i``'s ``doc_id`` (sorted), ``row_start``, ``row_end``, as arrays (cached)."""
        got = self._index.get(i)
        if got is None:
            t = self.part(i)
            ids = t.column("doc_id").to_numpy()
            order = np.argsort(ids, kind="stable") if ids.size > 1 and not bool((np.diff(ids) > 0).all()) else None
            cols = [t.column(c).to_numpy() for c in ("doc_id", "row_start", "row_end")]
            got = tuple(c if order is None else c[order] for c in cols)  # type: ignore[assignment]
            self._index[i] = got  # type: ignore[assignment]
        return got  # type: ignore[return-value]

    def spans(self, ids: np.ndarray) -> list[tuple[int, int, int]]:
        """``(doc, row_start, row_end)`` of each id, in the order given (errors as
        :func:`store.datasets.documents.spans_of`). Reads only the parts whose id range can hold them."""
        start = np.full(ids.size, -2, np.int64)
        end = np.full(ids.size, -2, np.int64)
        for i, pos in self._candidates(ids):
            d, a, b = self._arrays(i)
            want = ids[pos]
            at = np.minimum(np.searchsorted(d, want), d.size - 1)
            hit = d[at] == want
            start[pos[hit]], end[pos[hit]] = a[at[hit]], b[at[hit]]
        if (start < 0).any():  # unknown ids, or documents with no rows: the index's own message
            known = start != -2
            index = pa.table({"doc_id": ids[known], "row_start": start[known], "row_end": end[known]})
            index = index.sort_by("doc_id") if index.num_rows > 1 else index
            has = self._docs > 0
            lo, hi = (int(self._min[has].min()), int(self._max[has].max())) if has.any() else (0, -1)
            return spans_of(index, ids, dataset=self.dataset, total=int(self._docs.sum()), id_range=(lo, hi))
        return [(int(x), int(a), int(b)) for x, a, b in zip(ids, start, end)]
