"""The logit lens: the last layer reproduces the model's own logits and loss; earlier layers do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from strata.analysis import layers
from strata.analysis.similarity import AnalysisError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_last_layer_is_the_models_own_prediction(tiny_lm):
    ds, folder = tiny_lm
    hooks = ds.hooks
    table, prov = layers.logit_lens(ds, hooks, contexts=10**6)
    got = {h: r for h, r in zip(table.column("hook").to_pylist(), table.to_pylist())}
    assert set(got) == set(layers.lens_hooks(hooks)) and "blocks.0.hook_attn_out" not in got
    last = got["blocks.1.hook_resid_post"]
    assert last["max_abs_logit_diff"] < 1e-4
    assert last["kl_to_final"] == pytest.approx(0.0, abs=1e-8) and last["top1_agreement"] == 1.0
    assert got["ln_final.hook_normalized"]["max_abs_logit_diff"] < 1e-4  # already normed: unembedding only
    # The model's own next-token loss, computed here without the lens.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    toks = ds.tokens()
    cs = ds.info.context_size
    ids = torch.from_numpy(toks.column("token_id").to_numpy().astype(np.int64).reshape(-1, cs))
    special = torch.from_numpy(toks.column("special").to_numpy(zero_copy_only=False).reshape(-1, cs))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    ok = ~special[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][ok], ids[:, 1:][ok])
    assert prov["positions"] == int(ok.sum()) and prov["contexts"] == ids.shape[0]
    assert last["ce"] == pytest.approx(float(ce), rel=1e-6)
    # Earlier layers are other distributions (a seeded random model changes them little, but visibly).
    first = got["blocks.0.hook_resid_pre"]
    assert first["kl_to_final"] > 1e-5 and first["top1_agreement"] < 1.0 and first["max_abs_logit_diff"] > 1e-3
    assert all(0 <= r["entropy"] <= np.log(model.config.vocab_size) + 1e-9 for r in got.values())


def test_lens_needs_residual_hooks_and_the_model(tiny_lm, tmp_path):
    ds, _ = tiny_lm
    with pytest.raises(AnalysisError, match="residual-stream hooks"):
        layers.logit_lens(ds, ["blocks.0.hook_attn_out"])
