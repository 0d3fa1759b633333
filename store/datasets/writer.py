"""The one writer of activation datasets: write units (any worker), and the driver-only
metadata changes (grow, add hooks, the document index, provenance)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from strata.store import layout
from strata.store.commit import protocol
from strata.store.commit.lease import Lease, current_generation
from strata.store.commit.protocol import CommitRecord, FileEntry
from strata.store.datasets.commits import CommitState, encode_commit_index
from strata.store.datasets.documents import check_documents, encode_documents
from strata.store.datasets.manifest import IDENTITY_META_KEYS, DatasetInfo, HookInfo, load_manifest, write_manifest
from strata.store.datasets.shards import create_hook_array, pick_chunk_rows, resize_hook_array, shard_layout
from strata.store.datasets.tokenized import check_shards_table
from strata.store.datasets.tokens import check_tokens, encode_tokens
from strata.store.dtypes import storage_dtype, to_storage
from strata.store.errors import HookNotFoundError, LeaseLostError, UnitOutOfRangeError, WriteMismatchError
from strata.store.root import StoreRoot
from strata.store.storage import Storage

log = logging.getLogger(__name__)


def dataset_lease(storage: Storage, name: str, *, owner: str = "", stale_after_s: float = 60.0) -> Lease:
    """The write lease of a dataset, for a job's driver (or a repair): ``with dataset_lease(...) as lease:``;
    ``lease.token`` is the fencing token its writers carry."""
    layout.check_name(name)
    return Lease(
        storage, layout.dataset_dir(name), what=f"dataset {name!r}", owner=owner,
        stale_after_s=stale_after_s, heartbeat_s=min(10.0, stale_after_s / 4),
    )


def new_hook_info(unit_rows: int, d: int, dtype: str) -> HookInfo:
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d <= 0:
        raise ValueError(f"hook width must be a positive int, got {d!r}")
    return HookInfo(d=int(d), chunk_rows=pick_chunk_rows(unit_rows, int(d), storage_dtype(dtype).itemsize))


class DatasetWriter:
    """Writes units of one dataset. Safe to use from many processes and machines at once, each
    writing different units; a unit written twice keeps its first commit.

    ``fence`` is the fencing token (lease generation) of the job this writer works for: every
    commit record carries it, and a writer refuses to commit once the dataset's lease has a
    newer generation (the job lost its lease).
    """

    # A data file uncommitted for this long was left by a dead writer (a live one commits
    # within milliseconds of its file appearing).
    orphan_after_s: float = 60.0

    def __init__(self, store: StoreRoot, name: str, *, fence: int | None = None) -> None:
        self.store = store
        self.name = layout.check_name(name)
        self.storage = store.storage
        self.fence = fence
        self.info = load_manifest(self.storage, name)

    def refresh(self) -> DatasetInfo:
        self.info = load_manifest(self.storage, self.name)
        return self.info

    # -- driver-only metadata changes ---------------------------------------------------

    def grow(self, num_units: int) -> DatasetInfo:
        """Add units at the end (driver only, while no worker writes). Existing units are untouched."""
        info = self.refresh()
        if num_units < info.num_units:
            raise ValueError(f"cannot shrink dataset {self.name!r} from {info.num_units} to {num_units} units")
        if num_units == info.num_units:
            return info
        new = info.with_changes(num_units=int(num_units))
        for hook in new.hooks:
            resize_hook_array(self.storage, new, hook)
        return self._publish(new)

    def forget_units(self, units: list[int], *, hooks: list[str] | None = None) -> list[int]:
        """Remove every commit of ``units`` (token table and every hook, or only ``hooks``), records
        first, then their files (driver only, holding the lease: a sharded corpus whose shard
        changed recomputes the units it feeds; a hook whose meaning changed is captured again).
        Returns the units that had a commit."""
        if not units:
            return []
        self._check_fence()
        state = CommitState(self.storage, self.name)
        state.refresh()
        gone = set()
        for hook in [None, *self.info.hooks] if hooks is None else hooks:
            have = set(state.committed_units(hook))
            for u in sorted(set(units) & have):
                self.storage.delete(layout.commit_key(self.name, hook, u))
                gone.add(u)
        for u in sorted(gone):
            if hooks is None:
                for key in self.storage.list(layout.tokens_dir(self.name)):
                    if layout.tokens_key_pattern(self.name, u).fullmatch(key):
                        self.storage.delete(key)
            for hook in self.info.hooks if hooks is None else hooks:
                self.storage.delete(layout.shard_key(self.name, hook, u))
        self.compact_commits(full=True)  # the index must not name the removed records
        return sorted(gone)

    def shrink(self, num_units: int) -> DatasetInfo:
        """Drop units at the end (driver only); refused while any of them is committed."""
        info = self.refresh()
        if num_units >= info.num_units:
            return info
        state = CommitState(self.storage, self.name)
        state.refresh()
        held = sorted({u for h in [None, *info.hooks] for u in state.committed_units(h) if u >= num_units})
        if held:
            raise ValueError(f"cannot shrink dataset {self.name!r} to {num_units} units: units {held[:10]} are committed")
        new = info.with_changes(num_units=int(num_units))
        for hook in new.hooks:
            resize_hook_array(self.storage, new, hook)
        return self._publish(new)

    def write_shards_table(self, table: pa.Table) -> DatasetInfo:
        """Record the plan of a sharded corpus (driver only): one row per shard, see
        :data:`strata.store.datasets.tokenized.SHARDS_SCHEMA`."""
        return self._write_aux("shards", encode_documents(check_shards_table(table)), "parquet")

    def add_hooks(self, hooks: Mapping[str, int]) -> DatasetInfo:
        """Add hook points (driver only). Hooks already present must keep their width."""
        info = self.refresh()
        added = {}
        for hook, d in hooks.items():
            layout.check_hook(hook)
            if hook in info.hooks:
                if info.hooks[hook].d != d:
                    raise ValueError(f"hook {hook!r} already exists with width {info.hooks[hook].d}, not {d}")
                continue
            added[hook] = new_hook_info(info.unit_rows, d, info.dtype)
        if not added:
            return info
        new = info.with_changes(hooks={**info.hooks, **added})
        for hook in added:
            create_hook_array(self.storage, new, hook)
        return self._publish(new)

    def write_documents(self, table: pa.Table) -> DatasetInfo:
        """Record the document index (driver only): ``doc_id, row_start, row_end,
        dropped_tokens`` per document, plus any document fields kept from the corpus (see
        :mod:`store.datasets.documents`)."""
        return self._write_aux("documents", encode_documents(check_documents(table)), "parquet")

    def write_tokenizer(self, tokenizer_json: str) -> DatasetInfo:
        """Record the tokenizer (driver only; a ``tokenizers`` JSON serialization), so readers
        can decode tokens to text without the model."""
        return self._write_aux("tokenizer", tokenizer_json.encode("utf-8"), "json")

    def _write_aux(self, kind: str, data: bytes, suffix: str) -> DatasetInfo:
        # Named by content and written put-if-absent, then the manifest points at it: a reader
        # always sees the file its manifest describes.
        key = layout.aux_key(self.name, kind, xxhash.xxh3_64_hexdigest(data), suffix)
        fe = FileEntry.of(key, data)
        if not self.storage.put_if_absent(key, data) and protocol.verify_file(self.storage, fe) is not None:
            # The key names the content, so a file there with other bytes is damaged: replace it
            # (atomically; we are the driver), or a rerun would keep pointing at the damage.
            log.warning("dataset %r: replacing the damaged %s file %s", self.name, kind, key)
            self.storage.write(key, data)
        info = self.refresh()
        entry = fe.to_dict()
        if info.aux.get(kind) == entry:
            return info
        return self._publish(info.with_changes(aux={**info.aux, kind: entry}))

    def compact_commits(self, *, full: bool = False) -> DatasetInfo:
        """Compact every commit record into the dataset's commit index (driver only, when no
        worker writes: at the end of a job, after a repair). Readers then open and refresh the
        dataset with one read instead of one per record. Incremental by default (the old index
        for the record folders it covers, the records themselves for the rest); ``full``
        rereads every record (after a repair: the old index may name removed records)."""
        state = CommitState(self.storage, self.name, use_index=not full)
        state.refresh()
        return self._write_aux("commit_index", encode_commit_index(state), "parquet")

    def update_meta(self, **meta: Any) -> DatasetInfo:
        """Update provenance fields of the manifest (driver only); identity fields are refused."""

        bad = [k for k in meta if k in IDENTITY_META_KEYS]
        if bad:
            raise ValueError(f"cannot change identity field(s) {bad} of dataset {self.name!r}; a new identity is a new dataset")
        info = self.refresh()
        if {**info.meta, **meta} == info.meta:  # nothing new: a rerun writes nothing
            return info
        return self._publish(info.with_changes(meta={**info.meta, **meta}))

    def _publish(self, new: DatasetInfo) -> DatasetInfo:
        self._check_fence()
        write_manifest(self.storage, new)
        self.info = new
        return new

    def _check_fence(self) -> None:
        if self.fence is None:
            return
        cur = current_generation(self.storage, layout.dataset_dir(self.name))
        if cur != self.fence:
            raise LeaseLostError(
                f"dataset {self.name!r}: this writer works for the job holding lease generation {self.fence}, "
                f"but the lease is now at generation {cur}: another job took it over, so nothing more is committed"
            )

    # -- units --------------------------------------------------------------------------

    def read_commit(self, unit: int, hook: str | None) -> CommitRecord | None:
        return protocol.read_record(self.storage, layout.commit_key(self.name, hook, unit))

    def write_unit(self, unit: int, *, tokens: pa.Table, acts: Mapping[str, Any]) -> dict[str, str]:
        """Write one unit's token table and activations, then commit them.

        ``acts`` maps hooks to ``[rows, d]`` arrays (NumPy or torch, any floating dtype; values
        are rounded to the stored dtype). It may name a subset of the hooks (a hook added later
        is written for old units alone). Everything is checked before anything is written.
        Returns, per hook and for ``"tokens"``, ``"committed"`` or ``"already committed"``.
        """
        info = self.info
        what = f"dataset {self.name!r} unit {unit}"
        if not isinstance(unit, (int, np.integer)) or isinstance(unit, bool):
            raise UnitOutOfRangeError(f"{what}: unit index must be an int")
        unit = int(unit)
        if not 0 <= unit < info.num_units:
            info = self.refresh()  # the driver may have grown the dataset since this writer opened
            if not 0 <= unit < info.num_units:
                raise UnitOutOfRangeError(f"{what}: out of range; the dataset has units 0..{info.num_units - 1}")
        if any(h not in info.hooks for h in acts):
            info = self.refresh()
            unknown = [h for h in acts if h not in info.hooks]
            if unknown:
                raise HookNotFoundError(f"{what}: unknown hook(s) {unknown}; the dataset has {sorted(info.hooks, key=layout.hook_order)}")
        rows = tokens.num_rows if isinstance(tokens, pa.Table) else -1
        if rows <= 0 or rows % info.context_size or rows > info.unit_rows:
            raise WriteMismatchError(
                f"{what}: {rows} token rows; expected a positive multiple of context_size={info.context_size} "
                f"up to unit_rows={info.unit_rows}"
            )
        tokens = check_tokens(tokens, unit=unit, first_context=unit * info.unit_contexts, context_size=info.context_size, what=what)
        stored: dict[str, np.ndarray] = {}
        for hook, values in acts.items():
            arr = to_storage(values, info.dtype, what=f"{what} hook {hook!r}")
            expect = (rows, info.hooks[hook].d)
            if arr.shape != expect:
                raise WriteMismatchError(f"{what} hook {hook!r}: shape {tuple(arr.shape)}, expected {expect}")
            stored[hook] = arr

        ident = protocol.writer_identity()
        # The token table (Parquet encoding) and each shard's block checksums run on helper
        # threads while this one writes the shards: all release the GIL, so the write path
        # stays near disk speed. The token table is committed before any hook, so a hook's
        # unit is never visible without its tokens.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="strata-write") as pool:
            tokens_done = pool.submit(self._write_tokens, unit, tokens, rows, ident, what)
            ready = {}
            for h, a in stored.items():
                entry, parts = shard_layout(info, h).encode(a, layout.shard_key(self.name, h, unit), digest=pool.submit)
                ready[h] = self._write_shard(unit, h, parts, entry, rows, ident, what)
            status = {"tokens": tokens_done.result()}
        for hook, rec in ready.items():
            status[hook] = rec if isinstance(rec, str) else self._commit(rec, what)
        return status

    def _check_existing(self, rec: CommitRecord, rows: int, what: str) -> str:
        if rec.rows != rows:
            raise WriteMismatchError(f"{what}: already committed with {rec.rows} rows, this write has {rows}")
        return "already committed"

    def _record(self, unit: int, hook: str | None, rows: int, entry: FileEntry, ident: dict[str, Any], **kw: Any) -> CommitRecord:
        return CommitRecord(unit, hook, rows, (entry,), ident, protocol.utcnow(), fence=self.fence, **kw)

    def _commit(self, rec: CommitRecord, what: str) -> str:
        assert rec.unit is not None
        self._check_fence()
        won, winner = protocol.commit(self.storage, layout.commit_key(self.name, rec.hook, rec.unit), rec)
        return "committed" if won else self._check_existing(winner, rec.rows, what)

    def _write_tokens(self, unit: int, table: pa.Table, rows: int, ident: dict[str, Any], what: str) -> str:
        existing = self.read_commit(unit, None)
        if existing is not None:
            return self._check_existing(existing, rows, what)
        data = encode_tokens(table, first_row=unit * self.info.unit_rows)
        # The key is this attempt's own: put-if-absent (a link, on a local disk) publishes it
        # whole, and avoids the rename that makes a local write much slower here.
        key = layout.tokens_key(self.name, unit, ident["attempt"])
        self.storage.put_if_absent(key, data)
        n_special = int(table.column("special").to_numpy(zero_copy_only=False).sum())
        rec = self._record(unit, None, rows, FileEntry.of(key, data), ident, special=n_special)
        status = self._commit(rec, what)
        if status != "committed":
            self.storage.delete(key)  # lost the race: the winner's table is the one that counts
        return status

    def _write_shard(self, unit: int, hook: str, parts: list[Any], entry: Any, rows: int, ident: dict[str, Any], what: str) -> CommitRecord | str:
        """Publish one hook's shard; returns its commit record to write, or the status when
        another writer's commit already covers the unit. ``entry()`` gives its file entry."""
        existing = self.read_commit(unit, hook)
        if existing is not None:
            return self._check_existing(existing, rows, what)
        key = layout.shard_key(self.name, hook, unit)
        winner = protocol.publish(
            self.storage, key, parts, entry, record_key=layout.commit_key(self.name, hook, unit),
            orphan_after_s=self.orphan_after_s, what=f"{what} hook {hook!r}",
        )
        if winner is not None:
            return self._check_existing(winner, rows, what)
        return self._record(unit, hook, rows, entry(), ident)
