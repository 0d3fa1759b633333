"""HTML pieces every notebook view is built of: escaping (:func:`esc`, the one way a stored or
user-given string reaches HTML), collapsible xarray-style sections, tables, token shading and
the page frame with its scoped CSS. Imports nothing of the store but its errors, so every
artifact module can use it."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from strata.store.errors import StrataError

__all__ = ["CSS", "ViewError", "HTML", "esc", "fmt_bytes", "section", "kv_table", "rows_table", "arrow_table", "page", "status", "shade_tokens"]


class ViewError(StrataError, ValueError):
    """A view asked of something that has none (an analysis without plots, a metric without a
    plot, a neuron out of range): the message names the valid choices."""


# -- HTML primitives -----------------------------------------------------------------------------

CSS = """<style>
.strata-repr{font-family:var(--jp-content-font-family,-apple-system,sans-serif);font-size:13px;line-height:1.45;max-width:1100px}
.strata-repr .strata-head{font-weight:600;margin-bottom:2px}
.strata-repr .strata-head .strata-kind{color:#6b7280;font-weight:400;margin-right:6px}
.strata-repr .strata-sub{color:#6b7280;margin-bottom:4px}
.strata-repr details{margin:1px 0 1px 2px}
.strata-repr summary{cursor:pointer;font-weight:600;color:#374151}
.strata-repr summary .strata-n{color:#6b7280;font-weight:400}
.strata-repr table{border-collapse:collapse;margin:2px 0 4px 14px}
.strata-repr th,.strata-repr td{padding:1px 10px 1px 0;text-align:left;vertical-align:top;font-size:12px}
.strata-repr th{color:#6b7280;font-weight:500}
.strata-repr td.strata-num{text-align:right;font-variant-numeric:tabular-nums}
.strata-repr .strata-ok{color:#15803d;font-weight:600}.strata-repr .strata-warn{color:#b45309;font-weight:600}
.strata-repr .strata-bad{color:#b91c1c;font-weight:600}
.strata-repr .strata-bar{display:inline-block;height:9px;background:#60a5fa;vertical-align:middle}
.strata-tokens{white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);font-size:12.5px;line-height:1.9}
.strata-tok{border-radius:2px;padding:0 1px}
.strata-tok.strata-special{color:#9ca3af}
</style>"""


def esc(value: Any) -> str:
    """``value`` as HTML text: ``&``, ``<``, ``>`` and both quotes escaped (safe in attributes too)."""
    return html.escape(str(value), quote=True)


def fmt_bytes(n: float) -> str:
    """``1.2 MiB``-style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt(v: Any) -> str:
    """A value as short escaped text: floats to 4 significant digits, JSON for containers."""
    if isinstance(v, bool) or v is None:
        return esc(v)
    if isinstance(v, (float, np.floating)):
        return esc(f"{float(v):.4g}")
    if isinstance(v, (int, np.integer)):
        return esc(f"{int(v):,}")
    if isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str, sort_keys=True)
        return esc(text if len(text) <= 300 else text[:297] + "...")
    return esc(v)


def section(title: str, body: str, *, count: Any = None, open: bool = False) -> str:  # noqa: A002 - HTML's own word
    """A collapsible section; ``body`` is HTML already escaped."""
    n = f' <span class="strata-n">({esc(count)})</span>' if count is not None else ""
    return f"<details{' open' if open else ''}><summary>{esc(title)}{n}</summary>{body}</details>"


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of ``(key, value)``; values formatted with :func:`_fmt` (pairs whose value
    is None are left out)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in pairs if v is not None)
    return f"<table>{rows}</table>"


def rows_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, html_cols: Sequence[int] = ()) -> str:
    """A table; numbers right-aligned. Columns in ``html_cols`` hold HTML already escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            cells.append(f"<td{' class=strata-num' if num else ''}>{v if i in html_cols else _fmt(v)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def arrow_table(t: pa.Table, *, max_rows: int = 20) -> str:
    """The first ``max_rows`` rows of a pyarrow table as an HTML table (values escaped)."""
    shown = t.slice(0, max_rows).to_pylist()
    more = f'<div class="strata-sub">... {t.num_rows - max_rows:,} more rows</div>' if t.num_rows > max_rows else ""
    return rows_table(t.column_names, ([r[c] for c in t.column_names] for r in shown)) + more


def page(kind: str, title: str, sub: str, sections: Sequence[str]) -> str:
    return (f'{CSS}<div class="strata-repr"><div class="strata-head"><span class="strata-kind">{esc(kind)}</span>{esc(title)}</div>'
            f'<div class="strata-sub">{sub}</div>{"".join(sections)}</div>')


def status(label: str, level: str) -> str:
    return f'<span class="strata-{level}">{esc(label)}</span>'


class HTML:
    """An HTML fragment that Jupyter displays (what the views return)."""

    def __init__(self, html_text: str, text: str) -> None:
        self.html, self.text = html_text, text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text



def shade_tokens(texts: Sequence[str], values: np.ndarray, *, special: Sequence[bool] | None = None,
                 titles: Sequence[str] | None = None, scale: float | None = None) -> str:
    """Tokens as ``<span>``s shaded by ``values`` (orange for positive, blue for negative, opacity
    by ``|value| / scale``; ``scale`` defaults to the largest ``|value|``), each with its value as a
    tooltip. Every text is escaped."""
    vals = np.asarray(values, dtype=np.float64)
    top = float(scale if scale is not None else (np.abs(vals).max() if vals.size else 0.0)) or 1.0
    out = []
    for i, (t, v) in enumerate(zip(texts, vals)):
        a = min(1.0, abs(v) / top) * 0.85
        colour = f"rgba(249,115,22,{a:.3f})" if v >= 0 else f"rgba(59,130,246,{a:.3f})"
        cls = "strata-tok strata-special" if special is not None and special[i] else "strata-tok"
        title = titles[i] if titles is not None else f"{v:.4g}"
        out.append(f'<span class="{cls}" style="background:{colour}" title="{esc(title)}">{esc(t)}</span>')
    return f'<div class="strata-tokens">{"".join(out)}</div>'


