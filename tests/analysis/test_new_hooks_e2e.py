"""Everything downstream on the hooks beyond the residual stream (issue 18), end to end on a tiny
GPT-2 extracted with ``compute.executor: local``: an SAE trained on MLP neurons
(``mlp.hook_post``, d_mlp wide) with its spliced loss and a feature table; ``compare`` of
``attn.hook_z`` across two layers against a numpy CKA of the same rows; the logit lens on the
final norm's hooks by their recorded meaning; a hook stored transformed is not spliced; and
``strata reprocess`` computing only a newly asked-for neuron hook.

The model's LayerNorm weights and biases are perturbed (seeded): unit weights and zero biases
would hide the difference between a norm's normalized input and its output."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from strata import store
from strata.analysis.layers import geometry, logit_lens
from strata.analysis.layers.lens import norm_affine
from strata.analysis.sae import SAETrainSpec, next_token_ce, run_job, spliced_ce
from strata.analysis.sae.evaluate import heldout_contexts, hook_site
from strata.analysis.similarity import compare
from strata.jobs.cli import main
from strata.jobs.reprocess import load_pipeline, plan_pipeline
from strata.pipeline.config import ExtractSpec
from strata.pipeline.extract import run_extract
from strata.pipeline.hooks import Transform, apply_transform, family_of, hook_sites
from strata.pipeline.tiny import build_tiny, synthetic_docs, tiny_config, write_jsonl

pytestmark = [pytest.mark.slow]

D, D_MLP, CTX = 32, 128, 16
POST, Z0, Z1 = "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"
NORMALIZED, OUT, LN2N = "ln_final.hook_normalized", "ln_final.hook_out", "blocks.0.ln2.hook_normalized"
HOOKS = [POST, Z0, Z1, LN2N, "blocks.1.hook_resid_post", NORMALIZED, OUT]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny models, busy two-core machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturbed_gpt2(folder: Path) -> Path:
    """The tiny seeded GPT-2 with every LayerNorm's weight and bias moved away from 1 and 0."""
    build_tiny(folder, family="gpt2", layers=2, d_model=D, heads=4, max_positions=128, vocab_size=400, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(store root, dataset, model folder, causal LM) of the tiny GPT-2 at ``HOOKS``, float32."""
    root = tmp_path_factory.mktemp("newhooks")
    folder = perturbed_gpt2(root / "model")
    corpus = write_jsonl(root / "corpus.jsonl", synthetic_docs(40, seed=3))
    run_extract(ExtractSpec(store=str(root / "acts"), name="lm", model={"id": str(folder)}, corpus={"path": str(corpus)},
                            tokenize={"context_size": CTX}, hooks=HOOKS, dtype="float32",
                            compute={"executor": "local", "unit_contexts": 8, "batch_tokens": 256, "num_workers": 1}), progress=False)
    ds = store.open(root / "acts").dataset("lm")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    return root / "acts", ds, folder, model


def plain_ce(model, ids: torch.Tensor, special: torch.Tensor) -> float:
    """Independent reference: one forward pass, mean CE over non-special targets."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ok = ~special[:, 1:]
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][ok], ids[:, 1:][ok]))


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_an_sae_on_mlp_neurons_trains_splices_and_encodes(lm, tmp_path):
    root, ds, _, model = lm
    assert ds.info.hooks[POST].d == D_MLP and ds.info.meta["hook_widths"][POST] == D_MLP
    spec = SAETrainSpec.model_validate({
        "store": str(root), "dataset": "lm", "hooks": [POST], "name": "neurons", "architecture": "topk",
        "sae": {"expansion_factor": 2, "k": 8},
        "train": {"total_training_samples": 40 * 64, "batch_size": 64, "lr": 3e-3, "n_batches_for_norm_estimate": 4, "checkpoint_every": 0},
        "data": {"holdout_units": 1}, "compute": {"device": "cpu", "threads": 1},
    })
    (outcome,) = run_job(spec).outcomes
    assert (outcome.name, outcome.status) == ("neurons", "trained")
    s = store.open(root)
    h = s.sae("neurons")
    assert h.cfg["d_in"] == D_MLP and h.cfg["d_sae"] == 2 * D_MLP
    m = h.metrics
    assert "ce_skipped" not in m, m.get("ce_skipped")
    assert m["l0"] == 8 and 0 < m["fvu"] < 1.5 and m["explained_variance"] == pytest.approx(1 - m["fvu"])
    held = h.lineage["holdout_units"]
    ids, special, _ = heldout_contexts(ds, held, 64)
    assert m["ce_clean"] == pytest.approx(plain_ce(model, ids, special), rel=1e-6)
    assert m["ce_zero_ablated"] != pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["loss_recovered"] == pytest.approx((m["ce_zero_ablated"] - m["ce_spliced"]) / (m["ce_zero_ablated"] - m["ce_clean"]))

    # The splice site is c_proj's input: the stored neurons put back there give the clean loss.
    site = hook_site(model, POST, ds.info.meta)
    assert (site.module, site.io, site.transform) == ("h.0.mlp.c_proj", "input", None)
    rows = ds.tokens(POST, units=held).column("row").to_numpy()[: ids.numel()]
    stored = ds.read(POST, rows=rows, as_="torch").reshape(*ids.shape, D_MLP)
    ce, _ = next_token_ce(model, ids, special, site=site, replace=lambda x: stored, batch_contexts=ids.shape[0], splice_special=True)
    assert ce == pytest.approx(m["ce_clean"], rel=1e-6)

    # `strata features encode` on it.
    (tmp_path / "features.yaml").write_text(yaml.safe_dump({
        "store": str(root), "sae": "neurons", "name": "neurons", "top_k": 8,
        "compute": {"executor": "local", "batch_rows": 256, "num_workers": 1, "device": "cpu"}}))
    rc, out, err = cli("features", "encode", str(tmp_path / "features.yaml"), "--no-progress")
    assert rc == 0, err
    fs = s.features("neurons")
    special_rows = ds.tokens(POST).column("special").to_numpy(zero_copy_only=False)
    assert fs.encoded_rows == int((~special_rows).sum())
    sae = h.load()
    with torch.inference_mode():
        dense = sae.encode(ds.read(POST, as_="torch").float()).numpy()
    dense[special_rows] = 0
    assert abs(sum(fs.stats().column("count").to_pylist()) - int((dense != 0).sum())) <= 1e-3 * (dense != 0).sum()


def test_a_hook_stored_transformed_is_not_spliced(lm):
    _, ds, _, model = lm
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=2 * D, k=4))
    units = ds.committed_units(LN2N)[-1:]
    out = spliced_ce(sae, ds, LN2N, units, model=model)
    assert list(out) == ["ce_skipped"]
    why = out["ce_skipped"]
    assert "\n" not in why and LN2N in why and "normalize" in why and "cannot be spliced" in why


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), feature-space form: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) of centred X, Y."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_compare_attention_head_outputs_across_two_layers(lm):
    _, ds, _, _ = lm
    assert ds.info.hooks[Z0].d == ds.info.hooks[Z1].d == D  # 4 heads x 8
    got = compare((ds, Z0), (ds, Z1), ["linear_cka"])
    keep = ~ds.tokens(Z0).column("special").to_numpy(zero_copy_only=False)
    x = ds.read(Z0, as_="numpy").astype(np.float64)[keep]
    y = ds.read(Z1, as_="numpy").astype(np.float64)[keep]
    assert got["n"] == keep.sum()
    ref = numpy_linear_cka(x, y)
    assert 0 < ref < 0.999
    assert got["linear_cka"] == pytest.approx(ref, rel=1e-6)


def test_the_lens_reads_the_final_norm_hooks_by_their_meaning(lm, tmp_path):
    root, ds, _, model = lm
    norm = model.transformer.ln_f
    rows = np.arange(min(ds.info.unit_rows * 2, ds.tokens(NORMALIZED).num_rows))
    n = ds.read(NORMALIZED, rows=rows, as_="torch").float()
    o = ds.read(OUT, rows=rows, as_="torch").float()
    with torch.no_grad():
        direct = n * norm.weight + norm.bias  # the norm's weight and bias on the stored normalized values
        renormed = norm(n)
    assert float((n - o).abs().max()) > 0.1  # the weights are not 1: the two hooks differ
    # The affine part alone is the norm's output (the stored ln_final.hook_out) ...
    assert torch.allclose(norm_affine(norm, n), direct) and torch.allclose(direct, o, atol=1e-5, rtol=1e-5)
    # ... and the norm run again is that up to 1 / sqrt(var(n) + eps): var(n) = v / (v + eps), which a
    # tiny model's small residual stream puts visibly below 1. So the lens applies the affine part only.
    assert float((renormed - direct).abs().max()) > 1e-3
    var = n.double().var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(renormed.double(), (direct.double() - norm.bias) / torch.sqrt(var + norm.eps) + norm.bias, atol=1e-5)

    table, _ = logit_lens(ds, [NORMALIZED, OUT, "blocks.1.hook_resid_post", POST], contexts=10**6, model=model)
    got = dict(zip(table.column("hook").to_pylist(), table.column("max_abs_logit_diff").to_pylist()))
    assert set(got) == {NORMALIZED, OUT, "blocks.1.hook_resid_post"}
    assert all(v < 1e-4 for v in got.values()), got

    # A dataset stored before ln_final.hook_normalized took TransformerLens's meaning recorded it
    # as ln_f's output, and holds that output: unembedded as it is.
    s = store.open(root)
    meta = {**ds.info.meta, "hook_modules": {**ds.info.meta["hook_modules"], NORMALIZED: "ln_f:output"}}
    units = ds.committed_units(OUT)
    w = s.create_dataset("old-meaning", hooks={NORMALIZED: D}, context_size=CTX, dtype="float32", num_units=len(units),
                         unit_contexts=ds.info.unit_contexts, meta=meta)
    cols = ["context_id", "position", "doc_id", "doc_position", "token_id", "special"]
    for u in units:
        t = ds.tokens(OUT, units=[u])
        w.write_unit(u, tokens=pa.table({c: t.column(c) for c in cols}), acts={NORMALIZED: np.asarray(ds.unit_array(OUT, u))})
    old = s.dataset("old-meaning")
    table, _ = logit_lens(old, [NORMALIZED], contexts=10**6, model=model)
    assert table.column("max_abs_logit_diff").to_pylist()[0] < 1e-4
    assert table.column("ce").to_pylist() == pytest.approx(
        [r["ce"] for r in logit_lens(ds, [OUT], contexts=10**6, model=model)[0].to_pylist()], rel=1e-6)


def test_reprocess_with_a_new_neuron_hook_computes_only_that_hook(tmp_path, monkeypatch):
    folder = perturbed_gpt2(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "corpus.jsonl", synthetic_docs(20, seed=5))
    extract = {"store": "acts", "name": "tiny", "model": {"id": str(folder)}, "corpus": {"path": "corpus.jsonl"},
               "tokenize": {"context_size": CTX}, "hooks": ["blocks.*.hook_resid_post"], "dtype": "float32",
               "compute": {"executor": "local", "unit_contexts": 8, "batch_tokens": 256, "num_workers": 1}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(extract))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"store": "./acts", "jobs": ["extract.yaml"]}))
    rc, _, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    units = store.open(tmp_path / "acts", create=False).dataset("tiny").committed_units()
    before = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "acts").rglob("*")
              if p.is_file() and "hook_resid_post" in str(p)}
    assert before

    new = "blocks.0.mlp.hook_pre"
    extract["hooks"] = ["blocks.*.hook_resid_post", new]
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(extract))
    plan = plan_pipeline(load_pipeline("pipeline.yaml"))
    assert [st.job.entry for st in plan.todo] == ["extract.yaml"] and plan.todo[0].hooks == {new: units}
    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    assert f"new hook(s) {new}" in out
    ds = store.open(tmp_path / "acts", create=False).dataset("tiny")
    assert ds.committed_units(new) == units and ds.info.hooks[new].d == D_MLP
    after = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "acts").rglob("*") if str(p) in before}
    assert after == before  # the other hooks' data untouched

    # The stored neurons are c_fc's output: the input of the MLP's activation, taken here by hand.
    toks = ds.tokens(new)
    ids = torch.from_numpy(toks.column("token_id").to_numpy().astype(np.int64).reshape(-1, CTX))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    handle = model.transformer.h[0].mlp.act.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    (ref,) = seen
    assert torch.allclose(ds.read(new, as_="torch").float(), ref.reshape(-1, D_MLP), atol=1e-5)


def test_spliced_loss_of_an_input_site_replaces_the_modules_input(lm):
    """Zeroing attn.hook_z (c_proj's input) by hand equals the zero-ablated loss of the splice."""
    _, ds, _, model = lm
    held = ds.committed_units(Z1)[-1:]
    ids, special, _ = heldout_contexts(ds, held, 64)
    keep = (~special)[..., None]

    def pre(mod, args):
        return (torch.where(keep, torch.zeros_like(args[0]), args[0]),)

    handle = model.transformer.h[1].attn.c_proj.register_forward_pre_hook(pre)
    try:
        ref = plain_ce(model, ids, special)
    finally:
        handle.remove()
    from sae_lens import TopKSAE, TopKSAEConfig

    out = spliced_ce(TopKSAE(TopKSAEConfig(d_in=D, d_sae=2 * D, k=4)), ds, Z1, held, model=model, batch_contexts=ids.shape[0])
    assert out["ce_zero_ablated"] == pytest.approx(ref, rel=1e-6)
    assert json.dumps(out)  # plain numbers


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
def test_the_final_norms_affine_part_gives_its_output_from_its_normalized_input(family):
    """For every family's final norm (weights and biases perturbed): the normalized input, as the
    extraction stores ``ln_final.hook_normalized``, through :func:`norm_affine` is the norm's output."""
    cfg = tiny_config(family, layers=1, d_model=D, heads=4, max_positions=64, vocab_size=100)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    fam = family_of(cfg.model_type)
    site = hook_sites(fam, 1, cfg)[NORMALIZED]
    assert isinstance(site.transform, Transform) and site.io == "input"
    norm = model.base_model.get_submodule(fam.ln_final)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = 0.05 * torch.randn(3, 5, D, generator=g) + 0.01
        got = norm_affine(norm, apply_transform(site.transform, norm, x))
        assert torch.allclose(got, norm(x), atol=1e-5, rtol=1e-5)


def test_layer_metrics_over_hooks_of_different_widths(lm):
    _, ds, _, _ = lm
    hooks = [Z1, POST, "blocks.1.hook_resid_post"]
    table, _ = geometry(ds, hooks, ["norm", "cos_next", "linearity_next"], tasks=1)
    got = {r["hook"]: r for r in table.to_pylist()}
    keep = ~ds.tokens(POST).column("special").to_numpy(zero_copy_only=False)
    for h in hooks:
        x = ds.read(h, as_="numpy").astype(np.float64)[keep]
        assert got[h]["norm"] == pytest.approx(float(np.linalg.norm(x, axis=1).mean()), rel=1e-9)
    assert np.isnan(got[Z1]["cos_next"]) and np.isnan(got[POST]["cos_next"])  # 32 -> 128 -> 32 wide: no cosine
    # linearity_next: R^2 of a least-squares map from one hook to the next, here checked with numpy.
    x = ds.read(Z1, as_="numpy").astype(np.float64)[keep]
    y = ds.read(POST, as_="numpy").astype(np.float64)[keep]
    xa = np.c_[x, np.ones(len(x))]
    resid = y - xa @ np.linalg.lstsq(xa, y, rcond=None)[0]
    assert got[Z1]["linearity_next"] == pytest.approx(1 - (resid**2).sum() / ((y - y.mean(0)) ** 2).sum(), abs=1e-6)


def test_the_splice_site_follows_what_the_dataset_recorded(lm):
    _, ds, _, model = lm
    assert hook_site(model, NORMALIZED, ds.info.meta).transform is not None  # today's meaning: not spliceable
    old = {"hook_modules": {NORMALIZED: "ln_f:output"}}
    site = hook_site(model, NORMALIZED, old)  # stored before the meaning changed: ln_f's output, spliceable
    assert (site.module, site.io, site.transform) == ("ln_f", "output", None)
    with pytest.raises(ValueError, match="captured at h.0.nope:output"):
        hook_site(model, POST, {"hook_modules": {POST: "h.0.nope:output"}})
