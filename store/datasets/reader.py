"""Reading an activation dataset: committed units only, every byte checked, consistent while
jobs still write. What is committed is tracked by :mod:`strata.store.datasets.commits`; this
module reads rows, tokens and documents of it, and hands out batches (:mod:`.batches`) and
verification (:mod:`.verify`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from strata.store.commit import protocol
from strata.store.commit.protocol import CommitRecord
from strata.store.datasets.batches import BatchIterator
from strata.store.datasets.commits import IO_THREADS, CommitState
from strata.store.datasets.documents import as_doc_ids, decode_documents, spans_of
from strata.store.datasets.manifest import DatasetInfo, dataset_names, read_aux
from strata.store.datasets.shards import ShardLayout, shard_layout
from strata.store.datasets.tokenized import ShardedDocuments, decode_shards_table
from strata.store.datasets.tokens import STORED_TOKEN_SCHEMA, decode_tokens, rows_of_docs
from strata.store.datasets.verify import RepairReport, VerifyReport, repair, verify
from strata.store.datasets.versions import pick
from strata.store.dtypes import storage_dtype, to_torch
from strata.store.errors import CorruptionError, DatasetNotFoundError, NotCommittedError, RowOutOfRangeError, UnknownDocumentError
from strata.store.root import StoreRoot
from strata.store.views.summaries import dataset_html
from strata.store.views.tokens import TokenView, token_view

if TYPE_CHECKING:
    import torch


def _resolve_out_dtype(stored: str, as_: str, dtype: Any) -> tuple[str, np.dtype]:
    """(logical output dtype name, NumPy dtype of the output buffer)."""
    if dtype is None:
        name = stored if (as_ == "torch" or stored != "bfloat16") else "float32"
    elif str(dtype).startswith("torch."):  # a torch.dtype (torch imported only when used)
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name if dtype != "bfloat16" else "bfloat16"
        except TypeError:
            name = repr(dtype)
    if name not in ("float32", "float16", "bfloat16") or (name == "bfloat16" and as_ != "torch"):
        raise ValueError(f"cannot read as dtype {dtype!r}; valid: float32, float16, and bfloat16 with as_='torch'")
    return name, storage_dtype(name)


def _copy_into(out: np.ndarray, out_name: str, src: np.ndarray, src_name: str) -> None:
    """Copy stored values into an output slice, converting dtype in the same pass."""
    if out_name == src_name:
        out[...] = src
    elif src_name == "bfloat16":
        wide = out if out_name == "float32" else np.empty(out.shape, np.float32)
        np.left_shift(src, 16, out=wide.view(np.uint32), dtype=np.uint32)
        if wide is not out:
            out[...] = wide
    elif out_name == "bfloat16":
        import torch  # lazy: only a bfloat16 read pays for torch; `import strata.store` stays light

        out[...] = torch.from_numpy(np.ascontiguousarray(src, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        out[...] = src


class ActivationDataset:
    """A dataset opened for reading. It sees the units committed when it was opened (or last
    :meth:`refresh`-ed), so a notebook gets a consistent view while a job keeps writing.

    Every read checks what it returns against the commit records: a partial read checks the
    chunks it touches, a whole read all of them. A damaged commit record makes its unit
    unreadable (:class:`CorruptionError`) and is reported by :meth:`verify`; other units stay
    readable."""

    def __init__(self, store: StoreRoot, name: str, *, use_index: bool = True) -> None:
        self.store = store  # kept for callers that go on from a dataset to its store
        self.storage = store.storage
        self.commits = CommitState(self.storage, name, use_index=use_index)
        self.name = self.commits.name
        self._mapped: dict[tuple[str, int], np.ndarray] = {}
        self._tokens: dict[int, pa.Table] = {}
        self._docs: tuple[str, pa.Table] | None = None
        self._sharded: tuple[str, ShardedDocuments] | None = None
        self.refresh()

    def __repr__(self) -> str:
        units = len(self.commits.records.get(None, {}))
        return f"ActivationDataset({self.name!r}, hooks={len(self.info.hooks)}, committed units={units}/{self.info.num_units})"

    def _repr_html_(self) -> str:
        """Jupyter's summary: identity and lineage, hooks (d, dtype, rows, committed/total units),
        bytes on disk and status, from metadata alone (see :mod:`strata.store.views.summaries`)."""
        return dataset_html(self)

    def show_tokens(self, doc_id: int, *, hook: str | None = None, neuron: int | None = None, sae: str | None = None,
                    feature: int | None = None) -> TokenView:
        """Document ``doc_id``'s tokens coloured by one activation, as circuitsvis does: ``neuron``
        of ``hook``, or ``feature`` of ``sae`` (a feature table of that name encoding this dataset,
        else the SAE itself encodes the document). Jupyter shows it inline; ``.values`` holds the
        numbers. An unknown document, hook, neuron or feature is a one-line error naming the valid ones."""
        return token_view(self, doc_id, hook=hook, neuron=neuron, sae=sae, feature=feature)

    # -- commit state (see store.datasets.commits) --------------------------------------------

    @property
    def info(self) -> DatasetInfo:
        """The manifest as of the last :meth:`refresh`."""
        return self.commits.info

    @property
    def damaged(self) -> dict[tuple[str | None, int], str]:
        """``(hook or None, unit) -> what is wrong with its commit record``, for damaged records."""
        return self.commits.damaged

    def refresh(self) -> ActivationDataset:
        """Pick up units (and hooks, and growth) committed since the dataset was opened, and
        forget units whose records were removed (by a repair). Records come from the dataset's
        commit index (one read) and from listing only the record folders it does not cover."""
        for hook, unit in self.commits.refresh():
            if hook is None:
                self._tokens.pop(unit, None)
            else:
                self._mapped.pop((hook, unit), None)
        return self

    def unit_counts(self, hook: str | None, unit: int) -> tuple[int, int]:
        """``(rows, special rows)`` of a committed unit, without parsing its record."""
        return self.commits.unit_counts(hook, unit)

    @property
    def hooks(self) -> list[str]:
        """Hook points in model order: embed, blocks 0..L-1, final norm."""
        return self.commits.hooks()

    def check_hook(self, hook: str) -> str:
        """``hook``, when the dataset has it; HookNotFoundError naming those it has otherwise."""
        return self.commits.check_hook(hook)

    def committed_units(self, hook: str | None = None) -> list[int]:
        """Units committed for ``hook`` (or whose token table is committed, for ``None``). A
        hook's unit counts only with its token table (the writer commits that first)."""
        return self.commits.committed_units(hook)

    def num_rows(self, hook: str | None = None) -> int:
        """Committed token rows of ``hook`` (of the token table, for ``None``)."""
        return self.commits.num_rows(hook)

    @property
    def is_complete(self) -> bool:
        return self.commits.is_complete()

    def record(self, hook: str | None, unit: int) -> CommitRecord:
        """The commit record of one unit of ``hook`` (``None``: its token table)."""
        return self.commits.record(hook, unit)

    def _where(self, hook: str | None, unit: int, rec: CommitRecord) -> str:
        return f"dataset {self.name!r} {'tokens' if hook is None else f'hook {hook!r}'} unit {unit} ({rec.file.key})"

    # -- tokens and documents ---------------------------------------------------------------

    def unit_tokens(self, unit: int) -> pa.Table:
        """One committed unit's token table (with ``row``), checked against its commit record
        the first time this dataset object reads it."""
        t = self._tokens.get(unit)
        if t is None:
            rec = self.record(None, unit)
            where = self._where(None, unit, rec)
            t = decode_tokens(protocol.read_whole(self.storage, rec.file, where=where), where=where)
            if t.num_rows != rec.rows:
                raise CorruptionError(f"{where}: {t.num_rows} rows, the commit record says {rec.rows}")
            self._tokens[unit] = t
        return t

    def special_mask(self, unit: int) -> np.ndarray:
        """Which rows of a committed unit are special (BOS, separators, padding)."""
        return self.unit_tokens(unit).column("special").to_numpy(zero_copy_only=False)

    def tokens(self, hook: str | None = None, *, units: Iterable[int] | None = None) -> pa.Table:
        """The token table of committed units, in row order, with a ``row`` column (the global
        row index that :meth:`read` takes). With ``hook``, only units committed for that hook, so
        the table is row-aligned with ``read(hook)``."""
        chosen = self.committed_units(hook) if units is None else sorted(int(u) for u in units)
        with ThreadPoolExecutor(IO_THREADS) as pool:
            tables = list(pool.map(self.unit_tokens, chosen))
        if not tables:
            return STORED_TOKEN_SCHEMA.empty_table()
        common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
        return pa.concat_tables([t.select(common) for t in tables])

    def aux_file(self, kind: str) -> tuple[str, bytes] | None:
        """A driver-written file (``documents``, ``tokenizer``), checked: (key, bytes)."""
        return read_aux(self.storage, self.info, kind)

    def shards(self) -> pa.Table | None:
        """The plan of a sharded corpus, one row per shard in corpus order (its name, fingerprint,
        counts, first unit and units, document-id offset); None for a corpus planned as one
        stream of documents."""
        docs = self._sharded_documents()
        return None if docs is None else docs.shards

    def _sharded_documents(self) -> ShardedDocuments | None:
        key = (self.info.aux.get("shards") or {}).get("key")
        if key is None:
            return None
        if self._sharded is None or self._sharded[0] != key:
            k, data = self.aux_file("shards")  # type: ignore[misc]
            table = decode_shards_table(data, where=f"dataset {self.name!r} shards table ({k})")
            self._sharded = (k, ShardedDocuments(self.storage, self.name, table, unit_rows=self.info.unit_rows))
        return self._sharded[1]

    def docs(self) -> pa.Table | None:
        """The document table: ``doc_id, row_start, row_end, dropped_tokens`` (every row of a
        document lies in ``[row_start, row_end)``) and the document fields the extraction kept
        (``corpus.keep_fields``); None for a dataset written without one. A sharded corpus's
        index is stored in parts, one per shard, assembled here."""
        key = (self.info.aux.get("documents") or {}).get("key")
        if key is None:
            sharded = self._sharded_documents()
            return None if sharded is None else sharded.table()
        if self._docs is None or self._docs[0] != key:
            k, data = self.aux_file("documents")  # type: ignore[misc]
            self._docs = (k, decode_documents(data, where=f"dataset {self.name!r} document index ({k})"))
        return self._docs[1]

    def tokenizer(self) -> Any:
        """The dataset's tokenizer (a ``tokenizers.Tokenizer``), to decode token ids to text;
        None for a dataset written without it."""
        got = self.aux_file("tokenizer")
        if got is None:
            return None
        try:
            return Tokenizer.from_str(got[1].decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception types
            raise CorruptionError(f"dataset {self.name!r}: the stored tokenizer does not load ({e})") from None

    def _rows_of_docs(self, hook: str, docs: Any) -> np.ndarray | list[tuple[int, int]]:
        """Rows of documents: an index array, or (with the document index) their spans."""
        ids = as_doc_ids(docs)
        if ids.size == 0:
            return np.zeros(0, np.int64)
        sharded = self._sharded_documents()
        index = self.docs() if sharded is None else None
        ur = self.info.unit_rows
        if index is None and sharded is None:
            # Without an index only a fully committed hook can say a document is whole.
            committed = self.committed_units(hook)
            if len(committed) < self.info.num_units:
                raise NotCommittedError(
                    f"dataset {self.name!r} has no document index, so documents are found by scanning committed units, "
                    f"and {len(committed)} of {self.info.num_units} units of {hook!r} are committed: a document could "
                    "continue in one that is not. Read by rows, or wait until every unit is committed"
                )
            toks = self.tokens(hook)
            rows = toks.column("row").to_numpy()[rows_of_docs(toks, ids)]
            found = np.isin(ids, toks.column("doc_id").to_numpy())
            if not found.all():
                raise UnknownDocumentError(f"dataset {self.name!r} has no document(s) {[int(d) for d in ids[~found]][:10]}")
            return rows
        found = sharded.spans(ids) if sharded is not None else spans_of(index, ids, dataset=self.name)  # type: ignore[arg-type]
        spans = sorted(found, key=lambda s: s[1])
        committed = set(self.committed_units(hook))
        for doc, a, b in spans:
            units = range(a // ur, (b - 1) // ur + 1)
            missing = [u for u in units if u not in committed]
            if missing:
                held = " (held back until the corpus fills a unit)" if missing[0] >= self.info.num_units else ""
                raise NotCommittedError(
                    f"dataset {self.name!r} hook {hook!r}: document {doc} has rows {a}..{b - 1} in unit(s) "
                    f"{list(units)}, of which {missing} {'is' if len(missing) == 1 else 'are'} not committed{held}; "
                    "call refresh() to see newer commits"
                )
        return [(a, b) for _, a, b in spans]

    # -- activations ----------------------------------------------------------------------

    def _layout(self, hook: str) -> ShardLayout:
        return shard_layout(self.info, hook)

    def _extent(self, hook: str) -> int:
        """Rows of the dataset's row space: every unit full but the last, as committed (it may
        be short; taken as full while uncommitted)."""
        last_rows = self.commits.last_rows(hook)
        return (self.info.num_units - 1) * self.info.unit_rows + (last_rows if last_rows is not None else self.info.unit_rows)

    def _unit_rows(self, hook: str, unit: int, local: np.ndarray | None, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Stored values ``[n, d]`` of one unit's rows: ``local`` (sorted unique indices within
        the unit), or the range ``[lo, hi)``. Only the checksum blocks holding those rows are
        read and checked (nearby rows share one read). Read-only: callers copy."""
        rec = self.record(hook, unit)
        hi = rec.rows if hi is None else hi
        self._check_in_unit(hook, unit, rec, hi - 1 if local is None else int(local[-1]))
        sl = self._layout(hook)
        sdt = storage_dtype(self.info.dtype)
        rb, where = sl.row_bytes, self._where(hook, unit, rec)

        if local is None:  # a short range is checked in row blocks, a long one in 64 KiB blocks
            buf = protocol.read_checked(self.storage, rec.file, lo * rb, hi * rb, where=where)
            return buf.view(sdt).reshape(hi - lo, sl.d)
        # Rows whose 64 KiB checksum blocks touch or adjoin share one range (a range costs more
        # Python than hashing 64 KiB does); all ranges in one read. Of a range with gaps only
        # the blocks holding its rows are checked (the gaps are never handed on), at the
        # granularity that hashes least: a row's own fine block, or 64 KiB blocks for runs.
        bs = rec.file.block_size
        first_block, last_block = local * rb // bs, ((local + 1) * rb - 1) // bs
        cuts = np.flatnonzero(first_block[1:] > last_block[:-1] + 1) + 1
        groups = np.split(local, cuts)
        spans = [(int(g[0]), int(g[-1]) + 1) for g in groups]
        used = [None if g.size == b - a else g * rb for g, (a, b) in zip(groups, spans)]
        bufs = protocol.read_checked_many(self.storage, rec.file, [(a * rb, b * rb) for a, b in spans], where=where,
                                          used=used, used_bytes=rb)
        parts = []
        for grp, (a, b), buf in zip(groups, spans, bufs):
            block = buf.view(sdt).reshape(b - a, sl.d)
            parts.append(block if grp.size == b - a else block[grp - a])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _check_in_unit(self, hook: str, unit: int, rec: CommitRecord, last: int) -> None:
        if last >= rec.rows:
            raise RowOutOfRangeError(
                f"dataset {self.name!r} hook {hook!r}: row {unit * self.info.unit_rows + last} is past the end of unit {unit}, "
                f"which holds {rec.rows} rows"
            )

    def unit_array(self, hook: str, unit: int) -> np.ndarray:
        """A whole committed unit as a read-only ``[rows, d]`` array of the stored dtype,
        memory-mapped where the backend can; checked in full the first time this dataset object
        maps it (the batch iterator's path)."""
        arr = self._mapped.get((hook, unit))
        if arr is None:
            rec = self.record(hook, unit)
            data = protocol.map_checked(self.storage, rec.file, where=self._where(hook, unit, rec))
            sl = self._layout(hook)
            arr = data[: rec.rows * sl.row_bytes].view(storage_dtype(self.info.dtype)).reshape(rec.rows, sl.d)
            self._mapped[(hook, unit)] = arr
        return arr

    def read(
        self,
        hook: str,
        rows: slice | Sequence[int] | np.ndarray | None = None,
        *,
        docs: Iterable[int] | None = None,
        as_: Literal["numpy", "torch"] = "numpy",
        dtype: Any = None,
    ) -> np.ndarray | torch.Tensor:
        """Activations ``[n, d]`` of ``hook`` at global token rows (a slice or an index array),
        or of every row of ``docs`` (in dataset order); with neither, every committed row in
        order (aligned with ``tokens(hook)``). Only committed rows are read, and every byte read
        is checked. NumPy output of bfloat16 data is widened to float32 exactly;
        ``as_="torch"`` returns bfloat16 as is. ``dtype`` converts (e.g. ``torch.float32``).

        Rows past the dataset's end raise :class:`RowOutOfRangeError` (slices and indices
        alike); rows of a unit that is not committed raise :class:`NotCommittedError`; unknown
        documents raise :class:`UnknownDocumentError`."""
        self.check_hook(hook)
        if as_ not in ("numpy", "torch"):
            raise ValueError(f"as_ must be 'numpy' or 'torch', got {as_!r}")
        if rows is not None and docs is not None:
            raise ValueError("pass `rows` or `docs`, not both")
        out_name, out_np = _resolve_out_dtype(self.info.dtype, as_, dtype)
        d = self.info.hooks[hook].d

        # Plan: (unit, lo, hi) blocks for contiguous rows, or an index array.
        blocks: list[tuple[int, int, int]] = []
        idx: np.ndarray | None = None
        if rows is None and docs is None:
            blocks = [(u, 0, self.unit_counts(hook, u)[0]) for u in self.committed_units(hook)]
        elif docs is not None:
            found = self._rows_of_docs(hook, docs)
            if isinstance(found, np.ndarray):
                idx = found
            else:  # contiguous spans: read as blocks, like slices
                for a, b in found:
                    self._blocks_of(a, b, blocks)
        elif isinstance(rows, slice):
            idx = self._slice_plan(hook, rows, blocks)
        else:
            idx = self._index_array(hook, rows)

        if idx is not None:
            return self._gather(hook, idx, out_name, out_np, as_)
        for u, _lo, _hi in blocks:  # every unit committed before anything is read
            self.record(hook, u)
        # One copy, out of the (mapped, checked) file into memory of the caller's own.
        n = sum(hi - lo for _, lo, hi in blocks)
        out = np.empty((n, d), dtype=out_np)
        at = 0
        for u, lo, hi in blocks:
            _copy_into(out[at : at + hi - lo], out_name, self._unit_rows(hook, u, None, lo, hi), self.info.dtype)
            at += hi - lo
        return to_torch(out, out_name) if as_ == "torch" else out

    def _past_end(self, hook: str, row: int, extent: int) -> RowOutOfRangeError:
        return RowOutOfRangeError(
            f"dataset {self.name!r} hook {hook!r}: row {row} is past the end; the dataset has {extent:,} rows "
            f"(0..{extent - 1}) in {self.info.num_units} units, {self.num_rows(hook):,} of them committed"
        )

    def _slice_plan(self, hook: str, rows: slice, blocks: list[tuple[int, int, int]]) -> np.ndarray | None:
        extent = self._extent(hook)
        for bound in (rows.start, rows.stop):
            if bound is not None and not isinstance(bound, (int, np.integer)):
                raise TypeError(f"row slice bounds must be integers, got {bound!r}")
            if bound is not None and bound > extent:
                raise self._past_end(hook, int(bound) - 1, extent)
        start, stop, step = rows.indices(extent)
        if step != 1:
            return np.arange(start, stop, step, dtype=np.int64)
        self._blocks_of(start, stop, blocks)
        return None

    def _blocks_of(self, start: int, stop: int, blocks: list[tuple[int, int, int]]) -> None:
        """Global rows ``[start, stop)`` as ``(unit, lo, hi)`` blocks, appended to ``blocks``."""
        ur = self.info.unit_rows
        u = start // ur
        while start < stop:
            hi = min(stop, (u + 1) * ur)
            blocks.append((u, start - u * ur, hi - u * ur))
            start, u = hi, u + 1

    def _index_array(self, hook: str, rows: Any) -> np.ndarray:
        idx = np.asarray(rows)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"rows must be a slice or a 1-d array of integer row indices, got dtype {idx.dtype} with {idx.ndim} dimension(s)")
        idx = idx.astype(np.int64)
        if idx.min() < 0:
            raise RowOutOfRangeError(f"row indices must be non-negative, got {int(idx.min())}")
        extent = self._extent(hook)
        if idx.max() >= extent:
            raise self._past_end(hook, int(idx.max()), extent)
        return idx

    def _gather(self, hook: str, idx: np.ndarray, out_name: str, out_np: np.dtype, as_: str) -> np.ndarray | torch.Tensor:
        """Rows ``idx`` in the order given (repeats allowed): each distinct row read once,
        unit by unit, touching only the chunks that hold them."""
        d, ur = self.info.hooks[hook].d, self.info.unit_rows
        if idx.size == 0:
            empty = np.empty((0, d), dtype=out_np)
            return to_torch(empty, out_name) if as_ == "torch" else empty
        uniq, inverse = np.unique(idx, return_inverse=True)
        units = uniq // ur
        bounds = np.flatnonzero(np.diff(units)) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, uniq.size]
        for a in starts:  # every unit committed before anything is read
            self.record(hook, int(units[a]))
        vals = np.empty((uniq.size, d), dtype=out_np)
        for a, b in zip(starts, ends):
            u = int(units[a])
            _copy_into(vals[a:b], out_name, self._unit_rows(hook, u, uniq[a:b] - u * ur), self.info.dtype)
        in_order = uniq.size == idx.size and (idx.size < 2 or bool((np.diff(idx) > 0).all()))
        out = vals if in_order else vals[inverse.reshape(-1)]
        return to_torch(out, out_name) if as_ == "torch" else out

    def iter_batches(self, hooks: str | Sequence[str], **options: Any) -> BatchIterator:
        """Shuffled training batches of ``hooks``: a ``[batch, d]`` tensor, or a dict of aligned
        tensors for several hooks. Options (``batch_size=4096, shuffle=True, seed=0, epochs=1,
        skip_special=True, buffer_rows=2**17, drop_last=False, dtype=torch.float32,
        prefetch=4, units=None, progress=None``) are those of :class:`store.datasets.batches.BatchIterator`. Use it as
        a context manager (or call ``close()``) to stop its loader threads promptly."""
        return BatchIterator(self, hooks, **options)

    # -- verification ---------------------------------------------------------------------

    def verify(self, *, hooks: Sequence[str] | None = None, committed_only: bool = False) -> VerifyReport:
        """Check every committed unit against its commit record, and count what is committed.
        ``ok`` needs no problem and, unless ``committed_only``, every unit committed."""
        return verify(self, hooks=hooks, committed_only=committed_only)

    def repair(self, report: VerifyReport | None = None) -> RepairReport:
        """Remove the commit records (and files) of units that fail their check, so the next
        extraction recomputes exactly those. Takes the dataset's write lease."""
        return repair(self, report)


def open_dataset(store: StoreRoot, name: str, *, version: str | None = None) -> ActivationDataset:
    """The dataset of exactly that name (an error naming those the store holds otherwise); with
    ``version``, one of the versions of ``name``: ``"latest"`` the newest, or a revision (a prefix
    of its hash). What :meth:`strata.store.Store.dataset` does."""
    if version is not None:
        name = pick(store, name, version)
    try:
        return ActivationDataset(store, name)
    except DatasetNotFoundError:
        names = dataset_names(store.storage)
        raise DatasetNotFoundError(
            f"no dataset {name!r} in store {store.uri}; it holds: {', '.join(names) if names else 'no datasets'}"
        ) from None
