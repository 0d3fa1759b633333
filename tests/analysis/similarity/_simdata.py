"""Small deterministic stores for the analysis tests: synthetic datasets with planted structure,
written through the store's own writer (token tables with character spans, document tables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from strata import store

CTX = 16
UNIT_CONTEXTS = 4


def pack(doc_tokens: list[list[tuple[int, int]]], *, context_size: int = CTX) -> dict[str, np.ndarray]:
    """Concat packing of documents given as lists of character spans: BOS first in every context,
    a separator after each document (both special, spans -1), the tail padded (doc -1, special).
    Returns flat per-row arrays."""
    cols: dict[str, list] = {k: [] for k in ("doc_id", "doc_position", "special", "char_start", "char_end")}
    body: list[tuple[int, int, bool, int, int]] = []
    for d, spans in enumerate(doc_tokens):
        body += [(d, p, False, a, b) for p, (a, b) in enumerate(spans)]
        body.append((d, len(spans), True, -1, -1))  # separator
    per = context_size - 1
    n_ctx = -(-len(body) // per)
    body += [(-1, -1, True, -1, -1)] * (n_ctx * per - len(body))
    for c in range(n_ctx):
        rows = [(body[c * per][0], -1, True, -1, -1), *body[c * per : (c + 1) * per]]
        for d, p, sp, a, b in rows:
            for k, v in zip(cols, (d, p, sp, a, b)):
                cols[k].append(v)
    return {k: np.asarray(v) for k, v in cols.items()}


def write_dataset(s: store.Store, name: str, flat: dict[str, np.ndarray], acts: dict[str, np.ndarray], *,
                  meta: dict | None = None, char_spans: bool = True, docs: pa.Table | None = None,
                  unit_contexts: int = UNIT_CONTEXTS, dtype: str = "float32") -> store.ActivationDataset:
    """Write rows (``flat`` token columns, ``acts`` per hook, row-aligned) as a dataset; the last
    unit may be short. ``flat["token_id"]`` is optional (default: row % 97)."""
    n = flat["doc_id"].size
    ur = unit_contexts * CTX
    units = -(-n // ur)
    hooks = {h: a.shape[1] for h, a in acts.items()}
    w = s.create_dataset(name, hooks=hooks, context_size=CTX, dtype=dtype, num_units=units, unit_contexts=unit_contexts,
                         meta=meta or {"model": "synthetic", "revision": "r0"})
    for u in range(units):
        r = np.arange(u * ur, min(n, (u + 1) * ur))
        cols = {"context_id": r // CTX, "position": (r % CTX).astype(np.int32), "doc_id": flat["doc_id"][r],
                "doc_position": flat["doc_position"][r].astype(np.int32),
                "token_id": (flat["token_id"][r] if "token_id" in flat else r % 97).astype(np.int32),
                "special": flat["special"][r].astype(bool)}
        if char_spans:
            cols["char_start"] = flat["char_start"][r].astype(np.int32)
            cols["char_end"] = flat["char_end"][r].astype(np.int32)
        w.write_unit(u, tokens=pa.table(cols), acts={h: a[r] for h, a in acts.items()})
    if docs is not None:
        w.write_documents(docs)
    return s.dataset(name)


def doc_table(flat: dict[str, np.ndarray], **fields: list) -> pa.Table:
    """The document index of packed rows (each document's row span), with extra fields."""
    ids = np.unique(flat["doc_id"][flat["doc_id"] >= 0])
    rows = np.arange(flat["doc_id"].size)
    start = np.array([rows[flat["doc_id"] == d].min() for d in ids])
    end = np.array([rows[flat["doc_id"] == d].max() + 1 for d in ids])
    t = pa.table({"doc_id": ids, "row_start": start, "row_end": end, "dropped_tokens": np.zeros(ids.size, np.int64)})
    for k, v in fields.items():
        t = t.append_column(k, pa.array(v))
    return t


def texts(n_docs: int, *, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "be", "gamma", "delta", "epsilon", "z", "eta", "theta", "io", "kappa", "lambda", "mu"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(n_docs)]


def char_spans(text: str) -> list[tuple[int, int]]:
    """One token per character."""
    return [(i, i + 1) for i in range(len(text))]


def word_spans(text: str) -> list[tuple[int, int]]:
    """One token per word, the space before a word inside its token (as byte-level BPE does)."""
    out, start = [], 0
    for i, ch in enumerate(text + " "):
        if ch == " " and i > start:
            out.append((start, i))
            start = i
    return out


def planted_pair(n: int, d1: int, d2: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Related representations with anisotropic spectra: Y = X A + noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d1)) * np.geomspace(3.0, 0.3, d1) + 0.5
    y = x @ rng.standard_normal((d1, d2)) / np.sqrt(d1) + 0.6 * rng.standard_normal((n, d2))
    return x.astype(np.float32), y.astype(np.float32)


def two_hook_dataset(root: Path, name: str = "ds", *, n_docs: int = 30, d1: int = 6, d2: int = 5, seed: int = 0,
                     dtype: str = "float32") -> store.ActivationDataset:
    """One dataset, two related hooks, documents of words packed with BOS and separators."""
    s = store.open(root)
    flat = pack([word_spans(t) for t in texts(n_docs, seed=seed)])
    x, y = planted_pair(flat["doc_id"].size, d1, d2, seed=seed)
    return write_dataset(s, name, flat, {"blocks.0.hook_resid_post": x, "blocks.1.hook_resid_post": y},
                         docs=doc_table(flat), dtype=dtype)


def stacked_rows(ds: store.ActivationDataset, hook: str, rows: np.ndarray) -> np.ndarray:
    """Rows read back through the plain reader, as float64 (the independent path of the tests)."""
    return np.asarray(ds.read(hook), dtype=np.float64)[rows]
