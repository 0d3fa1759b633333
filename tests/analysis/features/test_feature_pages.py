"""Static HTML feature pages, read back with html.parser: the index sorted by density and linked,
each page's top contexts highlighted by the feature's activation, its histogram."""

from __future__ import annotations

import numpy as np
import pytest
from pagesparse import parse

from strata import store
from strata.analysis.features import write_pages
from strata.analysis.features.synthetic import synthetic_dataset, write_table
from strata.store.features.format import FeatureOutOfRangeError

H = "blocks.0.hook_resid_post"
D_SAE, CTX, UC = 24, 16, 4


def _dense(unit: int) -> np.ndarray:
    rng = np.random.default_rng([3, unit])
    z = np.round(rng.exponential(1.0, (CTX * UC, D_SAE)), 2).astype(np.float32)
    z *= rng.random(z.shape) < np.linspace(0.02, 0.5, D_SAE)  # densities differ by feature
    z[:, 4] = 0  # a dead feature
    z[np.arange(CTX * UC) % CTX == 0] = 0
    return z


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    s = store.open(tmp_path_factory.mktemp("pages"))
    synthetic_dataset(s, "syn", hook=H, d=8, units=3, unit_contexts=UC, context_size=CTX)

    def entries(u: int):
        z = _dense(u)
        r, f = np.nonzero(z)
        return r + u * CTX * UC, f, z[r, f], CTX * UC - UC

    return write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 1, 2], entries=entries, top_k=10, block_features=8)


def test_index_is_sorted_by_density_and_links_every_page(fs, tmp_path):
    index = write_pages(fs, tmp_path / "out", k=5)
    page = parse(index.read_text())
    rows = [r for r in page.rows if r.cls == "feature"]
    assert [int(r.attrs["data-feature"]) for r in rows] != list(range(D_SAE))  # not in feature order
    dens = [float(r.attrs["data-density"]) for r in rows]
    assert dens == sorted(dens, reverse=True) and len(rows) == D_SAE
    st = fs.stats().to_pydict()
    for r in rows:
        f = int(r.attrs["data-feature"])
        assert int(r.cells[1]) == st["count"][f]
        if st["count"][f] > 0:  # every live feature has a page, linked; the dead one has none
            assert r.links == [f"feature-{f}.html"] and (tmp_path / "out" / f"feature-{f}.html").exists()
        else:
            assert r.links == [] and not (tmp_path / "out" / f"feature-{f}.html").exists()


def test_feature_page_contexts_are_highlighted_by_activation(fs, tmp_path):
    write_pages(fs, tmp_path, features=[7, 20], k=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature-20.html", "feature-7.html", "index.html"]
    page = parse((tmp_path / "feature-7.html").read_text())
    assert page.h1 == "Feature 7" and "index.html" in page.links
    act = dict(zip(fs.activations(7).column("row").to_pylist(), fs.activations(7).column("activation").to_pylist()))
    top = fs.top(7, k=5)
    rows = [r for r in page.rows if r.cls == "top"]
    assert len(rows) == 5
    mx = fs.stats().column("max_activation")[7].as_py()
    for r, want_row, want_act in zip(rows, top.column("row").to_pylist(), top.column("activation").to_pylist()):
        assert int(r.cells[2]) == want_row and float(r.cells[1]) == pytest.approx(want_act, rel=1e-3)
        hits = [sp for sp in r.spans if "hit" in sp["class"]]
        assert len(hits) == 1 and int(hits[0]["data-row"]) == want_row and hits[0]["text"] == top.column("token")[rows.index(r)].as_py()
        for sp in r.spans:  # every token shaded by the feature's own activation there
            a = act.get(int(sp["data-row"]), 0.0)
            assert float(sp["data-act"]) == pytest.approx(a, rel=1e-5)
            alpha = float(sp["style"].rsplit(",", 1)[1].rstrip(")"))
            assert alpha == pytest.approx(min(1.0, a / mx), abs=1e-3)
    assert [r.cells[0] for r in page.rows if r.cls == "sample"] == [str(q) for q in fs.sample(7).column("quantile").to_pylist()]
    # The histogram: one bar per bin, counts from the table.
    assert page.svgs == 1
    want = fs.histogram(7).column("count").to_pylist()
    assert [int(b["data-count"]) for b in page.bars] == want and sum(want) == fs.stats().column("count")[7].as_py()
    assert all((float(b["height"]) > 0) == (int(b["data-count"]) > 0) for b in page.bars)


def test_bad_features_write_nothing(fs, tmp_path):
    with pytest.raises(FeatureOutOfRangeError, match=r"features 0\.\.23"):
        write_pages(fs, tmp_path / "out", features=[3, 24])
    assert not (tmp_path / "out").exists()
