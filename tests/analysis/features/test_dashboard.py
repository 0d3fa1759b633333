"""The feature viewer's data, derived data, static export, Neuronpedia layout and JSON endpoints,
checked against the table's own reads and independent numpy computations (no browser: see
test_dashboard_browser.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from dashboard_data import DEAD, PLANTED, XSS, XSS_TEXT, build, weights

from strata import store
from strata.analysis.features.dashboard import derive, export, fold_unembed, neuronpedia_batch
from strata.analysis.features.dashboard.derive import LOGIT_NOTE
from strata.store.features.view import derived_key, explanations_key, feature_data, feature_html, index_data, json_for_script, token_index


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    t = build(store.open(tmp_path_factory.mktemp("dash")))
    W_dec, W_U = weights()
    derive(t, decoder=W_dec, unembed=W_U)
    t.storage.write(explanations_key(t.name), b'{"feature": 3, "explanation": "the word w7"}\n{"index": 5, "description": "<b>markup</b>"}\n')
    return store.open(t.store.uri).features("ft")  # reopened: nothing cached from the writes


def _act(fs, f):
    a = fs.activations(f)
    return dict(zip(a.column("row").to_pylist(), a.column("activation").to_pylist()))


def test_feature_data_matches_the_table(fs):
    for f in (PLANTED, 7, 20):
        d = feature_data(fs, f)
        st = fs.stats().slice(f, 1).to_pylist()[0]
        assert (d["count"], d["density"], d["dead"]) == (st["count"], st["density"], False)
        top = fs.top(f, k=fs.info.top_k)  # every stored top row, in order, with the table's own token at the hit
        assert [r["row"] for r in d["top"]] == top.column("row").to_pylist()
        assert [r["act"] for r in d["top"]] == pytest.approx(top.column("activation").to_pylist(), rel=1e-3)
        assert [r["tokens"][r["hit"]] for r in d["top"]] == top.column("token").to_pylist()
        act = _act(fs, f)
        for r in d["top"] + d["sample"]:  # every token's value is the feature's activation at that row
            wrows, texts = fs.windows(np.array([r["row"]]))[0]
            assert r["tokens"] == texts
            assert r["acts"] == pytest.approx([act.get(int(w), 0.0) for w in wrows], rel=1e-3)
        samp = fs.sample(f)
        assert [(r["q"], r["row"]) for r in d["sample"]] == list(zip(samp.column("quantile").to_pylist(), samp.column("row").to_pylist()))
        # Data-driven bins: from 0 to the feature's maximum, every activation counted once.
        vals = np.array(list(act.values()))
        assert sum(d["hist"]["counts"]) == st["count"] and len(d["hist"]["counts"]) == 40
        assert d["hist"]["edges"][0] == 0 and d["hist"]["edges"][-1] == pytest.approx(vals.max(), rel=1e-3)
        want, _ = np.histogram(vals, bins=40, range=(0, vals.max()))
        assert d["hist"]["counts"] == want.tolist()
        assert (d["prev"], d["next"]) == (f - 1, f + 1)
    planted = feature_data(fs, PLANTED)
    assert {r["tokens"][r["hit"]] for r in planted["top"]} == {"w7"} and planted["explanation"] == "the word w7"
    dead = feature_data(fs, DEAD)
    assert dead["dead"] and dead["top"] == [] and dead["hist"]["counts"] == []
    assert feature_data(fs, 0)["prev"] is None and feature_data(fs, fs.d_sae - 1)["next"] is None
    json.dumps(feature_data(fs, XSS))  # JSON-able as it is


def test_derived_neighbours_and_logit_effects_match_numpy(fs):
    W_dec, W_U = weights()
    Wn = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    cos = Wn @ Wn.T
    np.fill_diagonal(cos, -np.inf)
    for f in (0, PLANTED, 11):
        d = feature_data(fs, f)
        want = np.argsort(-cos[f], kind="stable")[:10]
        assert [n[0] for n in d["neighbours"]] == want.tolist()
        assert [n[1] for n in d["neighbours"]] == pytest.approx(cos[f, want], rel=1e-3)
        e = W_dec[f] @ W_U
        assert [t for t, _ in d["logits"]["pos"]] == [fs.token_text(int(i)) for i in np.argsort(-e, kind="stable")[:10]]
        assert [t for t, _ in d["logits"]["neg"]] == [fs.token_text(int(i)) for i in np.argsort(e, kind="stable")[:10]]
        assert d["logits"]["note"] == LOGIT_NOTE
    d = feature_data(fs, PLANTED)
    assert [t for t, _ in d["logits"]["pos"]] == [f"w{i}" for i in range(9, 19)]
    assert [t for t, _ in d["logits"]["neg"]] == [f"w{i}" for i in range(20, 30)]
    assert fs.storage.exists(derived_key("ft"))


def test_fold_unembed_is_fold_ln_then_center_unembed():
    rng = np.random.default_rng(0)
    W_U, w = rng.standard_normal((6, 11)), rng.standard_normal(6)
    folded = np.einsum("d,dv->dv", w, W_U)  # TransformerLens fold_ln: W_U <- w[:, None] * W_U
    want = folded - folded.mean(-1, keepdims=True)  # center_unembed: W_U <- W_U - W_U.mean(-1)
    assert fold_unembed(W_U, w) == pytest.approx(want.astype(np.float32), abs=1e-6)
    assert fold_unembed(W_U, w, gemma=True) == pytest.approx(((1 + w)[:, None] * W_U - ((1 + w)[:, None] * W_U).mean(-1, keepdims=True)), abs=1e-5)
    # A centred unembedding changes no softmax: every logit of a residual vector moves by the same amount.
    x = rng.standard_normal(6)
    d = x @ folded - x @ fold_unembed(W_U, w)
    assert np.ptp(d) < 1e-5


def test_multi_source_decoder_gives_per_source_norms(tmp_path):
    t = build(store.open(tmp_path))
    W = np.random.default_rng(1).standard_normal((3, t.d_sae, 8)).astype(np.float32)
    derive(t, decoder=W)
    d = feature_data(t, 7)
    assert d["decoder_norms"] == pytest.approx(np.linalg.norm(W[:, 7], axis=1), rel=1e-3)
    assert d["logits"] is None and "several sites" in d["logits_note"]


def test_token_search_index(fs):
    idx = token_index(fs)
    top = {f: fs.top(f, k=fs.info.top_k).column("token").to_pylist() for f in range(fs.d_sae) if fs.stats().column("count")[f].as_py()}
    for text in ("w7", XSS_TEXT[0].lower(), "w12"):
        want = sorted(([f, sum(1 for t in toks if t.strip().lower() == text)] for f, toks in top.items()), key=lambda x: (-x[1], x[0]))
        assert idx.get(text, []) == [w for w in want if w[1] > 0]
    assert idx["w7"][0][0] == PLANTED


def test_index_data_lists_dead_and_explanations(fs):
    idx = index_data(fs)
    assert idx["dead"] == [DEAD] and idx["count"] == fs.stats().column("count").to_pylist()
    assert idx["explanations"] == {"3": "the word w7", "5": "<b>markup</b>"}


def test_bad_explanations_line_names_the_file(fs, tmp_path):
    from strata.store.features.view import load_explanations

    p = tmp_path / "ex.jsonl"
    p.write_text('{"feature": 1, "explanation": "ok"}\n{"feat": 2}\n')
    with pytest.raises(ValueError, match=r"ex\.jsonl line 2: expected a JSON object with `feature` and `explanation`"):
        load_explanations(fs, str(p))


def test_export_holds_every_feature_compactly(fs, tmp_path):
    index = export(fs, tmp_path / "pages")
    data = tmp_path / "pages" / "data"
    idx = json.loads(re.sub(r"^StrataView\._index = |;\n$", "", (data / "index.js").read_text()))
    assert idx["dead"] == [DEAD] and idx["d_sae"] == fs.d_sae and index.name == "index.html"
    chunk = json.loads(re.sub(r"^StrataView\.put\(|\);\n$", "", (data / "f0.js").read_text()))
    vocab = json.loads(re.sub(r"^StrataView\._vocab = |;\n$", "", (data / "vocab.js").read_text()))
    live = [f for f in range(fs.d_sae) if f != DEAD]
    assert sorted(int(k) for k in chunk) == live  # every live feature, the dead one only in the index
    for f in (PLANTED, XSS):
        full = feature_data(fs, f)
        got = chunk[str(f)]
        # Packed rows: [row, doc, pos, act, hit, token ids, [[i, value] non-zero]] (+ quantile for the sample).
        assert [[vocab[str(t)] for t in r[5]] for r in got["top"]] == [r["tokens"] for r in full["top"]]
        for packed, r in zip(got["top"] + got["sample"], full["top"] + full["sample"]):
            acts = [0] * len(packed[5])
            for i, a in packed[6]:
                acts[i] = a
            assert packed[:5] == [r["row"], r["doc"], r["pos"], r["act"], r["hit"]] and acts == r["acts"]
        assert [p[7] for p in got["sample"]] == [r["q"] for r in full["sample"]]
        assert got["logits"] == full["logits"] and got["neighbours"] == full["neighbours"] and got["hist"]["counts"] == full["hist"]["counts"]
        assert (got["hist"]["lo"], got["hist"]["hi"]) == (full["hist"]["edges"][0], full["hist"]["edges"][-1])
    text = "".join(p.read_text() for p in data.iterdir())
    for bad in ("<script", "<img", "<svg", "</"):  # hostile text is escaped inside the data scripts
        assert bad not in text
    size = sum(p.stat().st_size for p in data.iterdir())
    assert size / fs.d_sae < 15_000


def test_feature_html_fragment_escapes_and_embeds(fs):
    d = feature_data(fs, XSS)
    frag = feature_html(d)
    body = frag.split("<script>", 1)[0]  # the fallback and the data element
    for t in XSS_TEXT:
        assert t not in frag.replace(json_for_script(t)[1:-1], "")
    assert "<img" not in body and "<svg" not in body and body.count("<script") == 1  # the JSON data element only
    payload = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', frag, re.S).group(1)
    assert json.loads(payload) == json.loads(json.dumps(d))
    assert feature_html(d, standalone=True).startswith("<!DOCTYPE html>")


def test_neuronpedia_batch_fits_sae_dashboard_classes(fs):
    mod = pytest.importorskip("sae_dashboard.neuronpedia.neuronpedia_dashboard", reason="sae-dashboard (installed with --no-deps by .ci/setup)")
    batch = neuronpedia_batch(fs, [PLANTED, 7, DEAD])
    obj = mod.NeuronpediaDashboardBatch(**batch)  # raises TypeError on any field it does not know
    back = obj.to_dict()
    for mine, theirs in zip(batch["features"], back["features"]):
        for k, v in mine.items():
            assert theirs[k] == v, k  # every field we fill is one of theirs and survives their round trip
    f = back["features"][0]
    d = feature_data(fs, PLANTED)
    assert f["feature_index"] == PLANTED and f["pos_str"] == [t for t, _ in d["logits"]["pos"]] and f["frac_nonzero"] == d["density"]
    tops = [a for a in f["activations"] if a["bin_min"] == -1]
    assert [a["tokens"][a["qualifying_token_index"]] for a in tops] == ["w7"] * len(d["top"])
    assert sum(f["freq_hist_data_bar_heights"]) == d["count"]
    with pytest.raises(TypeError):
        mod.NeuronpediaDashboardBatch(**{**batch, "features": [{**batch["features"][0], "not_a_field": 1}]})


def test_served_endpoints(fs):
    from starlette.testclient import TestClient

    from strata.analysis.features.dashboard import make_app

    with TestClient(make_app(fs)) as c:
        r = c.get("/api/feature/3")
        assert r.status_code == 200 and r.json() == json.loads(json.dumps(feature_data(fs, 3)))
        assert c.get("/api/index").json()["dead"] == [DEAD]
        assert c.get("/api/search", params={"token": " W7 "}).json()[0][0] == PLANTED
        r = c.get("/api/feature/24")
        assert r.status_code == 404 and "features 0..23" in r.json()["error"]
        assert c.get("/api/feature/x").status_code == 400 and c.get("/api/search").status_code == 400
        assert 'StrataView.served("")' in c.get("/").text


def test_cli_html_neuronpedia_and_bad_input(fs, tmp_path, capsys):
    from strata.jobs.cli import main

    uri = fs.store.uri
    assert main(["features", "html", uri, "ft", "--out", str(tmp_path / "p"), "--neuronpedia"]) == 0
    batch = json.loads((tmp_path / "p" / "neuronpedia" / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [f for f in range(fs.d_sae) if f != DEAD]
    capsys.readouterr()
    assert main(["features", "serve", uri, "ft", "--explanations", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--explanations" in err and "nope.jsonl" in err and "no such file" in err and len(err.splitlines()) == 1
    # The synthetic table has no SAE behind it: derive says so in one line.
    assert main(["features", "derive", uri, "ft"]) == 2
    err = capsys.readouterr().err.strip()
    assert "synthetic" in err and len(err.splitlines()) == 1
