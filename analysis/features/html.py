"""Static HTML pages of a feature table (no server, no JavaScript, no external assets):

    index.html              every feature, densest first: count, density, mean and max activation,
                            a link to the feature's page where one was written
    feature-F.html          one feature: its statistics, its activation histogram (inline SVG on the
                            table's log-spaced bins), its top contexts and its quantile sample, each
                            token shaded by the feature's activation there (hover for the value)

    from strata.analysis.features import write_pages
    write_pages(store.open("./acts").features("tiny-topk"), "pages/", features=[0, 5, 7])

Pages are rebuilt whole on each call; the folder may be served or opened from disk.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from strata.store.features.stats import hist_edges

if TYPE_CHECKING:
    from strata.store.features.table import FeatureTable

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td.ctx{text-align:left;font-family:ui-monospace,monospace;white-space:pre-wrap}
span.tok{border-radius:2px}span.tok.hit{outline:1px solid #a00}
"""


def page_name(feature: int) -> str:
    return f"feature-{feature}.html"


def _doc(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def histogram_svg(counts: np.ndarray, edges: np.ndarray, *, width: int = 640, height: int = 160) -> str:
    """An SVG bar chart: one ``rect.bar`` per bin (below the lowest edge, each log-spaced bin,
    at or above the highest), heights on a log scale of counts so rare bins stay visible."""
    n = len(counts)
    bw = width / n
    top = math.log1p(float(counts.max())) if counts.size and counts.max() > 0 else 1.0
    bars = []
    for i, c in enumerate(counts):
        h = 0.0 if c == 0 else max(1.0, (height - 20) * math.log1p(float(c)) / top)
        lo = "-inf" if i == 0 else _fmt(edges[i - 1])
        hi = "inf" if i == n - 1 else _fmt(edges[i])
        bars.append(f'<rect class="bar" x="{i * bw:.1f}" y="{height - 20 - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" '
                    f'fill="#c33" data-count="{int(c)}"><title>[{lo}, {hi}): {int(c)}</title></rect>')
    ticks = []
    for i, e in enumerate(edges):
        if abs(math.log10(e) - round(math.log10(e))) < 1e-9:
            ticks.append(f'<text x="{(i + 1) * bw:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">{_fmt(e)}</text>')
    return (f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{"".join(bars)}{"".join(ticks)}</svg>')


def _context_cell(rows: np.ndarray, texts: list[str], hit: int, act: dict[int, float], scale: float) -> str:
    out = []
    for r, t in zip(rows.tolist(), texts):
        a = act.get(r, 0.0)
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        cls = "tok hit" if r == hit else "tok"
        out.append(f'<span class="{cls}" data-row="{r}" data-act="{a:.6g}" style="background:rgba(220,40,40,{alpha:.3f})" '
                   f'title="row {r}: {a:.4g}">{html.escape(t)}</span>')
    return "".join(out)


def _rows_table(fs: FeatureTable, rows: np.ndarray, values: np.ndarray, act: dict[int, float], scale: float, *,
                cls: str, before: int, after: int, quantiles: np.ndarray | None = None) -> str:
    head = "<tr>" + ("<th>quantile</th>" if quantiles is not None else "<th>#</th>") + "<th>activation</th><th>row</th><th>context</th></tr>"
    body = []
    for i, ((wrows, texts), r, v) in enumerate(zip(fs.windows(rows, before=before, after=after), rows, values)):
        first = str(int(quantiles[i])) if quantiles is not None else str(i + 1)
        body.append(f'<tr class="{cls}"><td>{first}</td><td>{float(v):.4g}</td><td>{int(r)}</td>'
                    f'<td class="ctx">{_context_cell(wrows, texts, int(r), act, scale)}</td></tr>')
    return f'<table class="{cls}s">{head}{"".join(body)}</table>'


def feature_page(fs: FeatureTable, feature: int, *, k: int = 20, before: int = 8, after: int = 4) -> str:
    """The HTML of one feature's page."""

    st = fs.stats().slice(feature, 1).to_pylist()[0]
    acts = fs.activations(feature)
    act = dict(zip(acts.column("row").to_numpy().tolist(), acts.column("activation").to_numpy().astype(float).tolist()))
    scale = float(st["max_activation"])
    h = fs.info.hist
    counts = fs.histogram(feature).column("count").to_numpy()
    top = fs.top(feature, k=min(k, fs.info.top_k), before=before, after=after)
    samp = fs.sample(feature, before=before, after=after)
    parts = [
        f'<p><a href="index.html">all features</a></p><h1>Feature {feature}</h1>',
        f"<p>feature table <b>{html.escape(fs.name)}</b>, SAE <b>{html.escape(fs.info.sae)}</b>, "
        f"dataset <b>{html.escape(fs.info.dataset)}</b>, hook <b>{html.escape(fs.info.hook)}</b></p>",
        f'<table class="stats"><tr><th>count</th><td>{st["count"]}</td></tr><tr><th>density</th><td>{st["density"]:.4g}</td></tr>'
        f'<tr><th>mean activation</th><td>{st["mean_activation"]:.4g}</td></tr><tr><th>max activation</th><td>{scale:.4g}</td></tr></table>',
        "<h2>Activation histogram</h2>", histogram_svg(counts, hist_edges(h["lo"], h["hi"], h["bins"])),
        f"<h2>Top {top.num_rows} contexts</h2>",
        _rows_table(fs, top.column("row").to_numpy(), top.column("activation").to_numpy(), act, scale, cls="top", before=before, after=after),
        "<h2>Sample by activation quantile</h2><p>Quantile 0 holds the highest activations; rows drawn with the table's seed.</p>",
        _rows_table(fs, samp.column("row").to_numpy(), samp.column("activation").to_numpy(), act, scale, cls="sample",
                    before=before, after=after, quantiles=samp.column("quantile").to_numpy()),
    ]
    return _doc(f"{fs.name}: feature {feature}", "\n".join(parts))


def index_page(fs: FeatureTable, pages: set[int]) -> str:
    """The index: every feature, densest first (ties by feature), linked where it has a page."""
    st = fs.stats()
    feat, count, dens = (st.column(c).to_numpy() for c in ("feature", "count", "density"))
    mean, mx = st.column("mean_activation").to_numpy(), st.column("max_activation").to_numpy()
    order = np.lexsort((feat, -dens))
    rows = []
    for i in order:
        f = int(feat[i])
        name = f'<a href="{page_name(f)}">{f}</a>' if f in pages else str(f)
        rows.append(f'<tr class="feature" data-feature="{f}" data-density="{dens[i]:.9g}"><td>{name}</td><td>{int(count[i])}</td>'
                    f"<td>{dens[i]:.4g}</td><td>{mean[i]:.4g}</td><td>{mx[i]:.4g}</td></tr>")
    body = (f"<h1>Feature table {html.escape(fs.name)}</h1><p>SAE <b>{html.escape(fs.info.sae)}</b> on dataset "
            f"<b>{html.escape(fs.info.dataset)}</b>, hook <b>{html.escape(fs.info.hook)}</b>: {fs.d_sae} features over "
            f"{fs.encoded_rows:,} rows; {len(pages)} feature page(s).</p>"
            '<table class="index"><tr><th>feature</th><th>count</th><th>density</th><th>mean</th><th>max</th></tr>'
            + "".join(rows) + "</table>")
    return _doc(f"{fs.name}: features", body)


def write_pages(fs: FeatureTable, out: str | Path, *, features: Iterable[int] | None = None, k: int = 20,
                max_pages: int = 1000, before: int = 8, after: int = 4) -> Path:
    """Write the index and one page per feature into ``out``; returns the index's path.
    ``features`` default: the ``max_pages`` densest features that ever fire. Every feature is
    checked before anything is written."""
    chosen = [fs.check_feature(f) for f in features] if features is not None else None
    if chosen is None:
        st = fs.stats()
        dens, count = st.column("density").to_numpy(), st.column("count").to_numpy()
        order = np.lexsort((np.arange(fs.d_sae), -dens))
        chosen = [int(f) for f in order if count[f] > 0][:max_pages]
    chosen = sorted(set(chosen))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in chosen:
        (out / page_name(f)).write_text(feature_page(fs, f, k=k, before=before, after=after), encoding="utf-8")
    index = out / "index.html"
    index.write_text(index_page(fs, set(chosen)), encoding="utf-8")
    log.info("wrote %d feature page(s) and the index of feature table %r to %s", len(chosen), fs.name, out)
    return index
