"""``compare(..., align="docs", pool=...)``: documents pooled by their mean, their CLS token or
their last token, per side, equal to the pools computed here from the written token tables; an
image corpus pairs with its captions by set hashes (``store.datasets.pairing``), tokens never do; bad
pools are refused at plan time, in one line."""

from __future__ import annotations

import re

import _simdata
import numpy as np
import pytest
import simref
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from strata import store
from strata.analysis import similarity as sim
from strata.analysis.similarity.compare import plan_compare, run_compare
from strata.analysis.similarity.errors import AnalysisError
from strata.store.datasets.aligned import AlignmentError, check_same_corpus
from strata.store.datasets.pairing import SetHash, set_hash

H = "blocks.0.hook_resid_post"
N_IMAGES, REGISTERS = 24, 2
CAPTIONS = _simdata.texts(N_IMAGES, seed=7)
IMAGE_BYTES = [bytes([i]) * (i + 3) for i in range(N_IMAGES)]  # stands in for the image files
METRICS = ["linear_cka", "procrustes", "rsa", "mutual_knn"]


def _image_rows(*, cls: bool) -> dict[str, np.ndarray]:
    """One context per image: CLS (token -1) and registers (-2, -3, ...) first when ``cls``, then
    patches (token = doc_position = patch index); every context full."""
    head = [-1 - r for r in range(1 + REGISTERS)] if cls else []
    tok = np.array(head + list(range(_simdata.CTX - len(head))))
    cols = {"doc_id": np.repeat(np.arange(N_IMAGES), tok.size), "token_id": np.tile(tok, N_IMAGES),
            "doc_position": np.tile(np.where(tok < 0, -1, tok), N_IMAGES), "special": np.tile(tok < 0, N_IMAGES)}
    cols["char_start"] = cols["char_end"] = np.full(cols["doc_id"].size, -1)
    return cols


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """A ViT (CLS + registers), a SigLIP-like encoder (patches only) over the same images, the
    captions through a causal LM (same ids), and the captions of other records."""
    s = store.open(tmp_path_factory.mktemp("paired"))
    rng = np.random.default_rng(0)
    caption_hash = set_hash(np.arange(N_IMAGES), [c.encode("utf-8") for c in CAPTIONS])
    image_meta = {"model": "vit", "revision": "0", "corpus_fingerprint": "images-1",
                  "doc_set_hash": set_hash(np.arange(N_IMAGES), IMAGE_BYTES), "caption_set_hash": caption_hash}
    flats = {"vit": _image_rows(cls=True), "siglip": _image_rows(cls=False), "lm": _simdata.pack([_simdata.word_spans(c) for c in CAPTIONS])}
    flats["other_lm"] = flats["lm"]
    metas = {"vit": image_meta, "siglip": {**image_meta, "model": "siglip"},
             "lm": {"model": "lm", "revision": "0", "tokenizer": "words", "corpus_fingerprint": "captions-1", "doc_set_hash": caption_hash},
             "other_lm": {"model": "lm", "revision": "0", "tokenizer": "words", "corpus_fingerprint": "captions-2",
                          "doc_set_hash": set_hash(np.arange(N_IMAGES), [c.upper().encode() for c in CAPTIONS])}}
    widths = {"vit": 5, "siglip": 6, "lm": 4, "other_lm": 4}
    out = {}
    for name, flat in flats.items():
        x = rng.standard_normal((flat["doc_id"].size, widths[name])).astype(np.float32)
        ds = _simdata.write_dataset(s, name, flat, {H: x}, meta=metas[name], docs=_simdata.doc_table(flat))
        out[name] = (ds, flat, x.astype(np.float64))
    return out


def _pool(flat: dict[str, np.ndarray], x: np.ndarray, how: str) -> np.ndarray:
    """Each document's pooled row, by a plain loop over the written rows."""
    out = []
    for d in range(N_IMAGES):
        mine = np.flatnonzero(flat["doc_id"] == d)
        real = mine[~flat["special"][mine]]
        if how == "mean":
            out.append(x[real].mean(0))
        elif how == "last":
            out.append(x[real[np.argmax(flat["doc_position"][real])]])
        else:
            (cls,) = mine[flat["token_id"][mine] == -1]
            out.append(x[cls])
    return np.stack(out)


def _want(px: np.ndarray, py: np.ndarray) -> dict[str, float]:
    return {"linear_cka": simref.linear_cka(px, py), "procrustes": simref.procrustes(px, py),
            "rsa": simref.rsa(px, py, "correlation"), "mutual_knn": simref.mutual_knn(px, py, 3, "cosine")}


@pytest.mark.parametrize("pool", ["mean", ("cls", "last"), ("cls", "mean"), ("mean", "last"), "last"])
def test_pooled_documents_equal_the_pools_of_the_written_rows(paired, pool):
    pa_, pb = (pool, pool) if isinstance(pool, str) else pool
    (va, fa, xa), (lm, fb, xb) = paired["vit"], paired["lm"]
    got = sim.compare((va, H), (lm, H), METRICS, align="docs", pool=pool, use_ray=False, tasks=3, chunk_rows=5,
                      sample_rows=10**6, knn_k=3)
    want = _want(_pool(fa, xa, pa_), _pool(fb, xb, pb))
    assert got["n"] == N_IMAGES
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k


def test_the_pools_differ_and_registers_are_never_read(paired):
    (va, fa, xa), (lm, _, _) = paired["vit"], paired["lm"]
    cls, mean = _pool(fa, xa, "cls"), _pool(fa, xa, "mean")
    assert not np.allclose(cls, mean)
    # A register row in place of the CLS row would give another value.
    reg = np.stack([xa[(fa["doc_id"] == d) & (fa["token_id"] == -2)][0] for d in range(N_IMAGES)])
    got = sim.compare((va, H), (va, H), ["linear_cka"], align="docs", pool=("cls", "mean"), use_ray=False)
    assert got["linear_cka"] == pytest.approx(simref.linear_cka(cls, mean), rel=1e-10)
    assert got["linear_cka"] != pytest.approx(simref.linear_cka(reg, mean), rel=1e-6)
    # SigLIP (patches only) pools by its patches.
    sg, fs, xs = paired["siglip"]
    got = sim.compare((sg, H), (lm, H), ["linear_cka"], align="docs", pool="mean", use_ray=False)
    assert got["linear_cka"] == pytest.approx(simref.linear_cka(_pool(fs, xs, "mean"), _pool(paired["lm"][1], paired["lm"][2], "mean")), rel=1e-10)


def test_the_pools_used_are_recorded(paired):
    va, lm = paired["vit"][0], paired["lm"][0]
    plan = plan_compare((va, H), (lm, H), ["linear_cka"], align="docs", pool=("cls", "last"))
    values, prov = run_compare(plan)
    assert prov["alignment"] == {"method": "docs", "documents": N_IMAGES, "candidates": [N_IMAGES, N_IMAGES], "pool": ["cls", "last"]}
    assert plan_compare((va, H), (lm, H), ["linear_cka"], align="docs").provenance()["alignment"]["pool"] == ["mean", "mean"]
    assert "pool" not in plan_compare((va, H), (va, H), ["linear_cka"]).provenance()["alignment"]  # tokens: nothing pooled


def test_bad_pools_are_refused_at_plan_time_in_one_line(paired):
    va, sg, lm = paired["vit"][0], paired["siglip"][0], paired["lm"][0]
    cases = [
        (lambda: plan_compare((va, H), (lm, H), align="docs", pool="first"), "`pool` must be one of 'mean', 'cls', 'last' or a pair"),
        (lambda: plan_compare((va, H), (lm, H), align="docs", pool=("cls",)), "`pool` must be one of .* got \\('cls',\\)"),
        (lambda: plan_compare((va, H), (lm, H), align="docs", pool=("cls", "max")), "got \\('cls', 'max'\\)"),
        (lambda: plan_compare((va, H), (va, H), pool="cls"), "`pool` 'cls' pools documents; it needs `align` 'docs'"),
        (lambda: plan_compare((va, H), (lm, H), align="docs", pool="cls"),
         "dataset 'lm' .*has no CLS token rows.*pool='cls' needs a dataset with a CLS token \\(ViT, CLIP, DINOv2\\); use pool='mean'"),
        (lambda: plan_compare((sg, H), (lm, H), align="docs", pool=("cls", "last")), "dataset 'siglip' .*has no CLS token rows"),
    ]
    for call, match in cases:
        with pytest.raises(AnalysisError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_an_image_corpus_pairs_with_its_captions_by_set_hash(paired):
    va, lm, other = paired["vit"][0], paired["lm"][0], paired["other_lm"][0]
    assert va.info.meta["corpus_fingerprint"] != lm.info.meta["corpus_fingerprint"]
    check_same_corpus([(va, H), (lm, H)], by_docs=True)
    check_same_corpus([(lm, H), (va, H)], by_docs=True)  # either direction
    assert sim.compare((lm, H), (va, H), ["linear_cka"], align="docs", pool=("last", "cls"), use_ray=False)["n"] == N_IMAGES
    hint = re.escape("(for an image corpus and its captions, extract the captions from the same records: the caption set hashes must match)")
    with pytest.raises(AlignmentError, match="extracted from different corpora.*" + hint):
        sim.compare((va, H), (other, H), align="docs", pool=("cls", "last"), use_ray=False)
    # Tokens of images and captions never pair, and the token check keeps its message.
    with pytest.raises(AlignmentError, match="different corpora") as err:
        sim.compare((va, H), (lm, H), use_ray=False)
    assert "caption set hashes" not in str(err.value)
    # Two caption corpora (document set hashes, no caption set hash) of different records do not pair.
    with pytest.raises(AlignmentError, match=hint):
        check_same_corpus([(lm, H), (other, H)], by_docs=True)


def _hash_one(doc_id: int, payload: bytes) -> int:
    return xxhash.xxh3_64_intdigest(doc_id.to_bytes(8, "little", signed=True) + payload)


def test_set_hash_is_the_sum_of_the_documents_hashes():
    ids = np.array([5, -1, 2**40], dtype=np.int64)
    payloads = [b"a cat", b"", "ünïcode".encode()]
    total = sum(_hash_one(int(i), p) for i, p in zip(ids, payloads)) % 2**64
    assert set_hash(ids, payloads) == f"xxh3_64-sum:{total:016x}"
    assert re.fullmatch(r"xxh3_64-sum:[0-9a-f]{16}", set_hash([], []))
    assert set_hash([1, 2], [b"x", b"y"]) != set_hash([2, 1], [b"x", b"y"])  # the id is inside each term
    with pytest.raises(ValueError):
        set_hash([1, 2], [b"x"])


@settings(max_examples=25, deadline=None)
@given(docs=st.dictionaries(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=12), max_size=12), seed=st.integers(0, 2**32 - 1))
def test_set_hash_is_order_independent_and_streams(docs, seed):
    ids, payloads = list(docs), list(docs.values())
    whole = set_hash(np.array(ids, dtype=np.int64), payloads)
    order = np.random.default_rng(seed).permutation(len(ids))
    h, part = SetHash(), SetHash()
    for k, i in enumerate(order):
        (h if k % 2 else part).add(ids[i], payloads[i])
    assert h.merge(part).hexdigest() == whole and h.count == len(ids)


def test_the_spec_passes_pool_through_and_checks_it(paired, tmp_path):
    from pydantic import ValidationError

    from strata.analysis.similarity.runner import prepare
    from strata.analysis.similarity.spec import AnalyzeSpec
    from strata.pipeline.executor import Executor

    va = paired["vit"][0]
    cmp = {"kind": "compare", "name": "img-cap", "a": {"dataset": "vit", "hook": H}, "b": {"dataset": "lm", "hook": H},
           "metrics": ["linear_cka"], "align": "docs", "pool": ["cls", "last"]}
    spec = AnalyzeSpec.model_validate({"store": str(va.store.uri), "analyses": [cmp]})
    (p,) = prepare(spec, va.store)
    assert p.plan.pool == ("cls", "last") and p.identity["spec"]["pool"] == ["cls", "last"]
    _, meta = p.compute(Executor())
    want = simref.linear_cka(_pool(paired["vit"][1], paired["vit"][2], "cls"), _pool(paired["lm"][1], paired["lm"][2], "last"))
    assert meta["provenance"]["alignment"]["pool"] == ["cls", "last"]
    assert meta["provenance"]["values"]["linear_cka"] == pytest.approx(want, rel=1e-10)
    # The default is left out of the identity: results committed before `pool` existed keep theirs.
    plain = AnalyzeSpec.model_validate({"analyses": [{**cmp, "pool": "mean"}]}).analyses[0]
    assert "pool" not in plain.model_dump(mode="json")
    for bad, match in ((["cls", "first"], "`pool` must be one of mean, cls, last or a pair"), ("last", None)):
        with pytest.raises(ValidationError, match=match or "needs `align: docs`"):
            AnalyzeSpec.model_validate({"analyses": [{**cmp, "pool": bad, **({"align": "tokens"} if match is None else {})}]})
