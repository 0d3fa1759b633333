"""One feature of a feature table as JSON-able data, and the one viewer that renders it.

    from strata.store.features.view import feature_data, feature_html
    d = feature_data(fs, 12)            # dict: statistics, histogram, top rows, samples, logit effects, ...
    feature_html(d)                      # a self-contained HTML fragment (a notebook cell, a served page)

Everything here reads the store only. What needs the model or the SAE's weights (logit effects,
nearest features by decoder cosine) is computed once per SAE by analysis code
(``strata.analysis.features.dashboard.derive``) and committed beside the table as the artifact
``features/NAME/dashboard/derived/`` (``derived.parquet`` and its commit record, :func:`write_derived`);
:func:`load_derived` reads it back, checked against the record, and the data of a feature carries
those fields when it exists and matches the table's SAE.
An optional ``features/NAME/explanations.jsonl`` (``{"feature": 3, "explanation": "..."}`` per line;
Neuronpedia's ``index``/``description`` keys are read too) gives each feature's explanation.

The data of a feature (``v`` 1):

    feature, d_sae, table, sae, dataset, hook, encoded_rows, count, density, mean, max, dead, prev, next
    hist        {"edges": [bins + 1 floats], "counts": [bins ints]}: equal-width bins from 0 (or the
                lowest activation when one is negative) to the highest activation
    top         every stored top row, highest first: {"row", "doc", "pos", "act", "hit", "tokens", "acts"}
                (``hit`` indexes the activating token in ``tokens``; ``acts`` is the feature's value
                at each token of the window; compact data has ``t``, token ids, instead of ``tokens``)
    sample      the seeded quantile sample, the same records with ``q`` (0 is the top quantile)
    logits      {"pos": [[token, value]...], "neg": [...], "note": how W_U was prepared} or None
    neighbours  [[feature, cosine]...] (decoder cosine, nearest first) or None
    decoder_norms  per-source decoder norms of a crosscoder / transcoder feature, or None
    explanation a string or None

The viewer is one script (:mod:`store.features.viewer_js`) that builds the page with DOM calls
only (``textContent``, never ``innerHTML`` of data), so corpus text renders as text.
"""

from __future__ import annotations

import html
import json
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from strata.store.commit import artifacts, parquet
from strata.store.errors import CorruptionError
from strata.store.features.format import FEATURES
from strata.store.features.viewer_js import VIEWER_CSS, VIEWER_JS

# The table imports this module (``fs.show(f)``), so this one names its type without importing it
# (a TYPE_CHECKING import counts as a cycle in tests/test_structure.py).
FeatureTable = Any

__all__ = ["feature_data", "feature_html", "app_html", "index_data", "token_index", "load_derived", "write_derived", "load_explanations",
           "Derived", "derived_key", "explanations_key", "json_for_script", "DENSE"]

log = logging.getLogger(__name__)

#: Density above which the index flags a feature as dense.
DENSE = 0.1
_UNIT_CACHE = 64


_DERIVED_NAME = "derived"
_DERIVED_FILE = "derived.parquet"


def derived_kind(table: str) -> str:
    """The artifact kind holding a table's derived dashboard data (one artifact, ``derived``)."""
    return f"{FEATURES}/{table}/dashboard"


def derived_key(table: str) -> str:
    """Where a table's derived dashboard data (neighbours, logit effects) lives in the store."""
    return f"{artifacts.folder(derived_kind(table), _DERIVED_NAME)}/{_DERIVED_FILE}"


def explanations_key(table: str) -> str:
    """Where a table's optional explanations live in the store (one JSON object a line)."""
    return f"{FEATURES}/{table}/explanations.jsonl"


# -- derived data: written by analysis code, read here -------------------------------------------

_LIST_I = pa.list_(pa.int32())
_LIST_F = pa.list_(pa.float32())
DERIVED_SCHEMA = pa.schema([("feature", pa.int32()), ("neighbours", _LIST_I), ("neighbour_cos", _LIST_F), ("pos_tokens", _LIST_I),
                            ("pos_values", _LIST_F), ("neg_tokens", _LIST_I), ("neg_values", _LIST_F)])


@dataclass
class Derived:
    """Per-feature data computed once from the SAE's weights (and the model's unembedding)."""

    sae_fingerprint: str
    neighbours: np.ndarray  # int32 [d_sae, k]; -1 pads
    neighbour_cos: np.ndarray  # float32 [d_sae, k]
    pos_tokens: np.ndarray | None  # int32 [d_sae, k] token ids, or None without logit effects
    pos_values: np.ndarray | None
    neg_tokens: np.ndarray | None
    neg_values: np.ndarray | None
    logit_note: str | None  # how W_U was prepared (stated on the page), or why there are no logit effects
    decoder_norms: np.ndarray | None = None  # float32 [d_sae, n_sources]


def _fixed(col: pa.ChunkedArray, n: int) -> np.ndarray:
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def write_derived(fs: FeatureTable, *, neighbours: np.ndarray, neighbour_cos: np.ndarray, pos_tokens: np.ndarray | None = None,
                  pos_values: np.ndarray | None = None, neg_tokens: np.ndarray | None = None, neg_values: np.ndarray | None = None,
                  logit_note: str | None = None, decoder_norms: np.ndarray | None = None) -> str:
    """Write a table's derived data (arrays ``[d_sae, k]``); returns its store key. Rewritten whole."""
    n = fs.d_sae
    if neighbours.shape[0] != n or neighbour_cos.shape != neighbours.shape:
        raise ValueError(f"neighbours must be [{n}, k] for feature table {fs.name!r}, got {neighbours.shape} and {neighbour_cos.shape}")

    def lists(a: np.ndarray | None, typ: pa.DataType) -> pa.Array:
        if a is None:
            return pa.nulls(n, pa.list_(typ))
        a = np.ascontiguousarray(a)
        return pa.ListArray.from_arrays(pa.array(np.arange(0, a.size + 1, max(a.shape[1], 1), dtype=np.int32)[: n + 1]),
                                        pa.array(a.reshape(-1).astype(typ.to_pandas_dtype())))

    cols = {"feature": pa.array(np.arange(n, dtype=np.int32)), "neighbours": lists(neighbours, pa.int32()),
            "neighbour_cos": lists(neighbour_cos, pa.float32()), "pos_tokens": lists(pos_tokens, pa.int32()),
            "pos_values": lists(pos_values, pa.float32()), "neg_tokens": lists(neg_tokens, pa.int32()),
            "neg_values": lists(neg_values, pa.float32())}
    schema = DERIVED_SCHEMA
    if decoder_norms is not None:
        cols["decoder_norms"] = lists(decoder_norms, pa.float32())
        schema = schema.append(pa.field("decoder_norms", _LIST_F))
    meta = {"sae_fingerprint": fs.info.sae_fingerprint, "logit_note": logit_note or ""}
    t = pa.table(cols, schema=schema.with_metadata({"strata": json.dumps(meta)}))
    data = parquet.to_bytes(t)
    kind = derived_kind(fs.name)
    # Replaced whole under its lease: readers see the old commit, none, or the new one; never a part.
    with artifacts.lease(fs.storage, kind, _DERIVED_NAME, owner="strata features derive") as lease:
        if artifacts.get(fs.storage, kind, _DERIVED_NAME) is not None:
            artifacts.delete(fs.storage, kind, _DERIVED_NAME, lease=lease)
        artifacts.put(fs.storage, kind, _DERIVED_NAME, {_DERIVED_FILE: data}, meta=meta, lease=lease)
    _DERIVED.pop(fs, None)
    return derived_key(fs.name)


_DERIVED: weakref.WeakKeyDictionary[Any, Derived | None] = weakref.WeakKeyDictionary()


def load_derived(fs: FeatureTable) -> Derived | None:
    """The table's derived data, or None when none was computed or it belongs to another SAE commit."""
    if fs in _DERIVED:
        return _DERIVED[fs]
    key = derived_key(fs.name)
    got: Derived | None = None
    art = artifacts.get(fs.storage, derived_kind(fs.name), _DERIVED_NAME)
    if art is not None:
        raw = art.read(_DERIVED_FILE)  # checked against its commit record: damage raises CorruptionError
        try:
            t = parquet.read(raw)
            meta = json.loads((t.schema.metadata or {}).get(b"strata", b"{}"))
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise CorruptionError(f"feature table {fs.name!r}: {key} is not readable derived data ({str(e).splitlines()[0]})") from None
        n = t.num_rows
        if n != fs.d_sae:
            raise CorruptionError(f"feature table {fs.name!r}: {key} has {n} rows for {fs.d_sae} features")
        if meta.get("sae_fingerprint") != fs.info.sae_fingerprint:
            log.warning("feature table %r: %s was computed for another SAE commit; rerun `strata features derive`", fs.name, key)
        else:
            has_logits = t.column("pos_tokens").null_count == 0
            got = Derived(
                sae_fingerprint=meta["sae_fingerprint"], neighbours=_fixed(t.column("neighbours"), n),
                neighbour_cos=_fixed(t.column("neighbour_cos"), n),
                pos_tokens=_fixed(t.column("pos_tokens"), n) if has_logits else None,
                pos_values=_fixed(t.column("pos_values"), n) if has_logits else None,
                neg_tokens=_fixed(t.column("neg_tokens"), n) if has_logits else None,
                neg_values=_fixed(t.column("neg_values"), n) if has_logits else None,
                logit_note=meta.get("logit_note") or None,
                decoder_norms=_fixed(t.column("decoder_norms"), n) if "decoder_norms" in t.column_names else None,
            )
    _DERIVED[fs] = got
    return got


def load_explanations(fs: FeatureTable, path: str | None = None) -> dict[int, str]:
    """Explanations by feature from ``features/NAME/explanations.jsonl`` (or a local file ``path``):
    one JSON object a line with ``feature`` (or ``index``) and ``explanation`` (or ``description``)."""
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            text, where = fh.read(), path
    else:
        key = explanations_key(fs.name)
        if not fs.storage.exists(key):
            return {}
        text, where = fs.storage.read(key).decode("utf-8"), key
    out: dict[int, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            f = int(rec["feature"] if "feature" in rec else rec["index"])
            out[f] = str(rec["explanation"] if "explanation" in rec else rec["description"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{where} line {i}: expected a JSON object with `feature` and `explanation` "
                             '(e.g. {"feature": 3, "explanation": "dates"})') from None
    return out


# -- reading a feature ---------------------------------------------------------------------------


class _Units:
    """Numpy columns of the dataset's unit token tables, a bounded cache per feature table."""

    def __init__(self, fs: FeatureTable) -> None:
        self.fs = fs
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = self.cache.get(u)
        if got is None:
            t = self.fs.dataset.unit_tokens(u)
            got = (t.column("token_id").to_numpy().astype(np.int64), t.column("position").to_numpy().astype(np.int64),
                   t.column("doc_id").to_numpy().astype(np.int64))
            self.cache[u] = got
            if len(self.cache) > _UNIT_CACHE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(u)
        return got


_UNITS: weakref.WeakKeyDictionary[Any, _Units] = weakref.WeakKeyDictionary()


def _units(fs: FeatureTable) -> _Units:
    u = _UNITS.get(fs)
    if u is None:
        u = _UNITS[fs] = _Units(fs)
    return u


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _records(fs: FeatureTable, rows: np.ndarray, values: np.ndarray, act_rows: np.ndarray, act_vals: np.ndarray, *,
             before: int, after: int, compact: bool) -> list[dict[str, Any]]:
    ur, cs = fs.info.unit_rows, fs.dataset.info.context_size
    units = _units(fs)
    out = []
    for r, v in zip(rows.tolist(), values.tolist()):
        u, local = divmod(int(r), ur)
        ids, pos, doc = units.get(u)
        p = int(pos[local])
        lo = max(local - before, local - p)
        hi = min(local + after + 1, local - p + cs, ids.size)
        wrows = np.arange(lo, hi, dtype=np.int64) + u * ur
        j = np.searchsorted(act_rows, wrows)
        j[j >= act_rows.size] = 0
        vals = np.where(act_rows[j] == wrows, act_vals[j], 0.0) if act_rows.size else np.zeros(wrows.size)
        toks = ids[lo:hi].tolist()
        rec: dict[str, Any] = {"row": int(r), "doc": int(doc[local]), "pos": p, "act": _sig(v), "hit": local - lo,
                               "acts": [_sig(a) if a else 0 for a in vals.tolist()]}
        if compact:
            rec["t"] = toks
        else:
            rec["tokens"] = [fs.token_text(t) for t in toks]
        out.append(rec)
    return out


def _histogram(vals: np.ndarray, bins: int) -> dict[str, list]:
    if vals.size == 0:
        return {"edges": [], "counts": []}
    lo = min(0.0, float(vals.min()))
    hi = float(vals.max())
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    return {"edges": [_sig(e) for e in edges.tolist()], "counts": counts.tolist()}


def feature_data(fs: FeatureTable, f: int, *, top: int | None = None, before: int = 8, after: int = 4, bins: int = 40,
                 compact: bool = False, explanations: dict[int, str] | None = None) -> dict[str, Any]:
    """The JSON-able data of feature ``f`` (see the module docstring). ``top``: how many top rows
    (default every stored one); ``compact``: token ids (``t``) instead of token strings, for an
    export that ships the vocabulary once; ``explanations``: a loaded map (default: the store's)."""
    f = fs.check_feature(f)
    st = fs.stats(full=True)  # one row per feature, loaded once per table
    count = int(st.column("count")[f].as_py())
    data: dict[str, Any] = {
        "v": 1, "feature": f, "d_sae": fs.d_sae, "table": fs.name, "sae": fs.info.sae, "dataset": fs.info.dataset, "hook": fs.info.hook,
        "encoded_rows": fs.encoded_rows, "count": count, "density": float(st.column("density")[f].as_py()),
        "mean": _sig(st.column("mean_activation")[f].as_py()), "max": _sig(st.column("max_activation")[f].as_py()),
        "dead": count == 0, "prev": f - 1 if f > 0 else None, "next": f + 1 if f + 1 < fs.d_sae else None,
        "hist": {"edges": [], "counts": []}, "top": [], "sample": [], "quantiles": int((fs.info.sample or {}).get("quantiles", 0) or 0),
        "logits": None, "neighbours": None, "decoder_norms": None, "explanation": None,
    }
    if count:
        acts = fs.activations(f)
        act_rows = acts.column("row").to_numpy()
        act_vals = acts.column("activation").to_numpy()
        data["hist"] = _histogram(act_vals, bins)
        off, cols = fs._top
        a, b = int(off[f]), int(off[f + 1])
        if top is not None:
            b = min(b, a + top)
        data["top"] = _records(fs, cols["row"][a:b], cols["value"][a:b], act_rows, act_vals, before=before, after=after, compact=compact)
        off, cols = fs._sample
        a, b = int(off[f]), int(off[f + 1])
        samp = _records(fs, cols["row"][a:b], cols["value"][a:b], act_rows, act_vals, before=before, after=after, compact=compact)
        for rec, q in zip(samp, cols["quantile"][a:b].tolist()):
            rec["q"] = int(q)
        data["sample"] = samp
    d = load_derived(fs)
    if d is not None:
        nb = [(int(g), _sig(c)) for g, c in zip(d.neighbours[f].tolist(), d.neighbour_cos[f].tolist()) if g >= 0]
        data["neighbours"] = [list(x) for x in nb]
        if d.pos_tokens is not None and d.neg_tokens is not None and d.pos_values is not None and d.neg_values is not None:
            data["logits"] = {
                "pos": [[fs.token_text(int(t)), _sig(v)] for t, v in zip(d.pos_tokens[f].tolist(), d.pos_values[f].tolist())],
                "neg": [[fs.token_text(int(t)), _sig(v)] for t, v in zip(d.neg_tokens[f].tolist(), d.neg_values[f].tolist())],
                "note": d.logit_note or "",
            }
        elif d.logit_note:
            data["logits_note"] = d.logit_note
        if d.decoder_norms is not None:
            data["decoder_norms"] = [_sig(x) for x in d.decoder_norms[f].tolist()]
    if data["decoder_norms"] is None and "decoder_norms" in st.column_names:  # a multi-source dictionary's stats column
        data["decoder_norms"] = [_sig(x) for x in (st.column("decoder_norms")[f].as_py() or [])] or None
    ex = explanations if explanations is not None else _explanations(fs)
    data["explanation"] = ex.get(f)
    return data


_EXPL: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _explanations(fs: FeatureTable) -> dict[int, str]:
    got = _EXPL.get(fs)
    if got is None:
        got = _EXPL[fs] = load_explanations(fs)
    return got


def index_data(fs: FeatureTable, *, explanations: dict[int, str] | None = None) -> dict[str, Any]:
    """The index's data: one entry per feature in column arrays (feature order), dead and dense counted."""
    st = fs.stats()
    count = st.column("count").to_numpy()
    dens = st.column("density").to_numpy()
    ex = explanations if explanations is not None else _explanations(fs)
    return {
        "v": 1, "table": fs.name, "sae": fs.info.sae, "dataset": fs.info.dataset, "hook": fs.info.hook, "d_sae": fs.d_sae,
        "encoded_rows": fs.encoded_rows, "dense_threshold": DENSE, "count": count.tolist(),
        "density": [float(f"{x:.4g}") for x in dens.tolist()],
        "mean": [float(f"{x:.4g}") for x in st.column("mean_activation").to_numpy().tolist()],
        "max": [float(f"{x:.4g}") for x in st.column("max_activation").to_numpy().tolist()],
        "dead": np.flatnonzero(count == 0).tolist(), "explanations": {str(k): v for k, v in sorted(ex.items())},
    }


def _norm_token(text: str) -> str:
    return text.strip().lower()


def token_index(fs: FeatureTable) -> dict[str, list[list[int]]]:
    """Token search: for each token text (stripped, lower-cased), the features whose stored top rows
    fire on it, as ``[feature, rows]`` pairs, most rows first (ties: lower feature first)."""
    off, cols = fs._top
    rows = cols["row"]
    feat = np.repeat(np.arange(fs.d_sae, dtype=np.int64), np.diff(off))
    ur = fs.info.unit_rows
    tok = np.empty(rows.size, np.int64)
    unit = rows // ur
    order = np.argsort(unit, kind="stable")
    bounds = np.searchsorted(unit[order], np.unique(unit))
    for a, b in zip(bounds.tolist(), [*bounds[1:].tolist(), rows.size]):
        sel = order[a:b]
        u = int(unit[sel[0]])
        ids = fs.dataset.unit_tokens(u).column("token_id").to_numpy()
        tok[sel] = ids[rows[sel] - u * ur]
    pairs, n = np.unique(np.stack([tok, feat], axis=1), axis=0, return_counts=True)
    out: dict[str, list[list[int]]] = {}
    for (t, f), c in zip(pairs.tolist(), n.tolist()):
        out.setdefault(_norm_token(fs.token_text(int(t))), []).append([int(f), int(c)])
    for v in out.values():
        v.sort(key=lambda x: (-x[1], x[0]))
    return out


# -- rendering -----------------------------------------------------------------------------------


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>``, ``&`` and the JS line separators escaped."""
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _fallback(data: dict[str, Any]) -> str:
    """What shows before (or without) the script: the feature, its counts and top tokens, escaped."""
    toks = []
    for r in data.get("top", [])[:10]:
        if "tokens" in r:
            toks.append(r["tokens"][r["hit"]])
    top = ", ".join(html.escape(t) for t in dict.fromkeys(toks))
    return (f'<p class="sv-fallback">Feature {int(data["feature"])} of {html.escape(str(data["table"]))}: count {int(data["count"])}, '
            f'density {float(data["density"]):.4g}{"; top tokens: " + top if top else ""}</p>')


def feature_html(data: dict[str, Any], *, standalone: bool = False) -> str:
    """A self-contained HTML fragment rendering ``data`` (from :func:`feature_data`): its own style,
    the data as JSON and the viewer script (defined once per page). ``standalone``: a whole document."""
    uid = f"sv-{int(data['feature'])}-{id(data):x}"
    frag = (f'<div class="strata-view" id="{uid}">{_fallback(data)}</div>'
            f"<style>{VIEWER_CSS}</style>"
            f'<script type="application/json" id="{uid}-data">{json_for_script(data)}</script>'
            f"<script>{VIEWER_JS}</script>"
            f'<script>StrataView.mountFeature("{uid}")</script>')
    if not standalone:
        return frag
    title = html.escape(f"{data['table']}: feature {int(data['feature'])}")
    return f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n<body>\n{frag}\n</body></html>\n'


def app_html(title: str, provider: str) -> str:
    """The whole-page app (index and feature pages, routed on the URL's hash) over a provider
    expression, e.g. ``StrataView.served("")`` or ``StrataView.static("", 64)``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{VIEWER_CSS}</style></head>\n<body>\n"
            '<div class="strata-view" id="app"><p class="sv-muted">loading\u2026</p></div>\n'
            f"<script>{VIEWER_JS}</script>\n<script>StrataView.app(document.getElementById(\"app\"), {provider});</script>\n"
            "</body></html>\n")
