"""What of a dataset is committed: the commit records of every unit of every hook (and of the
token tables), read from the dataset's commit index and from listing only the record folders it
does not cover, each checked against what a record of that unit may say.

:class:`CommitState` is that view, refreshed on demand; the reader
(:class:`strata.store.datasets.reader.ActivationDataset`), the writer's compaction and ``verify``
share it. The commit index is a Parquet table of every valid record that the driver compacts
(:func:`encode_commit_index`) and readers decode (:func:`decode_commit_index`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from strata.store import layout
from strata.store.commit import parquet, protocol
from strata.store.commit.protocol import CommitRecord
from strata.store.datasets.manifest import DatasetInfo, load_manifest, read_aux
from strata.store.datasets.shards import shard_layout
from strata.store.errors import CorruptionError, HookNotFoundError, NotCommittedError
from strata.store.storage import Storage

log = logging.getLogger(__name__)

#: Threads that read commit records (and token tables) at once: remote stores answer slowly.
IO_THREADS = 16


@dataclass(frozen=True)
class IndexedRecord:
    """A commit record as the commit index holds it: its counts, and its JSON, parsed when used."""

    rows: int
    special: int
    key: str
    raw: bytes


INDEX_SCHEMA = pa.schema([("part", pa.string()), ("unit", pa.int64()), ("rows", pa.int64()), ("special", pa.int64()),
                          ("key", pa.string()), ("record", pa.binary())])


def _same_commit(old: Any, new: IndexedRecord) -> bool:
    """Whether a record held is the one the index now holds (a unit whose commit was removed and
    made again, by a recompute, has a new one)."""
    if isinstance(old, IndexedRecord):
        return old.raw == new.raw
    try:
        return bool(old.committed_at == CommitRecord.from_json(new.raw, where=new.key).committed_at)
    except CorruptionError:
        return True  # a damaged index entry: the record held stands; verify reports the index


def decode_commit_index(data: bytes, *, where: str) -> dict[str | None, dict[int, IndexedRecord]]:
    """The records a commit index holds, by part (a hook, or None for the token tables) and unit."""
    try:
        t = parquet.read(data).cast(INDEX_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as e:
        raise CorruptionError(f"{where}: not a commit index ({e})") from None
    out: dict[str | None, dict[int, IndexedRecord]] = {}
    for part, unit, rows, special, key, raw in zip(*(t.column(c).to_pylist() for c in INDEX_SCHEMA.names)):
        out.setdefault(part or None, {})[unit] = IndexedRecord(rows, special, key, raw)
    return out


def encode_commit_index(state: CommitState) -> bytes:
    """Every valid commit record of a dataset, as the driver compacts them (see ``refresh``)."""
    cols: dict[str, list[Any]] = {c: [] for c in INDEX_SCHEMA.names}
    for hook in [None, *state.info.hooks]:
        for unit in sorted(state.records.get(hook, {})):
            try:
                rec = state.record(hook, unit) if hook is None or unit in state.records.get(None, {}) else None
            except CorruptionError:
                continue
            if rec is None:  # a hook's record whose token record is missing: keep it listed, not indexed
                continue
            for c, v in zip(INDEX_SCHEMA.names, (hook or "", unit, rec.rows, rec.special, layout.commit_key(state.name, hook, unit), rec.to_json())):
                cols[c].append(v)
    return parquet.to_bytes(pa.table(cols, schema=INDEX_SCHEMA))


class CommitState:
    """The committed units of one dataset as of the last :meth:`refresh`: every record by part
    (a hook, or None for the token tables) and unit, and the records found damaged, with why.

    ``use_index=False`` lists every record instead of trusting the commit index (what
    compacting the index and ``verify`` need)."""

    def __init__(self, storage: Storage, name: str, *, use_index: bool = True) -> None:
        self.storage = storage
        self.name = layout.check_name(name)
        self.use_index = use_index
        self.info: DatasetInfo = load_manifest(storage, self.name)
        self.records: dict[str | None, dict[int, CommitRecord | IndexedRecord]] = {}
        self.damaged: dict[tuple[str | None, int], str] = {}  # (hook or None, unit) -> what is wrong with its record
        self._index: tuple[str, dict[str | None, dict[int, IndexedRecord]]] | None = None

    def refresh(self) -> list[tuple[str | None, int]]:
        """Pick up units (and hooks, and growth) committed since the last refresh, and forget
        units whose records were removed (by a repair); returns those forgotten, so a reader
        drops what it cached of them. Records come from the dataset's commit index (one read)
        and from listing only the record folders it does not cover."""
        self.info = load_manifest(self.storage, self.name)
        prev = self._index[0] if self._index is not None else None
        index = self._load_index()
        new_index = self._index is not None and self._index[0] != prev  # rewritten: a unit may have been recommitted
        n, group = self.info.num_units, layout.COMMIT_GROUP
        todo: list[tuple[str | None, int, str]] = []
        forgotten: list[tuple[str | None, int]] = []
        for hook in [None, *self.info.hooks]:
            have = self.records.setdefault(hook, {})
            indexed = index.get(hook, {})
            listed: dict[int, str] = {}
            for g in range(-(-n // group)):
                if all(u in indexed for u in range(g * group, min(n, (g + 1) * group))):
                    continue  # the index holds every unit of this folder: no listing
                for key in self.storage.list(layout.commit_group_dir(self.name, hook, g)):
                    u = layout.unit_of_commit_key(key)
                    if u is not None and key == layout.commit_key(self.name, hook, u):
                        listed[u] = key
            present = set(indexed) | set(listed)
            for u in [u for u in have if u not in present]:
                del have[u]
                forgotten.append((hook, u))
            for hu in [hu for hu in self.damaged if hu[0] == hook and hu[1] not in present]:
                del self.damaged[hu]
            for u, entry in indexed.items():
                if new_index and u in have and not _same_commit(have[u], entry):  # recommitted (a changed corpus shard): drop the old
                    del have[u]
                    forgotten.append((hook, u))
                if u not in have and (hook, u) not in self.damaged:
                    have[u] = entry
            todo += [(hook, u, k) for u, k in listed.items() if u not in have and (hook, u) not in self.damaged]
        with ThreadPoolExecutor(IO_THREADS) as pool:
            results = list(pool.map(lambda t: self._load_record(*t), todo))
        for (hook, u, _), res in zip(todo, results):
            if isinstance(res, CommitRecord):
                self.records[hook][u] = res
            else:
                self.damaged[(hook, u)] = res
        return forgotten

    def _load_index(self) -> dict[str | None, dict[int, IndexedRecord]]:
        key = (self.info.aux.get("commit_index") or {}).get("key")
        if key is None or not self.use_index:
            return {}
        if self._index is None or self._index[0] != key:
            try:
                _, data = read_aux(self.storage, self.info, "commit_index")  # type: ignore[misc]
                self._index = (key, decode_commit_index(data, where=f"dataset {self.name!r} commit index ({key})"))
            except CorruptionError as e:  # derived data: list every record instead (verify reports it)
                log.warning("%s; reading the commit records themselves", e)
                self._index = (key, {})
        return self._index[1]

    def _load_record(self, hook: str | None, unit: int, key: str) -> CommitRecord | str:
        """A commit record, validated against what a record of (hook, unit) may say; the
        problem as text when it is damaged."""
        try:
            data = self.storage.read(key)
        except FileNotFoundError:
            return "commit record disappeared while reading (a repair?)"
        return self._parse_record(hook, unit, key, data)

    def _parse_record(self, hook: str | None, unit: int, key: str, data: bytes) -> CommitRecord | str:
        try:
            rec = CommitRecord.from_json(data, where=key)
            info = self.info
            if rec.unit != unit or rec.hook != hook or len(rec.files) != 1:
                raise CorruptionError(f"{key}: damaged commit record (it describes unit {rec.unit} of {rec.hook or 'tokens'})")
            if rec.rows <= 0 or rec.rows > info.unit_rows or rec.rows % info.context_size:
                raise CorruptionError(f"{key}: damaged commit record ({rec.rows} rows for a unit of {info.unit_rows})")
            if hook is None:
                protocol.check_key(rec.file.key, layout.tokens_key_pattern(self.name, unit), where=key)
            else:
                protocol.check_key(rec.file.key, layout.shard_key(self.name, hook, unit), where=key)
                sl = shard_layout(info, hook)
                fine = rec.file.fine is not None  # shards written before fine tables have none
                if (rec.file.nbytes != sl.shard_nbytes(rec.rows, fine=fine) or rec.file.body_bytes != sl.body_nbytes(rec.rows)
                        or (fine and rec.file.fine_block_size != sl.fine_block_bytes)):
                    raise CorruptionError(f"{key}: damaged commit record (file sizes do not match {rec.rows} rows)")
            return rec
        except CorruptionError as e:
            return str(e)

    def hooks(self) -> list[str]:
        """Hook points in model order: embed, blocks 0..L-1, final norm."""
        return sorted(self.info.hooks, key=layout.hook_order)

    def check_hook(self, hook: str) -> str:
        """``hook``, when the dataset has it; HookNotFoundError naming those it has otherwise."""
        if hook not in self.info.hooks:
            raise HookNotFoundError(f"dataset {self.name!r} has no hook {hook!r}; it has: {', '.join(self.hooks())}")
        return hook

    def committed_units(self, hook: str | None = None) -> list[int]:
        """Units committed for ``hook`` (or whose token table is committed, for ``None``). A
        hook's unit counts only with its token table (the writer commits that first)."""
        if hook is None:
            return sorted(self.records.get(None, {}))
        self.check_hook(hook)
        toks = self.records.get(None, {})
        return sorted(u for u in self.records.get(hook, {}) if u in toks)

    def num_rows(self, hook: str | None = None) -> int:
        """Committed token rows of ``hook`` (of the token table, for ``None``)."""
        part = self.records.get(hook, {})
        return sum(part[u].rows for u in self.committed_units(hook))

    def is_complete(self) -> bool:
        """Whether every unit of the token table and of every hook is committed."""
        return all(len(self.committed_units(h)) == self.info.num_units for h in [None, *self.info.hooks])

    def unit_counts(self, hook: str | None, unit: int) -> tuple[int, int]:
        """``(rows, special rows)`` of a committed unit, without parsing its record."""
        entry = self.records.get(hook, {}).get(unit)
        damaged = (hook, unit) in self.damaged or (None, unit) in self.damaged
        if entry is None or damaged or (hook is not None and unit not in self.records.get(None, {})):
            self.record(hook, unit)  # raises the error that says why
        assert entry is not None
        return entry.rows, entry.special

    def record(self, hook: str | None, unit: int) -> CommitRecord:
        """The commit record of one unit of ``hook`` (``None``: its token table)."""
        for part in {hook, None}:
            if (part, unit) in self.damaged:
                raise CorruptionError(
                    f"dataset {self.name!r} unit {unit}: {self.damaged[(part, unit)]} (run `strata verify --repair`)"
                )
        rec = self.records.get(hook, {}).get(unit)
        if isinstance(rec, IndexedRecord):  # from the commit index: parsed (and checked) when first used
            parsed = self._parse_record(hook, unit, rec.key, rec.raw)
            if isinstance(parsed, str):
                self.damaged[(hook, unit)] = parsed
                del self.records[hook][unit]
                return self.record(hook, unit)
            self.records[hook][unit] = rec = parsed
        if rec is None or (hook is not None and unit not in self.records.get(None, {})):
            if hook is not None:
                self.check_hook(hook)
            committed = self.committed_units(hook)
            have = f"{len(committed)} of {self.info.num_units} units committed" + (f", e.g. {committed[:8]}" if committed else "")
            ur = self.info.unit_rows
            raise NotCommittedError(
                f"dataset {self.name!r} {'tokens' if hook is None else f'hook {hook!r}'}: unit {unit} (rows {unit * ur}.."
                f"{(unit + 1) * ur - 1}) is not committed ({have}); call refresh() to see newer commits"
            )
        return rec

    def last_rows(self, hook: str) -> int | None:
        """Rows of the last unit of ``hook`` as committed (None while it is not): the last unit may be short."""
        rec = self.records.get(hook, {}).get(self.info.num_units - 1)
        return None if rec is None else rec.rows
