"""Hook firing order, per family, against the modules' own call sequence.

The capture stops the forward after the deepest hook asked for by :attr:`HookSite.order`, so that
order must be the order in which the model's modules really run. Post-LN BERT normalizes after each
sub-block (``ln1`` after ``hook_attn_out``, ``ln2`` after ``hook_mlp_out``), unlike the pre-norm
families. Each family's tiny seeded model runs once with a plain PyTorch hook on every module a site
names (a pre-hook for inputs, a forward hook for outputs), recording the call sequence; the sites of
:func:`hook_sites` must follow it. Then every pair of hooks of block 0 is captured with the forward
stopped early: both must arrive, equal to a capture of the whole forward.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from strata.pipeline.errors import UnknownHookError
from strata.pipeline.hooks import Capture, HookSite, expand_hooks, family_of, hook_sites
from strata.pipeline.tiny import FAMILIES, tiny_config


def _load(folder) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, family_of(config.model_type).model_class or "AutoModel")
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def _sites(model: torch.nn.Module) -> dict[str, HookSite]:
    c = model.config
    return hook_sites(family_of(c.model_type), c.num_hidden_layers, c)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """A factory: ``loaded(family)`` -> (model, its sites, ids, every hook captured in one whole forward)."""
    done: dict[str, tuple] = {}

    def get(family: str):
        if family not in done:
            model = _load(tiny_models(family))
            sites, ids = _sites(model), _ids(model)
            got: dict[str, torch.Tensor] = {}
            with torch.no_grad(), Capture(model, sites, list(sites), lambda h, t: got.__setitem__(h, t.clone()), stop_early=False) as cap:
                cap.forward(input_ids=ids)
            done[family] = (model, sites, ids, got)
        return done[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_sites_follow_the_modules_firing_order(loaded, family):
    model, sites, ids, got = loaded(family)
    assert set(got) == set(sites)
    events: list[tuple[str, str]] = []
    handles = []
    for module, io in dict.fromkeys((s.module, s.io) for s in sites.values()):
        m = model.get_submodule(module)
        if io == "input":
            handles.append(m.register_forward_pre_hook(lambda *a, k=(module, io): events.append(k)))
        else:
            handles.append(m.register_forward_hook(lambda *a, k=(module, io): events.append(k)))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert len(events) == len(set(events)), "a hooked module ran twice"
    fired = {k: i for i, k in enumerate(events)}
    names = list(sites)
    assert names == sorted(names, key=lambda h: sites[h].order)  # hook_sites gives them in their order
    when = [fired[(sites[h].module, sites[h].io)] for h in names]
    late = [(a, b) for (a, i), (b, j) in itertools.pairwise(zip(names, when, strict=True)) if i > j]
    assert not late, f"{family}: fired in the other order: {late}"
    # hooks on one module's input (or output) share its firing; their order breaks the tie consistently
    assert len({sites[h].order for h in names}) == len(names)
    if family == "bert":  # post-LN: the norms fire after their sub-block
        o = {k: sites[f"blocks.0.{k}"].order for k in ("hook_attn_out", "ln1.hook_normalized", "hook_mlp_out", "ln2.hook_normalized")}
        assert o["hook_attn_out"] < o["ln1.hook_normalized"] < o["hook_mlp_out"] < o["ln2.hook_normalized"]


@pytest.mark.parametrize("family", FAMILIES)
def test_any_two_hooks_of_a_block_arrive_when_the_forward_stops_early(loaded, family):
    model, sites, ids, got = loaded(family)
    block0 = [h for h in sites if h == "hook_embed" or h.startswith("blocks.0.")]
    ran: list[int] = []
    layers = model.get_submodule(family_of(model.config.model_type).layers)
    handle = layers[1].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        for pair in itertools.combinations(block0, 2):
            part: dict[str, torch.Tensor] = {}
            with torch.no_grad(), Capture(model, sites, list(pair), lambda h, t, part=part: part.__setitem__(h, t.clone())) as cap:
                cap.forward(input_ids=ids)
            assert set(part) == set(pair), f"{family}: {pair} gave {sorted(part)}"
            for h in pair:
                torch.testing.assert_close(part[h], got[h], rtol=0, atol=0)
    finally:
        handle.remove()
    assert ran == []  # every forward stopped inside block 0


def test_globs_pass_over_attn_hook_result_without_an_error():
    """``attn.hook_result`` is large: a glob never takes it and does not fail for it; naming it does."""
    config = tiny_config("bert", layers=2, d_model=32, heads=4, max_positions=64, vocab_size=100)
    sites = hook_sites(family_of("bert"), 2, config)
    assert expand_hooks(["blocks.*.attn.*"], sites) == [f"blocks.{i}.attn.hook_{k}" for i in range(2) for k in "qkvz"]
    assert not any(h.endswith("hook_result") for h in expand_hooks(["*"], sites))
    assert expand_hooks(["blocks.1.*", "blocks.1.attn.hook_result"], sites)[4:8] == [
        "blocks.1.attn.hook_z", "blocks.1.attn.hook_result", "blocks.1.hook_attn_out", "blocks.1.hook_resid_mid"]
    with pytest.raises(UnknownHookError, match=r"'blocks\.0\.attn\.hook_res\*'.*only when named: blocks\.\*\.attn\.hook_result$"):
        expand_hooks(["blocks.0.attn.hook_res*"], sites)  # a glob that could only take hook_result takes nothing


def test_a_hook_that_did_not_fire_is_an_error_not_a_hole(loaded):
    """A forward stopped before a hook asked for (a wrong ``stop_after``) fails; it never leaves the hook's rows unwritten."""
    model, sites, ids, got = loaded("gpt2")
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
    with torch.no_grad(), Capture(model, sites, hooks, lambda h, t: None, stop_after="blocks.0.hook_resid_pre") as cap:
        missed = r"^hooks blocks\.1\.mlp\.hook_post, blocks\.1\.hook_resid_post did not fire .*'blocks\.0\.hook_resid_pre'"
        with pytest.raises(RuntimeError, match=missed):
            cap.forward(input_ids=ids)
