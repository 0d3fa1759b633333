"""A small store holding one artifact of every kind, each in its real format, written with the
store APIs the jobs use (no Ray, no training): a dataset with a tokenizer, a document index and a
commit index; a sae-lens SAE folder; a feature table with a merged generation; an analysis."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from strata import store
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset, write_table
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts, parquet
from strata.store.errors import CorruptionError
from strata.store.saes.handles import SAES

H = "blocks.0.hook_resid_post"
D, D_SAE, CTX, UC, UNITS = 8, 16, 16, 4, 2
UR = CTX * UC
NAMES = {"dataset": "ds", "sae": "sae1", "features": "ft", "analysis": "cmp"}


def _entries(unit: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng([5, unit])
    z = np.round(rng.exponential(1.0, (rows, D_SAE)), 2).astype(np.float32) * (rng.random((rows, D_SAE)) < 0.3)
    z[np.arange(rows) % CTX == 0] = 0
    r, f = np.nonzero(z)
    return r + unit * UR, f, z[r, f], int(np.sum(np.arange(rows) % CTX != 0))


def build(root: Path) -> store.Store:
    s = store.open(root)
    w = synthetic_dataset(s, "ds", hook=H, d=D, units=UNITS, unit_contexts=UC, context_size=CTX)
    ctx = np.arange(UNITS * UC)
    w.write_documents(pa.table({"doc_id": ctx, "row_start": ctx * CTX, "row_end": ctx * CTX + CTX, "dropped_tokens": np.zeros_like(ctx)}))
    w.compact_commits()

    sae = random_topk_sae(D, D_SAE, k=4, seed=1)
    folder = root.parent / "sae-src"
    sae.save_model(folder)
    lineage = {"dataset": "ds", "hook": H, "units": [0], "holdout_units": [1]}
    files: dict[str, Any] = {p.name: p for p in sorted(folder.iterdir())}
    files["lineage.json"] = json.dumps(lineage).encode()
    files["metrics.json"] = json.dumps({"mse": 0.25}).encode()
    with s.artifact_lease(SAES, "sae1", owner="test") as lease:
        artifacts.put(s.storage, SAES, "sae1", files, meta={"config_hash": "x"}, lease=lease)

    ds = s.dataset("ds")
    rows = {u: ds.record(H, u).rows for u in range(UNITS)}
    write_table(s, "ft", dataset="ds", hook=H, d_sae=D_SAE, units=list(range(UNITS)), entries=lambda u: _entries(u, rows[u]),
                top_k=4, block_features=8)

    results = pa.table({"metric": ["linear_cka", "svcca"], "value": [0.75, 0.5]})
    with s.artifact_lease(ANALYSES, "cmp", owner="test") as lease:
        artifacts.put(s.storage, ANALYSES, "cmp", {"results.parquet": parquet.to_bytes(results),
                                                    "provenance.json": json.dumps({"inputs": ["ds"]}).encode()},
                      meta={"kind": "compare"}, lease=lease)
    return s


def kind_of(key: str) -> str | None:
    """The artifact kind a file of the store belongs to (None: the store's own files)."""
    for kind, prefix in (("dataset", "datasets/ds/"), ("sae", "saes/sae1/"), ("features", "features/ft/"), ("analysis", "analyses/cmp/")):
        if key.startswith(prefix):
            return kind
    return None


def artifact_files(root: Path) -> dict[str, list[str]]:
    """Every file of every artifact, by kind: all but leases and verify's own outcome file."""
    out: dict[str, list[str]] = {k: [] for k in NAMES}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        kind = kind_of(key)
        if p.is_file() and kind and "/lease/" not in key and not key.endswith("/verify.json"):
            out[kind].append(key)
    return out


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for x in parts:
        h.update(x.tobytes() if isinstance(x, np.ndarray) else repr(x).encode())
    return h.hexdigest()


def read_all(s: store.Store, kind: str) -> str:
    """Everything a user can read of the artifact of ``kind``, as one digest: every read path
    that touches its files (and every file through a checked read)."""
    if kind == "dataset":
        ds = s.dataset("ds")
        tok = ds.tokenizer()
        return _digest(ds.read(H), ds.tokens().to_pydict(), ds.docs().to_pydict(), tok.to_str() if tok else None,
                       ds.read(H, docs=[3]), ds.committed_units(H), ds.num_rows(H))
    if kind == "sae":
        h = s.sae("sae1")
        sae = h.load()
        return _digest({f: h.artifact.read(f) for f in h.files}, h.lineage, h.metrics, sae.W_enc.detach().numpy())
    if kind == "features":
        fs = s.features("ft")
        parts: list[Any] = [fs.stats(full=True).to_pydict(), fs.latents(rows=slice(None), dense=True).numpy(), fs.info.unit_rows]
        for f in range(D_SAE):
            parts += [fs.activations(f).to_pydict(), fs.top(f, k=4).to_pydict(), fs.sample(f).to_pydict(), fs.histogram(f).to_pydict()]
        return _digest(*parts)
    if kind == "analysis":
        h = s.analysis("cmp")
        return _digest(h.table().to_pydict(), {f: h.read(f) for f in h.files}, h.meta)
    raise ValueError(kind)


def read_outcome(root: Path, kind: str) -> str | CorruptionError:
    """``read_all`` on a freshly opened store (no cached checks), or the CorruptionError it raised."""
    from strata.store.commit import protocol

    protocol.forget_checked_tables()  # a new process: shard digest tables are checked again
    try:
        return read_all(store.open(root, create=False), kind)
    except CorruptionError as e:
        return e
