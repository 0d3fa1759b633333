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
3. **Every read is checked.** A file is checksummed in fixed blocks (``xxh3_64`` per block;
   activation shards carry a table of 64 KiB block digests and, for rows narrower than that, a
   second table of digests of a few whole rows each), so a partial read checks just the blocks
   it touches, at whichever granularity hashes less, and a whole read checks them all. Damaged
   bytes raise :class:`CorruptionError`; they are never handed back.
4. **Records are untrusted input.** A record may only name files at the keys its kind allows
   (inside its own folder, no ``..``); anything else is a damaged record, refused before any
   file is touched.

Verify and repair (:func:`verify_file`, used by the dataset's ``verify``/``repair``) and the
write lease with fencing (:mod:`store.commit.lease`) complete the protocol.
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

from strata.store.commit import sealed
from strata.store.errors import CorruptionError
from strata.store.storage import Buffers, Storage, as_parts

log = logging.getLogger(__name__)

ALGO = "xxh3_64"
#: Block size of small files (token tables, JSON): one block for the whole file up to this.
DEFAULT_BLOCK = 4 << 20
RECORD_VERSION = 2
#: Benchmarks only (benchmarks/store_io.py measures what checking costs): False skips the block
#: checksums of reads. Nothing else may turn it off.
CHECK_READS = True


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def writer_identity() -> dict[str, Any]:
    """Who writes: host, pid and a random attempt id (also used to name attempt files)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "attempt": uuid.uuid4().hex[:12]}


# -- block checksums ------------------------------------------------------------------------


def _flat(part: Any) -> memoryview:
    mv = memoryview(part)
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")


#: Blocks hashed between two yields of the GIL in :func:`block_digests`. The write path hashes on
#: a helper thread while its own thread writes the same bytes; small blocks make the hashing a
#: long run of short calls that keep the GIL, and the writing thread, back from each write
#: call, would wait up to the interpreter's switch interval (5 ms) for it every time.
_BATCH_BLOCKS = 256


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
            if filled == 0 and take == block_size:  # whole blocks in one buffer: one call each, in a tight loop
                n = min((len(mv) - at) // block_size, _BATCH_BLOCKS)
                out.extend(map(xxhash.xxh3_64_intdigest, [mv[i : i + block_size] for i in range(at, at + n * block_size, block_size)]))
                take = n * block_size
                time.sleep(0)  # let a waiting thread have the GIL (see _BATCH_BLOCKS)
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
    (``table``: little-endian uint64 ``xxh3_64`` of each ``block_size`` bytes of the body,
    ``[0, table.offset)``), the record holds the table's digest, and ``tail`` covers whatever
    follows the tables. Activation shards use the table form: a commit record stays a few
    hundred bytes while a read of a few rows checks just the blocks holding them.

    A table-form file may carry a second, finer table right after the first (``fine``: the
    digests of each ``fine_block_size`` bytes of the same body; for shards, a few whole rows).
    Scattered rows are checked against it, so a 3 KiB row costs hashing its 6 KiB block rather
    than its 64 KiB one; long ranges and whole reads use the coarse table (fewer hash calls). Files
    written before the fine table existed have none and are read at the coarse granularity::

        [body][coarse table][fine table, optional][tail]
    """

    key: str
    nbytes: int
    block_size: int
    blocks: tuple[str, ...] = ()
    table: Region | None = None
    tail: Region | None = None
    fine: Region | None = None
    fine_block_size: int = 0

    @classmethod
    def of(cls, key: str, data: Buffers, *, block_size: int | None = None) -> FileEntry:
        """The inline entry of a file's bytes."""
        parts = as_parts(data)
        size = sum(len(_flat(p)) for p in parts)
        bs = block_size or max(1, min(size, DEFAULT_BLOCK))
        n, digests = block_digests(parts, bs)
        return cls(key, n, bs, tuple(_hex(int(d)) for d in digests))

    @classmethod
    def with_table(
        cls, key: str, body_bytes: int, digests: np.ndarray, tail: bytes, *, block_size: int,
        fine: np.ndarray | None = None, fine_block_size: int = 0,
    ) -> FileEntry:
        """The entry of a file laid out as ``body, digest table of the body, [fine digest
        table of the body,] tail``, given the body's block digests (see :func:`block_digests`);
        each table's bytes are ``digests.tobytes()``."""
        table = digests.astype("<u8").tobytes()
        t = Region(body_bytes, len(table), xxhash.xxh3_64_hexdigest(table))
        f = None
        if fine is not None:
            raw = fine.astype("<u8").tobytes()
            f = Region(t.offset + t.length, len(raw), xxhash.xxh3_64_hexdigest(raw))
        at = (f or t).offset + (f or t).length
        tl = Region(at, len(tail), xxhash.xxh3_64_hexdigest(tail))
        return cls(key, at + len(tail), block_size, (), t, tl, f, fine_block_size if f is not None else 0)

    @property
    def body_bytes(self) -> int:
        """Bytes checked block by block: the whole file inline, the part before the table."""
        return self.table.offset if self.table is not None else self.nbytes

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "nbytes": self.nbytes, "algo": ALGO, "block_size": self.block_size}
        if self.table is not None and self.tail is not None:
            d["table"], d["tail"] = self.table.to_list(), self.tail.to_list()
            if self.fine is not None:
                d["fine"], d["fine_block_size"] = self.fine.to_list(), self.fine_block_size
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
            fine, fbs, tables_end = None, 0, to + tn
            if "fine" in d:  # absent from files written before fine tables existed
                (fo, fn, fd), fbs = d["fine"], d["fine_block_size"]
                if not isinstance(fbs, int) or isinstance(fbs, bool) or fbs <= 0:
                    raise ValueError(f"file entry of {key!r}: bad fine block size {fbs!r}")
                fine = Region(int(fo), int(fn), str(fd))
                if fo != to + tn or fn != 8 * max(1, -(-to // fbs)):
                    raise ValueError(f"file entry of {key!r}: its fine table does not fit its {nbytes} bytes")
                tables_end = fo + fn
            if tn != 8 * max(1, -(-to // bs)) or lo != tables_end or lo + ln != nbytes:
                raise ValueError(f"file entry of {key!r}: its table and tail do not fit its {nbytes} bytes")
            return cls(key, nbytes, bs, (), table, tail, fine, fbs)
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


def forget_checked_tables() -> None:
    """Forget the digest tables checked so far, so the next read checks them again (as a fresh
    process would): what tests that damage a table after reading it need."""
    _TABLES.clear()

#: What one hash call costs beyond its bytes, as bytes hashed (xxh3 runs at ~15 GB/s, a call
#: from Python costs ~0.4 us): a range is checked at the granularity with the least
#: ``bytes hashed + calls * _CALL_BYTES``, so a scattered row hashes its few-row block and a
#: long range its 64 KiB blocks.
_CALL_BYTES = 6 << 10


def _regions(entry: FileEntry) -> list[Region]:
    """The regions after the body (tables, tail), in file order; each is checked whole."""
    return [r for r in (entry.table, entry.fine, entry.tail) if r is not None]


def _table(storage: Storage, entry: FileEntry, region: Region, *, where: str) -> np.ndarray:
    k = (storage.uri, entry.key, region.digest)
    got = _TABLES.get(k)
    if got is None:
        raw = _read(storage, entry, region.offset, region.offset + region.length, where=where)
        if xxhash.xxh3_64_hexdigest(_flat(raw)) != region.digest:
            which = "fine table" if region is entry.fine else "table"
            raise CorruptionError(f"{where}: the file's {which} of block checksums is damaged (run `strata verify --repair`)")
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


def _check_blocks(
    storage: Storage, entry: FileEntry, spans: list[tuple[int, int, Any]], *, fine: bool = False, where: str,
    only: list[np.ndarray | None] | None = None,
) -> None:
    """Check the body blocks in reads ``(lo, hi, buf)`` (``lo`` on the block grid, ``hi`` on it
    or at the body's end) against the coarse digests, or the fine ones; with ``only``, just the
    listed blocks of a read (where not None). Runs for every read, a few rows each when
    scattered: plain Python for a few blocks, NumPy for many."""
    body = entry.body_bytes
    bs, region = (entry.fine_block_size, entry.fine) if fine else (entry.block_size, entry.table)
    pieces: list[Any] = []
    index: list[int] = []
    for k, (lo, hi, buf) in enumerate(spans):
        top = hi if hi < body else body
        blocks = only[k] if only is not None else None
        if blocks is not None:
            for b in blocks.tolist():
                pieces.append(buf[b * bs - lo : min((b + 1) * bs, top) - lo])
                index.append(b)
        elif lo < top <= lo + bs:  # one block (a scattered row): no slicing
            pieces.append(buf if len(buf) == top - lo else buf[: top - lo])
            index.append(lo // bs)
        elif lo < body:
            mv = _flat(buf)
            for at in range(lo, top, bs):
                pieces.append(mv[at - lo : (at + bs if at + bs < top else top) - lo])
                index.append(at // bs)
        elif body == 0 == lo and region is None:
            pieces.append(b""), index.append(0)  # an empty file still has its one (empty) block
    if not pieces:
        return
    h = xxhash.xxh3_64_intdigest
    bad = -1
    if region is None:
        bad = next((i for i, p in enumerate(pieces) if xxhash.xxh3_64_hexdigest(p) != entry.blocks[index[i]]), -1)
    elif len(pieces) <= 16:
        table = _table(storage, entry, region, where=where)
        bad = next((i for i, (p, b) in enumerate(zip(pieces, index)) if h(p) != table.item(b)), -1)  # .item: a Python int compares fast
    else:
        want = _table(storage, entry, region, where=where)[np.asarray(index)]
        got = np.fromiter(map(h, pieces), dtype=np.uint64, count=len(pieces))
        wrong = np.flatnonzero(got != want)
        bad = int(wrong[0]) if wrong.size else -1
    if bad >= 0:
        b = index[bad]
        raise _mismatch(where, b * bs, len(pieces[bad]), f"{'fine block' if fine else 'block'} {b}")


def _check_regions(entry: FileEntry, spans: list[tuple[int, int, Any]], *, where: str) -> None:
    """Check every table or tail region that reads ``(lo, hi, buf)`` hold whole."""
    body = entry.body_bytes
    for lo, hi, buf in spans:
        if hi <= body:  # body bytes only: nothing to do here
            continue
        for region in _regions(entry):
            if region.length and lo <= region.offset and region.offset + region.length <= hi:
                part = buf[region.offset - lo : region.offset - lo + region.length]
                if xxhash.xxh3_64_hexdigest(_flat(part)) != region.digest:
                    which = "table" if region is entry.table else "fine table" if region is entry.fine else "tail"
                    raise _mismatch(where, region.offset, region.length, which)


def _widen(entry: FileEntry, start: int, end: int, block_size: int) -> tuple[int, int]:
    """The range to read for bytes ``[start, end)`` so they can be checked: whole body blocks
    of ``block_size``, and whole regions (tables, tail) after the body."""
    if not 0 <= start <= end <= entry.nbytes:
        raise ValueError(f"byte range {start}..{end} outside the file's {entry.nbytes} bytes")
    body, after = entry.body_bytes, _regions(entry)
    if start < body:
        lo = (start // block_size) * block_size
    else:
        lo = next((r.offset for r in reversed(after) if r.offset <= start), body)
    if end <= body:
        hi = min(-(-end // block_size) * block_size, body)
    else:
        hi = next((r.offset + r.length for r in after if r.offset + r.length >= end), entry.nbytes)
    return lo, hi


def _plan(
    entry: FileEntry, ranges: list[tuple[int, int]], used: Sequence[np.ndarray | None] | None, used_bytes: int,
) -> tuple[list[tuple[int, int]], list[bool], list[np.ndarray | None] | None]:
    """Per range of bytes: the range to read so it can be checked, whether its body blocks are
    checked at the fine granularity (where that hashes less, counting a hash call as
    ``_CALL_BYTES``), and, for a range of which only some pieces are used, the blocks holding
    them (the only ones checked). Runs for every scattered read: kept to plain arithmetic."""
    body, cbs = entry.body_bytes, entry.block_size
    fbs = entry.fine_block_size if entry.fine is not None else 0
    wide: list[tuple[int, int]] = []
    fine: list[bool] = []
    only: list[np.ndarray | None] | None = None if used is None else [None] * len(ranges)
    for i, (a, b) in enumerate(ranges):
        if b > body or not 0 <= a <= b:  # reaches past the body (or is invalid: _widen says so)
            wide.append(_widen(entry, a, b, cbs))
            fine.append(False)
            continue
        u = used[i] if used is not None else None
        if u is not None and 0 < used_bytes <= (fbs or cbs):  # each piece in at most two blocks
            best: tuple[int, int, np.ndarray] | None = None
            for bs in (cbs, fbs) if fbs else (cbs,):
                blocks = np.unique(np.concatenate([u // bs, (u + used_bytes - 1) // bs]))
                cost = blocks.size * (bs + _CALL_BYTES)
                if best is None or cost < best[0]:
                    best = (cost, bs, blocks)
            assert best is not None and only is not None
            _, bs, only[i] = best
            wide.append((a // bs * bs, min(-(-b // bs) * bs, body)))
            fine.append(bs != cbs)
            continue
        lo, hi = a // cbs * cbs, min(-(-b // cbs) * cbs, body)
        if fbs:
            flo, fhi = a // fbs * fbs, min(-(-b // fbs) * fbs, body)
            if fhi - flo + -(-(fhi - flo) // fbs) * _CALL_BYTES < hi - lo + -(-(hi - lo) // cbs) * _CALL_BYTES:
                wide.append((flo, fhi))
                fine.append(True)
                continue
        wide.append((lo, hi))
        fine.append(False)
    return wide, fine, only


def read_checked_many(
    storage: Storage, entry: FileEntry, ranges: list[tuple[int, int]], *, where: str,
    used: Sequence[np.ndarray | None] | None = None, used_bytes: int = 0,
) -> list[np.ndarray]:
    """Several byte ranges of one committed file (one batched read), each checked: every block
    it touches, at the granularity that hashes least (see :class:`FileEntry`). With ``used``,
    a range whose entry is not None is read whole but only pieces of it are handed on: those
    ``used_bytes`` long at the given file offsets (scattered rows read in one range); only the
    blocks holding them are checked, and the caller must use nothing else of that range.
    Read-only results: copy what is handed on."""
    try:
        wide, fine, only = _plan(entry, ranges, used, used_bytes)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    bufs = _read_ranges(storage, entry, wide, where=where)
    if CHECK_READS:
        spans = [(lo, hi, buf) for (lo, hi), buf in zip(wide, bufs)]
        if any(hi > entry.body_bytes for _, hi in wide):
            _check_regions(entry, spans, where=where)
        n_fine = fine.count(True)
        for want, n in ((False, len(spans) - n_fine), (True, n_fine)):
            if n == len(spans):
                _check_blocks(storage, entry, spans, fine=want, where=where, only=only)
            elif n:
                sel = [k for k, f in enumerate(fine) if f == want]
                _check_blocks(storage, entry, [spans[k] for k in sel], fine=want, where=where,
                              only=None if only is None else [only[k] for k in sel])
    return [buf[a - lo : b - lo] for (a, b), (lo, _), buf in zip(ranges, wide, bufs)]


def _read_ranges(storage: Storage, entry: FileEntry, wide: list[tuple[int, int]], *, where: str) -> list[np.ndarray]:
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
    return bufs


def read_checked(storage: Storage, entry: FileEntry, start: int, end: int, *, where: str) -> np.ndarray:
    """Bytes ``[start, end)`` of a committed file, after checking every block they touch (a
    read reaching into the table or tail region checks that region whole). Read-only: copy
    what is handed on."""
    return read_checked_many(storage, entry, [(start, end)], where=where)[0]


def read_whole(storage: Storage, entry: FileEntry, *, where: str) -> np.ndarray:
    """The whole committed file, checked."""
    return read_checked(storage, entry, 0, entry.nbytes, where=where)


def map_checked(storage: Storage, entry: FileEntry, *, where: str) -> np.ndarray:
    """The whole committed file memory-mapped where the backend can (read otherwise), checked
    (its body at the coarse granularity: the fewest hash calls)."""
    try:
        data = np.frombuffer(storage.fetch(entry.key, entry.nbytes), dtype=np.uint8)
    except FileNotFoundError:
        raise CorruptionError(f"{where}: file is missing") from None
    if data.size != entry.nbytes:
        raise CorruptionError(f"{where}: {data.size} bytes, the commit record says {entry.nbytes} (truncated?)")
    _check_blocks(storage, entry, [(0, entry.body_bytes, data[: entry.body_bytes])], where=where)
    _check_regions(entry, [(0, entry.nbytes, data)], where=where)
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
    """What is wrong with a committed file (size, any block at every granularity it carries,
    its tables and tail), or None when it is intact. Reads each byte once."""
    try:
        size = storage.size(entry.key)
    except FileNotFoundError:
        return "file is missing"
    if size != entry.nbytes:
        return f"{size} bytes, the commit record says {entry.nbytes} (truncated or overwritten)"
    try:
        body, fbs = entry.body_bytes, entry.fine_block_size if entry.fine is not None else 0
        step = 64 * entry.block_size  # 64 blocks per read keeps memory bounded
        for at in range(0, body, step):
            end = min(at + step, body)
            # With a fine table, each read reaches on to the end of the fine block straddling
            # `end`, so every fine block is checked whole by the read it starts in.
            hi = min(body, -(-end // fbs) * fbs) if fbs else end
            buf = _read(storage, entry, at, hi, where="")
            _check_blocks(storage, entry, [(at, end, buf[: end - at])], where="")
            if fbs:
                f0 = min(-(-at // fbs) * fbs, hi)  # the first fine block starting in this read
                _check_blocks(storage, entry, [(f0, hi, buf[f0 - at :])], fine=True, where="")
        if entry.table is not None:
            read_checked(storage, entry, body, entry.nbytes, where="")
    except CorruptionError as e:
        return str(e).removeprefix(": ")
    return None


# -- what records may name --------------------------------------------------------------------

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.@+=-]+(/[A-Za-z0-9_.@+=:-]+)*$")  # ':' after the first part: module:PATH hooks


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
