"""SAE feature matching: streamed latent correlations equal dense ones; a planted permutation of
latents is recovered, its decoder SVCCA beats random pairings; SAEs committed to the store."""

from __future__ import annotations

import _simdata
import numpy as np
import pytest
import simref
import torch

from strata.analysis import similarity as sim
from strata.analysis.similarity.matching import LatentCorrelations

D, M = 8, 48
HA, HB = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def _sae(w_enc: np.ndarray, b_enc: np.ndarray, w_dec: np.ndarray, b_dec: np.ndarray):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1]))
    with torch.no_grad():
        for name, v in (("W_enc", w_enc), ("b_enc", b_enc), ("W_dec", w_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(torch.from_numpy(v.astype(np.float32)))
    return sae


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Hook B is an orthogonal map Q of hook A; SAE B is SAE A with its latents permuted, written
    in B's basis, so latent i of A fires exactly as latent perm^-1(i) of B."""
    from strata import store

    rng = np.random.default_rng(0)
    flat = _simdata.pack([_simdata.word_spans(t) for t in _simdata.texts(60, seed=1)])
    x = rng.standard_normal((flat["doc_id"].size, D)).astype(np.float32)
    q = np.linalg.qr(rng.standard_normal((D, D)))[0]
    ds = _simdata.write_dataset(store.open(tmp_path_factory.mktemp("match")), "m", flat, {HA: x, HB: (x @ q).astype(np.float32)})
    w_enc, b_enc = rng.standard_normal((D, M)), -0.8 * np.ones(M)
    w_dec, b_dec = rng.standard_normal((M, D)), 0.1 * rng.standard_normal(D)
    perm = rng.permutation(M)
    sae_a = _sae(w_enc, b_enc, w_dec, b_dec)
    sae_b = _sae(q.T @ w_enc[:, perm], b_enc[perm], w_dec[perm] @ q, b_dec @ q)
    return ds, sae_a, sae_b, perm


def test_streamed_correlations_equal_dense_pearson():
    rng = np.random.default_rng(3)
    fa = np.maximum(rng.standard_normal((300, 7)) - 0.5, 0)
    fb = np.maximum(fa @ rng.standard_normal((7, 5)) + rng.standard_normal((300, 5)) - 0.5, 0)
    fb[:, 2] = 0.0  # a dead latent
    acc = LatentCorrelations(7, 5)
    for s in range(0, 300, 41):
        acc.update(fa[s : s + 41], fb[s : s + 41])
    corr, live_a, live_b = acc.correlations()
    with np.errstate(invalid="ignore"):  # the dead latent's correlations are 0/0
        ref = np.corrcoef(fa.T, fb.T)[:7, 7:]
    assert live_a.all() and list(live_b) == [True, True, False, True, True]
    np.testing.assert_allclose(np.delete(corr, 2, axis=1), np.delete(ref, 2, axis=1), rtol=1e-10, atol=1e-12)
    assert np.isnan(corr[:, 2]).all()


def test_planted_permutation_is_recovered_and_beats_random_pairings(planted):
    ds, sae_a, sae_b, perm = planted
    table, summary, prov = sim.match_saes((sae_a, ds, HA), (sae_b, ds, HB), random_pairings=40, chunk_rows=53)
    live = table.column("live").to_numpy(zero_copy_only=False)
    best = table.column("best_b").to_numpy()[live]
    inverse = np.argsort(perm)
    assert live.sum() > M // 2
    np.testing.assert_array_equal(best, inverse[np.flatnonzero(live)])
    np.testing.assert_allclose(table.column("corr").to_numpy()[live], 1.0, atol=1e-6)
    assert summary["mean_max_corr_a"] == pytest.approx(1.0, abs=1e-6)
    assert summary["svcca"] == pytest.approx(1.0, abs=1e-6)
    assert summary["svcca_random_mean"] < 0.9 and summary["p_value"] == pytest.approx(1 / 41)
    # The decoder SVCCA is the SVCCA of the matched decoder rows (an independent reference).
    pairs = np.flatnonzero(table.column("paired").to_numpy(zero_copy_only=False))
    wa = sae_a.W_dec.detach().double().numpy()[pairs]
    wb = sae_b.W_dec.detach().double().numpy()[best[np.searchsorted(np.flatnonzero(live), pairs)]]
    assert summary["svcca"] == pytest.approx(simref.svcca(wa, wb, 0.99), rel=1e-9)
    assert prov["alignment"]["method"] == "rows"


def test_unrelated_saes_match_poorly(planted):
    ds, sae_a, _, _ = planted
    rng = np.random.default_rng(9)
    other = _sae(rng.standard_normal((D, M)), -0.8 * np.ones(M), rng.standard_normal((M, D)), np.zeros(D))
    _, summary, _ = sim.match_saes((sae_a, ds, HA), (other, ds, HB), random_pairings=20)
    assert summary["mean_max_corr_a"] < 0.9 and summary["p_value"] > 1 / 21


def test_sae_width_must_fit_the_hook(planted):
    ds, _, _, _ = planted
    small = _sae(np.zeros((4, 6)), np.zeros(6), np.zeros((6, 4)), np.zeros(4))
    with pytest.raises(sim.AnalysisError, match="an SAE with d_in=4 cannot encode m:blocks.0.hook_resid_post \\(d=8\\)"):
        sim.match_saes((small, ds, HA), (small, ds, HB))
