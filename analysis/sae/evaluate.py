"""Evaluating an SAE on held-out units of its dataset.

Reconstruction (:func:`reconstruction_metrics`), over every held-out row (special rows left out
as in training), in one streaming pass with float64 sums:

- ``mse``: squared error summed over the d_in dimensions, averaged over tokens (sae-lens's
  ``mse_loss`` convention); ``mse_per_dim`` divides it by d_in.
- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean||^2`` with
  ``mean`` the held-out data's own mean (per dimension); ``explained_variance = 1 - fvu``.
- ``l0``: nonzero latents per token, averaged.
- ``dead_features``, ``dead_fraction``: latents that fire on no held-out token (``dead_window``
  says which tokens). This is the one meaning of "dead" in Strata; the training curves'
  ``inactive_*`` columns count something else (see :mod:`analysis.sae.curves`).
- ``dense_fraction``: latents firing on more than ``dense_threshold`` (default 10%) of them.

Spliced loss (:func:`spliced_ce`), for causal LMs whose model is on this machine: the
next-token cross-entropy on held-out contexts, clean, with the SAE's reconstruction in place
of the hook's activations, and with them zeroed; ``loss_recovered = (ce_zero - ce_spliced) /
(ce_zero - ce_clean)``. The hook is replaced at the module the extraction pipeline captured it
from (``pipeline.hooks.hook_sites`` with the model's config): a hook taken from a module's input
(``mlp.hook_post``: the down projection's input; ``attn.hook_z``: the output projection's input)
replaces that input, one taken from its output replaces the output; at every position except
special ones (BOS, separators, padding), which the SAE never saw in training and which keep the
model's own activations. Targets that are special tokens are left out of the loss. A hook
stored transformed (``ln*.hook_normalized``: before the norm's weight and bias; ``attn.hook_q``
sliced out of a fused projection) is no tensor of the forward pass and cannot be spliced. When
the model is not available or the hook cannot be spliced, the result says why, under
``ce_skipped``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from strata.analysis.sae.config import EvalSpec
from strata.pipeline.hooks import FAMILIES, HookSite, family_of, hook_sites
from strata.pipeline.models import folder_revision
from strata.store.layout import unit_ranges

if TYPE_CHECKING:
    from sae_lens import SAE

    from strata.store import ActivationDataset

log = logging.getLogger(__name__)

Replace = Callable[[torch.Tensor], torch.Tensor]


def _reconstruct(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents as a dense tensor, reconstruction) of ``x`` ``[n, d]``."""
    f = sae.encode(x.to(sae.device))
    x_hat = sae.decode(f)
    if f.is_sparse:
        f = f.to_dense()
    return f, x_hat


class ReconstructionSums:
    """Float64 sums of one held-out pass of a dictionary, from which its metrics follow: per
    source (one for an SAE or a transcoder, ``n`` for a crosscoder) the target's sum, its squared
    norm and the squared error; the latents' L0 and which of them fired. Shared by SAEs,
    transcoders (the target is the out hook) and crosscoders, so every dictionary's ``fvu``,
    ``l0`` and ``dead_*`` mean the same."""

    def __init__(self, n_sources: int, d: int, d_sae: int) -> None:
        self.rows = 0
        self.sum_x = torch.zeros(n_sources, d, dtype=torch.float64)
        self.sum_x2 = torch.zeros(n_sources, dtype=torch.float64)
        self.sse = torch.zeros(n_sources, dtype=torch.float64)
        self.l0 = torch.zeros((), dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.int64)

    def add(self, target: torch.Tensor, prediction: torch.Tensor, latents: torch.Tensor) -> None:
        """One batch: ``target`` and ``prediction`` ``[b, d]`` (one source) or ``[b, n, d]``; ``latents`` ``[b, d_sae]``."""
        if target.dim() == 2:
            target, prediction = target[:, None], prediction[:, None]
        x64 = target.to(torch.float64)
        self.rows += target.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_x2 += x64.pow(2).sum((0, 2))
        self.sse += (prediction.detach().cpu().to(torch.float64) - x64).pow(2).sum((0, 2))
        if latents.is_sparse:
            latents = latents.to_dense()
        nz = (latents != 0).cpu()
        self.l0 += nz.sum()
        self.fired += nz.sum(0)

    def source_fvu(self) -> list[float]:
        """Each source's FVU against its own held-out mean."""
        var = self.sum_x2 - self.sum_x.pow(2).sum(-1) / self.rows
        return [float(self.sse[i] / var[i]) if var[i] > 0 else math.nan for i in range(var.shape[0])]

    def metrics(self, *, dead_window: str, dense_threshold: float) -> dict[str, Any]:
        """``tokens``, ``mse``, ``mse_per_dim``, ``fvu``, ``explained_variance``, ``l0``, ``dead_*``,
        ``dense_*`` over every source (see the module docstring)."""
        n = self.rows
        if n == 0:
            raise ValueError("no held-out rows to evaluate on")
        total_var = float((self.sum_x2 - self.sum_x.pow(2).sum(-1) / n).sum())
        sse = float(self.sse.sum())
        fvu = sse / total_var if total_var > 0 else math.nan
        freq = self.fired.to(torch.float64) / n
        return {
            "tokens": n,
            "mse": sse / n,
            "mse_per_dim": sse / (n * self.sum_x.numel()),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": float(self.l0) / n,
            # Strata's one definition of a dead latent, used everywhere (cfg.json's
            # `num_dead_features` is rewritten to it at save): it fires on no held-out token.
            "dead_features": int((self.fired == 0).sum()),
            "dead_fraction": float((self.fired == 0).to(torch.float64).mean()),
            "dead_window": dead_window,
            "dense_fraction": float((freq > dense_threshold).to(torch.float64).mean()),
            "dense_threshold": dense_threshold,
        }


def heldout_window(n: int, units: list[int], skip_special: bool) -> str:
    """Which tokens ``dead`` was measured on (``metrics.json``'s ``dead_window``)."""
    return f"fires on none of the {n:,} held-out tokens of unit(s) {unit_ranges(units)}" + (" (special tokens left out)" if skip_special else "")


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, ds: ActivationDataset, hook: str, units: list[int], *, batch_size: int = 4096, skip_special: bool = True,
    dense_threshold: float = 0.1,
) -> dict[str, Any]:
    """MSE, FVU, L0, dead and dense latent fractions of ``sae`` on ``units`` of ``hook``."""
    if not units:
        raise ValueError("no held-out units to evaluate on (`data.holdout_units` is 0)")
    was_training = sae.training
    sae.eval()
    sums = ReconstructionSums(1, ds.info.hooks[hook].d, int(sae.cfg.d_sae))
    it = ds.iter_batches(hook, batch_size=batch_size, shuffle=False, epochs=1, skip_special=skip_special, units=units)
    try:
        for x in it:
            f, x_hat = _reconstruct(sae, x)
            sums.add(x, x_hat, f)
    finally:
        it.close()
        sae.train(was_training)
    if sums.rows == 0:
        raise ValueError(f"units {units} of hook {hook!r} hold no rows to evaluate on")
    return sums.metrics(dead_window=heldout_window(sums.rows, units, skip_special), dense_threshold=dense_threshold)


# -- the spliced language-model loss ---------------------------------------------------------------


def _first(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


@contextlib.contextmanager
def splice(model: torch.nn.Module, site: HookSite, replace: Replace) -> Iterator[None]:
    """Within the block, ``replace(activation)`` takes the place of the hook's activation
    ``[batch, seq, d]`` in every forward pass of ``model`` (a causal LM or its base model).
    Handles modules returning a tensor (transformers 5 decoder layers) or a tuple."""
    module = model.base_model.get_submodule(site.module)
    if site.io == "input":

        def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(mod: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return replace(output)
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            raise TypeError(f"cannot splice into {site.module!r}: it returns a {type(output).__name__}")

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def next_token_ce(
    model: torch.nn.Module, token_ids: torch.Tensor, special: torch.Tensor, *, site: HookSite | None = None,
    replace: Replace | None = None, batch_contexts: int = 8, attention_mask: torch.Tensor | None = None,
    splice_special: bool = False,
) -> tuple[float, int]:
    """(mean next-token cross-entropy, number of targets) of ``model`` on contexts
    ``token_ids`` ``[n, seq]``, targets that are ``special`` left out. With ``site`` and
    ``replace``, the hook's activation is replaced by ``replace(activation)`` at non-special
    positions (at every position with ``splice_special``); ``replace`` gets one batch of
    ``batch_contexts`` contexts at a time. The identity gives exactly the clean loss."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for c0 in range(0, token_ids.shape[0], batch_contexts):
        ids = token_ids[c0 : c0 + batch_contexts].to(device)
        spec = special[c0 : c0 + batch_contexts].to(device)
        inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[c0 : c0 + batch_contexts].to(device, dtype=torch.long)
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if site is not None and replace is not None:
            keep = ~spec[..., None]

            def masked(x: torch.Tensor, fn: Replace = replace, keep: torch.Tensor = keep) -> torch.Tensor:
                y = fn(x).to(x.dtype)
                return y if splice_special else torch.where(keep, y, x)

            ctx = splice(model, site, masked)
        with ctx:
            logits = model(**inputs).logits
        targets = ids[:, 1:]
        ok = ~spec[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][ok].float(), targets[ok], reduction="sum")
        total += nll.double().cpu()
        count += int(ok.sum())
    return (float(total) / count if count else math.nan), count


def sae_replace(sae: SAE) -> Replace:
    """The SAE's reconstruction of a ``[..., d]`` activation, in the activation's dtype."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(device=sae.device, dtype=sae.dtype)
        return sae.decode(sae.encode(flat)).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    return fn


def load_causal_lm(meta: dict[str, Any], *, device: str = "cpu") -> tuple[torch.nn.Module | None, str | None]:
    """(model, None) when the dataset's causal LM is on this machine at the recorded revision,
    else (None, why). A local folder is checked against the revision hash recorded at
    extraction; a hub id is looked up in the local cache only (never downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: seconds to import; only loading a model needs it


    model_id = meta.get("model_path") or meta.get("model")
    if not model_id:
        return None, "the dataset records no model"
    revision = meta.get("revision")
    dtype = getattr(torch, str(meta.get("torch_dtype") or "float32"))
    folder = os.path.expanduser(str(model_id))
    if os.path.isdir(folder):
        if isinstance(revision, str) and revision.startswith("local-"):

            now = folder_revision(folder)
            if now != revision:
                return None, f"model folder {folder!r} changed since extraction (revision {revision}, now {now})"
        kwargs: dict[str, Any] = {}
    else:
        kwargs = {"revision": revision, "local_files_only": True}
        folder = str(model_id)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except Exception as e:  # not local, not cached: many error types
        return None, f"model {model_id!r} is not available on this machine ({type(e).__name__}: {str(e).splitlines()[0]})"
    bert = next(f for f in FAMILIES if f.name == "bert")
    if getattr(config, "model_type", None) in bert.model_types:
        return None, f"model {model_id!r} ({config.model_type}) is not a causal LM"
    if any(config.model_type in f.model_types for f in FAMILIES if f.modality == "image"):
        return None, f"model {model_id!r} ({config.model_type}) is an image encoder, not a causal LM"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False, **kwargs)
    except Exception as e:
        return None, f"model {model_id!r} cannot be loaded as a causal LM ({type(e).__name__}: {str(e).splitlines()[0]})"
    return model.to(device).eval().requires_grad_(False), None


def hook_site(model: torch.nn.Module, hook: str, meta: dict[str, Any] | None = None) -> HookSite:
    """The extraction pipeline's site of ``hook`` in ``model``, built with the model's config (so
    neurons, attention heads and norms are found too). When the dataset recorded where the hook
    was captured (``hook_modules``) and that differs from today's map, the record wins if it
    names a plain module input or output of this model (a dataset stored before a hook's meaning
    changed, such as ``ln_final.hook_normalized`` as the final norm's output, holds what it
    recorded); any other difference is an error."""

    cfg = model.config
    sites = hook_sites(family_of(cfg.model_type), int(cfg.num_hidden_layers), cfg)
    if hook not in sites:
        raise ValueError(f"model {cfg.model_type!r} has no hook {hook!r}")
    site = sites[hook]
    recorded = (meta or {}).get("hook_modules", {}).get(hook)
    if recorded is None or recorded == site.describe():
        return site
    module, _, io = str(recorded).rpartition(":")
    if io in ("input", "output") and "+" not in recorded:
        try:
            model.base_model.get_submodule(module)
        except AttributeError:
            pass
        else:
            return HookSite(hook, module, io, site.order, site.width, None, f"as recorded at extraction: {recorded}")
    raise ValueError(f"hook {hook!r} was captured at {recorded} but maps to {site.describe()} now")


def heldout_contexts(ds: ActivationDataset, units: list[int], max_contexts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(token ids, special, attention mask or None) ``[n, context_size]`` of the first
    ``max_contexts`` contexts of ``units``. The mask (False for padding, whose ``doc_id`` is -1)
    is given only when some context is padded, as the extraction pipeline did."""
    toks = ds.tokens(units=units)
    cs = ds.info.context_size
    n = min(max_contexts, toks.num_rows // cs)
    toks = toks.slice(0, n * cs)
    ids = torch.from_numpy(toks.column("token_id").to_numpy().astype(np.int64).reshape(n, cs))
    special = torch.from_numpy(toks.column("special").to_numpy(zero_copy_only=False).astype(bool).reshape(n, cs))
    doc = toks.column("doc_id").to_numpy().reshape(n, cs)
    mask = torch.from_numpy(doc >= 0) if (doc < 0).any() else None
    return ids, special, mask


def model_or_skip(
    ds: ActivationDataset, units: list[int], model: torch.nn.Module | None, device: str
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The model a spliced loss runs (``model``, else the dataset's causal LM when it is on this
    machine), or None and the ``{"ce_skipped": why}`` result when there is none or nothing is held out."""
    if not units:
        return None, {"ce_skipped": "no held-out units (`data.holdout_units` is 0)"}
    if model is None:
        model, why = load_causal_lm(ds.info.meta, device=device)
        if model is None:
            log.info("spliced loss skipped: %s", why)
            return None, {"ce_skipped": why}
    return model, {}


def spliced_ce(
    sae: SAE, ds: ActivationDataset, hook: str, units: list[int], *, model: torch.nn.Module | None = None,
    contexts: int = 64, batch_contexts: int = 8, device: str = "cpu",
) -> dict[str, Any]:
    """Clean, spliced and zero-ablated next-token loss on held-out contexts, and the loss
    recovered. ``model`` defaults to the dataset's model, when it is on this machine;
    otherwise the result is ``{"ce_skipped": why}``."""
    model, skipped = model_or_skip(ds, units, model, device)
    if model is None:
        return skipped
    try:
        site = hook_site(model, hook, ds.info.meta)
    except Exception as e:
        return {"ce_skipped": str(e)}
    if site.transform is not None:
        why = (f"hook {hook!r} is {site.module}'s {site.io} transformed ({site.transform.describe()}), not a module's input or output "
               "as it is: it cannot be spliced back into the model")
        log.info("spliced loss skipped: %s", why)
        return {"ce_skipped": why}
    ids, special, mask = heldout_contexts(ds, units, contexts)
    if ids.shape[0] == 0:
        return {"ce_skipped": "the held-out units hold no whole context"}
    kw: dict[str, Any] = {"batch_contexts": batch_contexts, "attention_mask": mask}
    clean, n = next_token_ce(model, ids, special, **kw)
    spliced, _ = next_token_ce(model, ids, special, site=site, replace=sae_replace(sae), **kw)
    zero, _ = next_token_ce(model, ids, special, site=site, replace=torch.zeros_like, **kw)
    return loss_figures(clean, spliced, zero, contexts=int(ids.shape[0]), tokens=n)


def loss_figures(clean: float, spliced: float, zero: float, *, contexts: int, tokens: int) -> dict[str, Any]:
    """``metrics.json``'s spliced-loss fields: the three losses, the spliced one's excess over the
    clean one, and the loss recovered ``(zero - spliced) / (zero - clean)``."""
    denom = zero - clean
    return {
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablated": zero,
        "ce_delta": spliced - clean,
        "loss_recovered": (zero - spliced) / denom if denom != 0 else math.nan,
        "ce_contexts": contexts,
        "ce_tokens": tokens,
    }


def evaluate(
    sae: SAE, ds: ActivationDataset, hook: str, units: list[int], *, spec: EvalSpec | None = None, skip_special: bool = True,
    device: str = "cpu", model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Reconstruction metrics and (``spec.ce``) the spliced loss of ``sae`` on held-out ``units``."""
    spec = spec or EvalSpec()
    home = sae.device
    sae.to(device)  # sae-lens's `to` also rewrites cfg.device: moved back below
    try:
        out: dict[str, Any] = {"hook": hook, "units": list(units)}
        out.update(reconstruction_metrics(sae, ds, hook, units, batch_size=spec.batch_size, skip_special=skip_special,
                                          dense_threshold=spec.dense_threshold))
        if spec.ce:
            out.update(spliced_ce(sae, ds, hook, units, model=model, contexts=spec.ce_contexts,
                                  batch_contexts=spec.ce_batch_contexts, device=device))
    finally:
        sae.to(home)
    return out
