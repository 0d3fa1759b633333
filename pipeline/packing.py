"""Tokenization and packing: documents -> fixed-length contexts -> units, before any model runs.

``concat`` (sae-lens style): every document's tokens followed by a separator (the tokenizer's
EOS, else SEP, else BOS) form one stream; contexts are cut from it back to back, each starting
with BOS when ``prepend_bos``. The tail that does not fill a context is left out, so the
contexts of a corpus are a prefix of the contexts of the same corpus with documents appended.

``truncate``: one document per context, padded (and masked) to ``context_size``; with
``split_long`` a longer document continues in further contexts, each starting with BOS.

Everything here is a pure function of the token ids, so a plan is the same on every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import xxhash

Packing = Literal["concat", "truncate"]


@dataclass(frozen=True)
class TokenizerInfo:
    """What packing needs of a tokenizer, and its identity. ``backend_json`` is the fast
    tokenizer's serialization, which the tokenization tasks load with ``tokenizers`` alone."""

    name: str
    backend_json: str
    bos_id: int | None
    sep_id: int | None
    pad_id: int
    special_ids: tuple[int, ...]

    @property
    def fingerprint(self) -> str:
        h = xxhash.xxh3_128(self.backend_json.encode())
        h.update(json.dumps([self.bos_id, self.sep_id, self.pad_id]).encode())
        return f"xxh3_128:{h.hexdigest()}"


def tokenizer_info(tok, name: str) -> TokenizerInfo:
    """Summarize a Hugging Face (fast) tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer of {name!r} has no fast (Rust) backend; Strata needs a fast tokenizer")

    def tid(*attrs: str) -> int | None:
        for a in attrs:
            v = getattr(tok, a, None)
            if v is not None:
                return int(v)
        return None

    bos = tid("bos_token_id", "cls_token_id")
    sep = tid("eos_token_id", "sep_token_id", "bos_token_id")
    pad = tid("pad_token_id", "eos_token_id", "sep_token_id")
    return TokenizerInfo(
        name=name,
        backend_json=backend.to_str(),
        bos_id=bos,
        sep_id=sep,
        pad_id=0 if pad is None else pad,
        special_ids=tuple(sorted({int(i) for i in tok.all_special_ids})),
    )


@dataclass
class Encoded:
    """One document's tokens: ids, and each token's character span ``[start, end)`` in its text."""

    ids: np.ndarray  # int32
    start: np.ndarray  # int32
    end: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.ids)


def encode_texts(backend_json: str, texts: list[str]) -> list[Encoded]:
    """Tokens of each text, without special tokens, with their character offsets (runs in a
    CPU task)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_str(backend_json)
    tk.no_truncation()
    tk.no_padding()
    out = []
    for e in tk.encode_batch(texts, add_special_tokens=False):
        off = np.asarray(e.offsets, dtype=np.int32).reshape(-1, 2)
        out.append(Encoded(np.asarray(e.ids, dtype=np.int32), off[:, 0].copy(), off[:, 1].copy()))
    return out


@dataclass
class Contexts:
    """Packed contexts, each array ``[n_contexts, context_size]``."""

    token_id: np.ndarray  # int32
    doc_id: np.ndarray  # int64; -1 for padding
    doc_position: np.ndarray  # int32; -1 for BOS and padding
    special: np.ndarray  # bool: BOS, separators, padding, special tokens
    mask: np.ndarray  # bool: attention mask (False for padding)
    char_start: np.ndarray  # int32: the token's character span in its document; -1 for BOS, separators, padding
    char_end: np.ndarray  # int32

    def __len__(self) -> int:
        return self.token_id.shape[0]

    @property
    def context_size(self) -> int:
        return self.token_id.shape[1]

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())

    def slice(self, lo: int, hi: int) -> Contexts:
        return Contexts(*(a[lo:hi] for a in (self.token_id, self.doc_id, self.doc_position, self.special, self.mask,
                                              self.char_start, self.char_end)))

    def token_table(self, first_context: int) -> pa.Table:
        """The store's token table of these contexts (row-major), numbered from ``first_context``."""
        n, s = self.token_id.shape
        ctx = np.repeat(np.arange(first_context, first_context + n, dtype=np.int64), s)
        pos = np.tile(np.arange(s, dtype=np.int32), n)
        return pa.table(
            {
                "context_id": ctx,
                "position": pos,
                "doc_id": self.doc_id.reshape(-1),
                "doc_position": self.doc_position.reshape(-1),
                "token_id": self.token_id.reshape(-1),
                "special": self.special.reshape(-1),
                "char_start": self.char_start.reshape(-1),
                "char_end": self.char_end.reshape(-1),
            }
        )


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
    """Pack tokenized documents into contexts (see the module docstring)."""
    if prepend_bos and tok.bos_id is None:
        raise ValueError(f"`tokenize.prepend_bos` is set but tokenizer {tok.name!r} has no BOS (or CLS) token")
    body = context_size - (1 if prepend_bos else 0)
    if body <= 0:
        raise ValueError("`tokenize.context_size` must leave room for at least one token after BOS")
    special_ids = np.asarray(tok.special_ids, dtype=np.int64)
    if packing == "concat":
        out = _pack_concat(tokens, doc_ids, tok, body)
    elif packing == "truncate":
        out = _pack_truncate(tokens, doc_ids, tok, body, split_long)
    else:
        raise ValueError(f"unknown packing {packing!r}; valid: concat, truncate")
    tid, did, dpos, spec, mask, cs, ce = out
    spec |= np.isin(tid, special_ids)
    if prepend_bos:
        n = tid.shape[0]
        first_doc = did[:, :1].copy() if n else np.zeros((0, 1), np.int64)
        minus = np.full((n, 1), -1, np.int32)
        tid = np.concatenate([np.full((n, 1), tok.bos_id, np.int32), tid], axis=1)
        did = np.concatenate([first_doc, did], axis=1)
        dpos = np.concatenate([minus, dpos], axis=1)
        spec = np.concatenate([np.ones((n, 1), bool), spec], axis=1)
        mask = np.concatenate([np.ones((n, 1), bool), mask], axis=1)
        cs, ce = np.concatenate([minus, cs], axis=1), np.concatenate([minus, ce], axis=1)
    return Contexts(*(np.ascontiguousarray(a) for a in (tid, did, dpos, spec, mask, cs, ce)))


def _pack_concat(tokens, doc_ids, tok, body):
    sep = tok.sep_id if tok.sep_id is not None else tok.pad_id
    lens = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    seg = lens + 1  # every document is followed by the separator
    total = int(seg.sum())
    n_ctx = total // body
    keep = n_ctx * body
    starts = np.cumsum(seg) - seg
    doc = np.repeat(np.asarray(doc_ids, np.int64), seg)
    pos = (np.arange(total, dtype=np.int64) - np.repeat(starts, seg)).astype(np.int32)
    is_sep = pos == np.repeat(lens, seg)
    stream = np.full(total, sep, dtype=np.int32)
    cs = np.full(total, -1, dtype=np.int32)
    ce = np.full(total, -1, dtype=np.int32)
    if len(tokens):
        stream[~is_sep] = np.concatenate([t.ids for t in tokens]).astype(np.int32, copy=False)
        cs[~is_sep] = np.concatenate([t.start for t in tokens])
        ce[~is_sep] = np.concatenate([t.end for t in tokens])
    shape = (n_ctx, body)
    return (
        stream[:keep].reshape(shape),
        doc[:keep].reshape(shape),
        pos[:keep].reshape(shape),
        is_sep[:keep].reshape(shape).copy(),
        np.ones(shape, bool),
        cs[:keep].reshape(shape),
        ce[:keep].reshape(shape),
    )


def _pack_truncate(tokens, doc_ids, tok, body, split_long):
    counts = [max(1, -(-len(t) // body)) if split_long else 1 for t in tokens]
    n_ctx = int(sum(counts))
    tid = np.full((n_ctx, body), tok.pad_id, np.int32)
    did = np.full((n_ctx, body), -1, np.int64)
    dpos = np.full((n_ctx, body), -1, np.int32)
    mask = np.zeros((n_ctx, body), bool)
    cs = np.full((n_ctx, body), -1, np.int32)
    ce = np.full((n_ctx, body), -1, np.int32)
    c = 0
    for t, d, k in zip(tokens, doc_ids, counts):
        for j in range(k):
            sl = slice(j * body, (j + 1) * body)
            m = len(t.ids[sl])
            tid[c, :m] = t.ids[sl]
            did[c, :m] = d
            dpos[c, :m] = np.arange(j * body, j * body + m, dtype=np.int32)
            mask[c, :m] = True
            cs[c, :m], ce[c, :m] = t.start[sl], t.end[sl]
            c += 1
    return tid, did, dpos, ~mask, mask, cs, ce


def num_units(n_contexts: int, unit_contexts: int, *, full_only: bool = False) -> int:
    """Units of a plan; with ``full_only`` the last, partial unit is held back."""
    return n_contexts // unit_contexts if full_only else -(-n_contexts // unit_contexts)
