"""The one writer of activation datasets: create (driver), write units (any worker), grow and
add hooks (driver)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import zarr

from store import layout
from store.commits import CommitRecord, checksum, utcnow, writer_identity
from store.dtypes import storage_dtype, to_storage
from store.errors import (
    HookNotFoundError,
    UnitOutOfRangeError,
    WriteMismatchError,
)
from store.manifest import DatasetInfo, HookInfo
from store.shards import ShardLayout, codec_config, pick_chunk_rows
from store.tokens import check_tokens, encode_tokens

if TYPE_CHECKING:
    from store.core import Store

log = logging.getLogger(__name__)


def shard_layout(info: DatasetInfo, hook: str) -> ShardLayout:
    h = info.hooks[hook]
    return ShardLayout(info.unit_rows, h.chunk_rows, h.d, storage_dtype(info.dtype).itemsize)


def create_hook_array(store: Store, info: DatasetInfo, hook: str) -> None:
    """Create the Zarr v3 array of one hook: ``[capacity_rows, d]``, one shard per unit."""
    h = info.hooks[hook]
    arr = zarr.create_array(
        store=store.zarr_store,
        name=layout.array_path(info.name, hook),
        shape=(info.capacity_rows, h.d),
        shards=(info.unit_rows, h.d),
        chunks=(h.chunk_rows, h.d),
        dtype=storage_dtype(info.dtype),
        compressors=None,
        fill_value=0,
        attributes={"strata": {"dtype": info.dtype, "hook": hook, "dataset": info.name, "unit_rows": info.unit_rows}},
        overwrite=True,
    )
    codecs = arr.metadata.to_dict()["codecs"]
    expect = codec_config(h.chunk_rows, h.d)
    if _normalize(codecs[0]) != _normalize(expect):
        raise RuntimeError(f"zarr wrote an unexpected codec configuration for {hook}: {codecs}")


def _normalize(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _normalize(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_normalize(v) for v in x]
    return x


def new_hook_info(info_unit_rows: int, d: int, dtype: str) -> HookInfo:
    if not isinstance(d, (int, np.integer)) or d <= 0:
        raise ValueError(f"hook width must be a positive int, got {d!r}")
    return HookInfo(d=int(d), chunk_rows=pick_chunk_rows(info_unit_rows, int(d), storage_dtype(dtype).itemsize))


class DatasetWriter:
    """Writes units of one dataset. Safe to use from many processes and machines at once, each
    writing different units; a unit written twice keeps its first commit."""

    # A shard uncommitted for this long was left by a dead writer (a live one commits within
    # milliseconds of its shard appearing).
    orphan_after_s: float = 60.0

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.storage = store.storage
        self.info = store._load_info(name)

    def refresh(self) -> DatasetInfo:
        self.info = self.store._load_info(self.name)
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
            arr = zarr.open_array(store=self.store.zarr_store, path=layout.array_path(self.name, hook), mode="r+")
            arr.resize((new.capacity_rows, new.hooks[hook].d))
        self.store._write_info(new)
        self.info = new
        return new

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
            create_hook_array(self.store, new, hook)
        self.store._write_info(new)
        self.info = new
        return new

    # -- units --------------------------------------------------------------------------

    def is_committed(self, unit: int, hook: str | None = None) -> bool:
        return self.storage.exists(layout.commit_key(self.name, hook, unit))

    def read_commit(self, unit: int, hook: str | None) -> CommitRecord | None:
        try:
            return CommitRecord.from_json(self.storage.read(layout.commit_key(self.name, hook, unit)))
        except FileNotFoundError:
            return None

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
        if not 0 <= unit < info.num_units:
            info = self.refresh()  # the driver may have grown the dataset since this writer opened
            if not 0 <= unit < info.num_units:
                raise UnitOutOfRangeError(f"{what}: out of range; the dataset has units 0..{info.num_units - 1}")
        unknown = [h for h in acts if h not in info.hooks]
        if unknown:
            info = self.refresh()
            unknown = [h for h in acts if h not in info.hooks]
            if unknown:
                raise HookNotFoundError(f"{what}: unknown hook(s) {unknown}; the dataset has {sorted(info.hooks)}")
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

        ident = writer_identity()
        # The token table (Parquet encoding) and the checksums run on a helper thread while this
        # one writes the shards: all three release the GIL, and the write path stays near disk
        # speed. The token table is committed before any hook, so a hook unit is never visible
        # without its tokens.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-write") as pool:
            tokens_done = pool.submit(self._write_tokens, unit, tokens, rows, ident, what)
            sums = {h: pool.submit(checksum, a) for h, a in stored.items()}
            ready = {h: self._write_shard(unit, h, a, sums[h], ident, what) for h, a in stored.items()}
            status = {"tokens": tokens_done.result()}
        for hook, rec in ready.items():
            status[hook] = rec if isinstance(rec, str) else self._commit_hook(rec, what)
        return status

    def _check_existing(self, rec: CommitRecord, rows: int, what: str) -> str:
        if rec.rows != rows:
            raise WriteMismatchError(f"{what}: already committed with {rec.rows} rows, this write has {rows}")
        return "already committed"

    def _write_tokens(self, unit: int, table: pa.Table, rows: int, ident: dict[str, Any], what: str) -> str:
        existing = self.read_commit(unit, None)
        if existing is not None:
            return self._check_existing(existing, rows, what)
        data = encode_tokens(table)
        key = layout.tokens_key(self.name, unit, ident["attempt"])
        # The key is this attempt's own: put-if-absent (a link, on a local disk) publishes it
        # whole, and avoids the rename that makes a local write much slower here.
        self.storage.put_if_absent(key, data)
        n_special = int(table.column("special").to_numpy(zero_copy_only=False).sum())
        rec = CommitRecord(unit, None, rows, checksum(data), key, len(data), ident, utcnow(), special=n_special)
        if self.storage.put_if_absent(layout.commit_key(self.name, None, unit), rec.to_json()):
            return "committed"
        # Lost a race with another writer of this unit: its table is the one that counts.
        self.storage.delete(key)
        winner = self.read_commit(unit, None)
        assert winner is not None
        return self._check_existing(winner, rows, what)

    def _write_shard(self, unit: int, hook: str, arr: np.ndarray, sum_: Future[str], ident: dict[str, Any], what: str) -> CommitRecord | str:
        """Write one hook's shard put-if-absent; returns its commit record to put, or the
        status when another writer's commit already covers the unit.

        A shard is never overwritten while it may be committed or about to be: the shard key is
        fixed (it is a Zarr array's), so two writers of one unit (a retried straggler, two jobs
        on one dataset) would otherwise leave a commit whose checksum is of the other's bytes.
        A shard already there with no commit is the other writer's, between its shard and its
        commit (milliseconds: put-if-absent publishes a shard only when whole); identical bytes
        are committed as they are, other bytes are waited on, and replaced only once they have
        sat uncommitted for ``orphan_after_s`` (their writer died).
        """
        rows = arr.shape[0]
        existing = self.read_commit(unit, hook)
        if existing is not None:
            return self._check_existing(existing, rows, what)
        sl = shard_layout(self.info, hook)
        key = layout.shard_key(self.name, hook, unit)
        written = self.storage.put_if_absent(key, sl.encode(arr))
        rec = CommitRecord(unit, hook, rows, sum_.result(), key, sl.shard_nbytes(rows), ident, utcnow())
        while not written:
            winner = self.read_commit(unit, hook)
            if winner is not None:
                return self._check_existing(winner, rows, what)
            # Shards are never rewritten, only deleted once orphaned: one comparison per shard seen.
            if self._shard_matches(key, rec):
                break  # the same bytes: commit them
            winner = self._await_commit_or_orphan(unit, hook, key)
            if winner is not None:
                return self._check_existing(winner, rows, what)
            log.warning("%s hook %r: replacing a shard left uncommitted by a dead writer", what, hook)
            self.storage.delete(key)
            written = self.storage.put_if_absent(key, sl.encode(arr))
        return rec

    def _commit_hook(self, rec: CommitRecord, what: str) -> str:
        assert rec.hook is not None
        if self.storage.put_if_absent(layout.commit_key(self.name, rec.hook, rec.unit), rec.to_json()):
            return "committed"
        winner = self.read_commit(rec.unit, rec.hook)
        assert winner is not None
        return self._check_existing(winner, rec.rows, what)

    def _shard_matches(self, key: str, rec: CommitRecord) -> bool:
        try:
            if self.storage.size(key) != rec.nbytes:
                return False
            itemsize = storage_dtype(self.info.dtype).itemsize
            body = self.storage.read_range(key, 0, rec.rows * self.info.hooks[rec.hook].d * itemsize)
        except FileNotFoundError:
            return False
        return checksum(body) == rec.checksum

    def _await_commit_or_orphan(self, unit: int, hook: str, key: str) -> CommitRecord | None:
        """Wait while another writer's shard may still be committed. Returns its commit, or
        None once the shard is an orphan (or gone) and may be replaced."""
        while True:
            winner = self.read_commit(unit, hook)
            if winner is not None:
                return winner
            try:
                age = time.time() - self.storage.modified(key)
            except FileNotFoundError:
                return None  # deleted meanwhile: try to write ours
            if age >= self.orphan_after_s:
                return None
            time.sleep(min(0.5, max(0.05, self.orphan_after_s - age)))
