"""Hook meanings checked against TransformerLens 3.x, offline.

A seeded tiny GPT-2, GPT-NeoX (parallel attention and MLP, partial rotary), Llama and Qwen2 (q, k, v
biases; both grouped-query attention: 2 key/value heads for 4 query heads) and Gemma-2 model have
every weight perturbed with a fixed seed (norm weights not 1, biases not 0: unit norms would hide the
difference between a norm's normalized input and its output) and are saved again. A
``HookedTransformer`` is built from a ``HookedTransformerConfig`` written out from the Hugging Face
config, with the HF weights converted by ``transformer_lens.pretrained.weight_conversions``
and ``fold_ln`` / ``center_writing_weights`` / ``center_unembed`` off, so that it holds the same
function; the HF model runs with ``attn_implementation="eager"`` (``sdpa`` drifts by about 1e-3).
Every hook that both offer must agree to 1e-5 in float32.

What TransformerLens gives, and what these tests pin:

- ``attn.hook_q|k|v|z`` are ``[batch, pos, heads, d_head]``; Strata stores heads side by side
  (``[tokens, heads * d_head]``). With grouped-query attention TransformerLens's ``hook_k`` and
  ``hook_v`` have the ``n_key_value_heads`` heads, not repeated to ``n_heads``: so do Strata's.
  ``hook_q`` / ``hook_k`` are before the rotary embedding (TransformerLens's ``hook_rot_q|k`` after).
- ``attn.hook_result`` (``set_use_attn_result(True)``) is ``[batch, pos, heads, d_model]``, the bias
  of the output projection left out; Strata's is the same, flattened.
- ``ln*.hook_normalized`` is the norm's input normalized, before its weight and bias.
- GPT-NeoX with parallel attention and MLP has no ``hook_resid_mid`` in either; its q, k, v come
  from the fused ``query_key_value`` laid out per head (``head_slice``).
- ``mlp.hook_in`` has no ``HookedTransformer`` name (it is ``TransformerBridge``'s): it is the
  MLP's input, the second norm's output. ``TransformerBridge.boot_transformers(folder)`` (the raw HF
  model, hooked) names every Strata hook but ``attn.hook_result``, ``mlp.hook_in`` and
  ``ln_final.hook_out`` included: all agree. ``HookedTransformer``'s ``hook_mlp_in``
  (``set_use_hook_mlp_in(True)``) is something else: ``resid_mid``, before the norm.
- ``ln_final.hook_out`` is the HF final norm's output (what the unembedding reads).
- Gemma-2: ``hook_attn_out`` / ``hook_mlp_out`` are after the post-norms (``ln1_post`` / ``ln2_post``).
- BERT (post-LN, ``HookedEncoder``): q, k, v, z, result, neurons, ``hook_attn_out``, ``hook_mlp_out``,
  ``hook_resid_pre``, ``hook_resid_mid`` and ``ln1|ln2.hook_normalized`` agree. ``hook_resid_post`` does
  NOT: TransformerLens's is before the block's output LayerNorm, Strata's is the block's output, after
  it (TransformerLens's ``hook_normalized_resid_post``, and the next block's ``hook_resid_pre`` in
  both). ``mlp.hook_in`` (``attention.output.LayerNorm``'s output) has no ``HookedEncoder`` name: it
  is ``ln1.hook_normalized`` with ln1's weight and bias, and TransformerLens's ``hook_resid_post``
  minus its ``hook_mlp_out``; ``HookedEncoder``'s ``hook_mlp_in`` is ``resid_mid``, before the norm.
  The norms fire after their sub-block, and the capture stops in that order. Strata's
  ``hook_embed`` is TransformerLens's ``embed.hook_embed`` (word embeddings only).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.pretrained.weight_conversions import (
    convert_bert_weights,
    convert_gemma_weights,
    convert_gpt2_weights,
    convert_llama_weights,
    convert_neox_weights,
    convert_qwen2_weights,
)
from transformers import AutoModelForCausalLM, BertForPreTraining, BertModel

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.extract import run_extract
from strata.pipeline.hooks import Capture, family_of, hook_sites
from strata.pipeline.tiny import synthetic_docs, write_jsonl

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]
TOL = {"rtol": 1e-5, "atol": 1e-5}
#: Strata hooks with no HookedTransformer name of the same meaning (checked separately below).
STRATA_ONLY = {"attn.hook_result", "mlp.hook_in", "ln_final.hook_out"}
#: transformer-lens 3.x warns that HookedTransformer and HookedEncoder go in 4.0; pyproject pins <4.
pytestmark = pytest.mark.filterwarnings("ignore:Hooked(Transformer|Encoder) is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def perturbed(tiny_models, tmp_path_factory):
    """A factory: ``perturbed(family)`` -> folder of the tiny model of ``family`` with every
    weight perturbed (seeded) and its tokenizer."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tl_perturbed")

    def get(family: str) -> Path:
        if family not in built:
            src = tiny_models(family)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            g = torch.Generator().manual_seed(11)
            with torch.no_grad():
                for _, p in sorted(model.named_parameters()):
                    p.add_((0.3 if p.ndim == 1 else 0.02) * torch.randn(p.shape, generator=g))
            out = root / family
            model.save_pretrained(out)
            for f in src.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                    (out / f.name).write_bytes(f.read_bytes())
            built[family] = out
        return built[family]

    return get


def _rope_theta(c) -> float:
    return float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _transformer_lens(hf, family: str) -> HookedTransformer:
    """A HookedTransformer holding ``hf``'s weights, unfolded and uncentred."""
    c = hf.config
    if family == "gpt2":
        cfg = HookedTransformerConfig(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, n_layers=c.n_layer,
            n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
            original_architecture="GPT2LMHeadModel", dtype=torch.float32, device="cpu")
        convert = convert_gpt2_weights
    elif family == "gpt_neox":
        d_head = c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(
            d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
            n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size, act_fn=c.hidden_act, normalization_type="LN",
            parallel_attn_mlp=c.use_parallel_residual, positional_embedding_type="rotary", rotary_adjacent_pairs=False,
            rotary_dim=round(c.rope_parameters.get("partial_rotary_factor", 1.0) * d_head), rotary_base=_rope_theta(c),
            original_architecture="GPTNeoXForCausalLM", dtype=torch.float32, device="cpu")
        convert = convert_neox_weights
    else:
        d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rotary = dict(
            d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
            n_key_value_heads=c.num_key_value_heads, normalization_type="RMS", positional_embedding_type="rotary",
            rotary_adjacent_pairs=False, rotary_dim=d_head, rotary_base=_rope_theta(c), final_rms=True, gated_mlp=True,
            dtype=torch.float32, device="cpu")
        if family in ("llama", "qwen2"):
            arch = "LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"
            cfg = HookedTransformerConfig(**rotary, act_fn=c.hidden_act, original_architecture=arch)
            convert = convert_llama_weights if family == "llama" else convert_qwen2_weights
        else:
            cfg = HookedTransformerConfig(
                **rotary, act_fn=c.hidden_activation, original_architecture="Gemma2ForCausalLM", use_normalization_before_and_after=True,
                attn_scale=math.sqrt(c.query_pre_attn_scalar), use_local_attn=True, window_size=c.sliding_window,
                attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
                attn_scores_soft_cap=c.attn_logit_softcapping, output_logits_soft_cap=c.final_logit_softcapping)
            convert = convert_gemma_weights
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    return tl.eval()


def _load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _ids(hf, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(5, hf.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


def _strata(hf, ids: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    c = hf.config
    sites = hook_sites(family_of(c.model_type), c.num_hidden_layers, c)
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad(), Capture(hf.base_model, sites, list(sites), lambda h, t: got.__setitem__(h, t.clone()), stop_early=False) as cap:
        cap.forward(input_ids=ids)
    return sites, got


def _mlp_norm(hf, family: str, layer: int) -> torch.nn.Module:
    """The HF norm in front of the MLP of block ``layer``."""
    if family == "gpt2":
        return hf.base_model.h[layer].ln_2
    block = hf.base_model.layers[layer]
    return block.pre_feedforward_layernorm if family == "gemma2" else block.post_attention_layernorm


def _flat(t: torch.Tensor) -> torch.Tensor:
    """TransformerLens's per-head ``[batch, pos, heads, d]`` as Strata stores it, heads side by side."""
    return t.flatten(-2) if t.ndim == 4 else t


@pytest.fixture(scope="module")
def runs(perturbed):
    """A factory: ``runs(family)`` -> (hf, tl, ids, sites, strata captures, TransformerLens cache)."""
    done: dict[str, tuple] = {}

    def get(family: str):
        if family not in done:
            hf = _load(perturbed(family))
            tl = _transformer_lens(hf, family)
            tl.set_use_attn_result(True)
            tl.set_use_hook_mlp_in(True)
            ids = _ids(hf)
            with torch.no_grad():
                logits, cache = tl.run_with_cache(ids)
                ref = hf(input_ids=ids).logits
            torch.testing.assert_close(logits, ref, **TOL)  # the two hold the same function
            sites, got = _strata(hf, ids)
            done[family] = (hf, tl, ids, sites, got, cache)
        return done[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shared_hook_equals_transformer_lens(runs, family):
    hf, tl, ids, sites, got, cache = runs(family)
    n = hf.config.num_hidden_layers
    compared = []
    for h in sites:
        kind = h.split(".", 2)[-1] if h.startswith("blocks.") else h
        if kind in STRATA_ONLY:
            assert h not in cache.cache_dict or kind == "attn.hook_result"
            continue
        assert h in cache.cache_dict, f"{h} has no TransformerLens hook"
        torch.testing.assert_close(got[h], _flat(cache[h]), **TOL, msg=lambda m, h=h: f"{h}: {m}")
        compared.append(h)
    per_block = ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "hook_attn_out",
                 "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    if family in ("llama", "qwen2", "gemma2"):
        per_block.append("mlp.hook_pre_linear")
    if family == "gpt_neox":  # parallel attention and MLP: no resid_mid, in either
        per_block.remove("hook_resid_mid")
        assert not any(h.endswith("hook_resid_mid") for h in list(sites) + list(cache.cache_dict))
    want = {"hook_embed", "ln_final.hook_normalized"} | {f"blocks.{layer}.{k}" for layer in range(n) for k in per_block}
    assert want <= set(compared), sorted(want - set(compared))
    # The perturbation shows: a norm's normalized input is not its output.
    assert (got["blocks.0.mlp.hook_in"] - got["blocks.0.ln2.hook_normalized"]).abs().max() > 0.05
    assert (got["ln_final.hook_out"] - got["ln_final.hook_normalized"]).abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_result_is_each_heads_write(runs, family):
    hf, tl, ids, sites, got, cache = runs(family)
    c = hf.config
    for layer in range(c.num_hidden_layers):
        h = f"blocks.{layer}.attn.hook_result"
        assert sites[h].explicit and cache[h].shape == (*ids.shape, c.num_attention_heads, tl.cfg.d_model)
        assert sites[h].width == c.num_attention_heads * tl.cfg.d_model == got[h].shape[-1]
        torch.testing.assert_close(got[h], _flat(cache[h]), **TOL)
        if family != "gemma2":  # the heads' writes and the output bias sum to attn_out (Gemma-2: before ln1_post)
            summed = cache[h].sum(-2) + tl.blocks[layer].attn.b_O
            torch.testing.assert_close(summed, got[f"blocks.{layer}.hook_attn_out"], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_in_is_the_second_norms_output(runs, family):
    hf, tl, ids, sites, got, cache = runs(family)
    for layer in range(hf.config.num_hidden_layers):
        norm = _mlp_norm(hf, family, layer)
        # what the MLP's norm reads: resid_mid, or resid_pre with NeoX's parallel attention and MLP
        read = f"blocks.{layer}.hook_resid_pre" if family == "gpt_neox" else f"blocks.{layer}.hook_resid_mid"
        with torch.no_grad():
            direct = norm(cache[read])
        torch.testing.assert_close(got[f"blocks.{layer}.mlp.hook_in"], direct, **TOL)
        # = TransformerLens's ln2.hook_normalized with the norm's weight (and bias) applied
        ln2 = tl.blocks[layer].ln2
        scaled = cache[f"blocks.{layer}.ln2.hook_normalized"] * ln2.w + (ln2.b if family in ("gpt2", "gpt_neox") else 0)
        torch.testing.assert_close(got[f"blocks.{layer}.mlp.hook_in"], scaled, **TOL)
        # HookedTransformer's own hook_mlp_in is resid_mid (NeoX: resid_pre), before the norm: not Strata's mlp.hook_in
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_in"], got[read], **TOL)
        assert (cache[f"blocks.{layer}.hook_mlp_in"] - got[f"blocks.{layer}.mlp.hook_in"]).abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_ln_final_hook_out_is_the_final_norms_output(runs, family):
    hf, tl, ids, sites, got, cache = runs(family)
    with torch.no_grad():
        last = hf.base_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # transformers 5: after the final norm
    torch.testing.assert_close(got["ln_final.hook_out"], last, **TOL)
    ln = tl.ln_final
    scaled = cache["ln_final.hook_normalized"] * ln.w + (ln.b if family in ("gpt2", "gpt_neox") else 0)
    torch.testing.assert_close(got["ln_final.hook_out"], scaled, **TOL)
    if family != "gemma2":  # Gemma-2 soft-caps the logits after the unembedding
        torch.testing.assert_close(tl.unembed(got["ln_final.hook_out"]), hf.get_output_embeddings()(last), **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grouped_query_attention_keeps_the_key_value_heads(runs, family):
    hf, tl, ids, sites, got, cache = runs(family)
    c = hf.config
    h, kv, dh = c.num_attention_heads, c.num_key_value_heads, tl.cfg.d_head
    assert kv < h and tl.cfg.n_key_value_heads == kv
    b, s = ids.shape
    for layer in range(c.num_hidden_layers):
        for k in ("k", "v"):  # TransformerLens: [batch, pos, n_key_value_heads, d_head], not repeated per query head
            assert cache[f"blocks.{layer}.attn.hook_{k}"].shape == (b, s, kv, dh)
            assert sites[f"blocks.{layer}.attn.hook_{k}"].width == kv * dh == got[f"blocks.{layer}.attn.hook_{k}"].shape[-1]
        for k in ("q", "z"):
            assert cache[f"blocks.{layer}.attn.hook_{k}"].shape == (b, s, h, dh)
            assert sites[f"blocks.{layer}.attn.hook_{k}"].width == h * dh
        # the rotary embedding comes after hook_q / hook_k, in both
        assert (cache[f"blocks.{layer}.attn.hook_rot_k"] - cache[f"blocks.{layer}.attn.hook_k"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hook_equals_transformer_bridge(perturbed, family):
    """The bridge wraps the HF model itself: it names mlp.hook_in and ln_final.hook_out too."""
    folder = perturbed(family)
    hf = _load(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    ids = _ids(hf)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    sites, got = _strata(hf, ids)
    missing = {h.split(".", 2)[-1] if h.startswith("blocks.") else h for h in sites if h not in cache}
    assert missing == {"attn.hook_result"}, missing
    for h in sites:
        if h in cache:
            torch.testing.assert_close(got[h], _flat(cache[h]), **TOL, msg=lambda m, h=h: f"{h}: {m}")
    n = hf.config.num_hidden_layers
    assert {f"blocks.{n - 1}.mlp.hook_in", "ln_final.hook_out", "ln_final.hook_normalized"} <= set(cache.keys())


CTX = 16
EXTRACTED = ["blocks.0.hook_resid_mid", "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_in", "blocks.*.attn.hook_k",
             "blocks.1.attn.hook_z", "blocks.1.attn.hook_result", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post",
             "ln_final.hook_normalized", "ln_final.hook_out"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_extracted_dataset_equals_transformer_lens(tmp_path, perturbed, family):
    """End to end: a local extraction of a perturbed model, read back, against run_with_cache on the stored tokens."""
    folder = perturbed(family)
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(12, seed=2))
    spec = ExtractSpec(store=str(tmp_path / "acts"), name="tl", model={"id": str(folder)}, corpus={"path": str(corpus)},
                       tokenize={"context_size": CTX}, hooks=EXTRACTED, dtype="float32",
                       compute={"executor": "local", "unit_contexts": 4, "batch_tokens": 64})
    run_extract(spec, progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("tl")
    ids = torch.from_numpy(ds.tokens().column("token_id").to_numpy().astype(np.int64).reshape(-1, CTX))
    hf = _load(folder)
    tl = _transformer_lens(hf, family)
    tl.set_use_attn_result(True)
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)
        mlp_in = _mlp_norm(hf, family, 0)(cache["blocks.0.hook_resid_mid"])  # the HF modules themselves
        final = hf.base_model.get_submodule(family_of(hf.config.model_type).ln_final)(cache["blocks.1.hook_resid_post"])
    hooks = sorted(ds.info.hooks)
    assert len(hooks) == 11 and "blocks.0.attn.hook_k" in hooks and "blocks.1.attn.hook_k" in hooks
    for h in hooks:
        want = mlp_in if h == "blocks.0.mlp.hook_in" else final if h == "ln_final.hook_out" else _flat(cache[h])
        want = want.reshape(-1, want.shape[-1]).numpy()
        assert ds.info.hooks[h].d == want.shape[-1], h
        np.testing.assert_allclose(ds.read(h), want, err_msg=h, **TOL)
    assert ds.info.hooks["blocks.0.attn.hook_k"].d == tl.cfg.d_head * (tl.cfg.n_key_value_heads or tl.cfg.n_heads)
    assert "before its weight" in ds.info.meta["hook_meanings"]["blocks.0.ln2.hook_normalized"]


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_((0.3 if p.ndim == 1 else 0.02) * torch.randn(p.shape, generator=g))


def _hooked_encoder(hf: BertForPreTraining) -> HookedEncoder:
    """A HookedEncoder holding ``hf``'s weights, with ``attn.hook_result`` and ``hook_mlp_in`` on."""
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size, act_fn="gelu",
        attention_dir="bidirectional", original_architecture="BertForMaskedLM", dtype=torch.float32, device="cpu")
    tl = HookedEncoder(cfg, move_to_device=False)
    tl.load_state_dict(convert_bert_weights(hf, cfg), strict=False)  # only the causal mask buffers are missing
    tl.eval()
    tl.cfg.use_attn_result = True
    tl.cfg.use_hook_mlp_in = True
    return tl


@pytest.fixture(scope="module")
def bert_run(tiny_models):
    """(hf, tl, ids, sites, strata captures, HookedEncoder cache) of a perturbed tiny BERT."""
    hf = BertForPreTraining.from_pretrained(tiny_models("bert"), dtype=torch.float32, attn_implementation="eager").eval()
    _perturb(hf)
    c = hf.config
    tl = _hooked_encoder(hf)
    ids = _ids(hf)
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)
    sites = hook_sites(family_of("bert"), c.num_hidden_layers, c)
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad(), Capture(hf.bert, sites, list(sites), lambda h, t: got.__setitem__(h, t.clone()), stop_early=False) as cap:
        cap.forward(input_ids=ids)
    return hf, tl, ids, sites, got, cache


def test_bert_hooks_against_hooked_encoder(bert_run):
    hf, tl, ids, sites, got, cache = bert_run
    torch.testing.assert_close(got["hook_embed"], cache["embed.hook_embed"], **TOL)
    same = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result", "hook_attn_out",
            "hook_resid_mid", "ln1.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "ln2.hook_normalized"]
    assert {h.split(".", 2)[-1] for h in sites if h.startswith("blocks.")} == {*same, "mlp.hook_in", "hook_resid_post"}
    for layer in range(hf.config.num_hidden_layers):
        for k in same:
            h = f"blocks.{layer}.{k}"
            torch.testing.assert_close(got[h], _flat(cache[h]), **TOL, msg=lambda m, h=h: f"{h}: {m}")
        post = got[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(post, cache[f"blocks.{layer}.hook_normalized_resid_post"], **TOL)
        assert (post - cache[f"blocks.{layer}.hook_resid_post"]).abs().max() > 0.05  # TransformerLens's: before the LayerNorm
        # the perturbation shows: a norm's normalized input is neither its input nor its output
        for a, b in (("ln1.hook_normalized", "hook_resid_mid"), ("ln1.hook_normalized", "mlp.hook_in"), ("ln2.hook_normalized", "hook_resid_post")):
            assert (got[f"blocks.{layer}.{a}"] - got[f"blocks.{layer}.{b}"]).abs().max() > 0.05, (layer, a, b)


def test_bert_mlp_in_is_the_attention_layernorms_output(bert_run):
    hf, tl, ids, sites, got, cache = bert_run
    for layer in range(hf.config.num_hidden_layers):
        mlp_in = got[f"blocks.{layer}.mlp.hook_in"]
        with torch.no_grad():  # the HF module itself, on TransformerLens's resid_mid
            direct = hf.bert.encoder.layer[layer].attention.output.LayerNorm(cache[f"blocks.{layer}.hook_resid_mid"])
        torch.testing.assert_close(mlp_in, direct, **TOL)
        ln1 = tl.blocks[layer].ln1  # TransformerLens's ln1.hook_normalized with the norm's weight and bias applied
        torch.testing.assert_close(mlp_in, cache[f"blocks.{layer}.ln1.hook_normalized"] * ln1.w + ln1.b, **TOL)
        # HookedEncoder's resid_post is normalized_resid_mid + mlp_out: the MLP's input is the difference
        torch.testing.assert_close(mlp_in, cache[f"blocks.{layer}.hook_resid_post"] - cache[f"blocks.{layer}.hook_mlp_out"], **TOL)
        # HookedEncoder's hook_mlp_in (use_hook_mlp_in) is resid_mid, before the LayerNorm: not Strata's mlp.hook_in
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_in"], got[f"blocks.{layer}.hook_resid_mid"], **TOL)
        assert (cache[f"blocks.{layer}.hook_mlp_in"] - mlp_in).abs().max() > 0.05


def test_bert_forward_stops_after_the_post_ln_hooks(bert_run):
    """BERT's norms fire after their sub-block: asking for a norm hook with the sub-block's output
    (or alone) must run the forward past both, and no further."""
    hf, tl, ids, sites, got, cache = bert_run
    ran: list[str] = []
    handle = hf.bert.encoder.layer[1].register_forward_pre_hook(lambda *a: ran.append("layer 1"))
    try:
        for asked, stop_after in (
            (["blocks.0.ln2.hook_normalized"], None), (["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"], None),
            (["blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"], None), (["blocks.0.hook_resid_mid", "blocks.0.ln1.hook_normalized"], None),
            (["blocks.0.mlp.hook_in", "blocks.0.attn.hook_result"], None),
            # a dry forward (module:PATH hooks) may name either of two hooks on one module's input as the last to fire
            (["blocks.0.hook_resid_mid", "blocks.0.ln1.hook_normalized"], "blocks.0.hook_resid_mid"),
        ):
            hooks = [h for h in sites if h in asked]  # in firing order, as expand_hooks gives them
            part: dict[str, torch.Tensor] = {}
            sink = lambda h, t, part=part: part.__setitem__(h, t.clone())  # noqa: E731
            with torch.no_grad(), Capture(hf.bert, sites, hooks, sink, stop_after=stop_after) as cap:
                cap.forward(input_ids=ids)
            assert set(part) == set(asked), asked
            for h in asked:
                torch.testing.assert_close(part[h], got[h], rtol=0, atol=0)
            assert ran == [], asked  # the forward stopped inside block 0
        torch.testing.assert_close(part["blocks.0.ln1.hook_normalized"], cache["blocks.0.ln1.hook_normalized"], **TOL)
    finally:
        handle.remove()


BERT_EXTRACTED = ["blocks.0.hook_attn_out", "blocks.0.ln1.hook_normalized", "blocks.*.mlp.hook_in", "blocks.1.hook_mlp_out",
                  "blocks.1.ln2.hook_normalized", "module:encoder.layer.1.output.LayerNorm:input"]


def test_bert_extracted_dataset_equals_hooked_encoder(tmp_path, tiny_models):
    """End to end: a perturbed BERT's post-LN hooks through `strata extract`, against HookedEncoder on the stored tokens;
    each norm hook is asked for with the sub-block output that fires before it."""
    src = tiny_models("bert")
    model = BertModel.from_pretrained(src, dtype=torch.float32)
    _perturb(model)
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (folder / f.name).write_bytes(f.read_bytes())
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(12, seed=2))
    spec = ExtractSpec(store=str(tmp_path / "acts"), name="bert", model={"id": str(folder)}, corpus={"path": str(corpus)},
                       tokenize={"context_size": CTX}, hooks=BERT_EXTRACTED, dtype="float32",
                       compute={"executor": "local", "unit_contexts": 4, "batch_tokens": 64})
    run_extract(spec, progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("bert")
    ids = torch.from_numpy(ds.tokens().column("token_id").to_numpy().astype(np.int64).reshape(-1, CTX))
    assert (ds.tokens().column("doc_id").to_numpy() >= 0).all()  # no padding: HookedEncoder runs without a mask
    tl = _hooked_encoder(BertForPreTraining.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval())
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)
    want = {h: _flat(cache[h]) for h in ("blocks.0.hook_attn_out", "blocks.0.ln1.hook_normalized", "blocks.1.hook_mlp_out",
                                         "blocks.1.ln2.hook_normalized")}
    for layer in range(2):  # the MLP's input: HookedEncoder's resid_post minus its mlp_out (normalized_resid_mid)
        want[f"blocks.{layer}.mlp.hook_in"] = cache[f"blocks.{layer}.hook_resid_post"] - cache[f"blocks.{layer}.hook_mlp_out"]
    want["module:encoder.layer.1.output.LayerNorm:input"] = cache["blocks.1.hook_resid_post"]  # HookedEncoder's: before the LayerNorm
    assert sorted(ds.info.hooks) == sorted(want)
    for h, w in want.items():
        np.testing.assert_allclose(ds.read(h), w.reshape(-1, w.shape[-1]).numpy(), err_msg=h, **TOL)
    meanings = ds.info.meta["hook_meanings"]
    assert "attention.output.LayerNorm's output" in meanings["blocks.0.mlp.hook_in"]
    assert "before its weight and bias" in meanings["blocks.1.ln2.hook_normalized"]
