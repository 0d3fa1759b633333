"""Model diffing with a crosscoder: which latents belong to which source.

For a crosscoder of two sources A and B (two models over one corpus, say), latent ``i``'s
*relative decoder norm* is B's share of its decoder norms (Lindsey et al., 2024)::

    r_i = ||W_dec[1, i]|| / (||W_dec[0, i]|| + ||W_dec[1, i]||)

``r`` near 0: the latent writes only to A (A-only); near 1: only to B (B-only); near 0.5: to
both (shared). The classes use the thresholds of :data:`THRESHOLDS` (recorded in
``metrics.json``): ``a_only`` r < 0.1, ``b_only`` r > 0.9, ``shared`` 0.3 <= r <= 0.7, ``mixed``
otherwise, ``none`` for a latent whose decoder is zero on both. For shared latents, the cosine
between the two decoder vectors says whether the latent means the same direction in both.

Outputs (:func:`write_crosscoder` writes them into the crosscoder's folder):
``latents.parquet`` (one row per latent: ``latent``, ``decoder_norms`` list<float32> one per
source, and for two sources ``relative_norm``, ``class``, ``cosine``), ``relative_norms.png``
(the histogram), and :func:`diffing_metrics` for ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from strata.store.saes.crosscoder import CrossCoder

log = logging.getLogger(__name__)

THRESHOLDS = {"a_only_below": 0.1, "b_only_above": 0.9, "shared_from": 0.3, "shared_to": 0.7}
LATENTS = "latents.parquet"
HISTOGRAM = "relative_norms.png"
CLASSES = ("a_only", "b_only", "shared", "mixed", "none")


def relative_norms(norms: np.ndarray) -> np.ndarray:
    """B's share ``r`` per latent of decoder norms ``[2, d_sae]`` (NaN where both are zero)."""
    total = norms[0] + norms[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, norms[1] / np.where(total > 0, total, 1), np.nan)


def classify(r: np.ndarray, thresholds: dict[str, float] = THRESHOLDS) -> np.ndarray:
    """The class of each relative norm (see the module docstring), as strings."""
    out = np.full(r.shape, "mixed", dtype=object)
    out[r < thresholds["a_only_below"]] = "a_only"
    out[r > thresholds["b_only_above"]] = "b_only"
    out[(r >= thresholds["shared_from"]) & (r <= thresholds["shared_to"])] = "shared"
    out[np.isnan(r)] = "none"
    return out


def decoder_cosines(w_dec: np.ndarray) -> np.ndarray:
    """Cosine between the two sources' decoder vectors of each latent (``w_dec`` ``[2, d_sae, d]``)."""
    a, b = w_dec[0].astype(np.float64), w_dec[1].astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), np.nan)


def latents_table(cc: CrossCoder) -> pa.Table:
    """One row per latent: ``latent``, ``decoder_norms`` (one per source) and, for two sources,
    ``relative_norm``, ``class`` and ``cosine``."""
    w = cc.decoder.weight.detach().cpu().float().numpy()
    norms = np.linalg.norm(w, axis=-1)  # [n, d_sae]
    cols: dict[str, Any] = {
        "latent": pa.array(np.arange(cc.d_sae, dtype=np.int64)),
        "decoder_norms": pa.array(list(norms.T.astype(np.float32)), type=pa.list_(pa.float32())),
    }
    if cc.n_sources == 2:
        r = relative_norms(norms)
        cols["relative_norm"] = pa.array(r.astype(np.float32), from_pandas=True)
        cols["class"] = pa.array(classify(r).tolist(), type=pa.string())
        cols["cosine"] = pa.array(decoder_cosines(w).astype(np.float32), from_pandas=True)
    return pa.table(cols)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def diffing_metrics(table: pa.Table) -> dict[str, Any]:
    """``metrics.json``'s model-diffing block of a two-source latents table: the thresholds,
    counts per class, mean and median relative norm, and the decoder cosine of shared latents."""
    if "relative_norm" not in table.column_names:
        return {}
    r = table.column("relative_norm").to_numpy(zero_copy_only=False).astype(np.float64)
    cls = np.asarray(table.column("class").to_pylist())
    cos = table.column("cosine").to_numpy(zero_copy_only=False).astype(np.float64)
    shared = cos[(cls == "shared") & np.isfinite(cos)]
    return {
        "thresholds": dict(THRESHOLDS),
        "counts": {c: int((cls == c).sum()) for c in CLASSES},
        "relative_norm_mean": _finite(float(np.nanmean(r))) if np.isfinite(r).any() else None,
        "relative_norm_median": _finite(float(np.nanmedian(r))) if np.isfinite(r).any() else None,
        "shared_cosine_mean": float(shared.mean()) if shared.size else None,
        "shared_cosine_median": float(np.median(shared)) if shared.size else None,
    }


def plot_relative_norms(table: pa.Table, path: str | Path, *, title: str = "", labels: tuple[str, str] = ("A", "B")) -> Path | None:
    """The histogram of relative decoder norms, thresholds marked, as a PNG (None without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib (~0.5 s) only for the PNG
        from matplotlib.figure import Figure  # lazy: as above
    except ImportError:
        log.warning("matplotlib is not installed: %s not written", path)
        return None
    r = table.column("relative_norm").to_numpy(zero_copy_only=False).astype(np.float64)
    r = r[np.isfinite(r)]
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.15, top=0.85)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(r, bins=50, range=(0.0, 1.0), color="#4c72b0")
    for x in THRESHOLDS.values():
        ax.axvline(x, color="#c44e52", lw=0.8, ls="--")
    ax.set_xlabel("relative decoder norm r: B's share (0: A only, 1: B only); dashed: class thresholds", fontsize=8)
    ax.set_ylabel("latents", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.suptitle(title or "relative decoder norms", fontsize=10)
    ax.set_title(f"A = {labels[0]}   B = {labels[1]}", fontsize=7)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def write_crosscoder(cc: CrossCoder, folder: str | Path, *, title: str = "") -> list[Path]:
    """Write the crosscoder (``cfg.json``, ``crosscoder.safetensors``), ``latents.parquet`` and,
    for two sources, ``relative_norms.png`` into ``folder``. Returns the paths written."""
    folder = Path(folder)
    cc.save(folder)
    table = latents_table(cc)
    pq.write_table(table, folder / LATENTS)
    out = [folder / "cfg.json", folder / "crosscoder.safetensors", folder / LATENTS]
    if cc.n_sources == 2:
        srcs = cc.cfg.get("sources") or [{}, {}]
        labels = tuple(f"{s.get('dataset', '?')}:{s.get('hook', '?')}" for s in srcs[:2])
        png = plot_relative_norms(table, folder / HISTOGRAM, title=title, labels=labels)  # type: ignore[arg-type]
        if png is not None:
            out.append(png)
    return out
