"""Alignment of two real extractions whose tokenizers differ, over one corpus: every pair is two
tokens that complete the same prefix of the same document (checked by decoding the token ids
with each dataset's own tokenizer, not through the character spans), and compare runs on them."""

from __future__ import annotations

import numpy as np
import pytest

from strata.analysis import similarity as sim
from strata.store.datasets.aligned import align_tokens, iter_aligned

pytestmark = [pytest.mark.ray, pytest.mark.slow]
H = "blocks.1.hook_resid_post"


def _doc_tokens(ds):
    t = ds.tokens()
    keep = ~t.column("special").to_numpy(zero_copy_only=False)
    return {c: t.column(c).to_numpy()[keep] for c in ("row", "doc_id", "doc_position", "token_id")}


def test_pairs_are_tokens_completing_the_same_prefix(two_tokenizers):
    _, a, b, texts, _ = two_tokenizers
    assert a.info.meta["tokenizer"] != b.info.meta["tokenizer"]
    al = align_tokens([(a, H), (b, H)])
    assert al.method == "char_end"
    fa, fb = al.paired_fraction
    assert 0.5 < fa <= 1 and 0.3 < fb <= 1 and fa != fb
    prefix = {}
    for key, ds in (("a", a), ("b", b)):
        tok, cols = ds.tokenizer(), _doc_tokens(ds)
        at = {int(r): i for i, r in enumerate(cols["row"])}
        prefix[key] = (tok, cols, at)
    checked = 0
    for ra, rb in zip(*al.rows):
        decoded = []
        for key, r in (("a", ra), ("b", rb)):
            tok, cols, at = prefix[key]
            i = at[int(r)]
            doc = cols["doc_id"][i]
            same = cols["doc_id"] == doc
            ids = cols["token_id"][same & (cols["doc_position"] <= cols["doc_position"][i])]
            decoded.append((int(doc), tok.decode(ids.tolist())))
        assert decoded[0] == decoded[1]  # the same document, the same decoded prefix
        assert texts[decoded[0][0]].startswith(decoded[0][1])
        checked += 1
    assert checked == len(al) > 1000
    # No pair is missing: the offsets where a prefix of A's tokens decodes to a prefix of the text,
    # and likewise for B, all pair, except where a document's tail was dropped (the last token
    # kept may stop inside a character, and nothing says whether it does: it does not pair).
    bounds = {}
    for key in ("a", "b"):
        tok, cols, _ = prefix[key]
        found = set()
        for doc in np.unique(cols["doc_id"]):
            sel = np.flatnonzero(cols["doc_id"] == doc)
            ids = cols["token_id"][sel][np.argsort(cols["doc_position"][sel])].tolist()
            ds = a if key == "a" else b
            dropped = int(ds.docs().column("dropped_tokens").to_numpy()[int(doc)])
            for p in range(len(ids) - (1 if dropped else 0)):
                text = tok.decode(ids[: p + 1])
                if "\ufffd" not in text and texts[int(doc)].startswith(text):
                    found.add((int(doc), len(text)))
        bounds[key] = found
    assert len(al) == len(bounds["a"] & bounds["b"])


def test_compare_and_batches_across_tokenizers(two_tokenizers, ray_session):
    _, a, b, _, _ = two_tokenizers
    al = align_tokens([(a, H), (b, H)])
    x = np.asarray(a.read(H), np.float64)[al.rows[0]]
    y = np.asarray(b.read(H), np.float64)[al.rows[1]]
    got = sim.compare((a, H), (b, H), ["linear_cka", "svcca"], use_ray=True, tasks=2)
    assert got["n"] == len(al)
    assert got["linear_cka"] == pytest.approx(sim.linear_cka(x, y), rel=1e-10)
    assert got["svcca"] == pytest.approx(sim.svcca(x, y), rel=1e-9)
    with iter_aligned([(a, H), (b, H)], batch_size=256, shuffle=True, seed=3) as it:
        batches = list(it)
    xs = np.concatenate([bx.numpy() for bx, _ in batches])
    ys = np.concatenate([by.numpy() for _, by in batches])
    assert xs.shape == (len(al), a.info.hooks[H].d) and ys.shape == (len(al), b.info.hooks[H].d)
    np.testing.assert_array_equal(np.sort(xs, axis=0), np.sort(x.astype(np.float32), axis=0))  # every pair once
    # ...and each with its partner: a joint permutation leaves CKA as it is, a broken pairing does not.
    assert sim.linear_cka(xs, ys) == pytest.approx(sim.linear_cka(x.astype(np.float32), y.astype(np.float32)), rel=1e-9)


def test_documents_pooled_across_tokenizers(two_tokenizers):
    _, a, b, texts, _ = two_tokenizers
    got = sim.compare((a, H), (b, H), ["linear_cka"], align="docs", use_ray=False)
    # Every document has rows on both sides, all in committed units (the last one lost only its
    # tail to the concat packing), so every document pairs.
    assert got["n"] == len(texts)
    assert 0 < got["linear_cka"] <= 1
