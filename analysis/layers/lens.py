"""The logit lens (nostalgebraist 2020) over stored residual streams of a causal LM.

Each residual-stream hook's stored activations ``h`` (``hook_embed``, ``blocks.L.hook_resid_pre``,
``blocks.L.hook_resid_mid``, ``blocks.L.hook_resid_post``) are decoded as the model decodes its
last one: the final norm, then the unembedding, ``logits = W_U norm(h)`` (Gemma 2's final logit
soft-capping is applied when the model has one). The final norm's hooks, by what the dataset
recorded they hold (``hook_modules``): ``ln_final.hook_out``, and ``ln_final.hook_normalized``
of a dataset that recorded it as the norm's ``:output`` (its meaning before it took
TransformerLens's; also when nothing is recorded), are the norm's output: unembedding only.
``ln_final.hook_normalized`` as TransformerLens means it (normalized, before the norm's weight
and bias) gets the norm's affine part only (:func:`norm_affine`: ``w * h + b``, RMSNorm's
``w * h``, Gemma's ``(1 + w) * h``), which is exactly the norm's output. Running the norm on it
again is not: it divides by ``sqrt(var(h) + eps)`` once more, and ``var(h) = v / (v + eps)`` is
visibly below 1 where the stream's variance ``v`` is not far above ``eps`` (1% off on a tiny
seeded GPT-2). On a
seeded sample of contexts, at every position whose next token is not special (as the model's own
loss counts them), per hook:

- ``ce``: cross-entropy (nats) of the lens distribution against the actual next token;
- ``entropy``: entropy (nats) of the lens distribution;
- ``kl_to_final``: ``KL(p_final || p_lens)`` with ``p_final`` the model's own next-token
  distribution (its logits from a forward pass over the same contexts);
- ``top1_agreement``: how often the lens's top token is the model's top token.

The last block's ``resid_post`` through the lens reproduces the model's logits (up to the stored
dtype's rounding): ``max_abs_logit_diff`` reports, per hook, the largest difference between lens
logits and model logits, so that check is in every result. Needs the dataset's model on this
machine (``analysis.sae.evaluate.load_causal_lm``: a local folder at the recorded revision, or
the hub cache).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from strata.analysis.layers.geometry import pick_contexts
from strata.analysis.similarity.errors import AnalysisError
from strata.pipeline.hooks import family_of

if TYPE_CHECKING:
    from strata.store import ActivationDataset

log = logging.getLogger(__name__)

__all__ = ["LENS_METRICS", "lens_hooks", "logit_lens", "norm_affine", "normed_already"]

LENS_METRICS = ("ce", "entropy", "kl_to_final", "top1_agreement", "max_abs_logit_diff")
_RESID = re.compile(r"^(hook_embed|blocks\.\d+\.hook_resid_(pre|mid|post)|ln_final\.hook_(normalized|out))$")


def lens_hooks(hooks: Sequence[str]) -> list[str]:
    """The residual-stream hooks among ``hooks`` (the ones the lens applies to)."""
    return [h for h in hooks if _RESID.match(h)]


def normed_already(meta: dict[str, Any], hook: str) -> bool:
    """Whether ``hook``'s stored values are the final norm's output (unembedded as they are)."""
    if hook == "ln_final.hook_out":
        return True
    if hook == "ln_final.hook_normalized":
        recorded = (meta.get("hook_modules") or {}).get(hook)
        return recorded is None or str(recorded).endswith(":output")
    return False


def norm_affine(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The output of the final norm ``norm`` whose normalized input is ``h``: its elementwise
    weight and bias (a LayerNorm's ``w * h + b``; an RMSNorm's ``w * h``; Gemma's RMSNorms
    scale by ``1 + w``; a norm without parameters, OLMo's, is ``h``)."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    if not isinstance(w, torch.Tensor):
        y = h
    elif type(norm).__name__.startswith("Gemma"):  # Gemma, Gemma 2, Gemma 3: `output * (1.0 + weight)`
        y = (h.float() * (1.0 + w.float())).to(h.dtype)
    else:
        y = h * w
    return y + b if isinstance(b, torch.Tensor) else y


def _unembed(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(final norm, unembedding, soft-cap) of a causal LM, found through the extraction hook map."""

    fam = family_of(model.config.model_type)
    if fam.ln_final is None:
        raise ValueError(f"model type {model.config.model_type!r} has no final norm to apply")
    norm = model.base_model.get_submodule(fam.ln_final)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return norm, model.get_output_embeddings(), (float(cap) if cap else None)


@torch.no_grad()
def logit_lens(ds: ActivationDataset, hooks: Sequence[str], *, contexts: int = 32, seed: int = 0,
               model: torch.nn.Module | None = None, batch_contexts: int = 8) -> tuple[pa.Table, dict[str, Any]]:
    """Per-hook logit-lens metrics (see the module docstring) and their provenance."""

    from strata.analysis.sae.evaluate import load_causal_lm  # lazy: strata.analysis.sae imports sae_lens (~3 s); only the logit lens loads a model

    chosen = lens_hooks(hooks)
    if not chosen:
        raise AnalysisError(f"logit lens needs residual-stream hooks (hook_embed, blocks.L.hook_resid_pre/mid/post, ln_final.*); got {list(hooks)}")
    if model is None:
        model, why = load_causal_lm(ds.info.meta)
        if model is None:
            raise AnalysisError(f"logit lens of dataset {ds.name!r} needs its model: {why}")
    norm, unembed, cap = _unembed(model)
    as_is = {h: normed_already(ds.info.meta, h) for h in chosen}
    affine = {h: h == "ln_final.hook_normalized" and not as_is[h] for h in chosen}
    toks, n_ctx, pick = pick_contexts(ds, chosen, contexts, (seed, 6))
    cs = ds.info.context_size
    ids = torch.from_numpy(toks.column("token_id").to_numpy().astype(np.int64).reshape(n_ctx, cs)[pick])
    special = torch.from_numpy(toks.column("special").to_numpy(zero_copy_only=False).astype(bool).reshape(n_ctx, cs)[pick])
    doc = toks.column("doc_id").to_numpy().reshape(n_ctx, cs)[pick]
    mask = torch.from_numpy(doc >= 0).long() if (doc < 0).any() else None
    rows = toks.column("row").to_numpy().reshape(n_ctx, cs)[pick]
    dtype = next(model.parameters()).dtype
    sums = {h: np.zeros(4) for h in chosen}  # ce, entropy, kl, top-1 agreement, summed over positions
    maxdiff = dict.fromkeys(chosen, 0.0)
    count = 0
    for c0 in range(0, pick.size, batch_contexts):
        b_ids, b_sp = ids[c0 : c0 + batch_contexts], special[c0 : c0 + batch_contexts]
        inputs: dict[str, Any] = {"input_ids": b_ids, "use_cache": False}
        if mask is not None:
            inputs["attention_mask"] = mask[c0 : c0 + batch_contexts]
        final = model(**inputs).logits.double()
        ok = ~b_sp[:, 1:]  # positions t whose target t+1 is a real token
        targets = b_ids[:, 1:][ok]
        lp_final = torch.log_softmax(final[:, :-1][ok], dim=-1)
        top_final = lp_final.argmax(-1)
        count += int(ok.sum())
        for h in chosen:
            x = ds.read(h, rows=rows[c0 : c0 + batch_contexts].reshape(-1), as_="torch", dtype=torch.float32)
            x = x.reshape(b_ids.shape[0], cs, -1).to(dtype)
            logits = unembed(x if as_is[h] else norm_affine(norm, x) if affine[h] else norm(x)).double()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            here = logits[:, :-1][ok]
            lp = torch.log_softmax(here, dim=-1)
            sums[h] += [
                float(-lp.gather(1, targets[:, None]).sum()),
                float(-(lp.exp() * lp).sum()),
                float((lp_final.exp() * (lp_final - lp)).sum()),
                float((lp.argmax(-1) == top_final).sum()),
            ]
            if here.numel():
                maxdiff[h] = max(maxdiff[h], float((here - final[:, :-1][ok]).abs().max()))
    if count == 0:
        raise AnalysisError(f"dataset {ds.name!r}: the sampled contexts have no position with a real next token")
    cols: dict[str, Any] = {"hook": chosen}
    for k, name in enumerate(LENS_METRICS[:4]):
        cols[name] = pa.array([float(sums[h][k] / count) for h in chosen])
    cols["max_abs_logit_diff"] = pa.array([maxdiff[h] for h in chosen])
    prov = {"contexts": int(pick.size), "positions": count, "seed": seed,
            "model": ds.info.meta.get("model"), "revision": ds.info.meta.get("revision")}
    return pa.table(cols), prov
