"""The commit protocol: how every artifact of the store (activation units, token tables, and
later feature-table units, SAEs and analysis results) becomes visible, and how every read is
checked.

1. **Data first, put-if-absent.** A data file is published whole or not at all
   (``Storage.put_if_absent``: a link on a local disk, ``If-None-Match: *`` on S3). A file that
   is already there and has no commit record belongs to another writer, between its data and
   its commit: identical bytes are committed as they are; other bytes are waited on, and
   replaced only once they have sat uncommitted for ``orphan_after_s`` (their writer died).
2. **Then the commit record, put-if-absent.** A small JSON record names the file(s) it makes
   visible, their sizes and block checksums, the row count, who wrote it and when, and the
   fencing token of the job's lease. The first record wins; a writer that loses the race reads
   the winner's record (a lost race is harmless: same inputs, same rows).
3. **Every read is checked.** A file is checksummed in fixed blocks (``xxh3_64`` per block; for
   activation shards a block is one Zarr chunk), so a partial read checks just the blocks it
   touches and a whole read checks them all. Damaged bytes raise :class:`CorruptionError`;
   they are never handed back.
4. **Records are untrusted input.** A record may only name files at the keys its kind allows
   (inside its own folder, no ``..``); anything else is a damaged record, refused before any
   file is touched.

Verify and repair (:func:`verify_file`, used by the dataset's ``verify``/``repair``) and the
write lease with fencing (:mod:`store.lease`) complete the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np
import xxhash

from store import sealed
from store.errors import CorruptionError
from store.storage import Storage
from store.storage._base import Buffers, as_parts

log = logging.getLogger(__name__)

ALGO = "xxh3_64"
#: Block size of small files (token tables, JSON): one block for the whole file up to this.
DEFAULT_BLOCK = 4 << 20
RECORD_VERSION = 2
#: Benchmarks only (benchmarks/store_io.py measures what checking costs): False skips the block
#: checksums of reads. Nothing else may turn it off.
_CHECK_READS = True


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def writer_identity() -> dict[str, Any]:
    """Who writes: host, pid and a random attempt id (also used to name attempt files)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "attempt": uuid.uuid4().hex[:12]}


# -- block checksums ------------------------------------------------------------------------


def _flat(part: Any) -> memoryview:
    mv = memoryview(part)
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")


def block_digests(data: Buffers, block_size: int) -> tuple[int, np.ndarray]:
    """``(nbytes, digests)``: the ``xxh3_64`` of each ``block_size`` bytes of ``data`` (one
    buffer, or several written one after the other; the last block may be short), as uint64."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    h = xxhash.xxh3_64()
    filled = 0
    total = 0
    for part in as_parts(data):
        mv = _flat(part)
        total += len(mv)
        at = 0
        while at < len(mv):
            take = min(block_size - filled, len(mv) - at)
            if filled == 0 and take == block_size:  # a whole block in one buffer: one call
                out.append(xxhash.xxh3_64_intdigest(mv[at : at + take]))
            else:
                h.update(mv[at : at + take])
                filled += take
                if filled == block_size:
                    out.append(h.intdigest())
                    h = xxhash.xxh3_64()
                    filled = 0
            at += take
    if filled or not out:
        out.append(h.intdigest())
    return total, np.asarray(out, dtype="<u8")


def _hex(d: int) -> str:
    return f"{d:016x}"


@dataclass(frozen=True)
class Region:
    """A byte range of a file checked whole by one digest."""

    offset: int
    length: int
    digest: str

    def to_list(self) -> list[Any]:
        return [self.offset, self.length, self.digest]


@dataclass(frozen=True)
class FileEntry:
    """One file a commit record makes visible: its key, size and how its bytes are checked.

    Two forms. *Inline*: ``blocks`` lists the digest of each ``block_size`` bytes of the whole
    file (small files: one block). *Table*: the file holds its own table of block digests
    (``table``: little-endian uint64 ``xxh3_64`` of each ``block_size`` bytes of
    ``[0, table.offset)``), the record holds the table's digest, and ``tail`` covers whatever
    follows the table. Activation shards use the table form: a commit record stays a few
    hundred bytes while a read of a few rows checks just the 64 KiB blocks holding them.
    """

    key: str
    nbytes: int
    block_size: int
    blocks: tuple[str, ...] = ()
    table: Region | None = None
    tail: Region | None = None

    @classmethod
    def of(cls, key: str, data: Buffers, *, block_size: int | None = None) -> FileEntry:
        """The inline entry of a file's bytes."""
        parts = as_parts(data)
        size = sum(len(_flat(p)) for p in parts)
        bs = block_size or max(1, min(size, DEFAULT_BLOCK))
        n, digests = block_digests(parts, bs)
        return cls(key, n, bs, tuple(_hex(int(d)) for d in digests))

    @classmethod
    def with_table(cls, key: str, body_bytes: int, digests: np.ndarray, tail: bytes, *, block_size: int) -> FileEntry:
        """The entry of a file laid out as ``body, digest table of the body, tail``, given the
        body's block digests (see :func:`block_digests`); the table's bytes are
        ``digests.tobytes()``."""
        table = digests.astype("<u8").tobytes()
        t = Region(body_bytes, len(table), xxhash.xxh3_64_hexdigest(table))
        tl = Region(body_bytes + len(table), len(tail), xxhash.xxh3_64_hexdigest(tail))
        return cls(key, body_bytes + len(table) + len(tail), block_size, (), t, tl)

    @property
    def body_bytes(self) -> int:
        """Bytes checked block by block: the whole file inline, the part before the table."""
        return self.table.offset if self.table is not None else self.nbytes

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "nbytes": self.nbytes, "algo": ALGO, "block_size": self.block_size}
        if self.table is not None and self.tail is not None:
            d["table"], d["tail"] = self.table.to_list(), self.tail.to_list()
        else:
            d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> FileEntry:
        if not isinstance(d, dict) or d.get("algo") != ALGO:
            raise ValueError(f"not a file entry with {ALGO} block checksums")
        key, nbytes, bs = d["key"], d["nbytes"], d["block_size"]
        if not isinstance(key, str) or not all(isinstance(x, int) and not isinstance(x, bool) for x in (nbytes, bs)) or nbytes < 0 or bs <= 0:
            raise ValueError("file entry fields have the wrong types")
        if "table" in d:
            (to, tn, td), (lo, ln, ld) = d["table"], d["tail"]
            table, tail = Region(int(to), int(tn), str(td)), Region(int(lo), int(ln), str(ld))
            if tn != 8 * max(1, -(-to // bs)) or lo != to + tn or lo + ln != nbytes:
                raise ValueError(f"file entry of {key!r}: its table and tail do not fit its {nbytes} bytes")
            return cls(key, nbytes, bs, (), table, tail)
        blocks = d["blocks"]
        if not isinstance(blocks, list) or len(blocks) != max(1, -(-nbytes // bs)):
            raise ValueError(f"file entry of {key!r} lists {len(blocks) if isinstance(blocks, list) else '?'} blocks for {nbytes} bytes")
        return cls(key, nbytes, bs, tuple(str(b) for b in blocks))

    def blocks_of(self, start: int, end: int) -> tuple[int, int]:
        """Block indices ``[b0, b1)`` covering bytes ``[start, end)`` of the body."""
        return start // self.block_size, -(-end // self.block_size)


# -- commit records -------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitRecord:
    """Makes one unit of one part (a hook, the token table, ...) or one whole artifact visible."""

    unit: int | None
    hook: str | None  # the part: a hook name; None for a unit's token table
    rows: int
    files: tuple[FileEntry, ...]
    writer: dict[str, Any]
    committed_at: str
    special: int = 0  # token rows flagged special (BOS, padding): training skips them
    fence: int | None = None  # generation of the write lease of the job that wrote it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> FileEntry:
        return self.files[0]

    def to_json(self) -> bytes:
        d = asdict(self)
        d["files"] = [f.to_dict() for f in self.files]
        d["version"] = RECORD_VERSION
        return json.dumps(sealed.seal(d), sort_keys=True).encode()  # a flipped row count is caught on read

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> CommitRecord:
        """Parse a record; anything malformed is a :class:`CorruptionError` naming ``where``."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            d, _ = sealed.unseal(d, where=where, what="commit record")  # records written before checksums have none
            unknown = set(d) - _RECORD_KEYS
            if unknown:  # e.g. a damaged key name: the record may have lost its checksum that way
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            if d.get("version") != RECORD_VERSION:
                raise ValueError(f"record version {d.get('version')!r}, this Strata reads {RECORD_VERSION}")
            files = tuple(FileEntry.from_dict(f) for f in d["files"])
            unit, rows = d["unit"], d["rows"]
            if unit is not None and (not isinstance(unit, int) or isinstance(unit, bool) or unit < 0):
                raise ValueError(f"bad unit {unit!r}")
            if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0 or not files:
                raise ValueError("bad row count or no files")
            return cls(
                unit=unit, hook=d["hook"], rows=rows, files=files, writer=dict(d.get("writer") or {}),
                committed_at=str(d.get("committed_at", "")), special=int(d.get("special", 0)),
                fence=d.get("fence"), extra=dict(d.get("extra") or {}),
            )
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise CorruptionError(f"{where}: damaged commit record ({e})") from None


_RECORD_KEYS = {f.name for f in fields(CommitRecord)} | {"version"}


def read_record(storage: Storage, key: str) -> CommitRecord | None:
    """The record at ``key``, or None when there is none; a damaged one raises."""
    try:
        data = storage.read(key)
    except FileNotFoundError:
        return None
    return CommitRecord.from_json(data, where=key)


def commit(storage: Storage, key: str, record: CommitRecord) -> tuple[bool, CommitRecord]:
    """Write ``record`` at ``key`` if no record is there. Returns ``(won, record that counts)``."""
    if storage.put_if_absent(key, record.to_json()):
        return True, record
    winner = read_record(storage, key)
    if winner is None:  # deleted between our attempt and the read (a repair): try once more
        if storage.put_if_absent(key, record.to_json()):
            return True, record
        winner = read_record(storage, key)
        if winner is None:
            raise CorruptionError(f"{key}: commit record keeps disappearing (is a repair running?)")
    return False, winner


def publish(
    storage: Storage,
    key: str,
    data: Buffers,
    entry: FileEntry | Callable[[], FileEntry],
    *,
    record_key: str,
    orphan_after_s: float,
    what: str,
) -> CommitRecord | None:
    """Publish a data file put-if-absent at a key that other writers of the same unit share
    (a Zarr shard's key is fixed by the array). Returns None once our bytes (or identical
    ones) are in place, ready to commit; or the record of another writer that committed first.

    A file found with no commit belongs to another writer, between its data and its commit
    (milliseconds). Identical bytes are committed as they are; other bytes are waited on and
    replaced only once uncommitted for ``orphan_after_s`` seconds (their writer died). One
    comparison per file seen: files are never rewritten, only deleted once orphaned.
    ``entry`` may be a callable (block checksums still being computed on another thread).
    """
    written = storage.put_if_absent(key, data)
    while not written:
        winner = read_record(storage, record_key)
        if winner is not None:
            return winner
        if _same_file(storage, entry() if callable(entry) else entry):
            return None
        winner = _await_commit_or_orphan(storage, key, record_key, orphan_after_s)
        if winner is not None:
            return winner
        log.warning("%s: replacing %s, left uncommitted by a dead writer", what, key)
        storage.delete(key)
        written = storage.put_if_absent(key, data)
    return None


def _same_file(storage: Storage, entry: FileEntry) -> bool:
    try:
        if storage.size(entry.key) != entry.nbytes:
            return False
        read_checked(storage, entry, 0, entry.nbytes, where=entry.key)
        return True
    except (FileNotFoundError, CorruptionError):
        return False


def _await_commit_or_orphan(storage: Storage, key: str, record_key: str, orphan_after_s: float) -> CommitRecord | None:
    while True:
        winner = read_record(storage, record_key)
        if winner is not None:
            return winner
        try:
            age = time.time() - storage.modified(key)
        except FileNotFoundError:
            return None  # deleted meanwhile: try to write ours
        if age >= orphan_after_s:
            return None
        time.sleep(min(0.5, max(0.05, orphan_after_s - age)))


# -- checked reads --------------------------------------------------------------------------

# Verified digest tables, by (store, key, table digest): a table is checked when first loaded;
# the data blocks it describes are checked on every read.
_TABLES: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
_TABLES_MAX = 1024


def _table(storage: Storage, entry: FileEntry, *, where: str) -> np.ndarray:
    assert entry.table is not None
    k = (storage.uri, entry.key, entry.table.digest)
    got = _TABLES.get(k)
    if got is None:
        raw = _read(storage, entry, entry.table.offset, entry.table.offset + entry.table.length, where=where)
        if xxhash.xxh3_64_hexdigest(_flat(raw)) != entry.table.digest:
            raise CorruptionError(f"{where}: the file's table of block checksums is damaged (run `strata verify --repair`)")
        got = np.frombuffer(bytes(raw), dtype="<u8")
        _TABLES[k] = got
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    return got


def _mismatch(where: str, start: int, length: int, what: str) -> CorruptionError:
    return CorruptionError(
        f"{where}: checksum mismatch in bytes {start}..{start + length - 1} ({what}); "
        "the file changed after its commit (run `strata verify --repair`)"
    )


def _check_body(storage: Storage, entry: FileEntry, buf: Any, b0: int, b1: int, *, where: str) -> None:
    mv = _flat(buf)
    if entry.table is None:
        for b in range(b0, b1):
            lo = (b - b0) * entry.block_size
            hi = min(lo + entry.block_size, len(mv))
            if xxhash.xxh3_64_hexdigest(mv[lo:hi]) != entry.blocks[b]:
                raise _mismatch(where, b * entry.block_size, hi - lo, f"block {b}")
        return
    table = _table(storage, entry, where=where)
    bs, h = entry.block_size, xxhash.xxh3_64_intdigest
    got = np.fromiter((h(mv[i : i + bs]) for i in range(0, len(mv), bs)), dtype=np.uint64, count=b1 - b0)
    bad = np.flatnonzero(got != table[b0:b1])
    if bad.size:
        b = b0 + int(bad[0])
        raise _mismatch(where, b * bs, min(bs, len(mv) - int(bad[0]) * bs), f"block {b}")


def _widen(entry: FileEntry, start: int, end: int) -> tuple[int, int]:
    """The range to read for bytes ``[start, end)`` so they can be checked: whole body blocks,
    the whole table, the whole tail."""
    if not 0 <= start <= end <= entry.nbytes:
        raise ValueError(f"byte range {start}..{end} outside the file's {entry.nbytes} bytes")
    body, bs = entry.body_bytes, entry.block_size
    tail_at = entry.tail.offset if entry.tail is not None else entry.nbytes
    lo = (start // bs) * bs if start < body else (body if start < tail_at else tail_at)
    hi = min(-(-end // bs) * bs, body) if end <= body else (tail_at if end <= tail_at else entry.nbytes)
    return lo, hi


def _check_ranges(storage: Storage, entry: FileEntry, spans: list[tuple[int, int, np.ndarray]], *, where: str) -> None:
    """Check widened reads ``(lo, hi, buf)``: their body blocks in one pass, and any table or
    tail region they hold whole."""
    body, bs = entry.body_bytes, entry.block_size
    pieces: list[Any] = []
    index: list[int] = []
    for lo, hi, buf in spans:
        if lo < body:
            mv = _flat(buf)
            for at in range(lo, min(hi, body), bs):
                pieces.append(mv[at - lo : min(at + bs, body, hi) - lo])
                index.append(at // bs)
        for region in (entry.table, entry.tail):
            if region is not None and region.length and lo <= region.offset and region.offset + region.length <= hi:
                part = buf[region.offset - lo : region.offset - lo + region.length]
                if xxhash.xxh3_64_hexdigest(_flat(part)) != region.digest:
                    raise _mismatch(where, region.offset, region.length, "table" if region is entry.table else "tail")
    if not pieces:
        return
    idx = np.asarray(index)
    if entry.table is not None:
        want = _table(storage, entry, where=where)[idx]
        got = np.fromiter((xxhash.xxh3_64_intdigest(p) for p in pieces), dtype=np.uint64, count=len(pieces))
        bad = np.flatnonzero(got != want)
    else:
        bad = np.asarray([i for i, p in enumerate(pieces) if xxhash.xxh3_64_hexdigest(p) != entry.blocks[index[i]]], dtype=np.int64)
    if bad.size:
        b = int(idx[bad[0]])
        raise _mismatch(where, b * bs, len(pieces[int(bad[0])]), f"block {b}")


def read_checked_many(storage: Storage, entry: FileEntry, ranges: list[tuple[int, int]], *, where: str) -> list[np.ndarray]:
    """Several byte ranges of one committed file (one batched read), each checked: every block
    it touches. Read-only results: copy what is handed on."""
    try:
        wide = [_widen(entry, a, b) for a, b in ranges]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    try:
        raws = storage.read_ranges(entry.key, wide)
    except FileNotFoundError:
        raise CorruptionError(f"{where}: file is missing") from None
    bufs = []
    for (lo, hi), raw in zip(wide, raws):
        buf = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
        if buf.size != hi - lo:
            raise CorruptionError(f"{where}: file is shorter than its commit record says ({entry.nbytes} bytes; truncated?)")
        bufs.append(buf)
    if _CHECK_READS:
        _check_ranges(storage, entry, [(lo, hi, buf) for (lo, hi), buf in zip(wide, bufs)], where=where)
    return [buf[a - lo : b - lo] for (a, b), (lo, _), buf in zip(ranges, wide, bufs)]


def read_checked(storage: Storage, entry: FileEntry, start: int, end: int, *, where: str) -> np.ndarray:
    """Bytes ``[start, end)`` of a committed file, after checking every block they touch (a
    read reaching into the table or tail region checks that region whole). Read-only: copy
    what is handed on."""
    return read_checked_many(storage, entry, [(start, end)], where=where)[0]


def read_whole(storage: Storage, entry: FileEntry, *, where: str) -> np.ndarray:
    """The whole committed file, checked."""
    return read_checked(storage, entry, 0, entry.nbytes, where=where)


def map_checked(storage: Storage, entry: FileEntry, *, where: str) -> np.ndarray:
    """The whole committed file memory-mapped where the backend can (read otherwise), checked."""
    try:
        data = np.frombuffer(storage.fetch(entry.key, entry.nbytes), dtype=np.uint8)
    except FileNotFoundError:
        raise CorruptionError(f"{where}: file is missing") from None
    if data.size != entry.nbytes:
        raise CorruptionError(f"{where}: {data.size} bytes, the commit record says {entry.nbytes} (truncated?)")
    _check_body(storage, entry, data[: entry.body_bytes], 0, max(1, -(-entry.body_bytes // entry.block_size)), where=where)
    for region in (entry.table, entry.tail):
        if region is not None and xxhash.xxh3_64_hexdigest(_flat(data[region.offset : region.offset + region.length])) != region.digest:
            raise _mismatch(where, region.offset, region.length, "table" if region is entry.table else "tail")
    return data


def _read(storage: Storage, entry: FileEntry, lo: int, hi: int, *, where: str) -> np.ndarray:
    try:
        raw = storage.read_range(entry.key, lo, hi)
    except FileNotFoundError:
        raise CorruptionError(f"{where}: file is missing") from None
    buf = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    if buf.size != hi - lo:
        raise CorruptionError(f"{where}: file is shorter than its commit record says ({entry.nbytes} bytes; truncated?)")
    return buf


def verify_file(storage: Storage, entry: FileEntry) -> str | None:
    """What is wrong with a committed file (size, any block), or None when it is intact."""
    try:
        size = storage.size(entry.key)
    except FileNotFoundError:
        return "file is missing"
    if size != entry.nbytes:
        return f"{size} bytes, the commit record says {entry.nbytes} (truncated or overwritten)"
    try:
        step = 64 * entry.block_size  # 64 blocks per read keeps memory bounded
        for at in range(0, entry.body_bytes, step):
            read_checked(storage, entry, at, min(at + step, entry.body_bytes), where="")
        if entry.table is not None:
            read_checked(storage, entry, entry.body_bytes, entry.nbytes, where="")
    except CorruptionError as e:
        return str(e).removeprefix(": ")
    return None


# -- what records may name --------------------------------------------------------------------

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.@+=-]+(/[A-Za-z0-9_.@+=-]+)*$")


def check_key(key: str, allowed: str | re.Pattern[str] | Callable[[str], bool], *, where: str) -> None:
    """A record's file key must be exactly what its kind allows: no absolute paths, no ``..``,
    nothing outside the artifact's folder. Checked before any file is opened, so a forged
    record cannot make a read touch (or an error reveal) anything else."""
    ok = isinstance(key, str) and bool(_SAFE_KEY.match(key)) and ".." not in key.split("/")
    if ok:
        if isinstance(allowed, str):
            ok = key == allowed
        elif isinstance(allowed, re.Pattern):
            ok = bool(allowed.fullmatch(key))
        else:
            ok = allowed(key)
    if not ok:
        raise CorruptionError(f"{where}: the commit record names a file outside what it may name ({key!r}); the record is damaged or forged")


def check_inside(prefix: str) -> Callable[[str], bool]:
    """An ``allowed`` predicate: any safe key under the folder ``prefix``."""
    return lambda key: key.startswith(prefix.rstrip("/") + "/")


def delete_all(storage: Storage, keys: Sequence[str]) -> None:
    for k in keys:
        storage.delete(k)
