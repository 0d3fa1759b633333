"""Row alignment and aligned batches: planted structure is recovered across tokenizations, every
pair appears once per epoch with its partner, resuming equals not stopping, bad sides refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from strata import store
from strata.store.datasets.aligned import AlignmentError, align_tokens, iter_aligned

CTX, UC = 16, 4
H = "blocks.0.hook_resid_post"
WORDS = ["alpha", "be", "gamma", "delta", "epsilon", "z", "eta", "theta", "io", "kappa"]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))) for _ in range(n)]


def _chars(text: str) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(len(text))]


def _words(text: str) -> list[tuple[int, int]]:
    out, start = [], 0
    for i, ch in enumerate(text + " "):
        if ch == " " and i > start:
            out.append((start, i))
            start = i
    return out


def _pack(docs: list[list[tuple[int, int]]]) -> dict[str, np.ndarray]:
    """Concat packing: BOS first in every context, a separator after each document, padded tail."""
    body = []
    for d, spans in enumerate(docs):
        body += [(d, p, False, a, b) for p, (a, b) in enumerate(spans)] + [(d, len(spans), True, -1, -1)]
    per = CTX - 1
    body += [(-1, -1, True, -1, -1)] * (-len(body) % per)
    rows = []
    for c in range(len(body) // per):
        rows += [(body[c * per][0], -1, True, -1, -1), *body[c * per : (c + 1) * per]]
    cols = np.array(rows, dtype=np.int64).T
    return dict(zip(("doc_id", "doc_position", "special", "char_start", "char_end"), cols))


def _write(s: store.Store, name: str, flat: dict[str, np.ndarray], values: np.ndarray, meta: dict) -> store.ActivationDataset:
    n = flat["doc_id"].size
    ur = UC * CTX
    w = s.create_dataset(name, hooks={H: values.shape[1]}, context_size=CTX, dtype="float32", num_units=-(-n // ur),
                         unit_contexts=UC, meta=meta)
    for u in range(-(-n // ur)):
        r = np.arange(u * ur, min(n, (u + 1) * ur))
        w.write_unit(u, tokens=pa.table({
            "context_id": r // CTX, "position": (r % CTX).astype(np.int32), "doc_id": flat["doc_id"][r],
            "doc_position": flat["doc_position"][r].astype(np.int32), "token_id": np.zeros(r.size, np.int32),
            "special": flat["special"][r].astype(bool), "char_start": flat["char_start"][r].astype(np.int32),
            "char_end": flat["char_end"][r].astype(np.int32)}), acts={H: values[r]})
    return s.dataset(name)


@pytest.fixture
def two_tokenizations(tmp_path):
    """The same 30 texts tokenized per character (A) and per word (B). A token's value encodes
    (document, char_end): A holds (doc, end, 1), B holds (doc, end, 2) at every real token."""
    texts = _texts(30)
    fa, fb = _pack([_chars(t) for t in texts]), _pack([_words(t) for t in texts])
    s = store.open(tmp_path)
    va = np.stack([fa["doc_id"], fa["char_end"], np.ones_like(fa["doc_id"])], axis=1).astype(np.float32)
    vb = np.stack([fb["doc_id"], fb["char_end"], 2 * np.ones_like(fb["doc_id"])], axis=1).astype(np.float32)
    meta = {"model": "m", "revision": "0", "corpus_fingerprint": "corpus-1"}
    a = _write(s, "chars", fa, va, {**meta, "tokenizer": "chars"})
    b = _write(s, "words", fb, vb, {**meta, "tokenizer": "words"})
    return a, b, texts


def test_cross_tokenizer_pairs_are_the_tokens_ending_at_the_same_offset(two_tokenizations):
    a, b, texts = two_tokenizations
    al = align_tokens([(a, H), (b, H)])
    assert al.method == "char_end"
    va, vb = a.read(H)[al.rows[0]], b.read(H)[al.rows[1]]
    np.testing.assert_array_equal(va[:, :2], vb[:, :2])  # same document, same end offset
    n_words = sum(len(_words(t)) for t in texts)
    n_chars = sum(len(t) for t in texts)
    assert len(al) == n_words  # every word ends where a character ends
    assert al.paired_fraction == pytest.approx((n_words / n_chars, 1.0))
    assert np.all(np.diff(al.rows[0]) > 0)


def test_byte_split_characters_pair_only_where_the_character_is_complete(tmp_path):
    # "é" split into two byte tokens (A) that both carry its span [1, 2); B has one token per character.
    text = "aéb"
    fa = _pack([[(0, 1), (1, 2), (1, 2), (2, 3)]])
    fb = _pack([[(0, 1), (1, 2), (2, 3)]])
    s = store.open(tmp_path)
    meta = {"model": "m", "revision": "0", "corpus_fingerprint": "c"}
    a = _write(s, "bytes", fa, np.arange(fa["doc_id"].size, dtype=np.float32)[:, None], {**meta, "tokenizer": "bytes"})
    b = _write(s, "chars", fb, np.arange(fb["doc_id"].size, dtype=np.float32)[:, None], {**meta, "tokenizer": "chars"})
    al = align_tokens([(a, H), (b, H)])
    pos_a = a.tokens().column("doc_position").to_numpy()[al.rows[0]]
    pos_b = b.tokens().column("doc_position").to_numpy()[al.rows[1]]
    assert len(text) == 3 and pos_a.tolist() == [0, 2, 3] and pos_b.tolist() == [0, 1, 2]  # the first byte of é never pairs


def test_one_dataset_pairs_rows_and_same_tokenizer_pairs_positions(two_tokenizations, tmp_path):
    a, _, _ = two_tokenizations
    al = align_tokens([(a, H), (a, H)])
    keep = ~a.tokens().column("special").to_numpy(zero_copy_only=False)
    assert al.method == "rows" and np.array_equal(al.rows[0], np.flatnonzero(keep)) and al.paired_fraction == (1.0, 1.0)
    only = align_tokens([(a, H), (a, H)], units=[1])
    assert set(only.rows[0] // a.info.unit_rows) == {1} and only.units[0] == (1,)


def test_sides_that_cannot_be_aligned(two_tokenizations, tmp_path):
    a, b, texts = two_tokenizations
    s = a.store
    flat = _pack([_words(t) for t in texts])
    vals = np.zeros((flat["doc_id"].size, 3), np.float32)
    other = _write(s, "other-corpus", flat, vals, {"model": "m", "revision": "0", "tokenizer": "words", "corpus_fingerprint": "corpus-2"})
    with pytest.raises(AlignmentError, match="different corpora"):
        align_tokens([(b, H), (other, H)])
    with pytest.raises(store.HookNotFoundError, match="has no hook 'nope'"):
        align_tokens([(a, H), (b, "nope")])
    with pytest.raises(ValueError, match="at least two"):
        align_tokens([(a, H)])


def _collect(it) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in it])
    return np.concatenate(xs), np.concatenate(ys)


def test_each_epoch_yields_every_pair_once_with_its_partner(two_tokenizations):
    a, b, _ = two_tokenizations
    al = align_tokens([(a, H), (b, H)])
    with iter_aligned([(a, H), (b, H)], batch_size=37, shuffle=True, seed=5, epochs=2, buffer_rows=100) as it:
        assert len(it) == 2 * -(-len(al) // 37)
        batches = list(it)
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x, _ in batches)
    x = np.concatenate([bx.numpy() for bx, _ in batches])
    y = np.concatenate([by.numpy() for _, by in batches])
    np.testing.assert_array_equal(x[:, :2], y[:, :2])  # partners: same document and offset
    per = -(-len(al) // 37)
    for e in range(2):
        ex = np.concatenate([bx.numpy() for bx, _ in batches[e * per : (e + 1) * per]])
        keys = sorted(map(tuple, ex[:, :2].tolist()))
        assert keys == sorted(map(tuple, a.read(H)[al.rows[0]][:, :2].tolist()))  # a permutation of the pairs
    first = np.concatenate([bx.numpy() for bx, _ in batches[:per]])
    second = np.concatenate([bx.numpy() for bx, _ in batches[per:]])
    assert not np.array_equal(first, second)  # epochs are shuffled differently
    with iter_aligned([(a, H), (b, H)], batch_size=37, shuffle=False) as it:
        x0, _ = _collect(it)
    np.testing.assert_array_equal(x0, a.read(H)[al.rows[0]])  # unshuffled: side-A row order


def test_resume_gives_the_next_batch_of_an_uninterrupted_run(two_tokenizations):
    a, b, _ = two_tokenizations
    for epochs in (4, None):  # ~150 pairs: 6 batches an epoch, so 12 batches cross epochs
        full = iter_aligned([(a, H), (b, H)], batch_size=29, seed=1, epochs=epochs, buffer_rows=64)
        ref = [next(full) for _ in range(12)]
        it = iter_aligned([(a, H), (b, H)], batch_size=29, seed=1, epochs=epochs, buffer_rows=64)
        for _ in range(7):
            next(it)
        state = it.state_dict()
        again = iter_aligned([(a, H), (b, H)], batch_size=29, seed=1, epochs=epochs, buffer_rows=64)
        again.load_state_dict(state)
        for want in ref[7:]:
            got = next(again)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        if epochs is None:
            assert all(x.shape[0] == 29 for x, _ in ref)  # endless: every batch full
    with pytest.raises(ValueError, match="cannot resume: `seed`"):
        iter_aligned([(a, H), (b, H)], batch_size=29, seed=2).load_state_dict(state)


def test_bad_iterator_arguments(two_tokenizations):
    a, b, _ = two_tokenizations
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        iter_aligned([(a, H), (b, H)], batch_size=0)
    with pytest.raises(ValueError, match="larger than an epoch"):
        iter_aligned([(a, H), (b, H)], batch_size=10**6, epochs=None)
