"""A document's tokens coloured by one activation, as circuitsvis does
(:meth:`~strata.store.datasets.reader.ActivationDataset.show_tokens`): a neuron of a hook, or a
feature of an SAE (read from its feature table, or encoded by the SAE itself)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from strata.store.errors import HookNotFoundError, UnknownDocumentError
from strata.store.views.html import CSS, HTML, ViewError, esc, shade_tokens

__all__ = ["TokenView", "token_view"]


class TokenView(HTML):
    """A document's tokens coloured by one activation (what ``ds.show_tokens`` returns):
    ``.tokens`` (texts), ``.values`` (numpy), ``.rows`` (global token rows), ``.special`` (BOS,
    separators: a document that spans contexts has the next context's BOS among its rows)."""

    def __init__(self, title: str, texts: list[str], values: np.ndarray, rows: np.ndarray, special: np.ndarray) -> None:
        titles = [f"row {r} · {v:.4g}" for r, v in zip(rows, values)]
        body = shade_tokens(texts, values, special=special, titles=titles)
        top = float(np.abs(values).max()) if values.size else 0.0
        page = f'{CSS}<div class="strata-repr"><div class="strata-head">{esc(title)}</div>' \
               f'<div class="strata-sub">{esc(f"{len(texts)} tokens · max |value| {top:.4g}")}</div>{body}</div>'
        super().__init__(page, f"TokenView({title!r}, tokens={len(texts)}, max={top:.4g})")
        self.tokens, self.values, self.rows, self.special = texts, values, rows, special


def _doc_rows(ds: Any, hook: str, doc_id: int) -> np.ndarray:
    """Global token rows of one document (an unknown one: one line naming the valid ids)."""
    try:
        found = ds._rows_of_docs(hook, [doc_id])  # noqa: SLF001 - the reader's own lookup, shared
    except UnknownDocumentError:
        docs = ds.docs()
        ids = docs.column("doc_id").to_numpy() if docs is not None and docs.num_rows else ds.tokens(hook).column("doc_id").to_numpy()
        span = f"{int(ids.min())}..{int(ids.max())}" if ids.size else "none"
        raise UnknownDocumentError(
            f"dataset {ds.name!r} has no document {doc_id!r}; its document ids are {span} ({np.unique(ids).size:,} documents)"
        ) from None
    if isinstance(found, np.ndarray):
        return np.sort(found.astype(np.int64))
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in found]) if found else np.zeros(0, np.int64)


def _doc_tokens(ds: Any, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Decoded texts and special flags of global token rows."""
    ur = ds.info.unit_rows
    ids, special = np.empty(rows.size, np.int64), np.empty(rows.size, bool)
    for u in np.unique(rows // ur):
        sel = np.flatnonzero(rows // ur == u)
        t = ds.unit_tokens(int(u))
        local = pa.array(rows[sel] - u * ur)
        ids[sel] = t.column("token_id").take(local).to_numpy()
        special[sel] = t.column("special").take(local).to_numpy(zero_copy_only=False)
    image = ds.info.meta.get("image")
    tok = ds.tokenizer() if image is None else None
    grid = ((image or {}).get("layout") or {}).get("grid") or [0, 0]
    cache: dict[int, str] = {}
    texts = []
    for i in ids.tolist():
        if i not in cache:
            cache[i] = _patch_text(i, grid) if image is not None else tok.decode([i], skip_special_tokens=False) if tok is not None else f"<{i}>"
        texts.append(cache[i])
    return texts, special


def _patch_text(i: int, grid: list[int]) -> str:
    """An image dataset's token: CLS is -1, register r is -2-r, patches count row-major (as the feature table names them)."""
    if i == -1:
        return "<CLS> "
    if i < -1:
        return f"<REG {-2 - i}> "
    return f"<patch {i} ({i // grid[1]}, {i % grid[1]})> " if grid[1] else f"<patch {i}> "


def token_view(ds: Any, doc_id: int, *, hook: str | None = None, neuron: int | None = None, sae: str | None = None,
               feature: int | None = None) -> TokenView:
    """What :meth:`ActivationDataset.show_tokens` returns: ``neuron`` of ``hook``, or ``feature``
    of ``sae`` (from the feature table of that name when it encodes this dataset, else the SAE
    encodes the document's activations)."""
    if (neuron is None) == (feature is None) or (feature is not None and sae is None):
        raise ViewError("show_tokens needs either hook=..., neuron=N or sae=NAME, feature=F")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (int, np.integer)):
        raise TypeError(f"a document id must be an int, got {doc_id!r}")
    if neuron is not None:
        if hook is None:
            raise ViewError(f"show_tokens(neuron=...) needs hook=...; dataset {ds.name!r} has: {', '.join(ds.hooks)}")
        ds.check_hook(hook)
        d = ds.info.hooks[hook].d
        if isinstance(neuron, bool) or not isinstance(neuron, (int, np.integer)) or not 0 <= int(neuron) < d:
            raise ViewError(f"neuron {neuron!r} is out of range: hook {hook!r} of dataset {ds.name!r} has neurons 0..{d - 1}")
        rows = _doc_rows(ds, hook, int(doc_id))
        values = np.asarray(ds.read(hook, rows), dtype=np.float32)[:, int(neuron)]
        title = f"{ds.name} · document {int(doc_id)} · {hook} neuron {int(neuron)}"
    else:
        values, rows, what = _feature_values(ds, int(doc_id), str(sae), feature, hook)
        title = f"{ds.name} · document {int(doc_id)} · {what}"
    texts, special = _doc_tokens(ds, rows)
    return TokenView(title, texts, values, rows, special)


def _feature_values(ds: Any, doc_id: int, sae: str, feature: Any, hook: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    st = ds.store  # a Store: the views reach other artifacts through it (their modules import this one)
    if sae in st.feature_tables():
        fs = st.features(sae)
        if fs.info.dataset == ds.name and (hook is None or hook == fs.info.hook):
            f = fs.check_feature(feature)
            rows = _doc_rows(ds, fs.info.hook, doc_id)
            fired = fs.activations(f)
            at = fired.column("row").to_numpy()
            vals = fired.column("activation").to_numpy()
            i = np.minimum(np.searchsorted(at, rows), max(at.size - 1, 0))
            hit = at[i] == rows if at.size else np.zeros(rows.size, bool)
            out = np.zeros(rows.size, np.float32)
            out[hit] = vals[i[hit]]
            return out, rows, f"feature {f} of {sae} ({fs.info.hook})"
    h = st.sae(sae)
    lin = h.lineage
    hk = hook or lin.get("hook")
    if hk is None:
        raise ViewError(f"SAE {sae!r} names no hook in its lineage: pass hook=...; dataset {ds.name!r} has: {', '.join(ds.hooks)}")
    if hk not in ds.info.hooks:
        raise HookNotFoundError(f"dataset {ds.name!r} has no hook {hk!r} (SAE {sae!r}'s); it has: {', '.join(ds.hooks)}")
    d_sae = int(h.cfg.get("d_sae", 0))
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < d_sae:
        raise ViewError(f"feature {feature!r} is out of range: SAE {sae!r} has features 0..{d_sae - 1} (d_sae={d_sae})")
    import torch  # lazy: only encoding with an SAE needs torch

    rows = _doc_rows(ds, hk, doc_id)
    model = h.load()
    with torch.no_grad():
        x = ds.read(hk, rows, as_="torch", dtype=torch.float32)
        vals = model.encode(x.to(next(model.parameters()).dtype))[:, int(feature)].float().numpy()
    return vals, rows, f"feature {int(feature)} of SAE {sae} ({hk}, encoded now)"


