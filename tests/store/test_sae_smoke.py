"""The batch iterator feeds sae-lens's SAETrainer directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data import CTX, UNIT_CONTEXTS, token_table
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from strata import store

D, UNITS = 16, 8


@pytest.mark.slow
def test_topk_sae_trains_from_iter_batches(tmp_path):
    # Activations with low-rank structure an SAE can learn: sparse codes over 8 directions.
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((8, D)).astype(np.float32)
    s = store.open(tmp_path)
    w = s.create_dataset("sae", hooks={"blocks.0.hook_resid_post": D}, context_size=CTX, dtype="float32", num_units=UNITS,
                         unit_contexts=UNIT_CONTEXTS)
    rows = UNIT_CONTEXTS * CTX
    for u in range(UNITS):
        codes = rng.exponential(1.0, (rows, 8)).astype(np.float32) * (rng.random((rows, 8)) < 0.25)
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts={"blocks.0.hook_resid_post": codes @ dirs})
    ds = s.dataset("sae")
    batch = 32
    data = ds.iter_batches("blocks.0.hook_resid_post", batch_size=batch, seed=0, epochs=None)

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=32, k=4, dtype="float32", device="cpu"))
    steps = 150
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-3, lr_end=3e-3, device="cpu",
                           n_batches_for_norm_estimate=10, dead_feature_window=50, feature_sampling_window=50)
    held = ds.read("blocks.0.hook_resid_post", rows=slice(0, 256), as_="torch")

    def mse() -> float:
        with torch.no_grad():
            return float(((sae.decode(sae.encode(held)) - held) ** 2).mean())

    before = mse()
    trained = SAETrainer(cfg=cfg, sae=sae, data_provider=data).fit()
    data.close()
    after = mse()
    assert trained.cfg.d_in == D
    assert after < 0.5 * before, (before, after)
