"""Architectures beyond decoder transformers: Mamba (a state-space model), T5's encoder (loaded from a
whole encoder-decoder checkpoint) and Mixtral (a sparse mixture of experts, with its router's logits).

Each is extracted with ``run_extract`` and every stored hook is compared with a direct forward of the
Hugging Face model, captured by this test's own torch hooks on module paths written out here. The tiny
models' norm weights are perturbed first (built from a config they are all ones, which would hide a
normalization taken after the weight instead of before)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from strata import store
from strata.pipeline import models
from strata.pipeline.config import ExtractSpec, ModelSpec
from strata.pipeline.errors import UnknownHookError
from strata.pipeline.extract import run_extract
from strata.pipeline.hooks import expand_hooks, family_of, hook_sites, model_class_of
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl

CTX = 16
D = 32
FAMILIES = ["mamba", "t5", "t5_relu", "mixtral"]
#: the class that builds each checkpoint (as published: T5 as the whole encoder-decoder) and the one that reads it here
CHECKPOINT = {"mamba": tf.MambaForCausalLM, "t5": tf.T5ForConditionalGeneration, "t5_relu": tf.T5ForConditionalGeneration,
              "mixtral": tf.MixtralForCausalLM}
BASE = {"mamba": tf.MambaModel, "t5": tf.T5EncoderModel, "t5_relu": tf.T5EncoderModel, "mixtral": tf.MixtralModel}


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """``perturbed(family)``: a folder holding a tiny seeded checkpoint whose norm weights are not 1."""
    root = tmp_path_factory.mktemp("arch")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family in built:
            return built[family]
        folder = build_tiny(root / family, family=family.removesuffix("_relu"), layers=2, d_model=D, heads=4, max_positions=256,
                            vocab_size=400, seed=0)
        if family == "t5_relu":  # the original T5's MLP: one projection, ReLU
            kept = {k: v for k, v in tf.T5Config.from_pretrained(folder).to_dict().items() if k not in ("is_gated_act", "dense_act_fn")}
            cfg = tf.T5Config(**{**kept, "feed_forward_proj": "relu"})
            assert not cfg.is_gated_act and cfg.dense_act_fn == "relu"
            torch.manual_seed(1)
            model = tf.T5ForConditionalGeneration(cfg)
        else:
            model = CHECKPOINT[family].from_pretrained(folder, dtype=torch.float32)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder)
        built[family] = folder
        return folder

    return get


def _spec(tmp_path: Path, model: Path, hooks: list[str]) -> ExtractSpec:
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(12, seed=2))
    return ExtractSpec(store=str(tmp_path / "acts"), name="m", model={"id": str(model)}, corpus={"path": str(corpus)},
                       tokenize={"context_size": CTX}, hooks=hooks, dtype="float32",
                       compute={"executor": "local", "unit_contexts": 4, "batch_tokens": 64})


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _paths(family: str, layers: int) -> dict[str, tuple[str, str]]:
    """hook -> (module path in the base model, "in" | "out"), written out by hand for each family."""
    out: dict[str, tuple[str, str]] = {}
    for layer in range(layers):
        b = f"blocks.{layer}."
        if family == "mamba":
            m = f"layers.{layer}"
            out |= {b + "hook_resid_pre": (m, "in"), b + "ln1.hook_normalized": (f"{m}.norm", "in"), b + "mixer.hook_in": (f"{m}.norm", "out"),
                    b + "hook_out_proj": (f"{m}.mixer.out_proj", "out"), b + "hook_resid_post": (m, "out")}
        elif family.startswith("t5"):
            m = f"encoder.block.{layer}"
            sa, ff = f"{m}.layer.0", f"{m}.layer.1"
            mlp = f"{ff}.DenseReluDense"
            out |= {b + "hook_resid_pre": (m, "in"), b + "ln1.hook_normalized": (f"{sa}.layer_norm", "in"),
                    b + "attn.hook_q": (f"{sa}.SelfAttention.q", "out"), b + "attn.hook_k": (f"{sa}.SelfAttention.k", "out"),
                    b + "attn.hook_v": (f"{sa}.SelfAttention.v", "out"), b + "attn.hook_z": (f"{sa}.SelfAttention.o", "in"),
                    b + "hook_attn_out": (f"{sa}.SelfAttention.o", "out"), b + "hook_resid_mid": (ff, "in"),
                    b + "ln2.hook_normalized": (f"{ff}.layer_norm", "in"), b + "mlp.hook_in": (f"{ff}.layer_norm", "out"),
                    b + "mlp.hook_post": (f"{mlp}.wo", "in"), b + "hook_mlp_out": (f"{mlp}.wo", "out"), b + "hook_resid_post": (m, "out")}
            if family == "t5":
                out |= {b + "mlp.hook_pre": (f"{mlp}.wi_0", "out"), b + "mlp.hook_pre_linear": (f"{mlp}.wi_1", "out")}
            else:
                out |= {b + "mlp.hook_pre": (f"{mlp}.wi", "out")}
        else:
            m = f"layers.{layer}"
            out |= {b + "hook_resid_pre": (m, "in"), b + "ln1.hook_normalized": (f"{m}.input_layernorm", "in"),
                    b + "attn.hook_q": (f"{m}.self_attn.q_proj", "out"), b + "attn.hook_k": (f"{m}.self_attn.k_proj", "out"),
                    b + "attn.hook_v": (f"{m}.self_attn.v_proj", "out"), b + "attn.hook_z": (f"{m}.self_attn.o_proj", "in"),
                    b + "hook_attn_out": (f"{m}.self_attn.o_proj", "out"), b + "hook_resid_mid": (f"{m}.post_attention_layernorm", "in"),
                    b + "ln2.hook_normalized": (f"{m}.post_attention_layernorm", "in"),
                    b + "mlp.hook_in": (f"{m}.post_attention_layernorm", "out"), b + "hook_resid_post": (m, "out")}
    return out


def _direct(family: str, folder: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook of ``family`` from a plain forward of the Hugging Face base model, ``[rows, width]``."""
    model = BASE[family].from_pretrained(folder, dtype=torch.float32, **({} if family == "mamba" else {"attn_implementation": "eager"}))
    model.eval()
    cfg = model.config
    n = cfg.num_hidden_layers
    paths = _paths(family, n)
    raw: dict[str, torch.Tensor] = {}

    def keep(hook: str, io: str):
        if io == "in":
            return lambda mod, args: raw.__setitem__(hook, args[0].detach().clone())
        return lambda mod, args, out: raw.__setitem__(hook, (out[0] if isinstance(out, tuple) else out).detach().clone())

    for hook, (path, io) in paths.items():
        mod = model.get_submodule(path)
        (mod.register_forward_pre_hook if io == "in" else mod.register_forward_hook)(keep(hook, io))
    final = {"mamba": "norm_f", "t5": "encoder.final_layer_norm", "t5_relu": "encoder.final_layer_norm", "mixtral": "norm"}[family]
    model.get_submodule(final).register_forward_pre_hook(keep("ln_final.in", "in"))
    extra = {"output_router_logits": True} if family == "mixtral" else {}
    with torch.no_grad():
        out = model(input_ids=ids, **extra)
        embed = model.get_input_embeddings()(ids)
    eps = cfg.layer_norm_epsilon if family != "mixtral" else cfg.rms_norm_eps
    want = {"hook_embed": embed, "ln_final.hook_normalized": _rms(raw.pop("ln_final.in"), eps), "ln_final.hook_out": out.last_hidden_state}
    for hook, t in raw.items():
        want[hook] = _rms(t, eps) if hook.endswith("hook_normalized") else t
    for layer in range(n):
        b = f"blocks.{layer}."
        if family == "mixtral":  # the MoE block's output, from the residual arithmetic; the router's logits from the model itself
            want[b + "hook_mlp_out"] = raw[b + "hook_resid_post"] - raw[b + "hook_resid_mid"]
            want[b + "mlp.hook_router_logits"] = out.router_logits[layer]
        if family != "mamba":  # each head's write: z_h @ W_O[h], from the output projection's weight
            h, dh = cfg.num_attention_heads, D // cfg.num_attention_heads
            w_o = model.get_submodule(paths[b + "attn.hook_z"][0]).weight  # [d, h * dh]
            z = raw[b + "attn.hook_z"].reshape(*ids.shape, h, dh)
            want[b + "attn.hook_result"] = torch.stack([z[..., i, :] @ w_o[:, i * dh : (i + 1) * dh].T for i in range(h)], dim=-2)
    return {k: v.detach().reshape(ids.numel(), -1).float() for k, v in want.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hook_matches_a_direct_forward(tmp_path, perturbed, family):
    folder = perturbed(family)
    hooks = ["*"] if family == "mamba" else ["*", "blocks.*.attn.hook_result"]
    run_extract(_spec(tmp_path, folder, hooks), progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("m")
    ids = torch.from_numpy(ds.tokens().column("token_id").to_numpy().astype(np.int64).reshape(-1, CTX))
    want = _direct(family, folder, ids)
    assert sorted(ds.hooks) == sorted(want)  # every hook the family offers, and only those
    for hook, w in want.items():
        got = ds.read(hook)
        assert got.shape == tuple(w.shape), hook
        assert ds.info.meta["hook_widths"][hook] == w.shape[1], hook
        np.testing.assert_allclose(got, w.numpy(), atol=1e-5, rtol=0, err_msg=hook)
    # the norms' weights matter: each hook_normalized is taken before them, the norm's output after
    block = ("blocks.1.ln1.hook_normalized", "blocks.1.mixer.hook_in") if family == "mamba" else \
        ("blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_in")
    pairs = [("ln_final.hook_normalized", "ln_final.hook_out"), block]
    for before, after in pairs:
        assert np.abs(ds.read(before) - ds.read(after)).max() > 0.05, before
    meta = ds.info.meta
    assert meta["family"] == family.removesuffix("_relu") and all(meta["hook_meanings"][h] for h in ds.hooks)
    if family == "mixtral":
        assert meta["hook_widths"]["blocks.0.mlp.hook_router_logits"] == 4
        assert meta["hook_modules"]["blocks.0.mlp.hook_router_logits"] == "layers.0.mlp.gate:output+tokens"
        logits = ds.read("blocks.1.mlp.hook_router_logits")
        assert logits.std(axis=0).min() > 0  # per token, not one row repeated
    if family == "mamba":  # a block adds its mixer's output to the residual stream, and nothing else
        np.testing.assert_allclose(ds.read("blocks.0.hook_resid_pre") + ds.read("blocks.0.hook_out_proj"), ds.read("blocks.0.hook_resid_post"),
                                   atol=1e-5)


def test_t5_checkpoints_load_their_encoder(perturbed):
    folder = perturbed("t5")
    assert tf.AutoConfig.from_pretrained(folder).architectures == ["T5ForConditionalGeneration"]  # the whole encoder-decoder is stored
    assert model_class_of("t5") == "T5EncoderModel" and model_class_of("llama") is None and model_class_of("nope") is None
    model = models.load_model(models.resolve(ModelSpec(id=str(folder))))
    assert type(model).__name__ == "T5EncoderModel" and not hasattr(model, "decoder")


@pytest.mark.parametrize(("family", "new", "absent"), [
    ("mamba", ["blocks.{1}.hook_out_proj", "blocks.{1}.mixer.hook_in", "ln_final.hook_out"], ["hook_attn_out", "hook_mlp_out", "attn.hook_q"]),
    ("t5", ["blocks.{1}.attn.hook_z", "blocks.{1}.mlp.hook_pre_linear", "ln_final.hook_normalized"], ["hook_router_logits", "hook_out_proj"]),
    ("mixtral", ["blocks.{1}.mlp.hook_router_logits", "blocks.{1}.hook_mlp_out", "blocks.{1}.attn.hook_v"],
     ["mlp.hook_pre", "mlp.hook_post", "hook_out_proj"]),
])
def test_unknown_hook_errors_list_the_new_hooks(tmp_path, perturbed, family, new, absent):
    with pytest.raises(UnknownHookError) as e:
        run_extract(_spec(tmp_path, perturbed(family), ["blocks.0.hook_nope"]), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "unknown hook 'blocks.0.hook_nope'" in msg
    for h in new:
        assert h.replace("{1}", "{0..1}") in msg, h
    for h in absent:
        assert h not in msg, h
    config = tf.AutoConfig.from_pretrained(perturbed(family))
    sites = hook_sites(family_of(config.model_type), 2, config)
    if family == "mamba":
        with pytest.raises(UnknownHookError, match="hook_attn_out"):
            expand_hooks(["blocks.0.hook_attn_out"], sites)
    # firing order: the router fires after the MLP's input and before the MoE block's output
    orders = [sites[f"blocks.0.{k}"].order for k in ("hook_resid_pre", "hook_resid_post")]
    assert orders[0] < orders[1]
    if family == "mixtral":
        assert sites["blocks.0.mlp.hook_in"].order < sites["blocks.0.mlp.hook_router_logits"].order < sites["blocks.0.hook_mlp_out"].order
