"""SAE feature matching across models (Lan et al. 2024, "Sparse Autoencoders Reveal Universal
Feature Spaces Across Large Language Models").

For SAEs trained on two (dataset, hook) sides whose rows align (``store.datasets.aligned``):

1. **Latent correlations**, streamed over the aligned rows in chunks: each side's SAE encodes its
   rows; float64 sums ``sum f_a``, ``sum f_a^2``, ``sum f_b``, ``sum f_b^2`` and the cross sums
   ``sum f_a f_b^T`` (a sparse product: the cost is the co-firing pairs, not ``m_a x m_b`` per
   row) give the Pearson correlation of every latent pair. Memory: one ``m_a x m_b`` float64
   matrix. Latents that never vary on these rows (dead) have no correlation and are left out.
2. Each live latent of A gets its **best match** in B (the highest correlation); the **mean max
   correlation** is their mean (and likewise from B to A).
3. **SVCCA of decoder directions** of the matched pairs: rows ``W_dec_A[i]`` against
   ``W_dec_B[match(i)]`` (pairs as samples, model dimensions as features), over the pairs with
   correlation ``>= min_corr`` (``one_to_one``: only the best A latent of each B latent).
4. **Random-pairing baseline**: the same SVCCA after permuting the B side of the pairs,
   ``random_pairings`` times (seeded); ``p_value = (1 + #{random >= observed}) / (1 + R)``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from strata.store.datasets.aligned import align_tokens

from ._cca import svcca
from .errors import AnalysisError
from .spec import MatchSettings, sections

if TYPE_CHECKING:
    from strata.store import ActivationDataset
    from strata.store.datasets.aligned import Alignment

log = logging.getLogger(__name__)

__all__ = ["MatchSettings", "LatentCorrelations", "match_saes"]


class LatentCorrelations:
    """Streaming Pearson correlations between two sets of sparse latents."""

    def __init__(self, m_a: int, m_b: int) -> None:
        self.n = 0
        self.sa, self.ssa = np.zeros(m_a), np.zeros(m_a)
        self.sb, self.ssb = np.zeros(m_b), np.zeros(m_b)
        self.cross = np.zeros((m_a, m_b))

    def update(self, fa: Any, fb: Any) -> LatentCorrelations:
        a = sp.csr_matrix(np.asarray(fa, dtype=np.float64))  # keeps the non-zeros only
        b = sp.csr_matrix(np.asarray(fb, dtype=np.float64))
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"latent chunks have {a.shape[0]} and {b.shape[0]} rows; rows must be aligned")
        self.n += a.shape[0]
        self.sa += np.asarray(a.sum(axis=0)).ravel()
        self.ssa += np.asarray(a.multiply(a).sum(axis=0)).ravel()
        self.sb += np.asarray(b.sum(axis=0)).ravel()
        self.ssb += np.asarray(b.multiply(b).sum(axis=0)).ravel()
        prod = (a.T @ b).tocoo()
        prod.sum_duplicates()
        self.cross[prod.row, prod.col] += prod.data
        return self

    def correlations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(correlation ``[m_a, m_b]`` with NaN for dead latents, live mask of A, live mask of B)."""
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        va, vb = self.ssa / n - ma**2, self.ssb / n - mb**2
        # Relative threshold: a latent whose variance is rounding noise of its second moment is dead.
        la, lb = va > 1e-12 * np.maximum(self.ssa / n, 1e-300), vb > 1e-12 * np.maximum(self.ssb / n, 1e-300)
        cov = self.cross / n - np.outer(ma, mb)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.sqrt(np.outer(np.where(la, va, np.nan), np.where(lb, vb, np.nan)))
        return corr, la, lb


def _encode(sae: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        f = sae.encode(torch.as_tensor(x).to(device=sae.device, dtype=sae.dtype))
        if f.is_sparse:
            f = f.to_dense()
        return f.float().cpu().numpy()


def _decoder(sae: Any) -> np.ndarray:
    return sae.W_dec.detach().double().cpu().numpy()


def match_saes(a: tuple[Any, ActivationDataset, str], b: tuple[Any, ActivationDataset, str], *,
               settings: MatchSettings | None = None, chunk_rows: int = 4096, alignment: Alignment | None = None,
               **fields: Any) -> tuple[pa.Table, dict[str, float], dict[str, Any]]:
    """Match the latents of SAE ``a = (sae, dataset, hook)`` to those of ``b`` (see the module
    docstring). ``settings``: a :class:`MatchSettings` (a ``kind: sae_match`` analysis of a spec is
    one), or its keys as keywords (``min_corr``, ``one_to_one``, ``random_pairings``, ...) with its
    defaults; ``chunk_rows``: aligned rows encoded per step. Returns (a table with one row per A
    latent, the summary numbers, provenance)."""
    opts, _ = sections("match_saes", MatchSettings, settings, None, fields)
    if chunk_rows < 1:
        raise AnalysisError(f"match_saes: `chunk_rows` must be >= 1, got {chunk_rows}")
    (sae_a, ds_a, hook_a), (sae_b, ds_b, hook_b) = a, b
    for sae, ds, hook in (a, b):
        d_in, d = int(sae.cfg.d_in), ds.info.hooks[ds.check_hook(hook)].d
        if d_in != d:
            raise AnalysisError(f"an SAE with d_in={d_in} cannot encode {ds.name}:{hook} (d={d})")
    al = alignment or align_tokens([(ds_a, hook_a), (ds_b, hook_b)])
    if opts.max_rows is not None:
        al = al.subset(slice(0, opts.max_rows))
    if len(al) < 3:
        raise AnalysisError(f"SAE matching needs at least 3 aligned rows, got {len(al)}")
    acc = LatentCorrelations(int(sae_a.cfg.d_sae), int(sae_b.cfg.d_sae))
    for s in range(0, len(al), chunk_rows):
        xa = ds_a.read(hook_a, rows=al.rows[0][s : s + chunk_rows], dtype="float32")
        xb = ds_b.read(hook_b, rows=al.rows[1][s : s + chunk_rows], dtype="float32")
        acc.update(_encode(sae_a, xa), _encode(sae_b, xb))
    corr, live_a, live_b = acc.correlations()
    if not live_a.any() or not live_b.any():
        raise AnalysisError(f"no latent of {'A' if not live_a.any() else 'B'} varies over the {len(al)} aligned rows; nothing to match")
    masked = np.where(np.isnan(corr), -np.inf, corr)
    best_b = masked.argmax(axis=1)
    max_a = np.where(live_a, masked.max(axis=1), np.nan)
    max_b = np.where(live_b, masked.max(axis=0), np.nan)
    pairs = np.flatnonzero(live_a & (max_a >= opts.min_corr))
    if opts.one_to_one and pairs.size:
        order = pairs[np.argsort(-max_a[pairs], kind="stable")]
        _, first = np.unique(best_b[order], return_index=True)
        pairs = np.sort(order[first])
    summary: dict[str, float] = {
        "n": float(len(al)), "live_a": float(live_a.sum()), "live_b": float(live_b.sum()),
        "mean_max_corr_a": float(np.nanmean(max_a)), "mean_max_corr_b": float(np.nanmean(max_b)), "pairs": float(pairs.size),
    }
    if pairs.size >= 3:
        wa, wb = _decoder(sae_a)[pairs], _decoder(sae_b)[best_b[pairs]]
        observed = svcca(wa, wb, keep=opts.keep)
        rng = np.random.default_rng([opts.seed, 10])
        rand = np.array([svcca(wa, wb[rng.permutation(pairs.size)], keep=opts.keep) for _ in range(opts.random_pairings)])
        summary.update(svcca=float(observed), svcca_random_mean=float(rand.mean()) if rand.size else math.nan,
                       svcca_random_std=float(rand.std()) if rand.size else math.nan,
                       p_value=float((1 + np.sum(rand >= observed)) / (1 + rand.size)))
    else:
        log.warning("SAE matching: %d matched pairs; SVCCA of decoder directions needs at least 3", pairs.size)
    table = pa.table({"latent_a": np.arange(corr.shape[0]), "best_b": best_b.astype(np.int64), "corr": max_a,
                      "live": live_a, "paired": np.isin(np.arange(corr.shape[0]), pairs)})
    options = {"chunk_rows": chunk_rows, **{k: getattr(opts, k) for k in MatchSettings.model_fields}}
    prov = {"options": options, "alignment": al.summary(), "units_a": list(al.units[0]), "units_b": list(al.units[1])}
    return table, summary, prov
