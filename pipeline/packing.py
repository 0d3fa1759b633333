"""Tokenization and packing: documents -> fixed-length contexts -> units, before any model runs.

``concat`` (sae-lens style): every document's tokens followed by a separator (the tokenizer's
EOS, else SEP, else BOS) form one stream; contexts are cut from it back to back, each starting
with BOS when ``prepend_bos``. The tail that does not fill a context is left out, so the
contexts of a corpus are a prefix of the contexts of the same corpus with documents appended.

``truncate``: one document per context, padded (and masked) to ``context_size``; with
``split_long`` a longer document continues in further contexts, each starting with BOS.

Everything here is a pure function of the token ids, so a plan is the same on every run.
:func:`strata.pipeline.plan.pack` packs a whole corpus in memory; :class:`~strata.pipeline.plan.Packer` any range.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import xxhash
from tokenizers import Tokenizer

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


@dataclass
class EncodedBatch:
    """Many documents' tokens, flat: what a tokenization task returns (three arrays and the
    lengths, cheap to ship and to append to a plan's files)."""

    ids: np.ndarray  # int32, every document's tokens one after the other
    start: np.ndarray  # int32
    end: np.ndarray  # int32
    lens: np.ndarray  # int64, tokens per document

    def split(self) -> list[Encoded]:
        cut = np.cumsum(self.lens)[:-1]
        return [Encoded(i, s, e) for i, s, e in zip(np.split(self.ids, cut), np.split(self.start, cut), np.split(self.end, cut))]


def encode_batch(backend_json: str, texts: list[str]) -> EncodedBatch:
    """Tokens of each text, without special tokens, with their character offsets, flat (runs
    in a CPU task)."""
    tk = Tokenizer.from_str(backend_json)
    tk.no_truncation()
    tk.no_padding()
    enc = tk.encode_batch(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) for e in enc), dtype=np.int64, count=len(enc))
    n = int(lens.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in enc), dtype=np.int32, count=n)
    off = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in enc)), dtype=np.int32, count=2 * n)
    return EncodedBatch(ids, off[0::2].copy(), off[1::2].copy(), lens)


def encode_texts(backend_json: str, texts: list[str]) -> list[Encoded]:
    """Tokens of each text, without special tokens, with their character offsets."""
    return encode_batch(backend_json, texts).split()


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


def num_units(n_contexts: int, unit_contexts: int, *, full_only: bool = False) -> int:
    """Units of a plan; with ``full_only`` the last, partial unit is held back."""
    return n_contexts // unit_contexts if full_only else -(-n_contexts // unit_contexts)
