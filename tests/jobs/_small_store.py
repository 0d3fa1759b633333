"""A small store for plan and pre-submit checks, made without Ray: a dataset written through the
public writer, and an SAE trained on it in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from strata import store

H = "blocks.1.hook_resid_post"
CTX, UNIT_CONTEXTS, UNITS, D = 16, 8, 5, 16
SAE = {"store": "acts", "dataset": "tiny", "hooks": [H], "name": "tsae", "architecture": "topk", "sae": {"d_sae": 32, "k": 4},
       "train": {"total_training_samples": 256, "batch_size": 64, "lr": 3e-3, "seed": 0, "n_batches_for_norm_estimate": 1,
                 "checkpoint_every": 0},
       "data": {"holdout_units": 1}, "eval": {"ce": False}, "compute": {"device": "cpu", "threads": 1}}
FEATURES = {"store": "acts", "sae": "tsae", "name": "ft", "top_k": 8,
            "compute": {"executor": "local", "batch_rows": 256, "num_workers": 1, "device": "cpu"}}


def tokens(unit: int) -> pa.Table:
    r = np.arange(UNIT_CONTEXTS * CTX, dtype=np.int64)
    g = unit * UNIT_CONTEXTS * CTX + r
    return pa.table({"context_id": unit * UNIT_CONTEXTS + r // CTX, "position": (r % CTX).astype(np.int32), "doc_id": g // 37,
                     "doc_position": (g % 37).astype(np.int32), "token_id": ((g * 7) % 1000).astype(np.int32), "special": (r % CTX) == 0})


def small_store(root: Path, *, sae: dict | None = SAE) -> store.Store:
    """Dataset `tiny` (5 units of hook H) and SAE `tsae` (spec ``sae``; None: no SAE) trained on
    it, in ``root``."""
    from strata.analysis.sae import SAETrainSpec, run_job

    s = store.open(root)
    w = s.create_dataset("tiny", hooks={H: D}, context_size=CTX, dtype="float32", num_units=UNITS, unit_contexts=UNIT_CONTEXTS,
                         meta={"model": "no-such-model", "revision": "r0"})
    rng = np.random.default_rng(0)
    for u in range(UNITS):
        w.write_unit(u, tokens=tokens(u), acts={H: rng.standard_normal((UNIT_CONTEXTS * CTX, D)).astype(np.float32)})
    if sae is None:
        return s
    threads = torch.get_num_threads()
    try:
        run_job(SAETrainSpec.model_validate({**sae, "store": str(root)}))
    finally:
        torch.set_num_threads(threads)
    return s


def feature_manifest(s: store.Store, spec: dict) -> None:
    """The manifest of feature table ``spec['name']`` as the encode job writes it first: the
    table's identity, no unit encoded."""
    from strata.pipeline.encode import EncodeSpec, prepare
    from strata.store.features.writer import create_or_open, table_lease

    info, _ = prepare(EncodeSpec.model_validate({**spec, "store": s.uri}), s)
    with table_lease(s.storage, info.name, owner="test") as lease:
        create_or_open(s.storage, info, lease=lease)
