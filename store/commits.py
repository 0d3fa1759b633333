"""Commit records: small immutable JSON files that make one unit of one hook (or of the token
table) visible. Written put-if-absent, after everything they describe."""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import xxhash

CHECKSUM_ALGO = "xxh3_64"


def checksum(*buffers: Any) -> str:
    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(b)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"


def writer_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "attempt": uuid.uuid4().hex[:12]}


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class CommitRecord:
    unit: int
    hook: str | None  # None for the token table
    rows: int
    checksum: str  # of the unit's stored values (activations) or of the file (tokens)
    file: str  # key of the file relative to the store root
    nbytes: int  # size of that file
    writer: dict[str, Any]
    committed_at: str
    special: int = 0  # token rows flagged special (BOS, padding): training skips them


    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CommitRecord:
        return cls(**json.loads(data))
