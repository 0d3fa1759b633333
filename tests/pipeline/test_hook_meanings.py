"""Hooks with TransformerLens's meanings: ``ln_final.hook_normalized`` is the final norm's input
normalized, before its weight and bias; ``ln_final.hook_out`` its output. A dataset stored when
``ln_final.hook_normalized`` meant the output keeps reading as what it holds until a run captures
the hook again (and only that hook). Tiny models have unit norm weights: they are perturbed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.errors import SpecError, UnknownHookError
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import synthetic_docs, write_jsonl
from strata.store.datasets.writer import dataset_lease

CTX = 16
HOOKS = ["blocks.1.hook_resid_post", "ln_final.hook_normalized", "ln_final.hook_out", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def perturbed_gpt2(tiny_models, tmp_path_factory):
    src = tiny_models("gpt2")
    model = AutoModel.from_pretrained(src)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("perturbed") / "gpt2"
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _spec(tmp_path, model, hooks=HOOKS, **kw) -> ExtractSpec:
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(12, seed=2))
    return ExtractSpec(store=str(tmp_path / "acts"), name="m", model={"id": str(model)}, corpus={"path": str(corpus)},
                       tokenize={"context_size": CTX}, hooks=hooks, dtype="float32",
                       compute={"executor": "local", "unit_contexts": 4, "batch_tokens": 64}, **kw)


def test_final_norm_hooks_and_neurons_mean_what_transformer_lens_means(tmp_path, perturbed_gpt2):
    run_extract(_spec(tmp_path, perturbed_gpt2), progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("m")
    assert ds.info.hooks["blocks.0.mlp.hook_post"].d == 4 * 32 and ds.info.hooks["blocks.1.attn.hook_z"].d == 32
    ids = torch.from_numpy(ds.tokens().column("token_id").to_numpy().astype(np.int64).reshape(-1, CTX))
    model = AutoModel.from_pretrained(perturbed_gpt2, dtype=torch.float32, attn_implementation="eager").eval()
    got = {}
    model.ln_f.register_forward_pre_hook(lambda m, a: got.__setitem__("ln_in", a[0]))
    model.ln_f.register_forward_hook(lambda m, a, o: got.__setitem__("ln_out", o))
    model.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("post", a[0]))
    model.h[1].attn.c_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    x = got["ln_in"].double()
    x = x - x.mean(-1, keepdim=True)
    normalized = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.layer_norm_epsilon)).reshape(-1, 32)
    np.testing.assert_allclose(ds.read("ln_final.hook_normalized"), normalized.numpy(), atol=1e-5)
    np.testing.assert_allclose(ds.read("ln_final.hook_out"), got["ln_out"].reshape(-1, 32).numpy(), atol=1e-5)
    assert np.abs(ds.read("ln_final.hook_out") - ds.read("ln_final.hook_normalized")).max() > 0.05  # the norm's weights matter
    np.testing.assert_allclose(ds.read("blocks.0.mlp.hook_post"), got["post"].reshape(-1, 128).numpy(), atol=1e-5)
    np.testing.assert_allclose(ds.read("blocks.1.attn.hook_z"), got["z"].reshape(-1, 32).numpy(), atol=1e-5)
    assert "before its weight and bias" in ds.info.meta["hook_meanings"]["ln_final.hook_normalized"]


def test_a_hook_stored_with_the_old_meaning_is_captured_again_alone(tmp_path, perturbed_gpt2):
    spec = _spec(tmp_path, perturbed_gpt2, hooks=["blocks.1.hook_resid_post", "ln_final.hook_normalized"])
    run_extract(spec, progress=False)
    s = store.open(str(tmp_path / "acts"))
    with dataset_lease(s.storage, "m") as lease:  # as a dataset stored before the hook took TransformerLens's meaning
        w = s.writer("m", fence=lease.token)
        meta = dict(w.info.meta)
        meta["hook_modules"] = {**meta["hook_modules"], "ln_final.hook_normalized": "ln_f:output"}
        w._publish(w.info.with_changes(meta=meta))
    ds = s.dataset("m")
    before = {u: ds.record("blocks.1.hook_resid_post", u).committed_at for u in ds.committed_units()}
    res = run_extract(spec, progress=False)
    assert not res.noop and res.hooks_computed == ["ln_final.hook_normalized"] and res.units_run == len(before)
    ds = s.dataset("m")
    assert {u: ds.record("blocks.1.hook_resid_post", u).committed_at for u in ds.committed_units()} == before
    assert ds.info.meta["hook_modules"]["ln_final.hook_normalized"].startswith("ln_f:input+normalize")
    assert run_extract(spec, progress=False).noop


def test_bad_hook_requests_are_one_line(tmp_path, perturbed_gpt2):
    with pytest.raises(UnknownHookError, match=r"unknown hook 'blocks.0.mlp.hook_nope'.*valid hooks:.*mlp.hook_post"):
        run_extract(_spec(tmp_path, perturbed_gpt2, hooks=["blocks.0.mlp.hook_nope"]), progress=False)
    with pytest.raises(SpecError, match=r"max_bytes_per_token"):
        run_extract(_spec(tmp_path, perturbed_gpt2, hooks=["blocks.*.attn.hook_result"], max_bytes_per_token=1000), progress=False)
    spec = _spec(tmp_path, perturbed_gpt2, hooks=["blocks.0.attn.*"])
    from strata.pipeline.extract import prepare

    assert "blocks.0.attn.hook_result" not in prepare(spec, store.open(spec.store)).hooks  # only when named
    assert not (tmp_path / "acts" / "datasets").exists() or not any((tmp_path / "acts" / "datasets").iterdir())


def test_module_path_hooks_store_what_the_module_computes(tmp_path, perturbed_gpt2):
    hooks = ["module:transformer.h.0.mlp.c_fc", "module:h.1.ln_2:input", "blocks.0.hook_resid_post"]
    res = run_extract(_spec(tmp_path, perturbed_gpt2, hooks=hooks), progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("m")
    assert sorted(res.hooks) == sorted(["module:h.0.mlp.c_fc", "module:h.1.ln_2:input", "blocks.0.hook_resid_post"])
    assert ds.info.hooks["module:h.0.mlp.c_fc"].d == 128 and ds.info.hooks["module:h.1.ln_2:input"].d == 32
    ids = torch.from_numpy(ds.tokens().column("token_id").to_numpy().astype(np.int64).reshape(-1, CTX))
    model = AutoModel.from_pretrained(perturbed_gpt2, dtype=torch.float32).eval()
    got = {}
    model.h[0].mlp.c_fc.register_forward_hook(lambda m, a, o: got.__setitem__("fc", o))
    model.h[1].ln_2.register_forward_pre_hook(lambda m, a: got.__setitem__("ln2in", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    np.testing.assert_allclose(ds.read("module:h.0.mlp.c_fc"), got["fc"].reshape(-1, 128).numpy(), atol=1e-5)
    np.testing.assert_allclose(ds.read("module:h.1.ln_2:input"), got["ln2in"].reshape(-1, 32).numpy(), atol=1e-5)
    (tmp_path / "typo").mkdir()
    with pytest.raises(UnknownHookError, match=r"h\.0\.mlp"):
        run_extract(_spec(tmp_path / "typo", perturbed_gpt2, hooks=["module:h.0.mpl"]), progress=False)
    assert not (tmp_path / "typo" / "acts" / "datasets").exists()
