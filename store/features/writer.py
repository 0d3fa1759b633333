"""Writing feature tables: units (any worker, fenced) and the driver-only steps (the manifest,
the merged generation, clean-up).

A unit's table becomes visible only through its commit record (put-if-absent): the data file
first, at a key of its own attempt, then the record naming it. A rerun of a committed unit finds
the record and writes nothing; a lost race deletes its own file; a crashed attempt leaves a file
no record names, which the driver removes once it is old enough to be an orphan.

The driver, holding the table's lease, writes the manifest (identity first, then a pointer to the
current merged generation) and builds merged generations (:mod:`store.features.merge`). A
generation is committed as a whole (its own commit record) before the manifest points at it, and
the generation before it is kept, so a reader that opened the table just before a rebuild keeps
reading a consistent set.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from strata.store.commit import protocol
from strata.store.commit.lease import Fence, Lease
from strata.store.commit.protocol import CommitRecord, FileEntry
from strata.store.errors import WriteMismatchError
from strata.store.features.format import (
    FeatureTableExistsError,
    FeatureTableInfo,
    commit_key,
    encode_unit,
    load_info,
    merged_dir,
    table_dir,
    unit_key,
    unit_records,
    units_dir,
    write_info,
)
from strata.store.storage import Storage

log = logging.getLogger(__name__)

#: A unit file no record names, older than this, was left by a dead writer.
ORPHAN_AFTER_S = 60.0


def table_lease(storage: Storage, name: str, *, owner: str = "", stale_after_s: float = 60.0) -> Lease:
    """The write lease of a feature table, held by its encode job's driver."""
    return Lease(storage, table_dir(name), what=f"feature table {name!r}", owner=owner, stale_after_s=stale_after_s,
                 heartbeat_s=min(10.0, stale_after_s / 4))


def identity_diff(old: FeatureTableInfo, new: FeatureTableInfo) -> str:
    a, b = old.identity(), new.identity()
    return ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k])


def create_or_open(storage: Storage, info: FeatureTableInfo, *, lease: Lease | Fence) -> FeatureTableInfo:
    """Write the manifest of a new table, or return the existing one when its identity is the
    same (driver only). A different identity is refused, never overwritten."""
    old = load_info(storage, info.name)
    if old is not None:
        diff = identity_diff(old, info)
        if diff:
            raise FeatureTableExistsError(f"feature table {info.name!r} already exists with another identity ({diff}); choose a new `name`")
        return old
    lease.check()
    now = protocol.utcnow()
    info = info.with_changes(created_at=now, updated_at=now, merged=None)
    write_info(storage, info)
    return info


class FeatureWriter:
    """Writes units of one feature table; safe from many processes at once, each writing other
    units (a unit written twice keeps its first commit). ``fence``: the driver's lease fence."""

    def __init__(self, storage: Storage, info: FeatureTableInfo, *, fence: Fence | None = None) -> None:
        self.storage = storage
        self.info = info
        self.fence = fence

    def committed(self, unit: int) -> CommitRecord | None:
        return protocol.read_record(self.storage, commit_key(self.info.name, unit))

    def write_unit(self, unit: int, *, rows: int, encoded_rows: int, row: np.ndarray, feature: np.ndarray,
                   value: np.ndarray, extra: dict[str, Any] | None = None) -> str:
        """Write and commit unit ``unit`` (``rows`` token rows, ``encoded_rows`` of them encoded):
        its activations as global ``row``, ``feature``, ``value`` arrays, sorted by row then
        feature. Returns ``"committed"`` or ``"already committed"``."""
        what = f"feature table {self.info.name!r} unit {unit}"
        n = len(row)
        if not (len(feature) == len(value) == n):
            raise WriteMismatchError(f"{what}: row, feature and value arrays differ in length")
        lo = unit * self.info.unit_rows
        if n and (int(row.min()) < lo or int(row.max()) >= lo + rows or int(feature.min()) < 0 or int(feature.max()) >= self.info.d_sae):
            raise WriteMismatchError(f"{what}: rows outside {lo}..{lo + rows - 1} or features outside 0..{self.info.d_sae - 1}")
        if n > 1 and not np.all((np.diff(row) > 0) | ((np.diff(row) == 0) & (np.diff(feature) > 0))):
            raise WriteMismatchError(f"{what}: entries must be sorted by row, then feature, without repeats")
        if self.committed(unit) is not None:
            return "already committed"
        ident = protocol.writer_identity()
        data = encode_unit(row, feature, value)
        key = unit_key(self.info.name, unit, ident["attempt"])
        self.storage.put_if_absent(key, data)
        rec = CommitRecord(unit, self.info.hook, rows, (FileEntry.of(key, data),), ident, protocol.utcnow(),
                           fence=None if self.fence is None else self.fence.token,
                           extra={"entries": n, "encoded_rows": int(encoded_rows), "sae_fingerprint": self.info.sae_fingerprint,
                                  **(extra or {})})
        if self.fence is not None:
            self.fence.check()  # a job that lost its lease commits nothing
        won, _ = protocol.commit(self.storage, commit_key(self.info.name, unit), rec)
        if not won:
            self.storage.delete(key)  # the winner's file is the one that counts
            return "already committed"
        return "committed"


def clean_orphans(storage: Storage, info: FeatureTableInfo, *, lease: Lease, older_than_s: float = ORPHAN_AFTER_S) -> int:
    """Delete unit files that no commit record names and that are old enough to be a dead
    writer's (driver, holding the lease, after its workers ended), so a DuckDB glob over
    ``units/`` sees committed tables only. Returns how many were deleted."""
    good, bad = unit_records(storage, info)
    named = {r.file.key for r in good.values()}
    now = time.time()
    gone = 0
    for key in storage.list(units_dir(info.name)):
        unit = _unit_of(key)
        if key in named or unit in bad:
            continue  # a damaged record's file is evidence for `verify`, not an orphan
        try:
            if now - storage.modified(key) < older_than_s:
                continue
        except FileNotFoundError:
            continue
        lease.check()
        storage.delete(key)
        gone += 1
    if gone:
        log.info("feature table %r: removed %d unit file(s) left by dead writers", info.name, gone)
    return gone


def _unit_of(key: str) -> int | None:
    stem = key.rsplit("/", 1)[-1]
    try:
        return int(stem.split(".")[0].removeprefix("unit-"))
    except ValueError:
        return None


def publish(storage: Storage, info: FeatureTableInfo, gen: str, *, lease: Lease) -> FeatureTableInfo:
    """Point the manifest at merged generation ``gen`` (already committed), then delete the
    generations older than the one it replaces (driver only)."""
    lease.check()
    new = info.with_changes(merged=gen, updated_at=protocol.utcnow())
    write_info(storage, new)
    keep = {gen, *([info.merged] if info.merged else [])}  # the new one and the one it replaces
    for g in storage.list_dirs(merged_dir(info.name)):
        if g not in keep:
            _delete_generation(storage, info.name, g)
    return new


def _delete_generation(storage: Storage, name: str, gen: str) -> None:
    prefix = f"{merged_dir(name)}/{gen}"
    storage.delete(f"{prefix}/commit.json")  # the record first: the generation vanishes whole
    for key in storage.list(prefix):
        storage.delete(key)
