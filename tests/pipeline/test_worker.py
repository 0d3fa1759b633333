"""The model replica in-process (no Ray): stored activations equal an independent forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from strata import store
from strata.pipeline.config import ModelSpec
from strata.pipeline.hooks import family_of, hook_sites
from strata.pipeline.models import resolve
from strata.pipeline.packing import encode_texts, tokenizer_info
from strata.pipeline.plan import pack
from strata.pipeline.tiny import synthetic_docs
from strata.pipeline.worker import UnitWorker, WorkerConfig

HOOKS = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]


def _contexts(folder, packing, n_docs=12, ctx=16):
    tok = tokenizer_info(AutoTokenizer.from_pretrained(folder), "tiny")
    texts = synthetic_docs(n_docs, seed=3)
    ids = encode_texts(tok.backend_json, texts)
    return pack(ids, np.arange(n_docs), tok=tok, context_size=ctx, packing=packing, prepend_bos=True)


def _reference(folder, contexts, mask: bool):
    """Independent capture: output_hidden_states for block 0, plain forward hooks on the HF
    modules for the rest (the last hidden state has the final norm applied)."""
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    got = {}
    model.h[1].register_forward_hook(lambda m, a, o: got.__setitem__("blocks.1.hook_resid_post", o if torch.is_tensor(o) else o[0]))
    model.h[1].mlp.register_forward_hook(lambda m, a, o: got.__setitem__("blocks.1.hook_mlp_out", o))
    ids = torch.from_numpy(contexts.token_id.astype(np.int64))
    kw = {"attention_mask": torch.from_numpy(contexts.mask).long()} if mask else {}
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, **kw)
    got["blocks.0.hook_resid_post"] = out.hidden_states[1]
    got["hook_embed"] = model.wte(ids)
    return {h: t.reshape(-1, t.shape[-1]) for h, t in got.items()}


@pytest.mark.parametrize(("packing", "dtype"), [("concat", "float32"), ("truncate", "float32"), ("concat", "float16"), ("concat", "bfloat16")])
def test_stored_activations_equal_a_direct_forward(tmp_path, tiny_gpt2, packing, dtype):
    contexts = _contexts(tiny_gpt2, packing)
    n = len(contexts)
    uc = n  # one unit holding every context, one batch: the reference sees the same batch
    m = resolve(ModelSpec(id=str(tiny_gpt2)))
    s = store.open(tmp_path / "acts")
    s.create_dataset("t", hooks={h: 32 for h in HOOKS}, context_size=16, dtype=dtype, num_units=1, unit_contexts=uc, meta={"model": "tiny"})
    w = UnitWorker(WorkerConfig(str(tmp_path / "acts"), "t", m, "gpt2", 2, 32, dtype, batch_tokens=uc * 16))
    st = w.process(0, contexts, HOOKS)
    assert all(v == "committed" for v in st["status"].values())
    ref = _reference(tiny_gpt2, contexts, mask=packing == "truncate")
    ds = s.dataset("t")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for h in HOOKS:
        got = ds.read(h, as_="torch")
        assert got.dtype == tdt
        assert torch.equal(got, ref[h].to(tdt)), h  # exact: same ops, rounded once to the stored dtype
    toks = ds.tokens()
    assert toks.column("token_id").to_numpy().tolist() == contexts.token_id.reshape(-1).tolist()
    assert toks.column("special").to_numpy().tolist() == contexts.special.reshape(-1).tolist()
    assert ds.verify().ok


def test_batches_split_by_tokens_and_a_hook_subset(tmp_path, tiny_gpt2):
    contexts = _contexts(tiny_gpt2, "concat")
    m = resolve(ModelSpec(id=str(tiny_gpt2)))
    s = store.open(tmp_path / "acts")
    s.create_dataset("t", hooks={h: 32 for h in HOOKS}, context_size=16, dtype="float32", num_units=2, unit_contexts=8, meta={})
    w = UnitWorker(WorkerConfig(str(tmp_path / "acts"), "t", m, "gpt2", 2, 32, "float32", batch_tokens=40))  # 2 contexts per batch
    w.process(1, contexts.slice(8, 16), ["blocks.0.hook_resid_post"])
    got = s.dataset("t").read("blocks.0.hook_resid_post", rows=slice(128, 256), as_="torch")
    ref = _reference(tiny_gpt2, contexts.slice(8, 16), mask=False)["blocks.0.hook_resid_post"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # other batch sizes: equal up to matmul blocking
    assert s.dataset("t").committed_units("blocks.1.hook_resid_post") == []
    sites = hook_sites(family_of("gpt2"), 2)
    assert sites["blocks.0.hook_resid_post"].describe() == "h.0:output"


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gemma2", "bert"])
@pytest.mark.parametrize("packing", ["concat", "truncate"])
def test_every_family_through_the_worker(tmp_path, tiny_models, family, packing):
    folder = tiny_models(family)
    contexts = _contexts(folder, packing, n_docs=6)
    n = len(contexts)
    m = resolve(ModelSpec(id=str(folder)))
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    s = store.open(tmp_path / "acts")
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    s.create_dataset("t", hooks={h: 32 for h in hooks}, context_size=16, dtype="float32", num_units=1, unit_contexts=n, meta={})
    w = UnitWorker(WorkerConfig(str(tmp_path / "acts"), "t", m, model.config.model_type, 2, 32, "float32", batch_tokens=n * 16))
    w.process(0, contexts, hooks)
    kw = {"attention_mask": torch.from_numpy(contexts.mask).long()} if contexts.padded else {}
    with torch.no_grad():
        hs = model(input_ids=torch.from_numpy(contexts.token_id.astype(np.int64)), output_hidden_states=True, **kw).hidden_states
    ds = s.dataset("t")
    ref = hs[1].reshape(-1, 32)
    assert torch.equal(ds.read("blocks.0.hook_resid_post", as_="torch"), ref)
    assert torch.equal(ds.read("blocks.1.hook_resid_pre", as_="torch"), ref)
    assert packing == "concat" or contexts.padded
