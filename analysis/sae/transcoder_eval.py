"""Evaluating a transcoder on held-out units of its dataset.

Prediction (:func:`transcoder_metrics`), over every held-out row (special rows left out as in
training), with the same meanings as an SAE's (:mod:`analysis.sae.evaluate`) but measured on
the OUT hook: ``fvu = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` with ``y_hat`` the
transcoder's output (its skip path included) for the in hook's row of the same token and
``mean(y)`` the held-out targets' own mean; ``l0``, ``dead_*`` (a latent that fires on no
held-out token) and ``dense_fraction`` of its latents.

Spliced loss (:func:`transcoder_spliced_ce`): the next-token cross-entropy with the out hook's
activation (the MLP's output, for ``hook_mlp_out``) replaced by ``replace(in activation)``, the
in hook's activation of the same forward pass captured where the extraction pipeline captures
it (its transform applied when it has one, as for ``ln2.hook_normalized``), at every
non-special position; with it zeroed; and clean. ``loss_recovered = (ce_zero - ce_spliced) /
(ce_zero - ce_clean)``. ``replace`` is any callable of the captured ``[batch, seq, d_in]``
tensor (:func:`transcoder_replace` for a transcoder). An out hook stored transformed is no
tensor of the forward pass and cannot be replaced: ``ce_skipped`` says so.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from strata.analysis.sae.config import EvalSpec
from strata.analysis.sae.evaluate import (
    ReconstructionSums,
    Replace,
    heldout_contexts,
    heldout_window,
    hook_site,
    loss_figures,
    model_or_skip,
    next_token_ce,
)
from strata.pipeline.hooks import HookSite, apply_transform

if TYPE_CHECKING:
    from strata.store import ActivationDataset

log = logging.getLogger(__name__)


def transcoder_replace(tc: Any) -> Replace:
    """The transcoder's output (``tc.forward``: the skip path included) of a ``[..., d_in]``
    activation, in the activation's dtype."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(device=tc.device, dtype=tc.dtype)
        y = tc.forward(flat)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(device=x.device, dtype=x.dtype)

    return fn


@torch.no_grad()
def transcoder_metrics(
    tc: Any, ds: ActivationDataset, hook_in: str, hook_out: str, units: list[int], *, batch_size: int = 4096,
    skip_special: bool = True, dense_threshold: float = 0.1,
) -> dict[str, Any]:
    """MSE and FVU of the out hook, L0, dead and dense latent fractions of ``tc`` on ``units``."""
    if not units:
        raise ValueError("no held-out units to evaluate on (`data.holdout_units` is 0)")
    was_training = tc.training
    tc.eval()
    sums = ReconstructionSums(1, ds.info.hooks[hook_out].d, int(tc.cfg.d_sae))
    it = ds.iter_batches([hook_in, hook_out], batch_size=batch_size, shuffle=False, epochs=1, skip_special=skip_special, units=units)
    try:
        for batch in it:
            xd = batch[hook_in].to(tc.device)
            sums.add(batch[hook_out], tc.forward(xd), tc.encode(xd))
    finally:
        it.close()
        tc.train(was_training)
    if sums.rows == 0:
        raise ValueError(f"units {units} of hooks {hook_in!r}, {hook_out!r} hold no rows to evaluate on")
    return sums.metrics(dead_window=heldout_window(sums.rows, units, skip_special), dense_threshold=dense_threshold)


@contextlib.contextmanager
def capture(model: torch.nn.Module, site: HookSite, into: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` stores the hook's activation (its
    transform applied) in ``into["x"]`` (not copied: read it within the same pass)."""
    module = model.base_model.get_submodule(site.module)

    def store(x: torch.Tensor, mod: torch.nn.Module) -> None:
        if site.transform is not None:
            x = apply_transform(site.transform, mod, x, tuple(x.shape[:2]) if x.dim() >= 2 else None)
        into["x"] = x

    if site.io == "input":

        def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store(args[0] if args else kwargs["hidden_states"], mod)

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(mod: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store(output if isinstance(output, torch.Tensor) else output[0], mod)

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def transcoder_spliced_ce(
    replace: Replace, ds: ActivationDataset, hook_in: str, hook_out: str, units: list[int], *, model: torch.nn.Module | None = None,
    contexts: int = 64, batch_contexts: int = 8, device: str = "cpu",
) -> dict[str, Any]:
    """Clean, spliced and zero-ablated next-token loss on held-out contexts, the out hook's
    activation replaced by ``replace(in hook's activation)`` (see the module docstring)."""
    model, skipped = model_or_skip(ds, units, model, device)
    if model is None:
        return skipped
    try:
        site_in = hook_site(model, hook_in, ds.info.meta)
        site_out = hook_site(model, hook_out, ds.info.meta)
    except Exception as e:
        return {"ce_skipped": str(e)}
    if site_out.transform is not None:
        why = (f"out hook {hook_out!r} is {site_out.module}'s {site_out.io} transformed ({site_out.transform.describe()}), not a module's "
               "input or output as it is: it cannot be replaced in the model")
        log.info("spliced loss skipped: %s", why)
        return {"ce_skipped": why}
    if site_in.order >= site_out.order:
        return {"ce_skipped": f"in hook {hook_in!r} does not come before out hook {hook_out!r} in the forward pass"}
    ids, special, mask = heldout_contexts(ds, units, contexts)
    if ids.shape[0] == 0:
        return {"ce_skipped": "the held-out units hold no whole context"}
    kw: dict[str, Any] = {"batch_contexts": batch_contexts, "attention_mask": mask}
    clean, n = next_token_ce(model, ids, special, **kw)
    got: dict[str, torch.Tensor] = {}
    busy: list[bool] = []

    def spliced_out(out: torch.Tensor) -> torch.Tensor:
        if busy:  # `replace` ran the out site's own module (the model's MLP, say): that inner call is left as it is
            return out
        busy.append(True)
        try:
            return replace(got.pop("x"))
        finally:
            busy.pop()

    with capture(model, site_in, got):
        spliced, _ = next_token_ce(model, ids, special, site=site_out, replace=spliced_out, **kw)
    zero, _ = next_token_ce(model, ids, special, site=site_out, replace=torch.zeros_like, **kw)
    return loss_figures(clean, spliced, zero, contexts=int(ids.shape[0]), tokens=n)


def evaluate_transcoder(
    tc: Any, ds: ActivationDataset, hook_in: str, hook_out: str, units: list[int], *, spec: EvalSpec | None = None,
    skip_special: bool = True, device: str = "cpu", model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Prediction metrics and (``spec.ce``) the spliced loss of transcoder ``tc`` on held-out ``units``."""
    spec = spec or EvalSpec()
    home = tc.device
    tc.to(device)
    try:
        out: dict[str, Any] = {"hook": hook_out, "hook_in": hook_in, "hook_out": hook_out, "units": list(units)}
        out.update(transcoder_metrics(tc, ds, hook_in, hook_out, units, batch_size=spec.batch_size, skip_special=skip_special,
                                      dense_threshold=spec.dense_threshold))
        if spec.ce:
            out.update(transcoder_spliced_ce(transcoder_replace(tc), ds, hook_in, hook_out, units, model=model, contexts=spec.ce_contexts,
                                             batch_contexts=spec.ce_batch_contexts, device=device))
    finally:
        tc.to(home)
    return out
