"""Transcoders on a tiny GPT-2's activations: the spliced loss replaces exactly the MLP's output
with a function of the MLP's input captured in the same forward pass (the model's own MLP gives
the clean loss back), a transformed out hook is skipped with the reason, a trained transcoder's
job reports the loss, and `strata features encode` encodes the in hook's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sae_data import lm_dataset, train_tiny_lm

from strata.analysis.sae import SAETrainSpec, run_job
from strata.analysis.sae.evaluate import heldout_contexts, load_causal_lm, next_token_ce
from strata.analysis.sae.transcoder_eval import transcoder_replace, transcoder_spliced_ce
from strata.pipeline.encode import EncodeSpec, run_encode

HIN, HOUT, NORM = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.0.ln2.hook_normalized"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(store, dataset, causal LM, held-out units) of the tiny fitted GPT-2 at the MLP's hooks."""
    from strata.pipeline.tiny import build_tiny

    folder = build_tiny(tmp_path_factory.mktemp("models") / "gpt2", family="gpt2", layers=2, d_model=32, heads=4,
                        max_positions=256, vocab_size=400, seed=0)
    train_tiny_lm(folder)
    root = tmp_path_factory.mktemp("tc-lm")
    s = lm_dataset(root, folder, hooks=(NORM, HIN, HOUT, "blocks.1.hook_resid_pre"))
    ds = s.dataset("lm")
    model, why = load_causal_lm(ds.info.meta)
    assert why is None and model is not None
    return s, ds, model, ds.committed_units()[-1:]


def test_the_splice_replaces_exactly_the_mlp_output_with_a_function_of_its_input(lm):
    s, ds, model, units = lm
    mlp = model.transformer.h[0].mlp
    ln2 = model.transformer.h[0].ln_2
    with torch.no_grad():
        same = transcoder_spliced_ce(lambda h: mlp(h), ds, HIN, HOUT, units, model=model)
        # The pre-affine normalized input (a transformed in hook): the norm's affine put back.
        same_norm = transcoder_spliced_ce(lambda h: mlp(h * ln2.weight + ln2.bias), ds, NORM, HOUT, units, model=model)
        other = transcoder_spliced_ce(lambda h: mlp(1.5 * h), ds, HIN, HOUT, units, model=model)
    assert same["ce_spliced"] == pytest.approx(same["ce_clean"], abs=1e-6)
    assert same_norm["ce_spliced"] == pytest.approx(same_norm["ce_clean"], abs=1e-6)
    assert same["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert abs(other["ce_spliced"] - other["ce_clean"]) > 1e-3  # the splice is live
    assert same["ce_zero_ablated"] > same["ce_clean"] + 0.01
    # Zero ablation, independently: the MLP's output zeroed at non-special positions by a plain hook.
    ids, special, _ = heldout_contexts(ds, units, 64)

    def zero(mod, args, out):
        return torch.where(special[..., None], out, torch.zeros_like(out))

    handle = mlp.register_forward_hook(zero)
    try:
        ref, n = next_token_ce(model, ids, special)
    finally:
        handle.remove()
    assert same["ce_zero_ablated"] == pytest.approx(ref, abs=1e-9) and same["ce_tokens"] == n


def test_a_transformed_out_hook_is_skipped_with_the_reason(lm):
    s, ds, model, units = lm
    got = transcoder_spliced_ce(lambda h: h, ds, "blocks.0.hook_resid_pre", NORM, units, model=model)
    assert set(got) == {"ce_skipped"} and "cannot be replaced" in got["ce_skipped"] and NORM in got["ce_skipped"]


def test_a_trained_transcoder_reports_the_spliced_loss_and_encodes_its_in_hook(lm, tmp_path):
    s, ds, model, units = lm
    spec = SAETrainSpec.model_validate({
        "store": str(s.uri), "dataset": "lm", "hooks": {"out": HOUT}, "name": "tc-lm", "architecture": "transcoder",
        "sae": {"d_sae": 64, "l1_coefficient": 0.01}, "train": {"total_training_samples": 150 * 64, "batch_size": 64, "lr": 3e-3},
        "compute": {"device": "cpu", "ray": "never"},
    })
    [out] = run_job(spec).outcomes
    m = out.metrics
    assert m["hook_in"] == HIN and m["hook_out"] == HOUT and m["units"] == units
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "loss_recovered"):
        assert isinstance(m[key], float), key
    tc = s.sae("tc-lm").load()
    again = transcoder_spliced_ce(transcoder_replace(tc), ds, HIN, HOUT, units, model=model)
    assert again["ce_spliced"] == m["ce_spliced"] and again["ce_clean"] == m["ce_clean"]
    assert m["ce_spliced"] < m["ce_zero_ablated"]

    # `strata features encode` on the transcoder: the in hook's rows, special rows skipped.
    run_encode(EncodeSpec(store=str(s.uri), sae="tc-lm", top_k=8, block_features=16, compute={"executor": "local", "batch_rows": 24}),
               progress=False)
    fs = s.features("tc-lm")
    assert fs.info.hook == HIN and fs.info.sae_lineage["hook_out"] == HOUT and fs.info.sae_lineage["hook_in"] == HIN
    x = ds.read(HIN, as_="torch").float()
    with torch.no_grad():
        z = tc.encode(x).numpy()
    z[ds.tokens(HIN).column("special").to_numpy()] = 0
    got = fs.latents(slice(None), dense=True).numpy()
    assert got.shape == z.shape and (z != 0).sum() > 0
    np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-6)
