"""Notebook views (issue 24) on a real store: a tiny model's extraction of a corpus holding a hostile
document, an SAE, its feature table and two analyses, all made in this process (local executors).

Every summary and view is parsed as HTML: no element or event attribute comes from the document
(``<script>``, ``onerror=``, ``"><svg onload=...>`` show as text), and the figures they state are
checked against the store read another way (file sizes on disk, ``ds.read``, ``fs.latents``, the
stored PNG's pixels)."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from strata import store
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae
from strata.jobs.cli import main
from strata.pipeline.encode import EncodeSpec, run_encode
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl
from strata.store.errors import HookNotFoundError, UnknownDocumentError
from strata.store.features.format import FeatureOutOfRangeError
from strata.store.views.html import ViewError, fmt_bytes

XSS = '<script>alert("x")</script> <img src=x onerror=alert(1)> "><svg onload=alert(2)>'
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
DOC = 2  # the hostile document's id


class Parsed(HTMLParser):
    """Every start tag with its attributes, the text, and the content of script elements."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self._in: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):  # noqa: ANN001, ANN201 - HTMLParser's own signature
        self.tags.append((tag, attrs))
        self._in = tag

    def handle_endtag(self, tag):  # noqa: ANN001, ANN201
        self._in = None

    def handle_data(self, data):  # noqa: ANN001, ANN201
        if self._in == "script":
            self.scripts.append(data)
        elif self._in != "style":
            self.text.append(data)


def inert(html_text: str, *, scripts_allowed: bool = False) -> Parsed:
    """Parse a view; fail if anything of the hostile document became markup."""
    p = Parsed(html_text)
    for tag, attrs in p.tags:
        assert tag not in {"svg", "img", "iframe", "object", "embed"}, tag
        assert not any(k.startswith("on") for k, _ in attrs), (tag, attrs)
        assert not any("alert(" in (v or "") and k != "title" for k, v in attrs), (tag, attrs)
    if not scripts_allowed:
        assert not any(t == "script" for t, _ in p.tags)
    for s in p.scripts:  # the dashboard viewer's own script and its JSON data: the document only escaped
        assert "<script" not in s.lower() and "<svg" not in s.lower() and "onerror=alert" not in s
    return p


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb")
    docs = synthetic_docs(16, seed=3)
    docs.insert(DOC, "Hello " + XSS + " end.")
    corpus = write_jsonl(root / 'corpus "><svg onload=alert(3)>.jsonl', docs)
    model = build_tiny(root / "model", family="gpt2", layers=2, d_model=32, heads=4, max_positions=256, vocab_size=400, seed=0, texts=docs)
    acts = root / "acts"
    spec = {"store": str(acts), "name": "xss", "model": {"id": str(model)}, "corpus": {"path": str(corpus)}, "tokenize": {"context_size": 32},
            "hooks": [H0, H1], "dtype": "float32", "compute": {"executor": "local", "unit_contexts": 4, "batch_tokens": 256}}
    (root / "x.yaml").write_text(json.dumps(spec))
    assert main(["extract", str(root / "x.yaml"), "--no-progress"]) == 0
    s = store.open(acts)
    sae = random_topk_sae(32, 64, k=8, seed=1)
    put_sae(s, "sae-x", sae, dataset="xss", hook=H1, lineage={"note": XSS})
    put_sae(s, "sae-y", sae, dataset="xss", hook=H1)  # the same weights, no feature table: show_tokens encodes
    run_encode(EncodeSpec(store=str(acts), sae="sae-x", top_k=8, compute={"executor": "local", "batch_rows": 256, "num_workers": 1}),
               progress=False)
    analyses = {"store": str(acts), "compute": {"executor": "local"}, "analyses": [
        {"kind": "heatmap", "name": "x-cka", "a": {"dataset": "xss", "hooks": ["blocks.*.hook_resid_post"]}, "metric": "linear_cka"},
        {"kind": "layers", "name": "x-layers", "dataset": "xss", "hooks": ["blocks.*.hook_resid_post"], "metrics": ["norm", "anisotropy"]},
        {"kind": "compare", "name": "x-cmp", "a": {"dataset": "xss", "hook": H0}, "b": {"dataset": "xss", "hook": H1}, "metrics": ["linear_cka"]},
    ]}
    (root / "a.yaml").write_text(json.dumps(analyses))
    assert main(["analyze", str(root / "a.yaml")]) == 0
    return acts


def test_every_summary_and_view_shows_the_hostile_document_as_text(acts):
    s = store.open(acts, create=False)
    ds, fs = s.dataset("xss"), s.features("sae-x")
    f = int(np.argmax(fs.stats().column("count").to_numpy()))
    for obj in (s, ds, ds.info, s.sae("sae-x"), s.sae("sae-y"), fs, s.analysis("x-cka"), s.analysis("x-layers"), s.analysis("x-cmp")):
        p = inert(obj._repr_html_())
        assert "\n" not in repr(obj) and len(repr(obj)) < 200, repr(obj)
        assert p.text, type(obj)
    # The corpus file's hostile name is shown, as text, in the dataset's lineage; the SAE's lineage note too.
    assert 'corpus "><svg onload=alert(3)>.jsonl' in "".join(inert(ds._repr_html_()).text)
    assert 'corpus "><svg onload=alert(3)>.jsonl' in "".join(inert(ds.info._repr_html_()).text)
    sae_html = s.sae("sae-x")._repr_html_()
    assert XSS in "".join(inert(sae_html).text) and "&lt;script&gt;" in sae_html
    # The document's own tokens: coloured by a neuron, by a feature from the table, by the SAE encoding it.
    for view in (ds.show_tokens(DOC, hook=H1, neuron=3), ds.show_tokens(DOC, sae="sae-x", feature=f), ds.show_tokens(DOC, sae="sae-y", feature=f)):
        text = "".join(inert(view._repr_html_()).text)
        assert "".join(view.tokens) in text
        assert XSS in "".join(t for t, sp in zip(view.tokens, view.special) if not sp)  # BOS of the contexts it spans left out
    # The dashboard's view carries the document in its (escaped) JSON: its viewer renders it with textContent.
    shown = 0
    for g in range(fs.d_sae):
        page = fs.show(g)._repr_html_()
        inert(page, scripts_allowed=True)
        shown += "onload" in page and "\\u003c" in page  # the document reached the page, its '<' escaped in the JSON
    assert shown > 0


def test_the_dataset_summary_states_what_the_store_holds(acts):
    s = store.open(acts, create=False)
    ds = s.dataset("xss")
    page = ds._repr_html_()
    text = " ".join(inert(page).text)
    n = ds.info.num_units
    for h in (H0, H1):
        on_disk = sum((acts / "datasets" / "xss" / "acts" / h / "c" / str(u) / "0").stat().st_size for u in range(n))
        rows = ds.num_rows(h)
        assert f"{h} 32 float32 {rows:,} {n}/{n} {fmt_bytes(on_disk)}" in " ".join(text.split()), text
    assert "complete" in text and "never verified" in text
    for k in ("model", "revision", "corpus fingerprint", "tokenizer"):
        assert k in text
    assert ds.info.meta["corpus_fingerprint"] in text and ds.info.fingerprint in text
    assert ds.verify().ok
    assert "last verified" in " ".join(inert(s.dataset("xss")._repr_html_()).text)


def test_in_progress_and_damaged_datasets_say_so(tmp_path):
    from strata.analysis.features.synthetic import synthetic_dataset

    s = store.open(tmp_path / "acts")
    synthetic_dataset(s, "part", hook=H0, d=8, units=4, write_units=3)
    assert "in progress: 3/4 units" in " ".join(inert(s.dataset("part")._repr_html_()).text)
    synthetic_dataset(s, "bad", hook=H0, d=8, units=2)
    shard = tmp_path / "acts" / "datasets" / "bad" / "acts" / H0 / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not s.dataset("bad").verify().ok
    text = " ".join(inert(s.dataset("bad")._repr_html_()).text)
    assert "damaged at the last verify" in text and "1 problem(s)" in text, text


def test_sae_and_feature_table_summaries_state_their_figures(acts):
    s = store.open(acts, create=False)
    h, fs = s.sae("sae-x"), s.features("sae-x")
    text = " ".join(inert(h._repr_html_()).text)
    assert "d_sae 64" in text and f"hook {H1}" in text and h.lineage["fingerprint"] in text
    meta = s.dataset("xss").info.meta  # the model and revision come from the SAE's dataset
    assert f"model {meta['model']}" in text and f"revision {meta['revision']}" in text
    ftext = " ".join(inert(fs._repr_html_()).text)
    # The density summary against the table's latents read row-major (another path than the merged stats).
    dense = fs.latents(slice(None), dense=True).numpy()
    special = np.concatenate([fs.dataset.special_mask(u) for u in fs.units])
    encoded = int((~special).sum())
    fired = (dense[~special] != 0).sum(0)
    assert f"encoded rows {encoded:,}" in ftext and f"dead features {int((fired == 0).sum()):,}" in ftext, ftext
    assert f"mean L0 {fired.sum() / encoded:.4g}" in ftext
    assert f"d_sae {fs.d_sae}" in ftext and "merged" in ftext


def test_show_tokens_values_are_the_stored_ones(acts):
    s = store.open(acts, create=False)
    ds, fs = s.dataset("xss"), s.features("sae-x")
    v = ds.show_tokens(DOC, hook=H1, neuron=5)
    assert np.array_equal(v.values, ds.read(H1, docs=[DOC])[:, 5])
    lo, hi = ds.docs().filter(np.asarray(ds.docs().column("doc_id")) == DOC).select(["row_start", "row_end"]).to_pylist()[0].values()
    assert v.rows.tolist() == list(range(lo, hi))
    tok = ds.tokenizer()
    ids = ds.tokens(H1).column("token_id").to_numpy()[lo:hi]
    assert "".join(v.tokens) == "".join(tok.decode([int(i)], skip_special_tokens=False) for i in ids)
    f = int(np.argmax(fs.stats().column("count").to_numpy()))
    from_table = ds.show_tokens(DOC, sae="sae-x", feature=f)
    assert np.array_equal(from_table.values, fs.latents(v.rows, dense=True).numpy()[:, f])
    encoded = ds.show_tokens(DOC, sae="sae-y", feature=f)  # the same SAE, encoding now: special rows too
    keep = ~ds.tokens(H1).column("special").to_numpy(zero_copy_only=False)[lo:hi]
    np.testing.assert_allclose(encoded.values[keep], from_table.values[keep], rtol=1e-5, atol=1e-6)


def test_plot_is_the_stored_png(acts):
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    s = store.open(acts, create=False)
    a = s.analysis("x-cka")
    fig = a.plot()
    assert isinstance(fig, Figure) and fig._repr_png_() == a.read("heatmap.png")
    stored = imread(io.BytesIO(a.read("heatmap.png")), format="png")
    assert np.array_equal(fig.axes[0].images[0].get_array(), stored)
    assert fig.get_size_inches().tolist() == [stored.shape[1] / 100, stored.shape[0] / 100]
    layers = s.analysis("x-layers")
    assert layers.plot("norm")._repr_png_() == layers.read("norm.png")


@pytest.mark.parametrize(("call", "error", "says"), [
    (lambda s: s.features("sae-x").show(64), FeatureOutOfRangeError, "features 0..63"),
    (lambda s: s.features("sae-x").show(-1), FeatureOutOfRangeError, "features 0..63"),
    (lambda s: s.dataset("xss").show_tokens(999, hook=H1, neuron=0), UnknownDocumentError, "document ids are 0..16"),
    (lambda s: s.dataset("xss").show_tokens(DOC, hook="blocks.7.hook_resid_post", neuron=0), HookNotFoundError, f"it has: {H0}, {H1}"),
    (lambda s: s.dataset("xss").show_tokens(DOC, hook=H1, neuron=32), ViewError, "neurons 0..31"),
    (lambda s: s.dataset("xss").show_tokens(DOC, neuron=1), ViewError, f"has: {H0}, {H1}"),
    (lambda s: s.dataset("xss").show_tokens(DOC, sae="sae-y", feature=64), ViewError, "features 0..63"),
    (lambda s: s.dataset("xss").show_tokens(DOC), ViewError, "neuron=N or sae=NAME, feature=F"),
    (lambda s: s.analysis("x-layers").plot(), ViewError, "one of: anisotropy, norm"),
    (lambda s: s.analysis("x-layers").plot("cka"), ViewError, "its plots are: anisotropy, norm"),
    (lambda s: s.analysis("x-cka").plot("norm"), ViewError, "its plots are: heatmap"),
    (lambda s: s.analysis("x-cmp").plot(), ViewError, "analysis 'x-cmp' (compare) has no plot"),
])
def test_bad_input_is_one_line_naming_the_valid_choices(acts, call, error, says):
    with pytest.raises(error) as e:
        call(store.open(acts, create=False))
    assert "\n" not in str(e.value) and says in str(e.value), str(e.value)


def test_an_image_documents_tokens_are_its_cls_and_patches(tmp_path):
    s = store.open(tmp_path / "acts")
    ctx = 5  # CLS and a 2 x 2 grid of patches: one context per image
    w = s.create_dataset("img", hooks={H0: 4}, context_size=ctx, dtype="float32", num_units=1, unit_contexts=2,
                         meta={"model": "vit", "revision": "0", "image": {"layout": {"grid": [2, 2]}}})
    n = 2 * ctx
    ids = np.tile(np.array([-1, 0, 1, 2, 3], np.int32), 2)
    tokens = pa.table({"context_id": np.repeat(np.arange(2), ctx).astype(np.int64), "position": np.tile(np.arange(ctx), 2).astype(np.int32),
                       "doc_id": np.repeat(np.arange(2), ctx).astype(np.int64), "doc_position": np.where(ids < 0, -1, ids).astype(np.int32),
                       "token_id": ids, "special": ids < 0})
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    w.write_unit(0, tokens=tokens, acts={H0: x})
    v = s.dataset("img").show_tokens(1, hook=H0, neuron=2)
    assert v.tokens == ["<CLS> ", "<patch 0 (0, 0)> ", "<patch 1 (0, 1)> ", "<patch 2 (1, 0)> ", "<patch 3 (1, 1)> "]
    assert v.special.tolist() == [True, False, False, False, False] and np.array_equal(v.values, x[ctx:, 2])
    assert "&lt;patch 3 (1, 1)&gt;" in v._repr_html_()
