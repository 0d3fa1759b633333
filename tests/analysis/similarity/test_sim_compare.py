"""``similarity.compare`` over the store: the in-memory metrics of the aligned rows, exactly, for any
number of tasks and any chunk size, as Ray tasks or here; documents pooled; bad input refused."""

from __future__ import annotations

import _simdata
import numpy as np
import pytest
import simref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.analysis import similarity as sim
from strata.analysis.similarity.compare import plan_compare
from strata.store.datasets.aligned import AlignmentError
from strata.store.errors import HookNotFoundError, StrataError

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
LINEAR = ["linear_cka", "debiased_cka", "cca", "svcca", "pwcca", "procrustes"]


def _aligned(ds):
    keep = ~ds.tokens().column("special").to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(keep)
    return rows, np.asarray(ds.read(H0), np.float64)[rows], np.asarray(ds.read(H1), np.float64)[rows]


def _close(got: dict, want: dict, rel: float = 1e-10) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-12), k


def test_streaming_metrics_equal_independent_references_on_the_aligned_rows(two_hook):
    rows, x, y = _aligned(two_hook)
    got = sim.compare((two_hook, H0), (two_hook, H1), [*LINEAR, "r2"], use_ray=False, tasks=3, chunk_rows=11, ridge=0.05)
    assert got["n"] == rows.size
    _close(got, {"linear_cka": simref.linear_cka(x, y), "debiased_cka": simref.debiased_cka(x, y), "cca": simref.cca(x, y),
                 "svcca": simref.svcca(x, y, 0.99), "pwcca": simref.pwcca(x, y, use_x=False), "procrustes": simref.procrustes(x, y)})
    # r2: fit on the training units, scored on the held-out units the plan names.
    plan = plan_compare((two_hook, H0), (two_hook, H1), ["r2"])
    assert plan.test_units and len(plan.test_units) < len(two_hook.committed_units(H0))
    test = np.isin(rows // two_hook.info.unit_rows, plan.test_units)
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    _close(got, {"r2_a_to_b": simref.ridge_r2(x, y, tr, te, 0.05), "r2_b_to_a": simref.ridge_r2(y, x, tr, te, 0.05)})


def test_sampled_metrics_on_the_whole_sample_equal_references(two_hook):
    rows, x, y = _aligned(two_hook)
    got = sim.compare((two_hook, H0), (two_hook, H1), ["rbf_cka", "mutual_knn", "rsa"], use_ray=False, sample_rows=10**6, knn_k=5)
    assert got["n_sample"] == rows.size  # the sample is every row when it asks for more
    _close(got, {"rbf_cka": simref.rbf_cka(x, y, 0.8, False), "rsa": simref.rsa(x, y, "correlation")})
    assert got["mutual_knn"] == pytest.approx(simref.mutual_knn(x, y, 5, "cosine"), abs=1e-15)


def test_sample_is_seeded_and_stated(two_hook):
    a = sim.compare((two_hook, H0), (two_hook, H1), ["rbf_cka"], use_ray=False, sample_rows=64, seed=1)
    b = sim.compare((two_hook, H0), (two_hook, H1), ["rbf_cka"], use_ray=False, sample_rows=64, seed=1)
    c = sim.compare((two_hook, H0), (two_hook, H1), ["rbf_cka"], use_ray=False, sample_rows=64, seed=2)
    assert a == b and a["n_sample"] == 64 and a["rbf_cka"] != c["rbf_cka"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tasks=st.integers(1, 9), chunk=st.integers(1, 400))
def test_any_number_of_tasks_and_chunk_size_gives_the_same_values(two_hook, tasks, chunk):
    base = sim.compare((two_hook, H0), (two_hook, H1), [*LINEAR, "r2"], use_ray=False, tasks=1, chunk_rows=10**6)
    got = sim.compare((two_hook, H0), (two_hook, H1), [*LINEAR, "r2"], use_ray=False, tasks=tasks, chunk_rows=chunk)
    _close(got, base, rel=1e-10)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_tasks_give_the_in_process_values(two_hook, ray_session):
    local = sim.compare((two_hook, H0), (two_hook, H1), [*LINEAR, "r2"], use_ray=False, tasks=1)
    remote = sim.compare((two_hook, H0), (two_hook, H1), [*LINEAR, "r2"], use_ray=True, tasks=3, chunk_rows=17)
    _close(remote, local, rel=1e-10)


def test_max_rows_keeps_the_first_pairs(two_hook):
    rows, x, y = _aligned(two_hook)
    got = sim.compare((two_hook, H0), (two_hook, H1), ["linear_cka", "debiased_cka"], use_ray=False, max_rows=50)
    assert got["n"] == 50
    _close(got, {"linear_cka": simref.linear_cka(x[:50], y[:50]), "debiased_cka": simref.debiased_cka(x[:50], y[:50])})


def test_documents_pooled_by_mean_of_their_tokens(two_hook):
    toks = two_hook.tokens()
    keep = ~toks.column("special").to_numpy(zero_copy_only=False)
    docs = toks.column("doc_id").to_numpy()[keep]
    x, y = (np.asarray(two_hook.read(h), np.float64)[keep] for h in (H0, H1))
    ids = np.unique(docs)
    px = np.stack([x[docs == d].mean(0) for d in ids])
    py = np.stack([y[docs == d].mean(0) for d in ids])
    got = sim.compare((two_hook, H0), (two_hook, H1), ["linear_cka", "procrustes", "rsa"], align="docs", use_ray=False, tasks=4)
    assert got["n"] == ids.size
    _close(got, {"linear_cka": simref.linear_cka(px, py), "procrustes": simref.procrustes(px, py), "rsa": simref.rsa(px, py, "correlation")})


def test_same_tokenizer_pairs_by_document_position_across_packings(tmp_path):
    # The same documents packed into contexts of 16 (A) and of 16 with an extra BOS-only offset (B):
    # rows differ, (doc_id, doc_position) do not. B's values are an orthogonal map of A's per token.
    from strata import store

    texts = _simdata.texts(25, seed=3)
    spans = [_simdata.word_spans(t) for t in texts]
    fa = _simdata.pack(spans)
    fb = _simdata.pack([[(0, 0)]] + spans)  # a leading empty document shifts every row
    fb["doc_id"] = np.where(fb["doc_id"] >= 0, fb["doc_id"] - 1, -1)
    fb["special"] |= fb["doc_id"] < 0
    rng = np.random.default_rng(0)
    table = rng.standard_normal((len(texts), 64, 6)).astype(np.float32)  # value of (doc, position)
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0].astype(np.float32)
    va = np.where(fa["special"][:, None], 9.0, table[np.maximum(fa["doc_id"], 0), np.maximum(fa["doc_position"], 0)])
    vb = np.where(fb["special"][:, None], -9.0, table[np.maximum(fb["doc_id"], 0), np.maximum(fb["doc_position"], 0)] @ q)
    s = store.open(tmp_path)
    meta = {"model": "m", "tokenizer": "same", "corpus_fingerprint": "c1"}
    da = _simdata.write_dataset(s, "a", fa, {H0: va.astype(np.float32)}, meta={**meta, "revision": "1"})
    db = _simdata.write_dataset(s, "b", fb, {H0: vb.astype(np.float32)}, meta={**meta, "revision": "2"})
    got = sim.compare((da, H0), (db, H0), ["linear_cka", "procrustes", "cosine"], use_ray=False)
    assert got["n"] == sum(len(x) for x in spans)
    assert got["linear_cka"] == pytest.approx(1.0, abs=1e-6) and got["procrustes"] == pytest.approx(0.0, abs=1e-6)
    assert got["cosine"] < 0.9  # rotated: the cosine sees the basis, CKA does not


def test_bad_input_is_one_line_and_named(two_hook, tmp_path):
    a, b = (two_hook, H0), (two_hook, H1)
    cases = [
        (lambda: sim.compare(a, b, ["cka"], use_ray=False), "unknown metric 'cka'; valid metrics are: linear_cka, debiased_cka"),
        (lambda: sim.compare(a, b, ["debiased_cka"], use_ray=False, max_rows=3), "debiased_cka needs at least 4 aligned rows, but .* have 3"),
        (lambda: sim.compare(a, b, ["cosine"], use_ray=False), "cosine needs the same width on both sides"),
        (lambda: sim.compare(a, (two_hook, "blocks.9.hook_resid_post"), use_ray=False), "has no hook 'blocks.9.hook_resid_post'; it has: "),
        (lambda: sim.compare(a, b, ["mutual_knn"], use_ray=False, sample_rows=5, knn_k=5), "mutual_knn needs at least 6"),
        (lambda: sim.compare(a, b, use_ray=False, bogus=1), "options are: keep, ridge"),
    ]
    for call, match in cases:
        with pytest.raises(StrataError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(HookNotFoundError):
        sim.compare(a, (two_hook, "nope"), use_ray=False)


def test_sides_that_cannot_be_aligned(tmp_path):
    from strata import store

    s = store.open(tmp_path)
    flat = _simdata.pack([_simdata.word_spans(t) for t in _simdata.texts(8)])
    x = np.random.default_rng(0).standard_normal((flat["doc_id"].size, 4)).astype(np.float32)
    a = _simdata.write_dataset(s, "a", flat, {H0: x}, meta={"model": "m", "tokenizer": "t1", "corpus_fingerprint": "c1"})
    b = _simdata.write_dataset(s, "b", flat, {H0: x}, meta={"model": "m", "tokenizer": "t1", "corpus_fingerprint": "c2"})
    c = _simdata.write_dataset(s, "c", flat, {H0: x}, meta={"model": "m", "tokenizer": "t2", "corpus_fingerprint": "c1"}, char_spans=False)
    other = dict(flat, doc_id=np.where(flat["doc_id"] >= 0, flat["doc_id"] + 100, -1))
    d = _simdata.write_dataset(s, "d", other, {H0: x}, meta={"model": "m", "tokenizer": "t1"})
    with pytest.raises(AlignmentError, match="different corpora"):
        sim.compare((a, H0), (b, H0), use_ray=False)
    with pytest.raises(AlignmentError, match="dataset 'c' has no character spans .* use `align: docs`"):
        sim.compare((a, H0), (c, H0), use_ray=False)
    with pytest.raises(AlignmentError, match="no common rows"):
        sim.compare((a, H0), (d, H0), use_ray=False)
    with pytest.raises(AlignmentError, match="no document is wholly committed on both sides"):
        sim.compare((a, H0), (d, H0), align="docs", use_ray=False)


def test_cosines_are_accumulated_only_when_asked_and_change_nothing_else(tmp_path):
    ds = _simdata.two_hook_dataset(tmp_path, d1=5, d2=5)
    without = sim.compare((ds, H0), (ds, H1), LINEAR, use_ray=False, tasks=2, chunk_rows=37)
    with_cos = sim.compare((ds, H0), (ds, H1), [*LINEAR, "cosine"], use_ray=False, tasks=2, chunk_rows=37)
    assert "cosine" not in without and {k: with_cos[k] for k in LINEAR} == {k: without[k] for k in LINEAR}
    _, x, y = _aligned(ds)
    assert with_cos["cosine"] == pytest.approx(simref.cosine(x, y), rel=1e-9)
