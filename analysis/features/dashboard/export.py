"""The static export of the feature viewer, and SAEDashboard / Neuronpedia feature JSON.

    export(fs, "pages/")          pages/index.html           the viewer (index and every feature, routed on #f=N)
                                  pages/data/index.js        per-feature statistics, dead features listed, explanations
                                  pages/data/vocab.js        the text of every token the pages show, once
                                  pages/data/search.js       token text -> features whose top rows fire on it
                                  pages/data/f{C}.js         compact data of the live features C*chunk .. (C+1)*chunk - 1
                                  pages/neuronpedia/batch-{B}.json   with ``neuronpedia=True``

Data files are scripts (``StrataView.put({...})``), not JSON, so the folder opens from disk
(``file://``), where browsers refuse ``fetch``. Dead features have no data file: the index holds all
there is to say about them. Token ids replace token text in the per-feature data (the vocabulary is
written once), and rows are packed as arrays with only the non-zero values of each window (``_pack``), which keeps
the export near 10 KB a live feature.

:func:`neuronpedia_batch` lays features out as sae-dashboard's ``NeuronpediaDashboardBatch`` (the JSON
Neuronpedia imports): logit effects as ``pos_str``/``pos_values``/``neg_str``/``neg_values``, density
as ``frac_nonzero``, the activation histogram as ``freq_hist_data_bar_*``, the top rows as one bin
(``bin_min`` -1, as SAEDashboard marks its top-activations bin) and the quantile sample as one bin
per quantile.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from strata.store.features.view import app_html, feature_data, index_data, json_for_script, load_explanations, token_index

if TYPE_CHECKING:
    from strata.store.features.table import FeatureTable

__all__ = ["export", "neuronpedia_batch", "CHUNK"]

log = logging.getLogger(__name__)

CHUNK = 64
#: Fields every feature shares with the index: left out of the compact per-feature data.
_SHARED = ("v", "d_sae", "table", "sae", "dataset", "hook", "encoded_rows", "explanation")


def export(fs: FeatureTable, out: str | Path, *, features: Iterable[int] | None = None, before: int = 8, after: int = 4,
           explanations: str | None = None, neuronpedia: bool = False, chunk: int = CHUNK) -> Path:
    """Write the static export of ``fs`` into ``out`` (see the module docstring); returns ``index.html``'s path.
    ``features``: only these get data (default: every live feature); ``explanations``: a local
    explanations.jsonl instead of the store's. The ``data`` folder is rewritten whole."""
    chosen = None if features is None else sorted({fs.check_feature(f) for f in features})
    ex = load_explanations(fs, explanations)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir()
    idx = index_data(fs, explanations=ex)
    count = np.asarray(idx["count"])
    live = [f for f in (chosen if chosen is not None else range(fs.d_sae)) if count[f] > 0]
    idx["exported"] = None if chosen is None else chosen
    used: set[int] = set()
    by_chunk: dict[int, dict[str, Any]] = {}
    np_feats: list[dict[str, Any]] = []

    def flush(c: int) -> None:
        (data_dir / f"f{c}.js").write_text(f"StrataView.put({json_for_script(by_chunk.pop(c))});\n", encoding="utf-8")

    for f in live:
        d = feature_data(fs, f, before=before, after=after, compact=True, explanations=ex)
        if neuronpedia:
            np_feats.append(_np_feature(fs, d))
        for rec in d["top"] + d["sample"]:
            used.update(rec["t"])
        for k in _SHARED:
            d.pop(k, None)
        _pack(d)
        c = f // chunk
        if by_chunk and c not in by_chunk:
            for old in list(by_chunk):
                flush(old)
        by_chunk.setdefault(c, {})[str(f)] = d
    for old in list(by_chunk):
        flush(old)
    vocab = {str(t): fs.token_text(t) for t in sorted(used)}
    (data_dir / "vocab.js").write_text(f"StrataView._vocab = {json_for_script(vocab)};\n", encoding="utf-8")
    (data_dir / "index.js").write_text(f"StrataView._index = {json_for_script(idx)};\n", encoding="utf-8")
    (data_dir / "search.js").write_text(f"StrataView._search = {json_for_script(token_index(fs))};\n", encoding="utf-8")
    index = out / "index.html"
    index.write_text(app_html(f"{fs.name}: features", f'StrataView.static("", {int(chunk)})'), encoding="utf-8")
    if neuronpedia:
        np_dir = out / "neuronpedia"
        np_dir.mkdir(exist_ok=True)
        for b in range(0, len(np_feats), 128):
            batch = _np_batch(fs, np_feats[b : b + 128])
            (np_dir / f"batch-{b // 128}.json").write_text(json.dumps(batch), encoding="utf-8")
    log.info("exported %d live feature(s) of %d (%d dead) of feature table %r to %s", len(live), fs.d_sae, len(idx["dead"]), fs.name, out)
    return index


def _pack(d: dict[str, Any]) -> None:
    """Shrink compact data in place: each top or sample row becomes ``[row, doc, pos, act, hit, token ids,
    [[i, value] for the window's non-zero values]]`` (a sample row has its quantile last), and the
    equal-width histogram's edges become ``lo``/``hi``."""
    for key in ("top", "sample"):
        d[key] = [[r["row"], r["doc"], r["pos"], r["act"], r["hit"], r["t"], [[i, a] for i, a in enumerate(r["acts"]) if a]]
                  + ([r["q"]] if "q" in r else []) for r in d[key]]
    e = d["hist"].pop("edges")
    if e:
        d["hist"]["lo"], d["hist"]["hi"] = e[0], e[-1]


# -- SAEDashboard / Neuronpedia ------------------------------------------------------------------


def _np_feature(fs: FeatureTable, d: dict[str, Any]) -> dict[str, Any]:
    """One feature in NeuronpediaDashboardFeature's layout, from :func:`feature_data`'s data."""

    def tokens(rec: dict[str, Any]) -> list[str]:
        return rec["tokens"] if "tokens" in rec else [fs.token_text(t) for t in rec["t"]]

    acts = [{"bin_min": -1.0, "bin_max": float(d["max"]), "bin_contains": -1.0, "tokens": tokens(r), "values": [float(v) for v in r["acts"]],
             "qualifying_token_index": int(r["hit"])} for r in d["top"]]
    nq = max(int(d.get("quantiles") or 0), 1)
    by_q: dict[int, list[dict[str, Any]]] = {}
    for r in d["sample"]:
        by_q.setdefault(int(r["q"]), []).append(r)
    for q in sorted(by_q):
        vals = [float(r["act"]) for r in by_q[q]]
        for r in by_q[q]:
            acts.append({"bin_min": min(vals), "bin_max": max(vals), "bin_contains": 1.0 / nq, "tokens": tokens(r),
                         "values": [float(v) for v in r["acts"]], "qualifying_token_index": int(r["hit"])})
    e = d["hist"]["edges"]
    lg = d.get("logits") or {"pos": [], "neg": []}
    return {
        "feature_index": int(d["feature"]), "pos_str": [t for t, _ in lg["pos"]], "pos_values": [float(v) for _, v in lg["pos"]],
        "neg_str": [t for t, _ in lg["neg"]], "neg_values": [float(v) for _, v in lg["neg"]], "frac_nonzero": float(d["density"]),
        "freq_hist_data_bar_values": [float((a + b) / 2) for a, b in zip(e[:-1], e[1:])],
        "freq_hist_data_bar_heights": [float(c) for c in d["hist"]["counts"]],
        "n_prompts_total": int(fs.encoded_rows // max(fs.dataset.info.context_size, 1)), "n_tokens_in_prompt": int(fs.dataset.info.context_size),
        "dataset": fs.info.dataset, "activations": acts,
        "decoder_weights_dist": [float(x) for x in d.get("decoder_norms") or []],
    }


def _np_batch(fs: FeatureTable, feats: list[dict[str, Any]]) -> dict[str, Any]:
    m = re.search(r"blocks\.(\d+)\.", fs.info.hook)
    meta = fs.dataset.info.meta
    return {"model_id": str(meta.get("model") or ""), "layer": int(m.group(1)) if m else 0, "sae_set": fs.name, "sae_id_suffix": None,
            "features": feats}


def neuronpedia_batch(fs: FeatureTable, features: Iterable[int], *, before: int = 8, after: int = 4) -> dict[str, Any]:
    """Features of ``fs`` as one ``NeuronpediaDashboardBatch`` dict (sae-dashboard's layout; see the module docstring)."""
    feats = [_np_feature(fs, feature_data(fs, fs.check_feature(f), before=before, after=after)) for f in features]
    return _np_batch(fs, feats)
