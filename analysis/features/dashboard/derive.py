"""What a feature page needs from the SAE's weights and the model, computed once per SAE and stored.

* **Nearest features**: the ``k`` features whose decoder rows have the highest cosine with
  ``W_dec[f]`` (the feature itself left out), in blocks so a 65k SAE never holds a 65k x 65k matrix.
* **Logit effects** (hooks in the residual stream): ``W_dec[f] @ W_U'``, top ``k`` promoted and
  suppressed tokens, where ``W_U'`` is prepared as SAEDashboard's TransformerLens model
  (``fold_ln=True, center_unembed=True``) has it: the final norm's weight folded into ``W_U``
  (``W_U' = diag(w) W_U``; Gemma's RMSNorm scales by ``1 + w``) and each row of ``W_U'`` centred
  over the vocabulary (:func:`fold_unembed`). The page states this formula.
* **Decoder norms per source** of a multi-source dictionary (decoder ``[n_sources, d_sae, d_in]``).

Written with :func:`strata.store.features.view.write_derived` to ``features/NAME/dashboard/derived.parquet``.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from strata.pipeline.hooks import family_of
from strata.store.features.view import write_derived

if TYPE_CHECKING:
    from strata.store.features.table import FeatureTable

__all__ = ["derive", "fold_unembed", "logit_effects", "nearest", "LOGIT_NOTE"]

log = logging.getLogger(__name__)

LOGIT_NOTE = ("logit effect of feature f on token t = W_dec[f] \u00b7 W_U'[:, t], where W_U' is the unembedding with the final norm's "
              "weight folded in (W_U' = diag(w_ln_final) W_U) and each row centred over the vocabulary, as SAEDashboard's "
              "TransformerLens model has it (fold_ln, center_unembed)")
_RESIDUAL = re.compile(r"(^|\.)hook_(resid_(pre|mid|post)|attn_out|mlp_out|embed)$")


def fold_unembed(W_U: np.ndarray, ln_weight: np.ndarray | None = None, *, gemma: bool = False) -> np.ndarray:
    """``W_U`` ``[d_model, vocab]`` with the final norm's weight folded in and rows centred (float32)."""
    W = np.asarray(W_U, dtype=np.float64)
    if ln_weight is not None:
        w = np.asarray(ln_weight, dtype=np.float64)
        W = (1.0 + w if gemma else w)[:, None] * W
    return (W - W.mean(axis=1, keepdims=True)).astype(np.float32)


def nearest(W_dec: np.ndarray, k: int = 10, *, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [d_sae, k], cosines [d_sae, k])``: each feature's nearest others by decoder cosine (-1 pads)."""
    import torch  # lazy: only deriving needs torch

    W = torch.from_numpy(np.ascontiguousarray(W_dec, dtype=np.float32))
    n = W.shape[0]
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kk = min(k, max(n - 1, 0))
    ids = np.full((n, k), -1, np.int32)
    cos = np.zeros((n, k), np.float32)
    if kk == 0:
        return ids, cos
    for a in range(0, n, block):
        b = min(n, a + block)
        s = Wn[a:b] @ Wn.T
        s[torch.arange(b - a), torch.arange(a, b)] = -float("inf")
        v, i = torch.topk(s, kk, dim=1)
        ids[a:b, :kk] = i.numpy()
        cos[a:b, :kk] = v.numpy()
    return ids, cos


def logit_effects(W_dec: np.ndarray, W_U: np.ndarray, k: int = 10, *, block: int = 1024) -> tuple[np.ndarray, ...]:
    """``(pos_ids, pos_values, neg_ids, neg_values)``, each ``[d_sae, k]``: the tokens ``W_dec[f] @ W_U``
    raises most (highest first) and lowers most (lowest first)."""
    import torch  # lazy: only deriving needs torch

    W = torch.from_numpy(np.ascontiguousarray(W_dec, dtype=np.float32))
    U = torch.from_numpy(np.ascontiguousarray(W_U, dtype=np.float32))
    n, k = W.shape[0], min(k, U.shape[1])
    out = [np.zeros((n, k), np.int32), np.zeros((n, k), np.float32), np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)]
    for a in range(0, n, block):
        e = W[a : a + block] @ U
        v, i = torch.topk(e, k, dim=1)
        out[0][a : a + block], out[1][a : a + block] = i.numpy(), v.numpy()
        v, i = torch.topk(e, k, dim=1, largest=False)
        out[2][a : a + block], out[3][a : a + block] = i.numpy(), v.numpy()
    return tuple(out)


def _model_unembed(fs: FeatureTable) -> tuple[np.ndarray | None, str]:
    """The dataset's model's prepared ``W_U`` (see :func:`fold_unembed`), or None and why not."""
    from strata.analysis.sae.evaluate import load_causal_lm  # lazy: strata.analysis.sae imports sae_lens (~3 s)

    model, why = load_causal_lm(fs.dataset.info.meta)
    if model is None:
        return None, f"no logit effects: {why}"
    fam = family_of(model.config.model_type)
    if fam.ln_final is None:
        return None, f"no logit effects: model type {model.config.model_type!r} has no final norm in Strata's hook map"
    norm = model.base_model.get_submodule(fam.ln_final)
    W_U = model.get_output_embeddings().weight.detach().float().numpy().T  # [d_model, vocab]
    w = getattr(norm, "weight", None)
    gemma = type(norm).__name__.startswith("Gemma")
    return fold_unembed(W_U, None if w is None else w.detach().float().numpy(), gemma=gemma), LOGIT_NOTE


def derive(fs: FeatureTable, *, decoder: np.ndarray | None = None, unembed: np.ndarray | None = None, unembed_note: str | None = None,
           k: int = 10) -> str:
    """Compute and store the table's nearest features, logit effects and per-source decoder norms;
    returns the store key written. ``decoder``: ``W_dec`` (default: the table's SAE, loaded from the
    store); ``unembed``: a prepared ``[d_in, vocab]`` unembedding (default: the dataset's model's,
    through :func:`fold_unembed`, when the hook is in the residual stream and the model is here)."""
    if decoder is None:
        sae = fs.store.sae(fs.info.sae).load()
        decoder = sae.W_dec.detach().float().numpy()
    W = np.asarray(decoder, dtype=np.float32)
    norms = None
    if W.ndim == 3:  # a multi-source dictionary: [n_sources, d_sae, d_in]
        norms = np.linalg.norm(W, axis=2).T.astype(np.float32)
        W = np.concatenate(list(W), axis=1)
    if W.shape[0] != fs.d_sae:
        raise ValueError(f"the decoder has {W.shape[0]} rows but feature table {fs.name!r} has d_sae={fs.d_sae}")
    ids, cos = nearest(W, k)
    logits: dict[str, Any] = {}
    note: str | None
    if unembed is not None:
        note = unembed_note or LOGIT_NOTE
    elif norms is not None:
        note = "no logit effects: a multi-source dictionary's decoder writes to several sites"
    elif not _RESIDUAL.search(fs.info.hook):
        note = f"no logit effects: hook {fs.info.hook} is not in the residual stream"
    else:
        unembed, note = _model_unembed(fs)
    if unembed is not None:
        if unembed.shape[0] != W.shape[1]:
            raise ValueError(f"the unembedding has {unembed.shape[0]} rows but the decoder writes {W.shape[1]} dimensions")
        p_i, p_v, n_i, n_v = logit_effects(W, unembed, k)
        logits = {"pos_tokens": p_i, "pos_values": p_v, "neg_tokens": n_i, "neg_values": n_v}
    key = write_derived(fs, neighbours=ids, neighbour_cos=cos, logit_note=note, decoder_norms=norms, **logits)
    log.info("feature table %r: derived data written to %s (%s)", fs.name, key, note)
    return key
