"""Every figure of a trained SAE agrees with itself: one meaning of "dead" (fires on no held-out
token) in metrics.json and cfg.json, the training curves' window count named apart, and a
held-out set that holds what the spec's evaluation asks for, or a refusal before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _sae_data import LM_CTX, LM_UNIT_CONTEXTS, lm_dataset, train_tiny_lm

from strata import store
from strata.analysis.sae import SAETrainSpec, run_job
from strata.pipeline.errors import SpecError

HOOK = "blocks.1.hook_resid_post"
UNITS = 4


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory):
    from strata.pipeline.tiny import build_tiny

    folder = build_tiny(tmp_path_factory.mktemp("models") / "gpt2", family="gpt2", layers=2, d_model=32, heads=4,
                        max_positions=256, vocab_size=400, seed=0)
    root = tmp_path_factory.mktemp("figures-store")
    lm_dataset(root, train_tiny_lm(folder), units=UNITS)
    return root


def spec(root, **changes) -> SAETrainSpec:
    raw = {
        "store": str(root), "dataset": "lm", "hooks": [HOOK], "name": "figures",
        "sae": {"expansion_factor": 16, "k": 4},
        "train": {"total_training_samples": 40 * 32, "batch_size": 32, "lr": 3e-3, "n_batches_for_norm_estimate": 4,
                  "dead_feature_window": 10},
        "eval": {"ce": True, "ce_contexts": 12},  # more than the last unit's 8 contexts
        "compute": {"device": "cpu"},
    }
    raw.update(changes)
    return SAETrainSpec.model_validate(raw)


@pytest.fixture(scope="module")
def trained(lm_root):
    (outcome,) = run_job(spec(lm_root)).outcomes
    assert outcome.status == "trained"
    return store.open(lm_root, create=False).sae("figures")


def test_the_held_out_set_holds_the_contexts_the_spec_asks_for(trained):
    lin, m = trained.lineage, trained.metrics
    # One unit holds 8 contexts: 12 asked for take the last two, whole.
    assert LM_UNIT_CONTEXTS == 8
    assert lin["holdout_units"] == [2, 3] and lin["units"] == [0, 1]
    assert m["units"] == [2, 3]
    assert m["ce_contexts"] == 12


def test_a_spec_asking_more_than_the_dataset_holds_is_refused_before_training(lm_root):
    s = store.open(lm_root, create=False)
    before = set(s.saes())
    with pytest.raises(SpecError) as e:
        run_job(spec(lm_root, name="too-many", eval={"ce": True, "ce_contexts": 25}))
    msg = str(e.value)
    assert "\n" not in msg
    # 3 of the 4 units (24 contexts) can be held out, leaving one to train on.
    assert "`eval.ce_contexts` (25)" in msg and "at most 24 context(s) in 3 unit(s)" in msg
    assert set(s.saes()) == before and not (lm_root / "saes" / "too-many").exists()


def test_without_an_explicit_ce_contexts_one_unit_is_held_out_as_before(lm_root):
    from strata.analysis.sae.plan import plan

    p = plan(spec(lm_root, name="default-eval", eval={"ce": True}), store.open(lm_root, create=False))
    assert [t.holdout_units for t in p.tasks] == [[3]]


def test_every_dead_figure_is_the_held_out_count(trained, lm_root):
    """metrics.json and cfg.json give one count, equal to an independent count: latents that
    fire on none of the held-out non-special tokens."""
    ds = store.open(lm_root, create=False).dataset("lm")
    units = trained.lineage["holdout_units"]
    rows = np.concatenate([np.arange(u * LM_UNIT_CONTEXTS * LM_CTX, (u + 1) * LM_UNIT_CONTEXTS * LM_CTX) for u in units])
    special = ds.tokens().column("special").to_numpy(zero_copy_only=False)[rows]
    x = torch.from_numpy(ds.read(HOOK, rows=rows[~special]).astype(np.float32))
    sae = trained.load()
    with torch.no_grad():
        fired = (sae.encode(x) > 0).any(0)
    dead = int((~fired).sum())
    d_sae = int(sae.cfg.d_sae)
    assert 0 < dead < d_sae, dead  # the figure means something here: some latents are dead, not all

    m = trained.metrics
    assert m["dead_features"] == dead
    assert m["dead_fraction"] == pytest.approx(dead / d_sae)
    assert m["tokens"] == int((~special).sum()) and f"{m['tokens']:,} held-out tokens" in m["dead_window"]

    cfg = json.loads((trained.path / "cfg.json").read_text())
    assert cfg["metadata"]["num_dead_features"] == dead
    assert cfg["metadata"]["l0"] == pytest.approx(m["l0"])
    assert cfg["metadata"]["dead_window"] == m["dead_window"]


def test_the_curves_name_their_window_count_apart_from_dead(trained):
    cols = trained.curves().column_names
    assert "inactive_features" in cols and "inactive_fraction" in cols
    assert not [c for c in cols if "dead" in c], cols


def test_curves_of_an_old_checkpoint_read_under_the_new_names():
    from strata.analysis.sae.curves import curves_table

    t = curves_table([{"step": 1, "samples": 32, "dead_features": 3.0, "dead_fraction": 0.5},
                      {"step": 2, "samples": 64, "inactive_features": 1.0, "inactive_fraction": 0.25}])
    assert t.column_names == ["step", "samples", "inactive_features", "inactive_fraction"]
    assert t.column("inactive_features").to_pylist() == [3.0, 1.0]
