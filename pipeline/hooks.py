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

Vision encoders (image models: one image per context, see :mod:`pipeline.vision`): ``hook_embed``
is the embeddings module's output (CLS and register tokens, patch embeddings and position
embeddings: the whole sequence entering the encoder; for CLIP, before its ``pre_layrnorm``,
which ``blocks.0.hook_resid_pre`` includes); ``attn_out`` / ``mlp_out`` are the attention and
MLP outputs for ViT, CLIP and SigLIP, and the layer-scaled ones for DINOv2;
``ln_final.hook_normalized`` is the final LayerNorm over every token (ViT ``layernorm``, DINOv2
``layernorm``, SigLIP ``post_layernorm``). CLIP's ``post_layernorm`` normalizes only the pooled
CLS vector, not the sequence, so CLIP has no ``ln_final`` hook.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strata.pipeline.errors import UnknownHookError, UnsupportedModelError

if TYPE_CHECKING:
    import torch

_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    attn: str  # relative to a layer
    mlp: str  # relative to a layer
    ln_final: str | None
    modality: str = "text"  # "image": a vision encoder (pixel_values in)


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
)


def family_of(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"no hook mapping for model type {model_type!r}; supported model types: {', '.join(known)}"
    )


@dataclass(frozen=True)
class HookSite:
    """Where a canonical hook is captured: a module path in the base model, and whether its
    input (``resid_pre``) or its output is taken. ``order`` sorts hooks by when they fire."""

    hook: str
    module: str
    io: str  # "input" | "output"
    order: tuple[int, int]

    def describe(self) -> str:
        return f"{self.module}:{self.io}"


def hook_sites(family: Family, n_layers: int) -> dict[str, HookSite]:
    """Every canonical hook of a model, in firing order."""
    sites = {"hook_embed": HookSite("hook_embed", family.embed, "output", (-1, 0))}
    for layer in range(n_layers):
        block = f"{family.layers}.{layer}"
        for hook, module, io, o in (
            ("hook_resid_pre", block, "input", 0),
            ("hook_attn_out", f"{block}.{family.attn}", "output", 1),
            ("hook_mlp_out", f"{block}.{family.mlp}", "output", 2),
            ("hook_resid_post", block, "output", 3),
        ):
            name = f"blocks.{layer}.{hook}"
            sites[name] = HookSite(name, module, io, (layer, o))
    if family.ln_final is not None:
        sites["ln_final.hook_normalized"] = HookSite("ln_final.hook_normalized", family.ln_final, "output", (n_layers, 0))
    return sites


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
    valid hooks."""
    ordered = sorted(sites, key=lambda h: sites[h].order)
    return match_hooks(patterns, ordered,
                       error=lambda p: UnknownHookError(f"unknown hook {p!r} for {model}; valid hooks: {describe_hooks(list(sites))}"))


class _StopForward(Exception):
    """Raised from the deepest hook to end the forward pass early (caught by :class:`Capture`)."""


def _first_tensor(x: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older code and some modules return tuples.
    import torch  # lazy: spec checks import this module for `match_hooks` and must not pay for torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a module result of type {type(x).__name__}")


class Capture:
    """Forward hooks on a model for a set of canonical hooks.

    ``sink(hook, tensor)`` is called with each captured tensor ``[batch, seq, d]`` (a view of
    the model's own tensor: copy it before the next forward). Use as a context manager; call
    :meth:`forward` to run the model up to the deepest hook.
    """

    def __init__(self, model: torch.nn.Module, sites: dict[str, HookSite], hooks: list[str], sink: Callable[[str, torch.Tensor], None], *,
                 stop_early: bool = True) -> None:
        self.model = model
        self.sites = [sites[h] for h in hooks]
        self.sink = sink
        self.deepest = max(self.sites, key=lambda s: s.order).hook if stop_early else None
        self._handles: list[Any] = []

    def _make(self, site: HookSite) -> Callable[..., None]:
        stop = site.hook == self.deepest
        sink, hook = self.sink, site.hook
        if site.io == "input":

            def pre(module, args, kwargs):
                sink(hook, args[0] if args else kwargs["hidden_states"])
                if stop:
                    raise _StopForward

            return pre

        def post(module, args, output):
            sink(hook, _first_tensor(output))
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
        try:
            self.model(**inputs)
        except _StopForward:
            pass
