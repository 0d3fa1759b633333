"""Canonical hook points (TransformerLens / sae-lens names) mapped onto Hugging Face modules.

One :class:`Family` per architecture family says where the embedding, the blocks, each block's
attention and MLP outputs and the final norm live in the base model (``AutoModel``). A hook is
captured with a PyTorch forward hook (``output``) or forward pre-hook (``input``) on that module,
never with ``output_hidden_states``: in transformers 5 the last hidden state has the final norm
applied and is not ``resid_post`` of the last block. The forward pass stops right after the
deepest requested hook by raising :class:`_StopForward` from it.

``attn_out`` and ``mlp_out`` are what each sub-block adds to the residual stream: for GPT-2,
NeoX and Llama-style models the attention / MLP module output; for Gemma 2/3 (and OLMo 2) the
output of the post-attention / post-feedforward norm; for post-LN BERT encoders the output
projection (``attention.output.dense`` / ``output.dense``) before the residual add and LayerNorm.
BERT's norms come after their sub-block, and so do their hooks: ``hook_resid_mid`` and
``ln1.hook_normalized`` are ``attention.output.LayerNorm``'s input (raw, normalized), ``mlp.hook_in``
its output, ``ln2.hook_normalized`` ``output.LayerNorm``'s normalized input; ``hook_resid_post`` the
block's output (TransformerLens's ``hook_normalized_resid_post``). Each family fires its hooks in
its own order (:func:`sub_order`), and the forward stops after the last one asked for.

Vision encoders (image models: one image per context, see :mod:`pipeline.vision`): ``hook_embed``
is the embeddings module's output (CLS and register tokens, patch embeddings and position
embeddings: the whole sequence entering the encoder; for CLIP, before its ``pre_layrnorm``,
which ``blocks.0.hook_resid_pre`` includes); ``attn_out`` / ``mlp_out`` are the attention and
MLP outputs for ViT, CLIP and SigLIP, and the layer-scaled ones for DINOv2;
``ln_final.hook_normalized`` is the final LayerNorm over every token (ViT ``layernorm``, DINOv2
``layernorm``, SigLIP ``post_layernorm``). CLIP's ``post_layernorm`` normalizes only the pooled
CLS vector, not the sequence, so CLIP has no ``ln_final`` hook.

Beyond transformers (each with a map of the hooks inside its blocks):

- Mamba (``mamba``) has no attention and no MLP: a block is ``x + mixer(norm(x))``. ``hook_resid_pre``
  / ``hook_resid_post`` are the residual stream entering and leaving a block, ``blocks.{l}.hook_out_proj``
  (MambaLens's name) the mixer's output, what the block adds to the residual stream, ``mixer.hook_in``
  the mixer's input (the block norm's output), ``ln1.hook_normalized`` the norm's input divided by its
  RMS; ``ln_final`` is ``norm_f``. No ``hook_attn_out`` or ``hook_mlp_out``.
- T5 (``t5``): the encoder of the encoder-decoder, loaded as ``T5EncoderModel`` (the family's
  ``model_class``: ``AutoModel`` would build the whole encoder-decoder, whose forward needs decoder
  inputs). Pre-norm blocks with RMS norms (no mean subtraction, no bias); ``hook_attn_out`` /
  ``hook_mlp_out`` are ``SelfAttention`` / ``DenseReluDense`` outputs before the residual add;
  ``ln_final`` is the encoder's ``final_layer_norm``.
- Mixtral (``mixtral``): Llama's attention and norms; the MLP is the sparse mixture of experts, so
  ``hook_mlp_out`` is the MoE block's output (the experts' weighted sum) and there are no per-token
  neurons; ``mlp.hook_router_logits`` (Strata's own name) holds the router's logits per token, one per
  expert, before the softmax and top-k.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from strata.pipeline.errors import UnknownHookError, UnsupportedModelError
from strata.pipeline.modules import module_input, module_tensor

if TYPE_CHECKING:
    import torch

_BLOCK = re.compile(r"^blocks\.(\d+)\.((?:\w+\.)?hook_\w+)$")  # kinds inside a block too: attn.hook_q


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    attn: str | None  # relative to a layer; None: no attention (Mamba)
    mlp: str | None  # relative to a layer; None: no MLP (Mamba)
    ln_final: str | None
    modality: str = "text"  # "image": a vision encoder (pixel_values in)
    model_class: str | None = None  # the transformers class to load when AutoModel's is not the one hooked (T5: its encoder)


FAMILIES = (
    Family("gpt2", ("gpt2",), "wte", "h", "attn", "mlp", "ln_f"),
    Family("gpt_neox", ("gpt_neox",), "embed_in", "layers", "attention", "mlp", "final_layer_norm"),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite", "smollm3"),
        "embed_tokens", "layers", "self_attn", "mlp", "norm",
    ),
    Family(
        "gemma2",
        ("gemma2", "gemma3_text", "olmo2"),
        "embed_tokens", "layers", "post_attention_layernorm", "post_feedforward_layernorm", "norm",
    ),
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        "embeddings.word_embeddings", "encoder.layer", "attention.output.dense", "output.dense", None,
    ),
    Family("vit", ("vit",), "embeddings", "layers", "attention", "mlp", "layernorm", "image"),
    Family("clip_vision", ("clip", "clip_vision_model"), "embeddings", "encoder.layers", "self_attn", "mlp", None, "image"),
    Family("siglip_vision", ("siglip", "siglip_vision_model"), "embeddings", "encoder.layers", "self_attn", "mlp", "post_layernorm", "image"),
    Family("dinov2", ("dinov2", "dinov2_with_registers"), "embeddings", "encoder.layer", "layer_scale1", "layer_scale2", "layernorm", "image"),
    Family("mamba", ("mamba",), "embeddings", "layers", None, None, "norm_f"),
    Family("t5", ("t5",), "encoder.embed_tokens", "encoder.block", "layer.0.SelfAttention", "layer.1.DenseReluDense",
           "encoder.final_layer_norm", model_class="T5EncoderModel"),
    Family("mixtral", ("mixtral",), "embed_tokens", "layers", "self_attn", "mlp", "norm"),
)

#: Families whose norms are RMS norms (no mean subtraction).
_RMS_FAMILIES = ("llama", "gemma2", "mamba", "t5", "mixtral")


def model_class_of(model_type: str) -> str | None:
    """The transformers class that loads a model of ``model_type`` for capture, when it is not
    ``AutoModel``'s (T5: ``T5EncoderModel``); None otherwise, and for unknown types."""
    return next((f.model_class for f in FAMILIES if model_type in f.model_types), None)


def family_of(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"no hook mapping for model type {model_type!r}; supported model types: {', '.join(known)}"
    )


@dataclass(frozen=True)
class Transform:
    """What is done to a captured tensor before it is stored (picklable: sites are rebuilt in
    every worker). ``kind``: ``normalize`` (``args``: ``"layer"`` or ``"rms"``, eps: a norm's
    input normalized, before its weight and bias, as TransformerLens's ``hook_normalized``);
    ``slice`` (start, stop: one of q, k, v of a fused projection laid out ``[q | k | v]``);
    ``head_slice`` (heads, d_head, j: of one laid out per head, ``[h, (q k v), d_head]``);
    ``result`` (heads, d_head, conv1d: each head's write ``z_h @ W_O[h]``, bias left out, from
    the output projection's input); ``tokens`` (a ``[batch * seq, n]`` result as ``[batch, seq, n]``)."""

    kind: str
    args: tuple[Any, ...] = ()

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.args))})" if self.args else self.kind


@dataclass(frozen=True)
class HookSite:
    """Where a canonical hook is captured: a module path in the base model, and whether its
    input (``resid_pre``) or its output is taken; ``order`` sorts hooks by when they fire.
    ``width`` is the values stored per token (0: not known without the model's config);
    ``transform`` what is done to the tensor first; ``meaning`` one line for the manifest and
    the README; ``explicit`` hooks are only captured when named (a glob never picks them)."""

    hook: str
    module: str
    io: str  # "input" | "output"
    order: tuple[int, int]
    width: int = 0
    transform: Transform | None = None
    meaning: str = ""
    explicit: bool = False

    def describe(self) -> str:
        return f"{self.module}:{self.io}" + (f"+{self.transform.describe()}" if self.transform is not None else "")


#: Firing order of the hooks inside one block (the forward stops after the deepest asked for).
_SUB_ORDER = {
    "hook_resid_pre": 0, "ln1.hook_normalized": 1, "attn.hook_q": 2, "attn.hook_k": 3, "attn.hook_v": 4, "attn.hook_z": 5,
    "attn.hook_result": 6, "hook_attn_out": 7, "hook_resid_mid": 8, "ln2.hook_normalized": 9, "mlp.hook_in": 10,
    "mlp.hook_pre": 11, "mlp.hook_pre_linear": 12, "mlp.hook_post": 13, "hook_mlp_out": 14, "hook_resid_post": 15,
    # Mamba's mixer (no attention, no MLP) and an MoE's router (no mlp.hook_pre) take free places.
    "mixer.hook_in": 10, "mlp.hook_router_logits": 11, "hook_out_proj": 14,
}

#: Families whose block hooks fire in another order than :data:`_SUB_ORDER`'s (pre-norm blocks): the
#: kinds in firing order. Post-LN BERT normalizes after each sub-block: ``attention.output.LayerNorm``
#: (``ln1``) reads ``resid_mid`` after attention, ``output.LayerNorm`` (``ln2``) reads ``mlp_out`` plus
#: the MLP's input after the MLP, and its output is the block's output.
_FAMILY_SUB_ORDER: dict[str, tuple[str, ...]] = {
    "bert": ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result", "hook_attn_out",
             "hook_resid_mid", "ln1.hook_normalized", "mlp.hook_in", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
             "ln2.hook_normalized", "hook_resid_post"),
}


def sub_order(family: Family) -> dict[str, int]:
    """Where each hook kind inside a block of ``family`` fires, as a rank (the second part of
    :attr:`HookSite.order`): the family's own order where it has one, else :data:`_SUB_ORDER`."""
    own = _FAMILY_SUB_ORDER.get(family.name)
    return _SUB_ORDER if own is None else {kind: i for i, kind in enumerate(own)}


@dataclass(frozen=True)
class Dims:
    """The widths a model's hooks need, from its config."""

    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_mlp: int
    eps: float

    @classmethod
    def of(cls, config: Any) -> Dims:
        c = config
        d = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0) or getattr(c, "d_model", 0))
        h = int(getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 0) or getattr(c, "num_heads", 0) or 1)
        dh = int(getattr(c, "head_dim", None) or (d // h if h else 0))
        kv = int(getattr(c, "num_key_value_heads", None) or h)
        d_mlp = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "d_ff", None) or 4 * d)
        eps = float(next((getattr(c, a) for a in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps")
                          if getattr(c, a, None) is not None), 1e-5))
        return cls(d, h, dh, kv, d_mlp, eps)


def _sub_sites(family: Family, layer: int, dims: Dims, config: Any) -> list[tuple[str, str, str, int, Transform | None, str, bool]]:
    """The block's hooks beyond the residual stream and the sub-block outputs, for families with
    a map of them: (kind, module, io, width, transform, meaning, explicit)."""
    b = f"{family.layers}.{layer}"
    d, h, dh, kv, dm, eps = dims.d_model, dims.n_heads, dims.d_head, dims.n_kv_heads, dims.d_mlp, dims.eps
    z = "each head's output before the output projection, heads side by side ([tokens, n_heads * d_head])"
    res = "each head's write to the residual stream (z_h @ W_O[h], bias left out), heads side by side ([tokens, n_heads * d_model]); large"
    out: list[tuple[str, str, str, int, Transform | None, str, bool]] = []
    if family.name == "gpt2":
        norm = Transform("normalize", ("layer", eps))
        out += [
            ("ln1.hook_normalized", f"{b}.ln_1", "input", d, norm, "ln_1's input normalized, before its weight and bias", False),
            ("attn.hook_q", f"{b}.attn.c_attn", "output", d, Transform("slice", (0, d)), "queries, heads side by side", False),
            ("attn.hook_k", f"{b}.attn.c_attn", "output", d, Transform("slice", (d, 2 * d)), "keys, heads side by side", False),
            ("attn.hook_v", f"{b}.attn.c_attn", "output", d, Transform("slice", (2 * d, 3 * d)), "values, heads side by side", False),
            ("attn.hook_z", f"{b}.attn.c_proj", "input", h * dh, None, z, False),
            ("attn.hook_result", f"{b}.attn.c_proj", "input", h * d, Transform("result", (h, dh, True)), res, True),
            ("hook_resid_mid", f"{b}.ln_2", "input", d, None, "the residual stream between attention and MLP", False),
            ("ln2.hook_normalized", f"{b}.ln_2", "input", d, norm, "ln_2's input normalized, before its weight and bias", False),
            ("mlp.hook_in", f"{b}.ln_2", "output", d, None, "the MLP's input: ln_2's output (TransformerLens's ln2.hook_out)", False),
            ("mlp.hook_pre", f"{b}.mlp.c_fc", "output", dm, None, "MLP neurons before the activation (c_fc's output)", False),
            ("mlp.hook_post", f"{b}.mlp.c_proj", "input", dm, None, "MLP neurons after the activation (c_proj's input)", False),
        ]
    elif family.name == "gpt_neox":
        norm = Transform("normalize", ("layer", eps))
        out += [
            ("ln1.hook_normalized", f"{b}.input_layernorm", "input", d, norm,
             "input_layernorm's input normalized, before its weight and bias", False),
            *[(f"attn.hook_{n}", f"{b}.attention.query_key_value", "output", h * dh, Transform("head_slice", (h, dh, j)),
               f"{name}, heads side by side", False) for j, (n, name) in enumerate((("q", "queries"), ("k", "keys"), ("v", "values")))],
            ("attn.hook_z", f"{b}.attention.dense", "input", h * dh, None, z, False),
            ("attn.hook_result", f"{b}.attention.dense", "input", h * d, Transform("result", (h, dh, False)), res, True),
        ]
        if not getattr(config, "use_parallel_residual", True):
            out.append(("hook_resid_mid", f"{b}.post_attention_layernorm", "input", d, None, "the residual stream between attention and MLP", False))
        out += [
            ("ln2.hook_normalized", f"{b}.post_attention_layernorm", "input", d, norm,
             "post_attention_layernorm's input normalized, before its weight and bias", False),
            ("mlp.hook_in", f"{b}.post_attention_layernorm", "output", d, None, "the MLP's input: post_attention_layernorm's output", False),
            ("mlp.hook_pre", f"{b}.mlp.dense_h_to_4h", "output", dm, None, "MLP neurons before the activation", False),
            ("mlp.hook_post", f"{b}.mlp.dense_4h_to_h", "input", dm, None, "MLP neurons after the activation", False),
        ]
    elif family.name in ("llama", "gemma2"):
        norm = Transform("normalize", ("rms", eps))
        ln2 = "post_attention_layernorm" if family.name == "llama" else "pre_feedforward_layernorm"
        out += [
            ("ln1.hook_normalized", f"{b}.input_layernorm", "input", d, norm, "input_layernorm's input divided by its RMS, before its weight", False),
            ("attn.hook_q", f"{b}.self_attn.q_proj", "output", h * dh, None, "queries before rotary embedding, heads side by side", False),
            ("attn.hook_k", f"{b}.self_attn.k_proj", "output", kv * dh, None,
             f"keys before rotary embedding, the {kv} key/value heads side by side", False),
            ("attn.hook_v", f"{b}.self_attn.v_proj", "output", kv * dh, None, f"values, the {kv} key/value heads side by side", False),
            ("attn.hook_z", f"{b}.self_attn.o_proj", "input", h * dh, None, z, False),
            ("attn.hook_result", f"{b}.self_attn.o_proj", "input", h * d, Transform("result", (h, dh, False)), res, True),
            ("hook_resid_mid", f"{b}.{ln2}", "input", d, None, "the residual stream between attention and MLP", False),
            ("ln2.hook_normalized", f"{b}.{ln2}", "input", d, norm, f"{ln2}'s input divided by its RMS, before its weight", False),
            ("mlp.hook_in", f"{b}.{ln2}", "output", d, None, f"the MLP's input: {ln2}'s output", False),
            ("mlp.hook_pre", f"{b}.mlp.gate_proj", "output", dm, None,
             "gated MLP: the gate projection before its activation (TransformerLens's hook_pre)", False),
            ("mlp.hook_pre_linear", f"{b}.mlp.up_proj", "output", dm, None,
             "gated MLP: the up projection (TransformerLens's hook_pre_linear)", False),
            ("mlp.hook_post", f"{b}.mlp.down_proj", "input", dm, None, "gated MLP neurons: act(gate) * up, the down projection's input", False),
        ]
    elif family.name == "bert":
        # Post-LN: each norm comes after its sub-block (their firing order is _FAMILY_SUB_ORDER's).
        norm = Transform("normalize", ("layer", eps))
        ln1, ln2 = f"{b}.attention.output.LayerNorm", f"{b}.output.LayerNorm"
        out += [
            ("attn.hook_q", f"{b}.attention.self.query", "output", h * dh, None, "queries, heads side by side", False),
            ("attn.hook_k", f"{b}.attention.self.key", "output", h * dh, None, "keys, heads side by side", False),
            ("attn.hook_v", f"{b}.attention.self.value", "output", h * dh, None, "values, heads side by side", False),
            ("attn.hook_z", f"{b}.attention.output.dense", "input", h * dh, None, z, False),
            ("attn.hook_result", f"{b}.attention.output.dense", "input", h * d, Transform("result", (h, dh, False)), res, True),
            ("hook_resid_mid", ln1, "input", d, None,
             "the residual stream after attention (resid_pre + attn_out): attention.output.LayerNorm's input", False),
            ("ln1.hook_normalized", ln1, "input", d, norm,
             "attention.output.LayerNorm's input (resid_mid) normalized, before its weight and bias", False),
            ("mlp.hook_in", ln1, "output", d, None, "the MLP's input: attention.output.LayerNorm's output", False),
            ("mlp.hook_pre", f"{b}.intermediate.dense", "output", dm, None, "MLP neurons before the activation", False),
            ("mlp.hook_post", f"{b}.output.dense", "input", dm, None, "MLP neurons after the activation", False),
            ("ln2.hook_normalized", ln2, "input", d, norm,
             "output.LayerNorm's input (mlp.hook_in + hook_mlp_out) normalized, before its weight and bias", False),
        ]
    elif family.name == "mamba":
        out += [
            ("ln1.hook_normalized", f"{b}.norm", "input", d, Transform("normalize", ("rms", eps)),
             "the block norm's input divided by its RMS, before its weight", False),
            ("mixer.hook_in", f"{b}.norm", "output", d, None, "the mixer's input: the block norm's output", False),
            ("hook_out_proj", f"{b}.mixer", "output", d, None,
             "the mixer's output (its out_proj): what the block adds to the residual stream", False),
        ]
    elif family.name == "t5":
        norm = Transform("normalize", ("rms", eps))
        sa, ff = f"{b}.layer.0", f"{b}.layer.1"
        mlp = f"{ff}.DenseReluDense"
        out += [
            ("ln1.hook_normalized", f"{sa}.layer_norm", "input", d, norm, "layer.0.layer_norm's input divided by its RMS, before its weight", False),
            *[(f"attn.hook_{n}", f"{sa}.SelfAttention.{n}", "output", h * dh, None,
               f"{name}, heads side by side (positions enter as relative biases, not in {name})", False)
              for n, name in (("q", "queries"), ("k", "keys"), ("v", "values"))],
            ("attn.hook_z", f"{sa}.SelfAttention.o", "input", h * dh, None, z, False),
            ("attn.hook_result", f"{sa}.SelfAttention.o", "input", h * d, Transform("result", (h, dh, False)), res, True),
            ("hook_resid_mid", ff, "input", d, None, "the residual stream between attention and MLP", False),
            ("ln2.hook_normalized", f"{ff}.layer_norm", "input", d, norm, "layer.1.layer_norm's input divided by its RMS, before its weight", False),
            ("mlp.hook_in", f"{ff}.layer_norm", "output", d, None, "the MLP's input: layer.1.layer_norm's output", False),
        ]
        if getattr(config, "is_gated_act", False):
            out += [
                ("mlp.hook_pre", f"{mlp}.wi_0", "output", dm, None, "gated MLP: the gate projection (wi_0) before its activation", False),
                ("mlp.hook_pre_linear", f"{mlp}.wi_1", "output", dm, None, "gated MLP: the linear projection (wi_1)", False),
                ("mlp.hook_post", f"{mlp}.wo", "input", dm, None, "gated MLP neurons: act(wi_0) * wi_1, wo's input", False),
            ]
        else:
            out += [
                ("mlp.hook_pre", f"{mlp}.wi", "output", dm, None, "MLP neurons before the activation (wi's output)", False),
                ("mlp.hook_post", f"{mlp}.wo", "input", dm, None, "MLP neurons after the activation (wo's input)", False),
            ]
    elif family.name == "mixtral":
        # Llama's attention and norms; the MoE block has no per-token neurons to offer, its router does.
        out += [s for s in _sub_sites(replace(family, name="llama"), layer, dims, config) if not s[0].startswith("mlp.hook_p")]
        n_experts = int(config.num_local_experts)
        out.append(("mlp.hook_router_logits", f"{b}.mlp.gate", "output", n_experts, Transform("tokens"),
                    f"the router's logits per token, one per expert ({n_experts}), before softmax and top-k", False))
    return out


def hook_sites(family: Family, n_layers: int, config: Any = None) -> dict[str, HookSite]:
    """Every canonical hook of a model, in firing order. With the model's ``config``, also the
    hooks inside each block (neurons, attention heads, norms) and every hook's width."""
    dims = Dims.of(config) if config is not None else None
    d = dims.d_model if dims is not None else 0
    rank = sub_order(family)
    sites = {"hook_embed": HookSite("hook_embed", family.embed, "output", (-1, 0), d, meaning="the token embeddings")}
    for layer in range(n_layers):
        block = f"{family.layers}.{layer}"
        for hook, module, io, meaning in (
            ("hook_resid_pre", block, "input", "the residual stream entering the block"),
            ("hook_attn_out", family.attn and f"{block}.{family.attn}", "output", "what attention adds to the residual stream"),
            ("hook_mlp_out", family.mlp and f"{block}.{family.mlp}", "output", "what the MLP adds to the residual stream"),
            ("hook_resid_post", block, "output", "the residual stream leaving the block"),
        ):
            if module is None:  # Mamba: no attention, no MLP
                continue
            name = f"blocks.{layer}.{hook}"
            sites[name] = HookSite(name, module, io, (layer, rank[hook]), d, meaning=meaning)
        if dims is not None:
            for kind, module, io, width, tf, meaning, explicit in _sub_sites(family, layer, dims, config):
                name = f"blocks.{layer}.{kind}"
                sites[name] = HookSite(name, module, io, (layer, rank[kind]), width, tf, meaning, explicit)
    if family.ln_final is not None:
        if dims is not None and family.modality == "text" and family.name != "bert":
            kind = "rms" if family.name in _RMS_FAMILIES else "layer"
            sites["ln_final.hook_normalized"] = HookSite(
                "ln_final.hook_normalized", family.ln_final, "input", (n_layers, 0), d, Transform("normalize", (kind, dims.eps)),
                "the final norm's input normalized, before its weight and bias (TransformerLens's meaning)")
            sites["ln_final.hook_out"] = HookSite("ln_final.hook_out", family.ln_final, "output", (n_layers, 1), d,
                                                  meaning="the final norm's output (what the unembedding reads)")
        else:
            sites["ln_final.hook_normalized"] = HookSite("ln_final.hook_normalized", family.ln_final, "output", (n_layers, 0), d,
                                                         meaning="the final norm's output")
    return dict(sorted(sites.items(), key=lambda kv: kv[1].order))


def describe_hooks(names: list[str]) -> str:
    """A compact list of hook names: ``blocks.{0..11}.hook_resid_post`` for a run of blocks."""
    per_kind: dict[str, list[int]] = {}
    out: list[str] = []
    for n in names:
        m = _BLOCK.match(n)
        if m:
            per_kind.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            out.append(n)
    for kind, layers in per_kind.items():
        out.append(f"blocks.{{{min(layers)}..{max(layers)}}}.{kind}" if len(layers) > 1 else f"blocks.{layers[0]}.{kind}")
    return ", ".join(out)


def match_hooks(patterns: Sequence[str], available: Sequence[str], *,
                error: Callable[[str], Exception] | None = None, skip_missing: bool = False) -> list[str]:
    """The hooks of ``available`` that match any of ``patterns`` (exact names or fnmatch globs
    such as ``blocks.*.hook_resid_post``), each once, in ``available``'s order.

    A pattern that matches nothing raises ``error(pattern)`` (default: an :class:`UnknownHookError`
    listing ``available``), or is passed over with ``skip_missing``."""
    chosen: set[str] = set()
    for p in patterns:
        hits = [h for h in available if fnmatch.fnmatchcase(h, p)]
        if not hits and not skip_missing:
            raise (error(p) if error is not None else
                   UnknownHookError(f"{p!r} matches no hook; valid hooks: {describe_hooks(list(available))}"))
        chosen.update(hits)
    return [h for h in available if h in chosen]


def expand_hooks(patterns: list[str], sites: dict[str, HookSite], *, model: str = "the model") -> list[str]:
    """Hook names matching ``patterns`` (exact names or globs like ``blocks.*.hook_resid_post``),
    in firing order. An unknown name or a pattern matching nothing is an error listing the
    valid hooks. An ``explicit`` hook (``attn.hook_result``: large) is taken only by a pattern
    that names it (``blocks.*.attn.hook_result``), never by a wider glob."""
    ordered = sorted(sites, key=lambda h: sites[h].order)
    out: list[str] = []
    for p in patterns:
        pool = [h for h in ordered if not sites[h].explicit or h.rsplit(".", 1)[-1] in p]
        out += match_hooks([p], pool, error=lambda p: UnknownHookError(
            f"unknown hook {p!r} for {model}; valid hooks: {describe_hooks([h for h in ordered if not sites[h].explicit])}"
            + ("" if not any(sites[h].explicit for h in ordered) else "; and, only when named: blocks.*.attn.hook_result")))
    return [h for h in ordered if h in set(out)]


class _StopForward(Exception):
    """Raised from the deepest hook to end the forward pass early (caught by :class:`Capture`)."""


def apply_transform(tf: Transform, module: Any, x: torch.Tensor, batch_seq: tuple[int, int] | None = None) -> torch.Tensor:
    """``x`` as the hook stores it (see :class:`Transform`)."""
    import torch  # lazy: spec checks import this module for `match_hooks` and must not pay for torch

    k, a = tf.kind, tf.args
    if k == "normalize":
        xf = x.float()
        if a[0] == "layer":
            xf = xf - xf.mean(-1, keepdim=True)
        return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + a[1])).to(x.dtype)
    if k == "slice":
        return x[..., a[0] : a[1]]
    if k == "head_slice":
        h, dh, j = a
        return x.reshape(*x.shape[:-1], h, 3 * dh)[..., j * dh : (j + 1) * dh].reshape(*x.shape[:-1], h * dh)
    if k == "result":
        h, dh, conv1d = a
        w = module.weight if conv1d else module.weight.t()  # [h * dh, d]
        z = x.reshape(*x.shape[:-1], h, dh)
        out = torch.einsum("...he,hed->...hd", z, w.reshape(h, dh, -1).to(z.dtype))
        return out.reshape(*x.shape[:-1], -1)
    if k == "tokens":
        if batch_seq is None:
            raise ValueError("a per-token result needs the batch's shape")
        return x.reshape(batch_seq[0], batch_seq[1], -1)
    raise ValueError(f"unknown hook transform {k!r}")


class Capture:
    """Forward hooks on a model for a set of canonical hooks.

    ``sink(hook, tensor)`` is called with each captured tensor ``[batch, seq, d]`` (a view of
    the model's own tensor: copy it before the next forward). Use as a context manager; call
    :meth:`forward` to run the model up to the deepest hook. A forward in which some hook did
    not fire (the forward stopped before it, or never reached its module) is a RuntimeError.
    """

    def __init__(self, model: torch.nn.Module, sites: dict[str, HookSite], hooks: list[str], sink: Callable[[str, torch.Tensor], None], *,
                 stop_early: bool = True, stop_after: str | None = None) -> None:
        self.model = model
        self.sites = [sites[h] for h in hooks]
        self.sink = sink
        # The deepest hook by firing order: from the sites' order, or (with module:PATH hooks, whose
        # place only a forward tells) the one the dry forward saw fire last.
        self.deepest = (stop_after if stop_after in hooks else max(self.sites, key=lambda s: s.order).hook) if stop_early else None
        if self.deepest is not None:
            # Hooks on one module's input (or output) fire in the order they are registered, this list's:
            # stop at the last of them, so that e.g. BERT's resid_mid never cuts off ln1.hook_normalized.
            at = next((s.module, s.io) for s in self.sites if s.hook == self.deepest)
            self.deepest = [s for s in self.sites if (s.module, s.io) == at][-1].hook
        self._handles: list[Any] = []
        self.batch_seq: tuple[int, int] | None = None
        self._fired: set[str] = set()

    def _make(self, site: HookSite) -> Callable[..., None]:
        stop = site.hook == self.deepest
        sink, hook, tf = self.sink, site.hook, site.transform

        def emit(module: Any, t: Any) -> None:
            sink(hook, t if tf is None else apply_transform(tf, module, t, self.batch_seq))
            self._fired.add(hook)

        if site.io == "input":

            def pre(module, args, kwargs):
                emit(module, module_input(args, kwargs))
                if stop:
                    raise _StopForward

            return pre

        def post(module, args, output):
            t = module_tensor(output)
            if t is None:
                raise TypeError(f"cannot find the hidden states in a module result of type {type(output).__name__} (hook {hook!r})")
            emit(module, t)
            if stop:
                raise _StopForward

        return post

    def __enter__(self) -> Capture:
        for site in self.sites:
            try:
                module = self.model.get_submodule(site.module)
            except AttributeError:
                raise UnsupportedModelError(f"model has no module {site.module!r} for hook {site.hook!r}") from None
            fn = self._make(site)
            if site.io == "input":
                self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, **inputs: Any) -> None:
        first = next((v for v in inputs.values() if hasattr(v, "shape")), None)
        self.batch_seq = (int(first.shape[0]), int(first.shape[1])) if first is not None and len(first.shape) >= 2 else None
        self._fired.clear()
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        missing = [s.hook for s in self.sites if s.hook not in self._fired]
        if missing:  # never store what a hook did not give (a writer's buffer would keep its garbage)
            raise RuntimeError(f"hooks {describe_hooks(missing)} did not fire in the forward pass"
                               + (f" (stopped after {self.deepest!r})" if self.deepest is not None else ""))
