"""HTML summaries (``_repr_html_``) of the store, an activation dataset, an SAE, a feature table
and an analysis result: xarray-style collapsible sections for identity and lineage, hooks,
bytes on disk and status, an SAE's metrics and a feature table's density summary.

They read metadata only (manifests, commit records or the commit index, lineage and metrics
JSON, a feature table's merged statistics, an analysis's small results table), never
activations: a dataset of 100k units summarises in milliseconds. The objects come in
duck-typed (this module imports none of their classes: they import it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from operator import attrgetter
from typing import Any

import numpy as np

from strata.store.datasets.shards import shard_layout
from strata.store.datasets.verify import last_outcome
from strata.store.errors import StrataError
from strata.store.views.html import arrow_table, esc, fmt_bytes, kv_table, page, rows_table, section, status
from strata.store.views.info import identity_pairs

__all__ = ["store_html", "dataset_html", "sae_html", "features_html", "analysis_html", "density_summary"]


# -- the store -----------------------------------------------------------------------------------


def store_html(s: Any) -> str:
    """The store's datasets (from the catalog), SAEs, feature tables and analyses."""
    cat = s.catalog()
    rows = [(r["name"], r["model"], r["revision"][:12] if r["revision"] else None, len(r["hooks"] or []),
             f"{r['committed_units']:,}/{r['num_units']:,}", r["rows"], "complete" if r["complete"] else "in progress")
            for r in cat.to_pylist()]
    saes, tables, analyses = s.saes(), s.feature_tables(), s.analyses()
    secs = [
        section("datasets", rows_table(["name", "model", "revision", "hooks", "units", "rows", "status"], rows), count=len(rows), open=True),
        section("SAEs", kv_table((n, "") for n in saes), count=len(saes), open=bool(saes)),
        section("feature tables", kv_table((n, "") for n in tables), count=len(tables), open=bool(tables)),
        section("analyses", kv_table((n, "") for n in analyses), count=len(analyses), open=bool(analyses)),
    ]
    sub = f"{len(rows)} dataset(s), {len(saes)} SAE(s), {len(tables)} feature table(s), {len(analyses)} analysis result(s)"
    return page("Store", s.uri, esc(sub), secs)


# -- activation datasets ------------------------------------------------------------------------


_ROWS = attrgetter("rows")


def _hook_counts(ds: Any) -> tuple[list[tuple[str, int, int, int]], int, int]:
    """Per hook ``(hook, units, rows, bytes)`` and the token table's ``(units, rows)``, from the
    commit records (or the commit index) alone: set and sum operations, fast on 100k units."""
    records = ds.commits.records
    toks = records.get(None, {})
    out = []
    for h in ds.hooks:
        recs = records.get(h, {})
        # A hook's unit counts with its token table (the writer commits that first): usually all do.
        held = recs.values() if recs.keys() <= toks.keys() else [recs[u] for u in recs.keys() & toks.keys()]
        by_rows = Counter(map(_ROWS, held))  # units by row count: few distinct counts (the last unit may be short)
        sl = shard_layout(ds.info, h)
        out.append((h, len(held), sum(r * n for r, n in by_rows.items()), sum(sl.shard_nbytes(r) * n for r, n in by_rows.items())))
    return out, len(toks), sum(map(_ROWS, toks.values()))


def _datasetstatus(ds: Any, hooks: list[tuple[str, int, int, int]], tok_units: int) -> tuple[str, str]:
    n = ds.info.num_units
    last = last_outcome(ds)
    if ds.damaged or (last is not None and not last.get("ok") and last.get("problems")):
        where = f"{len(ds.damaged)} damaged commit record(s)" if ds.damaged else f"{len(last.get('problems') or [])} problem(s)"  # type: ignore[union-attr]
        at = f" at the last verify ({last.get('at', '?')})" if last is not None and not ds.damaged else ""
        return status(f"damaged{at}: {where}", "bad") + esc("; `strata verify --repair` removes what is damaged"), "damaged"
    done = min([tok_units, *(u for _, u, _, _ in hooks)])
    verified = "never verified" if last is None else f"last verified {last.get('at', '?')}: {'OK' if last.get('ok') else 'incomplete'}"
    if done == n:
        return status("complete", "ok") + esc(f" ({verified})"), "complete"
    return status(f"in progress: {done:,}/{n:,} units", "warn") + esc(f" ({verified})"), "in progress"


def dataset_html(ds: Any) -> str:
    """An activation dataset: identity and lineage, hooks (d, dtype, rows, committed/total
    units), bytes on disk and status."""
    info = ds.info
    hooks, tok_units, tok_rows = _hook_counts(ds)
    status, _ = _datasetstatus(ds, hooks, tok_units)
    n = info.num_units
    hook_rows = [(h, info.hooks[h].d, info.dtype, rows, f"{units:,}/{n:,}", fmt_bytes(b)) for h, units, rows, b in hooks]
    total = sum(b for *_, b in hooks)
    storage = kv_table([("activation shards", fmt_bytes(total)), ("token table", f"{tok_units:,}/{n:,} units, {tok_rows:,} rows"),
                        ("store", ds.store.uri)])
    meaning = info.meta.get("hook_meanings") or info.meta.get("hook_modules")
    secs = [
        section("identity and lineage", kv_table(identity_pairs(info)), open=True),
        section("hooks", rows_table(["hook", "d", "dtype", "rows", "units", "on disk"], hook_rows), count=len(hooks), open=len(hooks) <= 12),
        section("storage", storage),
    ]
    if isinstance(meaning, Mapping) and meaning:
        secs.append(section("hook modules", kv_table(sorted(meaning.items()))))
    sub = f"{status}{esc(f' · {len(hooks)} hook(s) · {tok_rows:,} token rows · {fmt_bytes(total)}')}"
    return page("ActivationDataset", ds.name, sub, secs)



# -- SAEs, feature tables, analyses ------------------------------------------------------------------

_METRICS = ("fvu", "mse", "l0", "dead_fraction", "dead_features", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_delta",
            "ce_recovered", "ce_skipped")


def _files_bytes(files: Iterable[Any]) -> int:
    return int(sum(getattr(f, "nbytes", 0) or 0 for f in files))


def sae_html(h: Any) -> str:
    """An SAE: lineage (dataset and its fingerprint, hook, model), architecture, metrics (FVU,
    L0, dead fraction, CE), files and bytes."""
    lin, cfg, metrics = h.lineage, h.cfg, h.metrics
    stale = h.stale_inputs
    model = {k: lin.get(k) for k in ("model", "revision")}
    if not all(model.values()) and isinstance(lin.get("dataset"), str) and hasattr(h.store, "manifest"):
        try:  # the dataset's manifest (metadata) names the model the SAE's activations came from
            meta = h.store.manifest(lin["dataset"]).meta
            model = {k: model[k] or meta.get(k) for k in model}
        except StrataError:
            pass  # the dataset is gone: stale_inputs says so
    ident = [("dataset", lin.get("dataset")), ("dataset fingerprint", lin.get("dataset_fingerprint") or lin.get("fingerprint")),
             ("hook", lin.get("hook")), ("hook out", lin.get("hook_out")), ("model", model["model"] or cfg.get("model_name")),
             ("revision", model["revision"]),
             ("trained on", f"{len(lin.get('units') or [])} unit(s)" if "units" in lin else None),
             ("held out", f"{len(lin.get('holdout_units') or [])} unit(s)" if "holdout_units" in lin else None),
             ("committed", h.artifact.record.committed_at)]
    arch = [(k, cfg.get(k)) for k in ("architecture", "d_in", "d_sae", "k", "dtype", "hook_name", "apply_b_dec_to_input") if k in cfg]
    shown = [(k, metrics[k]) for k in _METRICS if k in metrics]
    other = [(k, v) for k, v in sorted(lin.items()) if k not in {"dataset", "hook", "hook_out", "model", "revision", "units", "holdout_units"}]
    files = [(f.key.rsplit("/", 1)[-1], fmt_bytes(f.nbytes)) for f in h.artifact.record.files]
    total = _files_bytes(h.artifact.record.files)
    secs = [section("identity and lineage", kv_table(ident), open=True),
            section("architecture", kv_table(arch), open=True),
            section("metrics (held-out units)", kv_table(shown) if shown else esc("not evaluated"), count=len(shown) or None, open=True),
            section("training", kv_table(other), count=len(other)),
            section("files", rows_table(["file", "size"], files), count=len(files))]
    bits = [f"{cfg.get('architecture', '?')} {cfg.get('d_in', '?')} -> {cfg.get('d_sae', '?')}"]
    bits += [f"{k} {metrics[k]:.4g}" for k in ("fvu", "l0", "dead_fraction") if isinstance(metrics.get(k), (int, float))]
    sub = esc(" · ".join([*bits, fmt_bytes(total)]))
    if stale:
        sub = status("stale: ", "bad") + esc(stale) + "<br>" + sub
    return page("SAE", h.name, sub, secs)


_DECADES = (-7, -6, -5, -4, -3, -2, -1, 0)


def density_summary(fs: Any) -> dict[str, Any]:
    """A feature table's density summary from its merged statistics: dead and alive features,
    quantiles of density, mean L0, and features per decade of density."""
    st = fs.stats()
    density = st.column("density").to_numpy()
    count = st.column("count").to_numpy()
    alive = density[count > 0]
    q = np.quantile(alive, [0.0, 0.25, 0.5, 0.75, 1.0]) if alive.size else np.zeros(5)
    rows = fs.encoded_rows
    logd = np.log10(alive) if alive.size else alive
    edges = np.array(_DECADES, dtype=np.float64)
    per = np.histogram(np.clip(logd, edges[0], edges[-1] - 1e-12), bins=edges)[0] if alive.size else np.zeros(len(edges) - 1, int)
    return {"features": int(density.size), "dead": int((count == 0).sum()), "alive": int(alive.size),
            "dead_fraction": float((count == 0).mean()) if count.size else 0.0, "encoded_rows": rows,
            "mean_l0": float(count.sum()) / rows if rows else 0.0, "density_quantiles": [float(x) for x in q],
            "decades": [(f"1e{a}..1e{b}", int(n)) for a, b, n in zip(_DECADES[:-1], _DECADES[1:], per)]}


def features_html(fs: Any) -> str:
    """A feature table: its SAE and dataset (with their fingerprints), d_sae, what is encoded and
    merged, and the density summary."""
    info = fs.info
    ident = [("SAE", info.sae), ("SAE fingerprint", info.sae_fingerprint), ("dataset", info.dataset),
             ("dataset fingerprint", info.dataset_fingerprint), ("hook", info.hook), ("d_in", info.d_in), ("d_sae", info.d_sae),
             ("top rows kept", info.top_k), ("special rows skipped", info.skip_special), ("created", info.created_at),
             ("updated", info.updated_at)]
    units, merged = fs.units, fs.merged_units
    state = status("stale: ", "bad") + esc(fs.stale_inputs) if fs.stale_inputs else (
        status(f"in progress: {len(merged):,}/{len(units):,} encoded units merged", "warn") if fs.stale or not merged else
        status("merged", "ok") + esc(f": {len(merged):,} unit(s)"))
    if fs.damaged:
        state = status(f"damaged: {len(fs.damaged)} unit record(s)", "bad") + " · " + state
    files = [r.file for r in fs._records.values()] + (list(fs._gen.files.values()) if fs._gen is not None else [])  # noqa: SLF001
    secs = [section("identity and lineage", kv_table(ident), open=True)]
    sub = f"{state}{esc(f' · d_sae {info.d_sae:,} · {fmt_bytes(_files_bytes(files))}')}"
    if merged:
        d = density_summary(fs)
        q = d["density_quantiles"]
        top = max([n for _, n in d["decades"]] + [1])
        bars = [(lab, n, f'<span class="strata-bar" style="width:{int(160 * n / top)}px"></span>') for lab, n in d["decades"]]
        secs.append(section("density", kv_table([
            ("encoded rows", d["encoded_rows"]), ("alive features", d["alive"]), ("dead features", f"{d['dead']:,} ({d['dead_fraction']:.1%})"),
            ("mean L0", d["mean_l0"]), ("density min / 25% / median / 75% / max", " / ".join(f"{x:.3g}" for x in q))])
            + rows_table(["density", "features", ""], bars, html_cols=(2,)), open=True))
        sub += esc(f" · {d['dead_fraction']:.1%} dead · mean L0 {d['mean_l0']:.3g}")
    secs.append(section("storage", kv_table([("units encoded", len(units)), ("units merged", len(merged)), ("files", len(files)),
                                             ("on disk", fmt_bytes(_files_bytes(files)))])))
    return page("FeatureTable", fs.name, sub, secs)


def analysis_html(a: Any) -> str:
    """An analysis result: kind, inputs (datasets and SAEs with their versions), plots, files and
    the first rows of its results."""
    try:
        meta = a.meta
    except StrataError as e:
        meta = {"note": str(e)}
    inputs = [i for i in meta.get("inputs") or [] if isinstance(i, dict)]
    in_rows = [(i.get("dataset") or i.get("sae") or "?", i.get("hook") or i.get("hooks"),
                i.get("fingerprint") or i.get("dataset_fingerprint") or i.get("committed_at")) for i in inputs]
    files = [(f.key.rsplit("/", 1)[-1], fmt_bytes(f.nbytes)) for f in a.artifact.record.files]
    plots = [f for f in a.files if f.endswith(".png")]
    secs = [section("identity", kv_table([("kind", meta.get("kind")), ("committed", a.artifact.record.committed_at),
                                          ("spec", meta.get("spec")), ("note", meta.get("note"))]), open=True),
            section("inputs", rows_table(["input", "hook(s)", "version"], in_rows), count=len(in_rows), open=True)]
    if "results.parquet" in a.files:
        t = a.table()
        secs.append(section("results", arrow_table(t, max_rows=12), count=f"{t.num_rows:,} rows", open=True))
    secs.append(section("files", rows_table(["file", "size"], files), count=len(files)))
    stale = a.stale_inputs
    sub = esc(f"{meta.get('kind', '?')} · plots: {', '.join(plots) if plots else 'none'} (.plot(" + ("metric" if len(plots) > 1 else "") + "))")
    if stale:
        sub = status("stale: ", "bad") + esc(stale) + "<br>" + sub
    return page("Analysis", a.name, sub, secs)


