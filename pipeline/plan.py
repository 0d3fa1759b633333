"""Streaming plans: a corpus's tokens kept out of memory, and any unit's contexts built on demand.

A plan is a function of per-document token counts: with the counts (16 bytes a document) the
packer knows where every context starts, how many units there are, and which rows each document
has (the document index, by arithmetic); the tokens themselves are read back only for the units
being computed. So a driver's memory stays flat in the size of the corpus.

Both packings (see :mod:`pipeline.packing` for what they mean) are built here from a
:class:`TokenSource`: :class:`MemorySource` for tokens already in memory (tests, small
corpora), :class:`FileSource` for tokens streamed to local files while planning.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from strata.pipeline.packing import Contexts, Encoded, EncodedBatch, Packing, TokenizerInfo


class TokenSource:
    """Documents' tokens in corpus order: ``lens`` per document, and ``read(i0, i1)`` the
    concatenated ids, character starts and ends of documents ``[i0, i1)``."""

    lens: np.ndarray  # int64, one per document
    offsets: np.ndarray  # int64, len(lens) + 1: where each document's tokens start

    def read(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class MemorySource(TokenSource):
    def __init__(self, tokens: list[Encoded]) -> None:
        self.lens = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)
        empty = np.zeros(0, np.int32)
        self._ids = np.concatenate([t.ids for t in tokens]).astype(np.int32) if tokens else empty
        self._start = np.concatenate([t.start for t in tokens]).astype(np.int32) if tokens else empty
        self._end = np.concatenate([t.end for t in tokens]).astype(np.int32) if tokens else empty

    def read(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.offsets[i0], self.offsets[i1]
        return self._ids[a:b], self._start[a:b], self._end[a:b]


class FileSource(TokenSource):
    """Tokens appended to three local files as they are tokenized; read back by range (plain
    reads into small buffers, not a memory map, so the driver's resident memory stays small)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="strata-plan-", dir=folder))
        self._files = {k: open(self.dir / f"{k}.i32", "wb") for k in ("ids", "start", "end")}  # noqa: SIM115
        self._lens: list[np.ndarray] = []
        self.lens = np.zeros(0, np.int64)
        self.offsets = np.zeros(1, np.int64)

    def append(self, tokens: EncodedBatch | list[Encoded]) -> None:
        if not isinstance(tokens, EncodedBatch):
            lens = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
            empty = np.zeros(0, np.int32)
            tokens = EncodedBatch(*(np.concatenate([getattr(t, a) for t in tokens]) if tokens else empty for a in ("ids", "start", "end")), lens)
        for k in ("ids", "start", "end"):
            self._files[k].write(np.ascontiguousarray(getattr(tokens, k), np.int32).tobytes())
        # A copy: a batch from a Ray task is a view into its object, which a view would pin (the
        # whole batch's tokens, for as long as the plan lives).
        self._lens.append(np.array(tokens.lens, dtype=np.int64, copy=True))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self.lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
        self._lens = []
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)

    def read(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, n = int(self.offsets[i0]), int(self.offsets[i1] - self.offsets[i0])
        out = []
        for k in ("ids", "start", "end"):
            with open(self.dir / f"{k}.i32", "rb") as f:
                f.seek(4 * a)
                out.append(np.fromfile(f, dtype=np.int32, count=n))
        return out[0], out[1], out[2]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Packer:
    """Contexts of a corpus, any range of them, from its token source."""

    source: TokenSource
    doc_ids: np.ndarray
    tok: TokenizerInfo
    context_size: int
    packing: Packing
    prepend_bos: bool
    split_long: bool = True

    def __post_init__(self) -> None:
        if self.prepend_bos and self.tok.bos_id is None:
            raise ValueError(f"`tokenize.prepend_bos` is set but tokenizer {self.tok.name!r} has no BOS (or CLS) token")
        if self.packing not in ("concat", "truncate"):
            raise ValueError(f"unknown packing {self.packing!r}; valid: concat, truncate")
        self.bos = 1 if self.prepend_bos else 0
        self.body = self.context_size - self.bos
        if self.body <= 0:
            raise ValueError("`tokenize.context_size` must leave room for at least one token after BOS")
        lens = self.source.lens
        if self.packing == "concat":
            self.seg = np.concatenate([[0], np.cumsum(lens + 1)]).astype(np.int64)  # where each doc's segment starts in the stream
            self.n_contexts = int(self.seg[-1] // self.body)
        else:
            counts = np.maximum(1, -(-lens // self.body)) if self.split_long else np.ones(len(lens), np.int64)
            self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # each doc's first context
            self.n_contexts = int(self.first[-1])
        self.special_ids = np.asarray(self.tok.special_ids, dtype=np.int64)

    def __len__(self) -> int:
        return self.n_contexts

    # -- contexts ---------------------------------------------------------------------------------

    def contexts(self, lo: int, hi: int) -> Contexts:
        """Contexts ``[lo, hi)`` (a pure function of the corpus: the same on every run)."""
        hi = min(hi, self.n_contexts)
        n = max(0, hi - lo)
        arrays = self._concat(lo, hi) if self.packing == "concat" else self._truncate(lo, hi)
        tid, did, dpos, spec, mask, cs, ce = (a.reshape(n, self.body) for a in arrays)
        spec |= np.isin(tid, self.special_ids)
        if self.bos:
            first_doc = did[:, :1].copy()
            minus = np.full((n, 1), -1, np.int32)
            tid = np.concatenate([np.full((n, 1), self.tok.bos_id, np.int32), tid], axis=1)
            did = np.concatenate([first_doc, did], axis=1)
            dpos = np.concatenate([minus, dpos], axis=1)
            spec = np.concatenate([np.ones((n, 1), bool), spec], axis=1)
            mask = np.concatenate([np.ones((n, 1), bool), mask], axis=1)
            cs, ce = np.concatenate([minus, cs], axis=1), np.concatenate([minus, ce], axis=1)
        return Contexts(*(np.ascontiguousarray(a) for a in (tid, did, dpos, spec, mask, cs, ce)))

    def _concat(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        sep = self.tok.sep_id if self.tok.sep_id is not None else self.tok.pad_id
        p0, p1 = lo * self.body, hi * self.body  # stream positions
        if p1 <= p0:
            return tuple(np.zeros(0, t) for t in (np.int32, np.int64, np.int32, bool, bool, np.int32, np.int32))
        i0 = int(np.searchsorted(self.seg, p0, side="right")) - 1
        i1 = int(np.searchsorted(self.seg, p1 - 1, side="right"))  # docs [i0, i1) cover the range
        ids, starts, ends = self.source.read(i0, i1)
        lens = self.source.lens[i0:i1]
        seg = lens + 1
        total = int(seg.sum())
        base = self.seg[i0]
        doc = np.repeat(self.doc_ids[i0:i1].astype(np.int64), seg)
        pos = (np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(seg) - seg, seg)).astype(np.int32)
        is_sep = pos == np.repeat(lens, seg)
        stream = np.full(total, sep, np.int32)
        cs = np.full(total, -1, np.int32)
        ce = np.full(total, -1, np.int32)
        stream[~is_sep], cs[~is_sep], ce[~is_sep] = ids, starts, ends
        a, b = p0 - base, p1 - base
        return stream[a:b], doc[a:b], pos[a:b], is_sep[a:b].copy(), np.ones(b - a, bool), cs[a:b], ce[a:b]

    def _truncate(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        n, body = max(0, hi - lo), self.body
        tid = np.full((n, body), self.tok.pad_id, np.int32)
        did = np.full((n, body), -1, np.int64)
        dpos = np.full((n, body), -1, np.int32)
        mask = np.zeros((n, body), bool)
        cs = np.full((n, body), -1, np.int32)
        ce = np.full((n, body), -1, np.int32)
        if n:
            i0 = int(np.searchsorted(self.first, lo, side="right")) - 1
            i1 = int(np.searchsorted(self.first, hi - 1, side="right"))
            ids, starts, ends = self.source.read(i0, i1)
            off = self.source.offsets[i0:i1 + 1] - self.source.offsets[i0]
            for c in range(lo, hi):
                i = int(np.searchsorted(self.first, c, side="right")) - 1
                j = c - int(self.first[i])
                a = int(off[i - i0]) + j * body
                m = min(body, int(self.source.lens[i]) - j * body)
                r = c - lo
                tid[r, :m], cs[r, :m], ce[r, :m] = ids[a : a + m], starts[a : a + m], ends[a : a + m]
                did[r, :m] = self.doc_ids[i]
                dpos[r, :m] = np.arange(j * body, j * body + m, dtype=np.int32)
                mask[r, :m] = True
        return tid.reshape(-1), did.reshape(-1), dpos.reshape(-1), ~mask.reshape(-1), mask.reshape(-1), cs.reshape(-1), ce.reshape(-1)

    # -- the document index, by arithmetic --------------------------------------------------------

    def document_index(self, fields: dict[str, pa.Array] | None = None) -> tuple[pa.Table, int, int, int]:
        """Every document's row span ``[row_start, row_end)`` over the planned contexts and its
        tokens no context holds; and ``(dropped tokens, dropped docs, partial docs)``. The same
        spans a scan of every context's ``doc_id`` would find (the tests check it), from the
        token counts alone."""
        lens, ctx, bos, body = self.source.lens, self.context_size, self.bos, self.body

        def row(p: np.ndarray) -> np.ndarray:  # stream or context position -> global row
            return (p // body) * ctx + bos + p % body

        if self.packing == "concat":
            keep = self.n_contexts * body
            s = self.seg[:-1]
            present = np.clip(keep - s, 0, lens)
            has = s < keep
            last = np.minimum(s + lens, keep - 1)
            start = np.where(has, row(s) - np.where(s % body == 0, bos, 0), -1)
            end = np.where(has, row(last) + 1, -1)
        else:
            first, k = self.first[:-1], np.diff(self.first)
            m_last = lens - (k - 1) * body if self.split_long else np.minimum(lens, body)
            present = np.minimum(lens, body) if not self.split_long else lens
            start = first * ctx
            end = (first + k - 1) * ctx + bos + m_last
            empty = (end <= start) | (lens == 0)  # a document of no tokens: its BOS row carries doc id -1
            start, end = np.where(empty, -1, start), np.where(empty, -1, end)
        dropped = lens - present
        table = pa.table({"doc_id": self.doc_ids.astype(np.int64), "row_start": start.astype(np.int64),
                          "row_end": end.astype(np.int64), "dropped_tokens": dropped.astype(np.int64)})
        for name, values in (fields or {}).items():
            table = table.append_column(name, values)
        return table, int(dropped.sum()), int(((present == 0) & (lens > 0)).sum()), int(((present > 0) & (dropped > 0)).sum())


def pack(
    tokens: list[Encoded],
    doc_ids: np.ndarray,
    *,
    tok: TokenizerInfo,
    context_size: int,
    packing: Packing,
    prepend_bos: bool,
    split_long: bool = True,
) -> Contexts:
    """Pack tokenized documents into contexts, all of them, in memory (see :mod:`strata.pipeline.packing`;
    :class:`Packer` builds any range of them from tokens kept out of memory)."""
    p = Packer(MemorySource(tokens), np.asarray(doc_ids), tok, context_size, packing, prepend_bos, split_long)
    return p.contexts(0, len(p))
