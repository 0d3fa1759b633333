"""Checksums of small JSON records that reads depend on (dataset and feature-table manifests,
commit records): the record carries ``"checksum": "xxh3_64:<hex>"`` of its own body, so one
flipped byte in a value (a row count, a histogram bound) is a :class:`CorruptionError` on read,
never a wrong answer.

The digest covers the canonical form of the body (sorted keys, no whitespace), so it does not
depend on how the file was indented; a change that alters no value alters nothing a read uses.
Records written before checksums existed have none: each caller decides whether to read those.
"""

from __future__ import annotations

import json
from typing import Any

import xxhash

from strata.store.errors import CorruptionError

KEY = "checksum"
PREFIX = "xxh3_64:"


def digest(body: dict[str, Any]) -> str:
    """The checksum of a record body (without its ``checksum`` key)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return PREFIX + xxhash.xxh3_64_hexdigest(canon.encode("utf-8"))


def seal(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its checksum added (serialize it with any indentation)."""
    if KEY in body:
        raise ValueError(f"a record body must not have a {KEY!r} key of its own")
    return {**body, KEY: digest(body)}


def unseal(d: dict[str, Any], *, where: str, what: str) -> tuple[dict[str, Any], bool]:
    """``(body, sealed)``: the record without its checksum, after checking it; ``sealed`` is
    False for a record written without one (the caller decides whether that is acceptable)."""
    if KEY not in d:
        return d, False
    body = {k: v for k, v in d.items() if k != KEY}
    if d[KEY] != digest(body):
        raise CorruptionError(f"{where}: damaged {what} (its checksum does not match its contents; run `strata verify --repair`)")
    return body, True
