"""The spliced next-token loss on a tiny GPT-2: clean loss checked against a plain forward pass,
the splice site checked by putting the stored activations back, a perfect SAE and zero
ablation, and skipping when the model is not on this machine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _sae_data import LM_CTX, LM_HOOKS, LM_UNIT_CONTEXTS, lm_dataset, train_tiny_lm

from strata import store
from strata.analysis.sae import SAETrainSpec, next_token_ce, run_job, spliced_ce
from strata.analysis.sae.evaluate import heldout_contexts, hook_site, load_causal_lm


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The tiny seeded GPT-2, fitted a little to synthetic text so that ablations hurt it."""
    from strata.pipeline.tiny import build_tiny

    folder = build_tiny(tmp_path_factory.mktemp("models") / "gpt2", family="gpt2", layers=2, d_model=32, heads=4,
                        max_positions=256, vocab_size=400, seed=0)
    return train_tiny_lm(folder)


@pytest.fixture(scope="module")
def lm(gpt2, tmp_path_factory):
    """(store root, dataset, causal LM, held-out units)."""
    root = tmp_path_factory.mktemp("lm-store")
    ds = lm_dataset(root, gpt2).dataset("lm")
    model, why = load_causal_lm(ds.info.meta)
    assert why is None and model is not None
    return root, ds, model, ds.committed_units()[-1:]


def plain_ce(model, ids: torch.Tensor, special: torch.Tensor) -> float:
    """Independent reference: one forward pass of the causal LM, mean CE over non-special targets."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ok = ~special[:, 1:]
    return float(F.cross_entropy(logits[:, :-1][ok], ids[:, 1:][ok]))


def perfect_sae(d: int):
    """A TopK SAE with latents x and -x (d_sae = 2d, k = d): relu(x) - relu(-x) = x exactly."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_clean_loss_matches_a_plain_forward_pass(lm):
    _, ds, model, held = lm
    ids, special, mask = heldout_contexts(ds, held, 64)
    assert ids.shape == (LM_UNIT_CONTEXTS, LM_CTX) and mask is None
    ce, n = next_token_ce(model, ids, special, batch_contexts=3)
    assert n == int((~special[:, 1:]).sum())
    assert ce == pytest.approx(plain_ce(model, ids, special), rel=1e-6)


@pytest.mark.parametrize("hook", LM_HOOKS)
def test_splicing_the_hook_back_gives_the_clean_loss(lm, hook):
    _, ds, model, held = lm
    ids, special, _ = heldout_contexts(ds, held, 64)
    site = hook_site(model, hook, ds.info.meta)
    clean, _ = next_token_ce(model, ids, special, batch_contexts=4)
    # The identity splice leaves every forward pass exactly as it was.
    assert next_token_ce(model, ids, special, site=site, replace=lambda x: x, batch_contexts=4)[0] == clean
    # The activations the store holds for these contexts, put back where they were captured,
    # give the clean loss too: the splice site is the extraction's site.
    (unit,) = held
    rows = unit * LM_UNIT_CONTEXTS * LM_CTX + np.arange(LM_UNIT_CONTEXTS * LM_CTX)
    stored = ds.read(hook, rows=rows, as_="torch").reshape(LM_UNIT_CONTEXTS, LM_CTX, -1)
    ce, _ = next_token_ce(model, ids, special, site=site, replace=lambda x: stored, batch_contexts=LM_UNIT_CONTEXTS, splice_special=True)
    assert ce == pytest.approx(clean, rel=1e-6)
    # ...and other contexts' activations do not (the splice takes effect).
    other = ds.read(hook, rows=rows - LM_UNIT_CONTEXTS * LM_CTX, as_="torch").reshape(LM_UNIT_CONTEXTS, LM_CTX, -1)
    ce, _ = next_token_ce(model, ids, special, site=site, replace=lambda x: other, batch_contexts=LM_UNIT_CONTEXTS, splice_special=True)
    assert abs(ce - clean) > 1e-3


@pytest.mark.parametrize("hook", LM_HOOKS)
def test_a_perfect_sae_recovers_the_loss_and_zero_ablation_hurts(lm, hook):
    _, ds, model, held = lm
    ids, special, _ = heldout_contexts(ds, held, 64)
    out = spliced_ce(perfect_sae(ds.info.hooks[hook].d), ds, hook, held, model=model, batch_contexts=3)
    assert out["ce_clean"] == pytest.approx(plain_ce(model, ids, special), rel=1e-6)
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], rel=1e-6, abs=1e-6)
    assert out["ce_zero_ablated"] > out["ce_clean"] + 1e-3
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert out["ce_contexts"] == LM_UNIT_CONTEXTS and out["ce_tokens"] == int((~special[:, 1:]).sum())


def test_zero_ablation_is_an_independent_computation(lm):
    """Zeroing blocks.1.hook_resid_pre at non-special positions, done by hand with a forward
    pre-hook on the block, gives the zero-ablated loss."""
    _, ds, model, held = lm
    hook = "blocks.1.hook_resid_pre"
    ids, special, _ = heldout_contexts(ds, held, 64)
    keep = (~special)[..., None]

    def pre(mod, args, kwargs):
        return (torch.where(keep, torch.zeros_like(args[0]), args[0]), *args[1:]), kwargs

    handle = model.transformer.h[1].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        ref = plain_ce(model, ids, special)
    finally:
        handle.remove()
    out = spliced_ce(perfect_sae(32), ds, hook, held, model=model, batch_contexts=LM_UNIT_CONTEXTS)
    assert out["ce_zero_ablated"] == pytest.approx(ref, rel=1e-6)


def test_the_model_is_loaded_from_the_dataset_record(lm):
    _, ds, model, held = lm
    given = spliced_ce(perfect_sae(32), ds, LM_HOOKS[0], held, model=model)
    loaded = spliced_ce(perfect_sae(32), ds, LM_HOOKS[0], held)
    assert loaded == given


def test_a_missing_or_changed_model_is_skipped_with_the_reason(gpt2, tmp_path):
    ds = lm_dataset(tmp_path / "a", gpt2, units=2, meta={"model": str(tmp_path / "gone")}).dataset("lm")
    out = spliced_ce(perfect_sae(32), ds, LM_HOOKS[0], [1])
    assert list(out) == ["ce_skipped"] and "not available" in out["ce_skipped"] and "gone" in out["ce_skipped"]
    ds = lm_dataset(tmp_path / "b", gpt2, units=2, meta={"revision": "local-xxh3:0000"}).dataset("lm")
    out = spliced_ce(perfect_sae(32), ds, LM_HOOKS[0], [1])
    assert "changed since extraction" in out["ce_skipped"]


def test_run_reports_the_spliced_loss_of_a_trained_sae(lm, tmp_path):
    root, ds, _, _ = lm
    spec = SAETrainSpec.model_validate({
        "store": str(root), "dataset": "lm", "hooks": ["blocks.1.hook_resid_post"], "name": "lm-topk",
        "sae": {"expansion_factor": 4, "k": 8},
        "train": {"total_training_samples": 60 * 32, "batch_size": 32, "lr": 3e-3, "n_batches_for_norm_estimate": 4},
        "compute": {"device": "cpu"},
    })
    (outcome,) = run_job(spec).outcomes
    assert (outcome.name, outcome.status) == ("lm-topk", "trained")
    h = store.open(root).sae("lm-topk")
    metrics = h.metrics
    assert outcome.metrics == metrics
    assert metrics["ce_zero_ablated"] > metrics["ce_clean"]
    assert metrics["ce_spliced"] >= metrics["ce_clean"] - 0.05
    assert metrics["loss_recovered"] == pytest.approx(
        (metrics["ce_zero_ablated"] - metrics["ce_spliced"]) / (metrics["ce_zero_ablated"] - metrics["ce_clean"]))
    assert metrics["l0"] == 8 and 0 < metrics["fvu"] < 1.5
    assert h.cfg["d_sae"] == 128 and json.loads((h.path / "cfg.json").read_text())["d_sae"] == 128
