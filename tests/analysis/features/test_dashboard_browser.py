"""The feature viewer in a real browser: Debian's chromium, headless, on the served app and on the
static export (``--dump-dom`` after ``--virtual-time-budget``, which waits for the pages' fetches and
script loads). A planted feature's top tokens are highlighted and its promoted and suppressed
tokens are the ones its decoder and unembedding give; the index sorts, flags dead features and
searches by id, token and density; hostile corpus text renders as text, in every view."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from html.parser import HTMLParser
from urllib.parse import quote

import numpy as np
import pytest
from dashboard_data import DEAD, PLANTED, XSS, XSS_TEXT, build, weights
from pagesparse import parse

from strata import store
from strata.analysis.features.dashboard import derive, export, make_app
from strata.store.features.view import explanations_key, feature_data, feature_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/setup installs Debian's chromium)")


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    t = build(store.open(tmp_path_factory.mktemp("browser")))
    W_dec, W_U = weights()
    derive(t, decoder=W_dec, unembed=W_U)
    t.storage.write(explanations_key(t.name), b'{"feature": 3, "explanation": "the word w7"}\n')
    return store.open(t.store.uri).features("ft")


@pytest.fixture(scope="module")
def served(fs):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(fs), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    th.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def exported(fs, tmp_path_factory):
    return export(fs, tmp_path_factory.mktemp("export") / "pages").as_uri()


@pytest.fixture(params=["served", "static"])
def base(request):
    return request.getfixturevalue("served" if request.param == "served" else "exported")


def dump(url: str, tmp_path) -> str:
    """The DOM once the page has settled (chromium headless; as root it needs --no-sandbox)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-state="ready"' in out.stdout or "strata-view" in out.stdout, out.stderr[-2000:]
    return out.stdout


class Tags(HTMLParser):
    """Every element of a document: (tag, attributes), and the text of each span."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def test_planted_feature_page(fs, base, tmp_path):
    dom = dump(f"{base}#f={PLANTED}", tmp_path)
    page = parse(dom)
    d = feature_data(fs, PLANTED)
    rows = [r for r in page.rows if r.cls == "sv-top-row"]
    assert [int(r.attrs["data-row"]) for r in rows] == fs.top(PLANTED, k=fs.info.top_k).column("row").to_pylist()
    for r, rec in zip(rows, d["top"]):
        hits = [s for s in r.spans if "sv-hit" in s["class"]]
        assert [h["text"] for h in hits] == ["w7"] and "sv-on" in hits[0]["class"]  # the planted token, highlighted
        assert [s["text"] for s in r.spans] == rec["tokens"]
        for s, a in zip(r.spans, rec["acts"]):
            assert float(s["data-act"]) == pytest.approx(a)
            if a > 0:  # shaded by the feature's own value there, relative to its maximum
                rgba = [float(x) for x in re.search(r"rgba?\(([^)]*)\)", s["style"]).group(1).split(",")]
                alpha = rgba[3] if len(rgba) == 4 else 1.0  # the browser writes rgb() for an opaque colour
                assert alpha == pytest.approx(min(1.0, a / d["max"]), abs=0.005)  # the browser keeps alpha in 8 bits
            else:
                assert "background" not in s.get("style", "")
    assert [r.cells[0] for r in page.rows if r.cls == "sv-sample-row"] == [str(q) for q in fs.sample(PLANTED).column("quantile").to_pylist()]
    promoted = [r.spans[0]["text"] for r in page.rows if r.cls == "sv-logit-row"]
    assert promoted == [f"w{i}" for i in range(9, 19)] + [f"w{i}" for i in range(20, 30)]  # promoted, then suppressed
    assert "fold_ln, center_unembed" in dom and "the word w7" in dom
    assert [int(b["data-count"]) for b in page.bars] == d["hist"]["counts"] and sum(d["hist"]["counts"]) == d["count"]
    tags = Tags(dom)
    xt = [a for t, a in tags.tags if t == "text" and a.get("class") == "sv-xtick"]
    assert len(xt) == 5 and all(float(a["x"]) >= 40 for a in xt)  # labelled x axis, inside the plot's margin
    assert sum(1 for t, a in tags.tags if t == "text" and a.get("class") == "sv-ytick") == 5
    nbrs = [lnk for lnk in page.links if lnk.startswith("#f=")]
    assert [f"#f={n[0]}" for n in d["neighbours"]] == [lnk for lnk in nbrs if lnk not in (f"#f={PLANTED - 1}", f"#f={PLANTED + 1}")][:10]
    assert f"#f={PLANTED - 1}" in page.links and f"#f={PLANTED + 1}" in page.links


def test_index_sorts_flags_and_searches(fs, base, tmp_path):
    st = fs.stats().to_pydict()
    page = parse(dump(f"{base}#", tmp_path))
    rows = [r for r in page.rows if r.cls == "sv-feature"]
    assert len(rows) == fs.d_sae
    got = [int(r.attrs["data-feature"]) for r in rows]
    assert got == sorted(range(fs.d_sae), key=lambda f: (-st["density"][f], f))
    dead = next(r for r in rows if int(r.attrs["data-feature"]) == DEAD)
    assert "dead" in dead.cells[5] and int(dead.cells[1]) == 0 and f"#f={DEAD}" in page.links  # dead ones listed and linked

    page = parse(dump(f"{base}#token=w7", tmp_path))
    rows = [r for r in page.rows if r.cls == "sv-feature"]
    assert int(rows[0].attrs["data-feature"]) == PLANTED and int(rows[0].attrs["data-match"]) == len(fs.top(PLANTED, k=10))
    for r in rows:  # each found feature does fire on w7 in its top rows
        assert "w7" in [t.strip() for t in fs.top(int(r.attrs["data-feature"]), k=fs.info.top_k).column("token").to_pylist()]

    assert [int(r.attrs["data-feature"]) for r in parse(dump(f"{base}#id=7", tmp_path)).rows if r.cls == "sv-feature"] == [7]
    dens = np.asarray(st["density"])
    page = parse(dump(f"{base}#dmin=0.1&dmax=0.3&sort=feature&order=asc", tmp_path))
    got = [int(r.attrs["data-feature"]) for r in page.rows if r.cls == "sv-feature"]
    assert got == [f for f in range(fs.d_sae) if 0.1 <= float(f"{dens[f]:.4g}") <= 0.3] and got


def _no_markup_from_data(dom: str, texts: list[str]) -> None:
    tags = Tags(dom)
    assert not [t for t, _ in tags.tags if t == "img"]
    assert not [a for _, a in tags.tags if {"onerror", "onload"} & set(a)]
    assert all(a.get("class") == "sv-hist" for t, a in tags.tags if t == "svg")
    text = "".join(tags.texts)
    for t in texts:
        assert t in text  # shown, as text


def test_hostile_text_renders_as_text(fs, base, tmp_path):
    _no_markup_from_data(dump(f"{base}#f={XSS}", tmp_path), XSS_TEXT)
    page = parse(dump(f"{base}#token={quote(XSS_TEXT[2])}", tmp_path))
    assert [int(r.attrs["data-feature"]) for r in page.rows if r.cls == "sv-feature"][0] == XSS
    _no_markup_from_data(dump(f"{base}#token={quote(XSS_TEXT[0])}", tmp_path), [])


def test_notebook_fragment_renders(fs, tmp_path):
    p = tmp_path / "cell.html"
    p.write_text(feature_html(feature_data(fs, XSS), standalone=True), encoding="utf-8")
    dom = dump(p.as_uri(), tmp_path)
    _no_markup_from_data(dom, XSS_TEXT)
    page = parse(dom)
    assert len([r for r in page.rows if r.cls == "sv-top-row"]) == len(feature_data(fs, XSS)["top"])


def test_dead_and_missing_features(fs, base, tmp_path):
    dom = dump(f"{base}#f={DEAD}", tmp_path)
    page = parse(dom)
    assert "Feature 4" in dom and "never fired on the" in dom and not [r for r in page.rows if r.cls == "sv-top-row"]
    dom = dump(f"{base}#f=99", tmp_path)
    assert 'data-state="error"' in dom and re.search(r"features (are )?0\D{1,2}23", dom) and "99" in dom


def test_top_rows_are_paged(fs, base, tmp_path):
    f = 20  # a dense feature: all 10 stored top rows
    rows = fs.top(f, k=fs.info.top_k).column("row").to_pylist()
    assert len(rows) == 10
    dom = dump(f"{base}#f={f}&per=4&page=2", tmp_path)
    assert [int(r.attrs["data-row"]) for r in parse(dom).rows if r.cls == "sv-top-row"] == rows[4:8]
    assert "rows 5\u20138 of 10" in dom
    dom = dump(f"{base}#f={f}&per=4&page=9", tmp_path)  # past the end: the last page
    assert [int(r.attrs["data-row"]) for r in parse(dom).rows if r.cls == "sv-top-row"] == rows[8:]
