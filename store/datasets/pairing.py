"""Order-independent hashes of a corpus's documents, so that two corpora can be shown to hold
the same documents under the same ids without either being read again.

An image corpus and its captions (extracted as a text corpus with the same ids) have different
corpus fingerprints, yet their documents correspond by id. The extraction records, in dataset
meta, ``doc_set_hash`` (every document of the corpus: its text, or an image's bytes) and, for an
image corpus with captions, ``caption_set_hash`` (the images with a non-empty caption, over the
caption text). ``align="docs"`` pairs two datasets of different corpora when one side's
``caption_set_hash`` equals the other side's ``doc_set_hash`` (:func:`strata.store.datasets.aligned.check_same_corpus`).

The hash of a set of ``(id, payload)`` documents is the sum modulo 2**64 of
``xxh3_64(id as 8 little-endian signed bytes + payload)``: a sum, so that documents may be added
in any order and by several workers (partial sums add), and the id inside each term, so that
the same texts under other ids hash differently. A text's payload is its UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash

__all__ = ["SetHash", "set_hash"]

_MASK = (1 << 64) - 1
PREFIX = "xxh3_64-sum:"


class SetHash:
    """A streaming :func:`set_hash`: ``add`` documents in any order, then ``hexdigest()``.
    Two accumulators over parts of one corpus combine with ``merge``."""

    __slots__ = ("total", "count")

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    def add(self, doc_id: int, payload: bytes) -> None:
        key = int(doc_id).to_bytes(8, "little", signed=True)
        self.total = (self.total + xxhash.xxh3_64_intdigest(key + bytes(payload))) & _MASK
        self.count += 1

    def merge(self, other: SetHash) -> SetHash:
        self.total = (self.total + other.total) & _MASK
        self.count += other.count
        return self

    def hexdigest(self) -> str:
        return f"{PREFIX}{self.total:016x}"


def set_hash(ids: np.ndarray | Iterable[int], payloads: Iterable[bytes]) -> str:
    """The set hash of the documents ``(ids[i], payloads[i])`` (a text's payload is
    ``text.encode("utf-8")``); see the module docstring."""
    h = SetHash()
    for doc_id, payload in zip(ids.tolist() if isinstance(ids, np.ndarray) else ids, payloads, strict=True):
        h.add(doc_id, payload)
    return h.hexdigest()
