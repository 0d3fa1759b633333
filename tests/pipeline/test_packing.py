from __future__ import annotations

import numpy as np
import pytest

from strata.pipeline.packing import Encoded, TokenizerInfo, encode_texts, num_units, tokenizer_info
from strata.pipeline.plan import pack
from strata.store.datasets.tokens import check_tokens

TOK = TokenizerInfo(name="t", backend_json="{}", bos_id=1, sep_id=2, pad_id=0, special_ids=(0, 1, 2))


def _docs(*lens, start=10):
    """Documents of these lengths; token i of a document spans characters [3i, 3i + 2) of it."""
    out, v = [], start
    for n in lens:
        c = np.arange(n, dtype=np.int32) * 3
        out.append(Encoded(np.arange(v, v + n, dtype=np.int32), c, c + 2))
        v += n
    return out


def _ids(docs):
    return [d.ids for d in docs]


def test_concat_matches_a_hand_built_stream():
    docs = _docs(3, 5, 2)
    ids = np.array([100, 101, 102])
    ctx = pack(docs, ids, tok=TOK, context_size=4, packing="concat", prepend_bos=True)
    # stream: d0 (3) sep, d1 (5) sep, d2 (2) sep = 13 tokens; 3 body tokens per context -> 4 contexts
    d = _ids(docs)
    stream = np.concatenate([d[0], [2], d[1], [2], d[2], [2]])
    assert len(ctx) == 4
    assert np.array_equal(ctx.token_id[:, 0], [1, 1, 1, 1])
    assert np.array_equal(ctx.token_id[:, 1:].reshape(-1), stream[:12])
    sdoc = np.repeat(ids, [4, 6, 3])
    assert np.array_equal(ctx.doc_id[:, 1:].reshape(-1), sdoc[:12])
    assert np.array_equal(ctx.doc_id[:, 0], ctx.doc_id[:, 1])  # BOS belongs to the doc it starts
    spos = np.concatenate([np.arange(4), np.arange(6), np.arange(3)])
    assert np.array_equal(ctx.doc_position[:, 1:].reshape(-1), spos[:12])
    assert np.array_equal(ctx.special[:, 1:].reshape(-1), np.isin(stream[:12], [0, 1, 2]))
    assert ctx.special[:, 0].all() and ctx.mask.all() and not ctx.padded
    # Character spans: each token's own, -1 for BOS and separators.
    starts = np.concatenate([np.arange(4) * 3, np.arange(6) * 3, np.arange(3) * 3])
    starts[[3, 9, 12]] = -1  # the separators
    assert np.array_equal(ctx.char_start[:, 1:].reshape(-1), starts[:12])
    assert np.array_equal(ctx.char_end[:, 1:].reshape(-1), np.where(starts[:12] >= 0, starts[:12] + 2, -1))
    assert (ctx.char_start[:, 0] == -1).all()


def test_concat_is_prefix_stable_when_documents_are_appended():
    docs = _docs(*[7, 3, 11, 5, 9, 2, 13])
    ids = np.arange(7)
    small = pack(docs[:4], ids[:4], tok=TOK, context_size=6, packing="concat", prepend_bos=True)
    big = pack(docs, ids, tok=TOK, context_size=6, packing="concat", prepend_bos=False)
    big_bos = pack(docs, ids, tok=TOK, context_size=6, packing="concat", prepend_bos=True)
    assert len(big_bos) > len(small)
    for a in ("token_id", "doc_id", "doc_position", "special", "char_start", "char_end"):
        assert np.array_equal(getattr(big_bos, a)[: len(small)], getattr(small, a))
    assert big.token_id.shape[1] == 6 and not (big.token_id == 1).any()


def test_truncate_pads_masks_and_splits_long_documents():
    docs = _docs(2, 9)
    ctx = pack(docs, np.array([5, 6]), tok=TOK, context_size=5, packing="truncate", prepend_bos=True, split_long=True)
    # doc 5 -> 1 context; doc 6 (9 tokens, 4 per context) -> 3 contexts
    assert len(ctx) == 4
    assert ctx.token_id[0].tolist() == [1, 10, 11, 0, 0]
    assert ctx.mask[0].tolist() == [True, True, True, False, False]
    assert ctx.special[0].tolist() == [True, False, False, True, True]
    assert ctx.doc_id[0].tolist() == [5, 5, 5, -1, -1]
    assert ctx.doc_position[3].tolist() == [-1, 8, -1, -1, -1]
    assert np.array_equal(ctx.token_id[1:, 1:][ctx.mask[1:, 1:]], docs[1].ids)
    assert ctx.char_start[3].tolist() == [-1, 24, -1, -1, -1] and ctx.char_end[3].tolist() == [-1, 26, -1, -1, -1]
    assert ctx.padded
    cut = pack(docs, np.array([5, 6]), tok=TOK, context_size=5, packing="truncate", prepend_bos=False, split_long=False)
    assert len(cut) == 2 and cut.token_id[1].tolist() == docs[1].ids[:5].tolist()


def test_token_table_satisfies_the_store_contract():
    ctx = pack(_docs(30, 40), np.array([0, 1]), tok=TOK, context_size=8, packing="concat", prepend_bos=True)
    part = ctx.slice(4, 8)
    t = check_tokens(part.token_table(4), unit=1, first_context=4, context_size=8, what="x")
    assert t.num_rows == 32 and t.column("token_id").to_pylist() == part.token_id.reshape(-1).tolist()
    assert t.column("char_start").to_pylist() == part.char_start.reshape(-1).tolist()


def test_num_units_full_only_holds_back_the_partial_unit():
    assert num_units(10, 4) == 3
    assert num_units(10, 4, full_only=True) == 2
    assert num_units(8, 4, full_only=True) == 2


def test_bos_required_and_real_tokenizer_roundtrip(tiny_gpt2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    info = tokenizer_info(tok, "tiny")
    texts = ["The river watched the last train.", "A red fox <|endoftext|> at midnight."]
    ids = encode_texts(info.backend_json, texts)
    ref = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
    assert [x.ids.tolist() for x in ids] == [r["input_ids"] for r in ref]
    assert [list(zip(x.start.tolist(), x.end.tolist())) for x in ids] == [[tuple(o) for o in r["offset_mapping"]] for r in ref]
    ctx = pack(ids, np.array([0, 1]), tok=info, context_size=4, packing="concat", prepend_bos=True)
    # a special token inside a document's text is flagged too
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert ctx.special[ctx.token_id == eot].all()
    nobos = TokenizerInfo("n", "{}", None, 2, 0, (0, 2))
    with pytest.raises(ValueError, match="no BOS"):
        pack(ids, np.array([0, 1]), tok=nobos, context_size=4, packing="concat", prepend_bos=True)
