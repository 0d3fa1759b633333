"""Streaming plans: contexts built on demand from tokens on disk equal the in-memory packing,
and the document index computed from token counts equals a scan of every context."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.pipeline.packing import Encoded, TokenizerInfo
from strata.pipeline.plan import FileSource, MemorySource, Packer

TOK = TokenizerInfo(name="t", backend_json="{}", bos_id=1, sep_id=2, pad_id=0, special_ids=(0, 1, 2))


def _docs(lens, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lens:
        c = np.sort(rng.integers(0, 1000, n)).astype(np.int32)
        out.append(Encoded(rng.integers(5, 500, n).astype(np.int32), c, c + 1))
    return out


def _scan_index(ctx, lens, doc_ids):
    """The independent way: the row span of each document is where its id appears."""
    flat_doc, flat_pos = ctx.doc_id.reshape(-1), ctx.doc_position.reshape(-1)
    out = {}
    for i, d in enumerate(doc_ids):
        rows = np.flatnonzero(flat_doc == d)
        present = int(((flat_doc == d) & (flat_pos >= 0) & (flat_pos < lens[i])).sum())
        out[int(d)] = ((int(rows[0]), int(rows[-1]) + 1) if rows.size else (-1, -1), int(lens[i]) - present)
    return out


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=25), ctx=st.integers(2, 12), packing=st.sampled_from(["concat", "truncate"]),
       bos=st.booleans(), split=st.booleans())
def test_document_index_by_arithmetic_equals_a_scan_of_every_context(lens, ctx, packing, bos, split):
    docs = _docs(lens)
    ids = np.arange(100, 100 + len(lens), dtype=np.int64)
    p = Packer(MemorySource(docs), ids, TOK, ctx, packing, bos, split)
    table, dropped, dropped_docs, partial = p.document_index()
    want = _scan_index(p.contexts(0, len(p)), np.asarray(lens), ids)
    got = {d: ((s, e), k) for d, s, e, k in zip(*(table.column(c).to_pylist() for c in ("doc_id", "row_start", "row_end", "dropped_tokens")))}
    assert got == want
    assert dropped == sum(k for _, k in want.values())
    assert dropped_docs == sum(1 for (span, k), n in zip(want.values(), lens) if n and k == n)
    assert partial == sum(1 for (span, k), n in zip(want.values(), lens) if 0 < k < n)


@pytest.mark.parametrize("packing", ["concat", "truncate"])
def test_any_range_from_files_equals_the_whole_packing(tmp_path, packing):
    docs = _docs(np.random.default_rng(1).integers(0, 60, 80))
    ids = np.arange(80, dtype=np.int64) * 3
    whole = Packer(MemorySource(docs), ids, TOK, 9, packing, True).contexts(0, 10**9)
    src = FileSource(tmp_path)
    for i in range(0, 80, 7):  # appended in batches, as tokenization tasks return them
        src.append(docs[i : i + 7])
    src.close()
    p = Packer(src, ids, TOK, 9, packing, True)
    assert len(p) == whole.token_id.shape[0]
    rng = np.random.default_rng(2)
    for _ in range(30):
        lo = int(rng.integers(0, len(p)))
        hi = int(rng.integers(lo, len(p) + 1))
        part = p.contexts(lo, hi)
        for a in ("token_id", "doc_id", "doc_position", "special", "mask", "char_start", "char_end"):
            assert np.array_equal(getattr(part, a), getattr(whole, a)[lo:hi]), a
    src.remove()
    assert not src.dir.exists()
