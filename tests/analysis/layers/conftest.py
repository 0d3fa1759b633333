"""Fixtures of the layer tests: synthetic datasets with planted structure, and a tiny GPT-2
extracted at every hook (float32) for the logit lens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from strata import store

CTX, UC = 16, 4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny matrices, busy two-core machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_docs_dataset(root: Path, name: str, doc_lens: list[int], acts_of, *, fields: dict | None = None) -> store.ActivationDataset:
    """Documents of ``doc_lens`` tokens packed back to back (BOS at position 0 of every context,
    special); ``acts_of(doc_id, doc_position) -> {hook: [n, d]}`` gives each row's values (BOS
    rows get large constants, which every analysis must skip)."""
    docs = np.concatenate([np.full(n, d) for d, n in enumerate(doc_lens)])
    pos = np.concatenate([np.arange(n) for n in doc_lens])
    per = CTX - 1
    pad = -docs.size % per
    docs, pos = np.r_[docs, np.full(pad, -1)], np.r_[pos, np.full(pad, -1)]
    n_ctx = docs.size // per
    doc_rows = np.concatenate([np.r_[docs[c * per], docs[c * per : (c + 1) * per]] for c in range(n_ctx)])
    pos_rows = np.concatenate([np.r_[-1, pos[c * per : (c + 1) * per]] for c in range(n_ctx)])
    special = (pos_rows < 0)
    values = acts_of(doc_rows, pos_rows)
    for v in values.values():
        v[special] = 25.0
    n = doc_rows.size
    ur = UC * CTX
    s = store.open(root)
    w = s.create_dataset(name, hooks={h: v.shape[1] for h, v in values.items()}, context_size=CTX, dtype="float32",
                         num_units=-(-n // ur), unit_contexts=UC, meta={"model": "synthetic", "revision": "r0"})
    for u in range(-(-n // ur)):
        r = np.arange(u * ur, min(n, (u + 1) * ur))
        w.write_unit(u, tokens=pa.table({
            "context_id": r // CTX, "position": (r % CTX).astype(np.int32), "doc_id": doc_rows[r],
            "doc_position": pos_rows[r].astype(np.int32), "token_id": (pos_rows[r] % 50).astype(np.int32), "special": special[r]}),
            acts={h: v[r].astype(np.float32) for h, v in values.items()})
    rows = np.arange(n)
    ids = np.arange(len(doc_lens))
    t = pa.table({"doc_id": ids, "row_start": [int(rows[(doc_rows == d) & ~special].min()) for d in ids],
                  "row_end": [int(rows[(doc_rows == d) & ~special].max()) + 1 for d in ids], "dropped_tokens": np.zeros(ids.size, np.int64)})
    for k, v in (fields or {}).items():
        t = t.append_column(k, pa.array(v))
    w.write_documents(t)
    return s.dataset(name)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny GPT-2 and its dataset at every hook, float32 (so the lens can match the logits)."""
    from strata.pipeline.config import ExtractSpec
    from strata.pipeline.extract import run_extract
    from strata.pipeline.tiny import build_tiny, synthetic_docs

    root = tmp_path_factory.mktemp("lens")
    model = build_tiny(root / "model", family="gpt2", layers=2, d_model=32, heads=4, max_positions=256, vocab_size=400, seed=0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_docs(12, seed=2)), encoding="utf-8")
    run_extract(ExtractSpec(store=str(root / "acts"), name="lm", model={"id": str(model)}, corpus={"path": str(corpus)},
                            tokenize={"context_size": 24}, hooks=["hook_embed", "blocks.*", "ln_final.hook_normalized"], dtype="float32",
                            compute={"executor": "local", "unit_contexts": 8, "batch_tokens": 192}), progress=False)
    return store.open(root / "acts").dataset("lm"), model
