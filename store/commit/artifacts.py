"""Committed artifact folders: an SAE, an analysis result, a training checkpoint. The same commit
protocol as dataset units, for a folder of files.

    saes/NAME/cfg.json, sae_weights.safetensors, lineage.json, ...   the files, under their own names
    saes/NAME/commit.json                                            the commit record: every file's size and checksums
    saes/NAME/lease/GEN.json                                         the write lease of the folder

A writer holds the folder's lease, writes the files (replacing any a crashed attempt left), then
writes the commit record put-if-absent: the folder exists for readers from that moment, whole.
Files keep their own names, so other tools read the folder as it is (``sae_lens.SAE.load_from_disk``
on ``saes/NAME``). Every read of a file through Strata is checked against the record.

``kind`` is the folder holding artifacts of one sort (``saes``, ``analyses``, or a nested one such as
``saes/NAME/checkpoints``); ``name`` one path component.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strata.store.commit import protocol
from strata.store.commit.lease import Fence, Lease
from strata.store.commit.protocol import CommitRecord, FileEntry
from strata.store.errors import CorruptionError, StrataError
from strata.store.layout import check_name
from strata.store.root import StoreRoot
from strata.store.storage import Storage

_KIND = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9][A-Za-z0-9_.@+=-]*(/[a-z][a-z0-9_]*)?)*$")
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+=-]*(/[A-Za-z0-9_][A-Za-z0-9_.@+=-]*)*$")
COMMIT = "commit.json"
_RESERVED = (COMMIT, "lease")


class ArtifactNotFoundError(StrataError, LookupError):
    """No committed artifact of that kind and name."""


class ArtifactExistsError(StrataError, FileExistsError):
    """An artifact of that name is committed already (with other contents or config)."""


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND.match(kind) or ".." in kind:
        raise ValueError(f"invalid artifact kind {kind!r}")
    return kind


def folder(kind: str, name: str) -> str:
    return f"{check_kind(kind)}/{check_name(name, what='artifact')}"


def check_file_name(rel: str) -> str:
    if not isinstance(rel, str) or not _FILE.match(rel) or ".." in rel.split("/") or rel.split("/")[0] in _RESERVED:
        raise ValueError(f"invalid artifact file name {rel!r}: relative names of letters, digits and '_.@+=-', not {_RESERVED}")
    return rel


@dataclass(frozen=True)
class Artifact:
    """A committed artifact folder: its record, and checked reads of its files."""

    storage: Storage
    kind: str
    name: str
    record: CommitRecord

    @property
    def prefix(self) -> str:
        return folder(self.kind, self.name)

    @property
    def meta(self) -> dict[str, Any]:
        """What the writer recorded with the files (config, lineage summary, ...)."""
        return dict(self.record.extra.get("meta", {}))

    @property
    def files(self) -> list[str]:
        """File names, relative to the folder."""
        return [f.key[len(self.prefix) + 1 :] for f in self.record.files]

    def _entry(self, rel: str) -> FileEntry:
        for f in self.record.files:
            if f.key == f"{self.prefix}/{rel}":
                return f
        raise ArtifactNotFoundError(f"{self.kind} {self.name!r} has no file {rel!r}; it has: {', '.join(self.files)}")

    def read(self, rel: str) -> bytes:
        """One file's bytes, checked against the commit record."""
        where = f"{self.kind} {self.name!r} ({self.prefix}/{rel})"
        return bytes(protocol.read_whole(self.storage, self._entry(rel), where=where))

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel))
        except ValueError as e:
            raise CorruptionError(f"{self.kind} {self.name!r}: {rel} is not JSON ({e})") from None

    def local_path(self, cache: str | os.PathLike[str] | None = None) -> Path:
        """A local folder holding the artifact's files, every one checked: the folder itself on a
        local store (after checking it), else a download into ``cache`` (default
        ``~/.cache/strata``), reused while the commit is the same."""
        root = getattr(self.storage, "root", None)
        if isinstance(root, Path):
            for rel in self.files:  # check before handing a folder to a tool that will not
                bad = protocol.verify_file(self.storage, self._entry(rel))
                if bad is not None:
                    raise CorruptionError(f"{self.kind} {self.name!r} ({self.prefix}/{rel}): {bad}")
            return root / self.prefix
        base = Path(cache or os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata"))
        tag = hashlib.sha256(f"{self.storage.uri}\0{self.prefix}\0{self.record.committed_at}".encode()).hexdigest()[:16]
        out = base / self.kind / f"{self.name}-{tag}"
        if (out / COMMIT).exists():
            return out
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".strata-", dir=base))
        for rel in self.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(self.read(rel))
        (tmp / COMMIT).write_bytes(self.record.to_json())
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another process downloaded it meanwhile
            pass
        return out


def lease(storage: Storage, kind: str, name: str, *, owner: str = "", stale_after_s: float = 60.0) -> Lease:
    return Lease(storage, folder(kind, name), what=f"{kind} {name!r}", owner=owner, stale_after_s=stale_after_s,
                 heartbeat_s=min(10.0, stale_after_s / 4))


def get(storage: Storage, kind: str, name: str) -> Artifact | None:
    """The committed artifact, or None when there is none."""
    prefix = folder(kind, name)
    rec = protocol.read_record(storage, f"{prefix}/{COMMIT}")
    if rec is None:
        return None
    for f in rec.files:
        protocol.check_key(f.key, protocol.check_inside(prefix), where=f"{prefix}/{COMMIT}")
    return Artifact(storage, kind, name, rec)


def require(store: StoreRoot, kind: str, name: str, *, what: str) -> Artifact:
    """The committed artifact ``kind/name``; :class:`ArtifactNotFoundError` naming those the store
    holds otherwise (``what`` names the kind in the message: ``"SAE"``, ``"analysis"``)."""
    art = get(store.storage, kind, name)
    if art is None:
        have = names(store.storage, kind)
        raise ArtifactNotFoundError(f"no {what} {name!r} in store {store.uri}; it holds: {', '.join(have) if have else f'no {what}s'}")
    return art


def names(storage: Storage, kind: str) -> list[str]:
    """Names of the committed artifacts of a kind."""
    return [n for n in storage.list_dirs(check_kind(kind)) if storage.exists(f"{kind}/{n}/{COMMIT}")]


def put(
    storage: Storage,
    kind: str,
    name: str,
    files: Mapping[str, bytes | bytearray | memoryview | np.ndarray | os.PathLike[str]],
    *,
    meta: Mapping[str, Any] | None = None,
    lease: Lease | Fence,
    writer: Mapping[str, Any] | None = None,
    block_size: int | None = None,
) -> Artifact:
    """Write the files of an artifact and commit them: the caller holds the folder's ``lease``,
    or works for its holder with its :class:`~store.commit.lease.Fence` (a Ray task, say).
    ``files`` maps names (relative, ``/`` allowed) to bytes or to local files to copy. If the
    artifact is committed already, nothing is written: its record is returned when its files and
    ``meta`` are the same, else :class:`ArtifactExistsError`. ``block_size``: bytes per checksum
    block (default: one block per 4 MiB), smaller for files read in small ranges."""
    prefix = folder(kind, name)
    if not files:
        raise ValueError(f"{kind} {name!r}: an artifact needs at least one file")
    data: dict[str, bytes] = {}
    for rel, src in files.items():
        check_file_name(rel)
        data[rel] = Path(src).read_bytes() if isinstance(src, (str, os.PathLike)) else bytes(memoryview(src).cast("B"))
    entries = tuple(FileEntry.of(f"{prefix}/{rel}", b, block_size=block_size and max(1, min(block_size, len(b))))
                    for rel, b in sorted(data.items()))
    meta = json.loads(json.dumps(dict(meta or {}), default=str))  # plain JSON, or an error now
    existing = get(storage, kind, name)
    if existing is not None:
        if [(f.key, f.nbytes, f.blocks) for f in existing.record.files] == [(f.key, f.nbytes, f.blocks) for f in entries] and existing.meta == meta:
            return existing
        raise ArtifactExistsError(f"{kind} {name!r} is committed already with other contents; choose a new name (or delete it first)")
    lease.check()
    for e, (_rel, b) in zip(entries, sorted(data.items())):
        storage.write(e.key, b)  # replaces what a crashed attempt may have left: we hold the lease
    rec = CommitRecord(None, None, 0, entries, dict(writer or protocol.writer_identity()), protocol.utcnow(),
                       fence=lease.token, extra={"kind": kind, "meta": meta})
    lease.check()
    won, winner = protocol.commit(storage, f"{prefix}/{COMMIT}", rec)
    if not won and [f.key for f in winner.files] != [f.key for f in entries]:  # pragma: no cover - the lease prevents it
        raise ArtifactExistsError(f"{kind} {name!r} was committed by another writer meanwhile")
    return Artifact(storage, kind, name, winner)


def delete(storage: Storage, kind: str, name: str, *, lease: Lease | Fence) -> None:
    """Remove an artifact: its commit record first (it vanishes for readers at once), then its files."""
    prefix = folder(kind, name)
    lease.check()
    storage.delete(f"{prefix}/{COMMIT}")
    for key in storage.list(prefix):
        if not key.startswith(f"{prefix}/lease/"):
            storage.delete(key)


def verify(storage: Storage, art: Artifact) -> list[str]:
    """What is wrong with the artifact's files (empty when intact)."""
    out = []
    for f in art.record.files:
        bad = protocol.verify_file(storage, f)
        if bad is not None:
            out.append(f"{f.key}: {bad}")
    return out
