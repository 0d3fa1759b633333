"""Geometry of one dataset's representations, layer by layer: one table row per hook.

Streamed over every non-special committed row, as tasks per range of units whose sums are added
(exact for any number of tasks up to float64 rounding):

- ``norm``: mean L2 norm of the hook's rows.
- ``write_ratio`` (``blocks.L.hook_attn_out`` / ``hook_mlp_out`` rows): the mean over tokens of
  ``|write| / |resid_pre_L|``, how much the sub-block adds relative to the stream entering the
  block (``resid_pre_L``, or ``resid_post_{L-1}`` when that is what the dataset holds).
- ``anisotropy``: the mean cosine between two distinct tokens' representations (Ethayarajh
  2019), exactly over all pairs: ``(|sum_i x_i/|x_i||^2 - n) / (n (n - 1))``.
- ``cos_next``: the mean cosine of each token's representation at this hook and at the next hook
  of the list (same width only).
- ``linearity_next``: the linearity score of the map to the next hook (Razzhigaev et al. 2024,
  "Your Transformer is Secretly Linear", as in LLM-Microscope): both sides centred and divided by
  their Frobenius norms (Procrustes normalisation), ``1 - min_A |X A - Y|_F^2``, which is the
  in-sample least-squares R^2 pooled over output dimensions; from streamed co-moments.

On seeded samples (sizes recorded):

- ``intrinsic_dim``: TwoNN (Facco et al. 2017) on ``sample_rows`` rows: with ``mu_i = r2/r1``
  the ratio of each point's second- to first-nearest-neighbour distance, the maximum-likelihood
  estimate ``d = (N - 1) / sum_i log mu_i`` over the ``N`` *distinct* rows. Exact duplicate rows
  are kept once before anything else: the same token gives the same row at ``hook_embed``, and
  a point with copies has ``r1 = 0`` (with two or more, ``r2 = 0`` too), which the estimator is
  not defined for; kept in, rounding makes ``r1`` and ``r2`` tiny and equal, ``log mu ~ 0``, and
  the estimate explodes (424 for d = 128 on a tiny model's embeddings). The two neighbour
  distances are recomputed exactly from the rows' differences (the Gram-matrix form only picks
  the candidates), so rows that differ by a little are not rounded to duplicates either.
- ``prompt_entropy``: per context, the matrix-based (von Neumann, alpha = 1) entropy of its
  tokens' Gram matrix, ``-sum_k p_k log p_k`` with ``p_k = lambda_k / tr K``, ``K = Z Z^T`` over
  the context's non-special tokens (Skean et al. 2025, "Layer by Layer"), in nats, averaged over
  ``sample_contexts`` contexts.
- ``curvature``: per context, the mean angle in degrees between consecutive steps
  ``x_{t+1} - x_t`` of its non-special tokens' trajectory (Hosseini & Fedorenko 2023), averaged
  over the same contexts.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from strata.analysis.similarity import Moments, r2_from_moments, split_ranges
from strata.analysis.similarity.errors import AnalysisError
from strata.pipeline.executor import Executor, StoreRef

if TYPE_CHECKING:
    from strata.store import ActivationDataset

log = logging.getLogger(__name__)

__all__ = ["GEOMETRY_METRICS", "geometry", "twonn", "prompt_entropy", "curvature"]

GEOMETRY_METRICS = ("norm", "write_ratio", "anisotropy", "cos_next", "linearity_next", "intrinsic_dim", "prompt_entropy", "curvature")
_STREAMED = {"norm", "write_ratio", "anisotropy", "cos_next", "linearity_next"}
_WRITE = re.compile(r"^blocks\.(\d+)\.hook_(attn_out|mlp_out)$")
_CHUNK = 4096


def _stream_in(hook: str, all_hooks: Sequence[str]) -> str | None:
    m = _WRITE.match(hook)
    if not m:
        return None
    layer = int(m.group(1))
    for cand in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer - 1}.hook_resid_post"):
        if cand in all_hooks:
            return cand
    return None


@dataclass(frozen=True)
class _Plan:
    hooks: list[str]
    extra: list[str]  # hooks read only as a write's incoming stream
    pairs: list[tuple[int, int]]  # consecutive (i, i+1) indices into hooks
    writes: dict[int, str]  # hook index -> its incoming stream hook
    linearity: bool


def _geometry_task(ref: StoreRef, name: str, plan: _Plan, units: list[int]) -> dict[str, Any]:
    ds = ref.dataset(name)
    hooks = plan.hooks
    k = len(hooks)
    out: dict[str, Any] = {"n": 0, "norm": np.zeros(k), "unit_sum": [np.zeros(ds.info.hooks[h].d) for h in hooks],
                           "nonzero": np.zeros(k, np.int64), "cos": np.zeros(len(plan.pairs)), "write": np.zeros(k)}
    lin = [Moments(ds.info.hooks[hooks[i]].d, ds.info.hooks[hooks[j]].d) for i, j in plan.pairs] if plan.linearity else []
    for u in units:
        keep = ~ds.special_mask(u)
        rows = np.flatnonzero(keep)
        for s in range(0, rows.size, _CHUNK):
            r = rows[s : s + _CHUNK]
            x = {h: np.asarray(ds.unit_array(h, u)[r], dtype=np.float64) for h in [*hooks, *plan.extra]}
            norms = {h: np.sqrt(np.einsum("ij,ij->i", v, v)) for h, v in x.items()}
            out["n"] += r.size
            for i, h in enumerate(hooks):
                nz = norms[h] > 0
                out["norm"][i] += norms[h].sum()
                out["unit_sum"][i] += (x[h][nz] / norms[h][nz, None]).sum(axis=0)
                out["nonzero"][i] += int(nz.sum())
                if i in plan.writes:
                    src = norms[plan.writes[i]]
                    ok = src > 0
                    out["write"][i] += float(np.sum(norms[h][ok] / src[ok]))
            for p, (i, j) in enumerate(plan.pairs):
                a, b = x[hooks[i]], x[hooks[j]]
                if a.shape[1] == b.shape[1]:
                    den = norms[hooks[i]] * norms[hooks[j]]
                    ok = den > 0
                    out["cos"][p] += float(np.sum(np.einsum("ij,ij->i", a[ok], b[ok]) / den[ok]))
                if lin:
                    lin[p].update(a, b)
    out["lin"] = [m.to_dict() for m in lin]
    return out


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    tot = parts[0]
    for p in parts[1:]:
        tot["n"] += p["n"]
        for key in ("norm", "nonzero", "cos", "write"):
            tot[key] = tot[key] + p[key]
        tot["unit_sum"] = [a + b for a, b in zip(tot["unit_sum"], p["unit_sum"])]
        tot["lin"] = [Moments.from_dict(a).merge(Moments.from_dict(b)).to_dict() for a, b in zip(tot["lin"], p["lin"])]
    return tot


_TWONN_CANDIDATES = 4  # nearest neighbours by the Gram form whose distances are recomputed exactly


def twonn(x: np.ndarray) -> float:
    """TwoNN intrinsic dimension of the distinct rows of ``x`` (maximum-likelihood form; exact
    duplicate rows kept once: see the module docstring). NaN with fewer than 3 distinct rows."""
    z = np.unique(np.asarray(x, dtype=np.float64), axis=0)
    n = z.shape[0]
    if n < 3:
        return math.nan
    z = z - z.mean(axis=0)
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * z @ z.T
    np.fill_diagonal(d2, np.inf)
    k = min(_TWONN_CANDIDATES, n - 1)
    cand = np.argpartition(d2, k - 1, axis=1)[:, :k]
    del d2
    exact = np.empty((n, k))
    for j in range(k):  # |z_i - z_c|, free of the Gram form's cancellation
        diff = z - z[cand[:, j]]
        exact[:, j] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    two = np.sort(exact, axis=1)[:, :2]
    ok = two[:, 0] > 0  # distinct rows: only an underflow could give 0
    mu = two[ok, 1] / two[ok, 0]
    if mu.size < 3 or not np.any(mu > 1):
        return math.nan
    return float((mu.size - 1) / np.sum(np.log(mu)))


def prompt_entropy(z: np.ndarray) -> float:
    """Von Neumann entropy (nats) of the trace-normalised Gram matrix of one context's tokens."""
    z = np.asarray(z, dtype=np.float64)
    lam = np.clip(np.linalg.eigvalsh(z @ z.T), 0.0, None)
    if lam.sum() <= 0:
        return math.nan
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def curvature(z: np.ndarray) -> float:
    """Mean angle (degrees) between consecutive steps of a token trajectory ``z [t, d]``."""
    v = np.diff(np.asarray(z, dtype=np.float64), axis=0)
    if v.shape[0] < 2:
        return math.nan
    a, b = v[:-1], v[1:]
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = den > 0
    if not ok.any():
        return math.nan
    cos = np.clip(np.einsum("ij,ij->i", a[ok], b[ok]) / den[ok], -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def pick_contexts(ds: ActivationDataset, hooks: Sequence[str], n: int, seed: Sequence[int]) -> tuple[pa.Table, int, np.ndarray]:
    """The token table of the units committed for every one of ``hooks``, its number of
    contexts, and ``n`` of them chosen with ``seed`` (sorted)."""
    units = set(ds.committed_units(None))
    for h in hooks:
        units &= set(ds.committed_units(h))
    toks = ds.tokens(units=sorted(units))
    ctx = toks.num_rows // ds.info.context_size
    pick = np.sort(np.random.default_rng(list(seed)).choice(ctx, size=min(n, ctx), replace=False))
    return toks, ctx, pick


def _sampled_contexts(ds: ActivationDataset, hooks: Sequence[str], n: int, seed: int) -> list[np.ndarray]:
    """Non-special rows of each of ``n`` seeded contexts of committed units (common to ``hooks``)."""
    toks, ctx, pick = pick_contexts(ds, hooks, n, (seed, 4))
    cs = ds.info.context_size
    special = toks.column("special").to_numpy(zero_copy_only=False).reshape(ctx, cs)
    rows = toks.column("row").to_numpy().reshape(ctx, cs)
    return [rows[c][~special[c]] for c in pick if (~special[c]).sum() >= 3]


def geometry(ds: ActivationDataset, hooks: Sequence[str], metrics: Sequence[str] | None = None, *,
             sample_rows: int = 2048, sample_contexts: int = 64, seed: int = 0, tasks: int | None = None,
             executor: Executor | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Per-hook geometry metrics (see the module docstring) and their provenance."""


    metrics = list(metrics or GEOMETRY_METRICS)
    bad = [m for m in metrics if m not in GEOMETRY_METRICS]
    if bad:
        raise AnalysisError(f"unknown layer metric {bad[0]!r}; valid: {', '.join(GEOMETRY_METRICS)}")
    hooks = list(hooks)
    for h in hooks:
        ds.check_hook(h)
    ex = executor or Executor.auto()
    writes = {i: src for i, h in enumerate(hooks) if (src := _stream_in(h, ds.hooks)) is not None} if "write_ratio" in metrics else {}
    plan = _Plan(hooks, sorted({s for s in writes.values() if s not in hooks}), [(i, i + 1) for i in range(len(hooks) - 1)],
                 writes, "linearity_next" in metrics)
    cols: dict[str, Any] = {"hook": hooks}
    prov: dict[str, Any] = {"metrics": metrics, "seed": seed}
    if _STREAMED & set(metrics):
        units = set(ds.committed_units(None))
        for h in [*hooks, *plan.extra]:
            units &= set(ds.committed_units(h))
        if not units:
            raise AnalysisError(f"dataset {ds.name!r} has no unit committed for every hook of {hooks}")
        ulist = np.array(sorted(units))
        ranges = split_ranges(ulist, tasks or ex.default_tasks())
        tot = _merge(ex.map(_geometry_task, [(ex.store_ref(ds), ds.name, plan, [int(u) for u in ulist[r]]) for r in ranges]))
        n = tot["n"]
        if n < 2:
            raise AnalysisError(f"dataset {ds.name!r}: layer metrics need at least 2 non-special rows, got {n}")
        prov.update(n=int(n), units=[int(u) for u in ulist])
        nan = np.full(len(hooks), np.nan)
        if "norm" in metrics:
            cols["norm"] = tot["norm"] / n
        if "write_ratio" in metrics:
            cols["write_ratio"] = np.where([i in writes for i in range(len(hooks))], tot["write"] / n, np.nan)
        if "anisotropy" in metrics:
            nz = tot["nonzero"]
            cols["anisotropy"] = [float((s @ s - c) / (c * (c - 1))) if c > 1 else math.nan for s, c in zip(tot["unit_sum"], nz)]
        if "cos_next" in metrics:
            v = nan.copy()
            for p, (i, j) in enumerate(plan.pairs):
                if ds.info.hooks[hooks[i]].d == ds.info.hooks[hooks[j]].d:
                    v[i] = tot["cos"][p] / n
            cols["cos_next"] = v
        if "linearity_next" in metrics:
            v = nan.copy()
            for p, (i, _) in enumerate(plan.pairs):
                m = Moments.from_dict(tot["lin"][p])
                try:
                    v[i] = r2_from_moments(m, m, ridge=0.0)["x_to_y"]
                except ValueError:  # a constant hook: undefined
                    v[i] = math.nan
            cols["linearity_next"] = v
    if "intrinsic_dim" in metrics:
        toks = ds.tokens(hooks[0])
        rows = toks.column("row").to_numpy()[~toks.column("special").to_numpy(zero_copy_only=False)]
        pick = np.sort(np.random.default_rng([seed, 5]).choice(rows.size, size=min(sample_rows, rows.size), replace=False))
        cols["intrinsic_dim"] = [twonn(ds.read(h, rows=rows[pick])) for h in hooks]
        prov["intrinsic_dim_rows"] = int(pick.size)
    if {"prompt_entropy", "curvature"} & set(metrics):
        contexts = _sampled_contexts(ds, hooks, sample_contexts, seed)
        prov["sample_contexts"] = len(contexts)
        per = {h: [np.asarray(ds.read(h, rows=r), dtype=np.float64) for r in contexts] for h in hooks}
        if "prompt_entropy" in metrics:
            cols["prompt_entropy"] = [float(np.nanmean([prompt_entropy(z) for z in per[h]])) if contexts else math.nan for h in hooks]
        if "curvature" in metrics:
            cols["curvature"] = [float(np.nanmean([curvature(z) for z in per[h]])) if contexts else math.nan for h in hooks]
    table = pa.table({k: (v if k == "hook" else pa.array(np.asarray(v, dtype=np.float64))) for k, v in cols.items()})
    return table, prov
