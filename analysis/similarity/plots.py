"""PNG figures of analysis results: heatmaps with labelled axes and their numbers, and line plots
per layer. Drawn on matplotlib's Agg canvas directly (no pyplot state, safe in workers and tests);
returned as bytes for the store to commit."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["short_hook", "heatmap_png", "lines_png"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


def short_hook(hook: str) -> str:
    """``blocks.3.hook_resid_post`` -> ``3 resid_post``; other hooks keep their names."""
    m = _BLOCK.match(hook)
    return f"{m.group(1)} {m.group(2)}" if m else hook.removeprefix("hook_")


def _png(fig: object) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: ~0.5 s; the analyses' workers never draw

    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # type: ignore[attr-defined]
    return buf.getvalue()


def heatmap_png(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str, xlabel: str, ylabel: str,
                metric: str) -> bytes:
    """A heatmap of ``values[i, j]`` (row ``rows[i]``, column ``cols[j]``), the numbers written in
    the cells when there are at most 24 x 24 of them."""
    from matplotlib.figure import Figure  # lazy: as above

    r, c = values.shape
    fig = Figure(figsize=(max(4.0, 0.55 * c + 2.5), max(3.5, 0.5 * r + 2.0)))
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    vmin, vmax = (0.0, 1.0) if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else (float(finite.min()), float(finite.max()))
    im = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
    ax.set_xticks(range(c), [short_hook(h) for h in cols], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(r), [short_hook(h) for h in rows], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if r <= 24 and c <= 24:
        for i in range(r):
            for j in range(c):
                v = values[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if (v - vmin) < 0.6 * (vmax - vmin) else "black")
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    return _png(fig)


def lines_png(x: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, ylabel: str, xlabel: str = "hook") -> bytes:
    """One line per series over the hooks ``x`` (model order)."""
    from matplotlib.figure import Figure  # lazy: as above

    fig = Figure(figsize=(max(5.0, 0.45 * len(x) + 2.5), 3.8))
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(range(len(x)), np.asarray(ys, dtype=float), marker="o", ms=3, label=name)
    ax.set_xticks(range(len(x)), [short_hook(h) for h in x], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
