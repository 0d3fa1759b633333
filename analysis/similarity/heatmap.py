"""Layer heatmaps: one metric for every pair of hooks of one dataset, or every (hook of A, hook of B)
pair of two datasets, with each unit read once per pass.

**Exact method.** The hooks' rows are accumulated jointly in one :class:`BlockMoments` (a
``D x D`` co-moment matrix, ``D`` the sum of the widths) by tasks per range of units, merged
exactly; every pair's metric comes from its blocks. Memory per task is about
``8 (3 D^2 + 2 chunk_rows D)`` bytes (the accumulator, a chunk's product, the copy a task
returns, and the chunk). When that exceeds ``memory_budget_mb``, the hooks are split into
groups whose pairwise union fits, and one pass runs per pair of groups (``m (m - 1) / 2`` passes
for ``m`` groups of one dataset, ``m_A m_B`` for two); every value is still exact.

**Sample method** (when even one pair of hooks does not fit the budget, when asked for with
``method: sample``, and always for the sampled metrics ``rbf_cka``, ``minibatch_cka``,
``mutual_knn``, ``rsa``, ``cknna``): the metric computed in memory on a seeded uniform sample of
``sample_rows`` aligned rows, the same rows for every hook (``n`` in the results says how many).
Its error is the metric's sampling error at that ``n``; biased linear CKA is biased upwards at
small ``n`` (see ``debiased_cka``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from strata.pipeline.executor import Executor, StoreRef
from strata.pipeline.hooks import match_hooks as _match
from strata.store.datasets.aligned import align_tokens
from strata.store.errors import HookNotFoundError

from . import _cca, _cka, _sampled
from ._blocks import BlockMoments
from ._cca import Spectra
from ._cknna import cknna
from ._linalg import eigh_desc
from ._streaming import from_moments
from ._tasks import split_ranges
from .errors import AnalysisError
from .spec import HEATMAP_METRICS, SAMPLED, AnalyzeCompute, HeatmapSettings, sections

if TYPE_CHECKING:
    from strata.store import ActivationDataset

log = logging.getLogger(__name__)

__all__ = ["HEATMAP_METRICS", "HeatmapSettings", "HeatmapPlan", "HeatmapResult", "layer_heatmap", "match_hooks", "plan_heatmap", "run_heatmap"]

# The compute keys a heatmap uses, and the settings recorded in its provenance (in this order).
_COMPUTE_KEYS = ("memory_budget_mb", "chunk_rows", "tasks")
_RECORDED = ("metric", "method", "memory_budget_mb", "sample_rows", "seed", "keep", "chunk_rows", "tasks", "max_rows")
_SYMMETRIC = {"linear_cka", "debiased_cka", "cca", "svcca", "procrustes", "cosine", "rbf_cka", "mutual_knn", "rsa", "minibatch_cka"}


@dataclass
class HeatmapResult:
    hooks_a: list[str]
    hooks_b: list[str]
    values: np.ndarray  # [len(hooks_a), len(hooks_b)]
    method: str  # "exact" | "sample"
    n: int
    passes: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def table(self) -> Any:
        ia, ib = np.meshgrid(np.arange(len(self.hooks_a)), np.arange(len(self.hooks_b)), indexing="ij")
        return pa.table({
            "hook_a": [self.hooks_a[i] for i in ia.ravel()], "hook_b": [self.hooks_b[j] for j in ib.ravel()],
            "metric": [self.provenance.get("metric", "")] * ia.size, "value": self.values.ravel(),
            "n": np.full(ia.size, self.n, dtype=np.int64), "method": [self.method] * ia.size,
        })


def match_hooks(ds: ActivationDataset, patterns: Sequence[str]) -> list[str]:
    """Hooks of ``ds`` matching names or globs, in model order; an unmatched pattern is an error."""
    return _match(patterns, ds.hooks,
                  error=lambda p: HookNotFoundError(f"dataset {ds.name!r} has no hook matching {p!r}; it has: {', '.join(ds.hooks)}"))


def _bytes(dims: int, chunk: int) -> float:
    return 8.0 * (3.0 * dims * dims + 2.0 * chunk * dims)


def _groups(widths: list[int], limit: int) -> list[list[int]]:
    """Consecutive block indices packed into groups of total width <= limit."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, w in enumerate(widths):
        if groups[-1] and total + w > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += w
    return groups


def _plan_passes(wa: list[int], wb: list[int] | None, budget: float, chunk: int) -> list[tuple[list[int], list[int]]] | None:
    """Passes as (A blocks, B blocks); one dataset: B is None and a pass is a set of A blocks
    (second list empty). None when one pair of hooks does not fit."""
    all_w = wa + (wb or [])
    if _bytes(sum(all_w), chunk) <= budget:
        return [(list(range(len(wa))), list(range(len(wb))) if wb else [])]
    # Largest D with 24 D^2 + 16 chunk D <= budget, split evenly between the two groups of a pass.
    dmax = int((-16 * chunk + math.sqrt((16 * chunk) ** 2 + 96 * budget)) / 48)
    half = dmax // 2
    if wb is None:
        if max(wa) * 2 > dmax:
            return None
        g = _groups(wa, half)
        return [(g[i] + g[j], []) for i in range(len(g)) for j in range(i + 1, len(g))] or [(g[0], [])]
    if max(wa) + max(wb) > dmax:
        return None
    ga, gb = _groups(wa, half), _groups(wb, half)
    return [(x, y) for x in ga for y in gb]


def _block_task(refs: list[tuple[StoreRef, str, list[str], np.ndarray]], chunk_rows: int, cosine: bool = True) -> dict[str, Any]:
    """Joint moments of every listed hook over aligned rows: ``refs`` holds per dataset
    ``(store, name, hooks, rows)``; blocks are the hooks in that order."""
    sides = [(ref.dataset(name), hooks, rows) for ref, name, hooks, rows in refs]
    dims = [ds.info.hooks[h].d for ds, hooks, _ in sides for h in hooks]
    bm = BlockMoments(dims, cosine=cosine)
    n = sides[0][2].size
    for s in range(0, n, chunk_rows):
        bm.update([ds.read(h, rows=rows[s : s + chunk_rows]) for ds, hooks, rows in sides for h in hooks])
    return bm.to_dict()


def _pair_value(bm: BlockMoments, i: int, j: int, metric: str, eig: dict[int, Any], keep: float) -> float:
    m = bm.pair(i, j)
    if metric in ("cca", "svcca", "pwcca"):
        sp = Spectra(m)
        for side, blk in (("X", i), ("Y", j)):  # one eigendecomposition per hook, not per pair
            if blk not in eig:
                eig[blk] = eigh_desc(bm.c[bm.sl(blk), bm.sl(blk)])
            sp._eig[side] = eig[blk]
        if metric == "cca":
            return _cca.cca_from_moments(m, spectra=sp)
        if metric == "svcca":
            return _cca.svcca_from_moments(m, keep=keep, spectra=sp)
        return _cca.pwcca_from_moments(m, spectra=sp)
    if metric == "cosine" and bm.dims[i] != bm.dims[j]:
        return math.nan
    return from_moments(m, [metric], keep=keep)[metric]


def _aligned_rows(a: tuple[ActivationDataset, list[str]], b: tuple[ActivationDataset, list[str]] | None) -> tuple[list[np.ndarray], Any]:
    ds_a, ha = a
    if b is None:
        al = align_tokens([(ds_a, h) for h in ha] if len(ha) > 1 else [(ds_a, ha[0]), (ds_a, ha[0])])
        return [al.rows[0]], al
    ds_b, hb = b
    al = align_tokens([(ds_a, ha[0]), (ds_b, hb[0])])
    keep = np.ones(len(al), bool)
    for ds, hooks, rows in ((ds_a, ha, al.rows[0]), (ds_b, hb, al.rows[1])):
        common = set(ds.committed_units(hooks[0]))
        for h in hooks[1:]:
            common &= set(ds.committed_units(h))
        keep &= np.isin(rows // ds.info.unit_rows, sorted(common))
    al = al.subset(np.flatnonzero(keep))
    return [al.rows[0], al.rows[1]], al


@dataclass
class HeatmapPlan:
    """A heatmap's hooks, aligned rows and passes, checked before anything is read."""

    ds_a: ActivationDataset
    hooks_a: list[str]
    side_b: tuple[ActivationDataset, list[str]] | None
    rows: list[np.ndarray]
    alignment: Any
    settings: HeatmapSettings
    compute: AnalyzeCompute
    passes: list[tuple[list[int], list[int]]] | None  # None: the sample method
    chunk: int

    @property
    def hooks_b(self) -> list[str]:
        return self.hooks_a if self.side_b is None else self.side_b[1]

    @property
    def n(self) -> int:
        return int(self.rows[0].size)

    def options(self) -> dict[str, Any]:
        """The settings the values depend on, as every result records them (``chunk_rows``: None
        when it comes from the budget)."""
        out = {k: getattr(self.compute if k in _COMPUTE_KEYS else self.settings, k) for k in _RECORDED}
        if "chunk_rows" not in self.compute.model_fields_set:
            out["chunk_rows"] = None
        if self.settings.metric in ("mutual_knn", "cknna"):  # only where it matters, so other results' records are unchanged
            out["knn_k"] = self.settings.knn_k
        return out


def plan_heatmap(a: tuple[ActivationDataset, Sequence[str]], b: tuple[ActivationDataset, Sequence[str]] | None = None,
                 *, settings: HeatmapSettings | None = None, compute: AnalyzeCompute | None = None, **fields: Any) -> HeatmapPlan:
    """Match the hooks, align the rows and choose the method (see the module docstring); raises
    a one-line error for a bad metric, hook, alignment or too few rows.

    ``settings``: a :class:`HeatmapSettings` (a ``kind: heatmap`` analysis of a spec is one), or its
    keys as keywords (``metric``, ``method``, ``sample_rows``, ...) with its defaults; ``compute``:
    the analyses' compute section, or its ``memory_budget_mb``, ``chunk_rows`` (default: from the
    budget, at most 16384) and ``tasks`` as keywords."""
    if settings is None and fields.get("metric", "linear_cka") not in HEATMAP_METRICS:
        raise AnalysisError(f"unknown heatmap metric {fields['metric']!r}; valid: {', '.join(HEATMAP_METRICS)}")
    opts, compute = sections("layer_heatmap", HeatmapSettings, settings, compute, fields, compute_keys=_COMPUTE_KEYS)
    ds_a, ha = a[0], match_hooks(a[0], a[1])
    side_b = None if b is None else (b[0], match_hooks(b[0], b[1]))
    rows, al = _aligned_rows((ds_a, ha), side_b)
    if opts.max_rows is not None:
        rows = [r[: opts.max_rows] for r in rows]
    n = int(rows[0].size)
    need = {"debiased_cka": 4, "rbf_cka": 3, "rsa": 3, "mutual_knn": opts.knn_k + 1, "cknna": max(4, opts.knn_k + 1)}.get(opts.metric, 2)
    if n < need:
        raise AnalysisError(f"{opts.metric} needs at least {need} aligned rows, but the heatmap's hooks have {n} in common")
    wa = [ds_a.info.hooks[h].d for h in ha]
    wb = None if side_b is None else [side_b[0].info.hooks[h].d for h in side_b[1]]
    total = sum(wa + (wb or []))
    budget = compute.memory_budget_mb * 2**20
    chunk = compute.chunk_rows if "chunk_rows" in compute.model_fields_set else int(max(256, min(16384, (budget - 24.0 * total**2) / (16.0 * total))))
    passes = None if (opts.method == "sample" or opts.metric in SAMPLED) else _plan_passes(wa, wb, budget, chunk)
    if passes is None and opts.method == "exact":
        raise AnalysisError(
            f"`memory_budget_mb` {compute.memory_budget_mb:g} is too small for the exact co-moments of one pair of hooks "
            f"(widths {max(wa)} and {max(wb or wa)}); raise it or use `method: sample`"
        )
    return HeatmapPlan(ds_a, ha, side_b, rows, al, opts, compute, passes, chunk)


def run_heatmap(plan: HeatmapPlan, executor: Executor | None = None) -> HeatmapResult:
    """The heatmap of a plan (see the module docstring)."""
    ex = executor or Executor.auto()
    opts = plan.settings
    values = np.full((len(plan.hooks_a), len(plan.hooks_b)), np.nan)
    if plan.passes is None:
        method, n_used = "sample", _sampled_heatmap(plan.ds_a, plan.hooks_a, plan.side_b, plan.rows, opts, values)
    else:
        method, n_used = "exact", plan.n
        _exact_heatmap(plan.ds_a, plan.hooks_a, plan.side_b, plan.rows, plan.passes, plan.chunk, opts, plan.compute.tasks, ex, values)
    al = plan.alignment
    prov = {"metric": opts.metric, "method": method, "n": n_used, "passes": len(plan.passes or [1]), "options": plan.options(),
            "alignment": al.summary(), "units_a": list(al.units[0]), "chunk_rows": plan.chunk}
    if plan.side_b is not None:
        prov["units_b"] = list(al.units[1])
    return HeatmapResult(plan.hooks_a, plan.hooks_b, values, method, n_used, len(plan.passes or [1]), prov)


def layer_heatmap(a: tuple[ActivationDataset, Sequence[str]], b: tuple[ActivationDataset, Sequence[str]] | None = None,
                  *, settings: HeatmapSettings | None = None, compute: AnalyzeCompute | None = None,
                  executor: Executor | None = None, **fields: Any) -> HeatmapResult:
    """``metric`` for every hook pair (see the module docstring). ``a``/``b``: a dataset and
    hook names or globs; without ``b``, every pair of ``a``'s hooks. Settings and compute keys as
    :func:`plan_heatmap` takes them."""
    return run_heatmap(plan_heatmap(a, b, settings=settings, compute=compute, **fields), executor)


def _exact_heatmap(ds_a: ActivationDataset, ha: list[str], side_b: tuple[ActivationDataset, list[str]] | None,
                   rows: list[np.ndarray], passes: list[tuple[list[int], list[int]]], chunk: int, opts: HeatmapSettings, tasks: int | None,
                   ex: Executor, values: np.ndarray) -> None:
    units = rows[0] // ds_a.info.unit_rows
    ranges = split_ranges(units, tasks or ex.default_tasks())
    for p, (ia, ib) in enumerate(passes):
        log.info("heatmap pass %d/%d: %d + %d hooks over %d rows in %d task(s)", p + 1, len(passes), len(ia), len(ib), rows[0].size, len(ranges))
        tasks = []
        for r in ranges:
            refs = [(ex.store_ref(ds_a), ds_a.name, [ha[i] for i in ia], rows[0][r])]
            if side_b is not None:
                refs.append((ex.store_ref(side_b[0]), side_b[0].name, [side_b[1][j] for j in ib], rows[1][r]))
            tasks.append((refs, chunk, opts.metric == "cosine"))
        bm = BlockMoments.sum(BlockMoments.from_dict(d) for d in ex.map(_block_task, tasks))
        eig: dict[int, Any] = {}
        for x, i in enumerate(ia):
            if side_b is None:
                for y, j in enumerate(ia):
                    if np.isnan(values[i, j]) and (opts.metric not in _SYMMETRIC or y >= x):
                        values[i, j] = _value(bm, x, y, opts, eig, ha[i], ha[j])
                        if opts.metric in _SYMMETRIC:
                            values[j, i] = values[i, j]
            else:
                for y, j in enumerate(ib):
                    values[i, j] = _value(bm, x, len(ia) + y, opts, eig, ha[i], side_b[1][j])


def _value(bm: BlockMoments, x: int, y: int, opts: HeatmapSettings, eig: dict[int, Any], ha: str, hb: str) -> float:
    try:
        return float(_pair_value(bm, x, y, opts.metric, eig, opts.keep))
    except ValueError as e:
        raise AnalysisError(f"{opts.metric} of {ha} vs {hb}: {e}") from None


def _sampled_heatmap(ds_a: ActivationDataset, ha: list[str], side_b: tuple[ActivationDataset, list[str]] | None,
                     rows: list[np.ndarray], opts: HeatmapSettings, values: np.ndarray) -> int:
    n = rows[0].size
    k = min(opts.sample_rows, n)
    idx = np.sort(np.random.default_rng([opts.seed, 3]).choice(n, size=k, replace=False))
    xa = [np.asarray(ds_a.read(h, rows=rows[0][idx]), dtype=np.float64) for h in ha]
    xb = xa if side_b is None else [np.asarray(side_b[0].read(h, rows=rows[1][idx]), dtype=np.float64) for h in side_b[1]]
    fns = {"linear_cka": _cka.linear_cka, "debiased_cka": _cka.debiased_cka, "cca": _cca.cca, "procrustes": _cka.procrustes,
           "svcca": lambda x, y: _cca.svcca(x, y, keep=opts.keep), "pwcca": _cca.pwcca, "cosine": _cka.cosine,
           "rbf_cka": _sampled.rbf_cka, "mutual_knn": lambda x, y: _sampled.mutual_knn(x, y, k=opts.knn_k), "rsa": _sampled.rsa,
           "cknna": lambda x, y: cknna(x, y, k=opts.knn_k),
           "minibatch_cka": lambda x, y: _sampled.minibatch_cka(x, y, batch_size=min(256, k), seed=opts.seed)}
    f = fns[opts.metric]
    for i, x in enumerate(xa):
        for j, y in enumerate(xb):
            if side_b is None and opts.metric in _SYMMETRIC and j < i:
                values[i, j] = values[j, i]
            elif opts.metric == "cosine" and x.shape[1] != y.shape[1]:
                continue
            else:
                try:
                    values[i, j] = float(f(x, y))
                except ValueError as e:
                    raise AnalysisError(f"{opts.metric} of hook {i} vs {j} on {k} sampled rows: {e}") from None
    return k
