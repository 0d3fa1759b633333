"""Hook mapping per family, checked against the model's own hidden states and against the
residual-stream arithmetic each architecture implies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from strata.pipeline.errors import UnknownHookError, UnsupportedModelError
from strata.pipeline.hooks import Capture, expand_hooks, family_of, hook_sites, match_hooks

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "bert"]


def _capture_all(model, sites, ids, **kw):
    got = {}
    with torch.no_grad(), Capture(model, sites, list(sites), lambda h, t: got.__setitem__(h, t.clone()), stop_early=False) as cap:
        cap.forward(input_ids=ids, **kw)
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_agree_with_hidden_states_and_residual_arithmetic(tiny_models, family):
    model = AutoModel.from_pretrained(tiny_models(family), dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    sites = hook_sites(family_of(model.config.model_type), n)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    got = _capture_all(model, sites, ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    for layer in range(n):
        assert torch.equal(got[f"blocks.{layer}.hook_resid_pre"], hs[layer])
        if layer < n - 1:
            assert torch.equal(got[f"blocks.{layer}.hook_resid_post"], hs[layer + 1])
        assert got[f"blocks.{layer}.hook_attn_out"].shape == hs[0].shape
    last = got[f"blocks.{n - 1}.hook_resid_post"]
    if family == "bert":  # post-LN encoder: no final norm, the last hidden state is resid_post
        assert torch.equal(last, hs[n]) and "ln_final.hook_normalized" not in sites
    else:
        # transformers 5: the last hidden state has the final norm applied; resid_post does not
        assert not torch.allclose(last, hs[n])
        assert torch.equal(got["ln_final.hook_normalized"], hs[n])
        for layer in range(n):  # pre-LN: what attn and MLP add is the whole residual update
            pre, post = got[f"blocks.{layer}.hook_resid_pre"], got[f"blocks.{layer}.hook_resid_post"]
            summed = pre + got[f"blocks.{layer}.hook_attn_out"] + got[f"blocks.{layer}.hook_mlp_out"]
            torch.testing.assert_close(summed, post, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["hook_embed"], model.get_input_embeddings()(ids))


def test_forward_stops_after_the_deepest_hook(tiny_gpt2):
    model = AutoModel.from_pretrained(tiny_gpt2).eval()
    sites = hook_sites(family_of("gpt2"), 2)
    ran = []
    model.h[1].register_forward_hook(lambda *a: ran.append("h1"))
    model.ln_f.register_forward_hook(lambda *a: ran.append("ln_f"))
    got = {}
    with torch.no_grad(), Capture(model, sites, ["hook_embed", "blocks.0.hook_resid_post"], lambda h, t: got.__setitem__(h, t)) as cap:
        cap.forward(input_ids=torch.tensor([[5, 6, 7]]))
    assert set(got) == {"hook_embed", "blocks.0.hook_resid_post"} and ran == []
    with torch.no_grad(), Capture(model, sites, ["blocks.1.hook_resid_pre"], lambda h, t: None) as cap:
        cap.forward(input_ids=torch.tensor([[5, 6, 7]]))
    assert ran == []  # a pre-hook stops before the block runs
    # our hooks are removed on exit; the test's own hook on h[1] stays
    assert len(model.h[0]._forward_hooks) == 0 and len(model.h[0]._forward_pre_hooks) == 0
    assert len(model.h[1]._forward_hooks) == 1 and len(model.h[1]._forward_pre_hooks) == 0


def test_glob_expansion_order_and_unknown_hooks():
    sites = hook_sites(family_of("llama"), 3)
    assert expand_hooks(["blocks.*.hook_resid_post"], sites) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert expand_hooks(["ln_final.hook_normalized", "hook_embed", "blocks.1.*"], sites) == [
        "hook_embed", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
        "ln_final.hook_normalized",
    ]
    with pytest.raises(UnknownHookError, match=r"blocks\.7\.hook_resid_post.*valid hooks: hook_embed, .*blocks\.\{0\.\.2\}\.hook_resid_post"):
        expand_hooks(["blocks.7.hook_resid_post"], sites)
    with pytest.raises(UnsupportedModelError, match="supported model types"):
        family_of("xlnet")  # t5 is known now (its encoder)


def test_match_hooks_keeps_the_order_of_the_available_hooks_once_each():
    available = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert match_hooks(["blocks.1.*", "blocks.*.hook_resid_post", "hook_embed"], available) == [
        "hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert match_hooks(["*"], available) == available
    assert match_hooks(["blocks.[01].hook_resid_post"], available) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    # a pattern matching nothing: an error naming it and the valid hooks, the caller's own, or passed over
    with pytest.raises(UnknownHookError, match=r"'blocks.9.\*' matches no hook; valid hooks: hook_embed, blocks.\{0..1\}.hook_resid_post"):
        match_hooks(["blocks.9.*"], available)
    with pytest.raises(KeyError, match="no blocks.9"):
        match_hooks(["hook_embed", "blocks.9.*"], available, error=lambda p: KeyError(f"no {p[:8]}"))
    assert match_hooks(["blocks.9.*", "hook_embed"], available, skip_missing=True) == ["hook_embed"]
    assert match_hooks([], available) == []
