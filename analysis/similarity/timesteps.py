"""Layer-by-timestep heatmaps: how each block of a denoiser, at each noise level, aligns with one
fixed layer of a vision encoder over the same images (the picture REPA draws with CKNNA between a
DiT and DINOv2).

Every cell is one :func:`~.compare.compare` of ``(denoiser, block, timestep)`` against
``(encoder, layer)``, with the same settings (``align="docs"`` by default: each image pooled as
``pool`` says; ``align="patches"`` pairs patch positions where the grids match), so a cell's value
is exactly what ``compare`` gives for it. Pooled encoder rows are computed once and shared by every
cell; the sampled metrics (``cknna``, ...) draw the same seeded sample of images in every cell.

    res = similarity.timestep_heatmap((dit, ["blocks.*.hook_resid_post"]), (dino, "blocks.3.hook_resid_post"),
                                      metrics=["cknna"], knn_k=10)
    res.values["cknna"]      # [blocks, timesteps]
    res.table()              # hook, timestep, metric, value, n
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from strata.pipeline.executor import Executor

from ._patches import split_side, timesteps_of
from .compare import ComparePlan, plan_compare, run_compare
from .errors import AnalysisError
from .heatmap import match_hooks
from .plots import heatmap_png
from .spec import SAMPLED, AnalyzeCompute, TimestepHeatmapSettings, sections

if TYPE_CHECKING:
    from strata.store import ActivationDataset

__all__ = ["TimestepHeatmap", "TimestepHeatmapPlan", "plan_timestep_heatmap", "run_timestep_heatmap", "timestep_heatmap"]

_COMPUTE_KEYS = ("chunk_rows", "tasks")


@dataclass
class TimestepHeatmap:
    """``values[metric][i, j]``: ``metric`` of ``hooks[i]`` at ``timesteps[j]`` against the fixed side;
    ``n[metric][i, j]``: the images (or patch pairs) it was computed on."""

    hooks: list[str]
    timesteps: list[int]
    values: dict[str, np.ndarray]
    n: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pa.Table:
        """One row per (metric, hook, timestep)."""
        cols: dict[str, list[Any]] = {"hook": [], "timestep": [], "metric": [], "value": [], "n": []}
        for m, v in self.values.items():
            for i, h in enumerate(self.hooks):
                for j, t in enumerate(self.timesteps):
                    for k, x in zip(cols, (h, t, m, float(v[i, j]), int(self.n[m][i, j]))):
                        cols[k].append(x)
        return pa.table({"hook": pa.array(cols["hook"], pa.string()), "timestep": pa.array(cols["timestep"], pa.int32()),
                         "metric": pa.array(cols["metric"], pa.string()), "value": pa.array(cols["value"], pa.float64()),
                         "n": pa.array(cols["n"], pa.int64())})

    def png(self, metric: str, *, title: str | None = None, fixed: str = "") -> bytes:
        """The heatmap of one metric: blocks up the side, timesteps along the bottom."""
        return heatmap_png(self.values[metric], self.hooks, [str(t) for t in self.timesteps], metric=metric,
                           title=title or f"{metric} vs {fixed}".strip(), xlabel="timestep", ylabel="denoiser hook")


@dataclass
class TimestepHeatmapPlan:
    """Every cell's :class:`ComparePlan`, checked before anything is read."""

    hooks: list[str]
    timesteps: list[int]
    cells: dict[tuple[int, int], ComparePlan]
    fixed: tuple[ActivationDataset, str, int | None]

    def provenance(self) -> dict[str, Any]:
        first = next(iter(self.cells.values()))
        ds, hook, t = self.fixed
        return {"hooks": self.hooks, "timesteps": self.timesteps, "fixed": {"dataset": ds.name, "hook": hook, "timestep": t},
                "align": first.align, "metrics": first.metrics, "options": first.options(), "pool": list(first.pool),
                "cells": [{"hook": self.hooks[i], "timestep": self.timesteps[j], "n": p.n, "n_sample": p.n_sample,
                           "alignment": p.provenance()["alignment"]} for (i, j), p in self.cells.items()]}


def plan_timestep_heatmap(a: tuple[ActivationDataset, Sequence[str]], b: Any, *, timesteps: Sequence[int] | None = None,
                          settings: TimestepHeatmapSettings | None = None, compute: AnalyzeCompute | None = None,
                          **fields: Any) -> TimestepHeatmapPlan:
    """Plan every cell: ``a`` is a diffusion dataset and hook names or globs, ``b`` the fixed side
    ``(dataset, hook)`` (or ``(dataset, hook, timestep)``), ``timesteps`` a subset of ``a``'s (default:
    all). ``settings``/``fields``: :class:`TimestepHeatmapSettings` (compare's keys; ``metrics``
    default ``[cknna]``, ``align`` default ``docs``); ``compute``: its ``chunk_rows`` and ``tasks``."""
    ds, patterns = a
    have = timesteps_of(ds)
    if have is None:
        raise AnalysisError(f"a timestep heatmap's side a is a diffusion dataset; {ds.name!r} has no timesteps")
    ts = list(have) if timesteps is None else [int(t) for t in timesteps]
    bad = [t for t in ts if t not in have]
    if bad or not ts:
        raise AnalysisError(f"dataset {ds.name!r} has no rows at timestep {bad[0] if bad else '(none asked for)'}; its timesteps are {have}")
    opts, compute = sections("timestep_heatmap", TimestepHeatmapSettings, settings, compute, fields, compute_keys=_COMPUTE_KEYS)
    hooks = match_hooks(ds, patterns)
    (fixed, tb) = split_side(b)
    cache: dict[Any, np.ndarray] = {}
    cells = {}
    for i, h in enumerate(hooks):
        for j, t in enumerate(ts):
            try:
                p = plan_compare((ds, h, t), (*fixed, tb), settings=opts, compute=compute)
            except AnalysisError as e:
                raise AnalysisError(f"{h} at timestep {t}: {e}") from None
            p.cache = cache
            cells[(i, j)] = p
    return TimestepHeatmapPlan(hooks, ts, cells, (fixed[0], fixed[1], tb))


def run_timestep_heatmap(plan: TimestepHeatmapPlan, executor: Executor | None = None) -> TimestepHeatmap:
    """Every cell's values (see the module docstring)."""
    ex = executor or Executor.auto()
    shape = (len(plan.hooks), len(plan.timesteps))
    values: dict[str, np.ndarray] = {}
    ns: dict[str, np.ndarray] = {}
    for (i, j), p in plan.cells.items():
        try:
            got, _ = run_compare(p, ex, progress=False)
        except AnalysisError as e:
            raise AnalysisError(f"{plan.hooks[i]} at timestep {plan.timesteps[j]}: {e}") from None
        for m, v in got.items():
            if m in ("n", "n_sample"):
                continue
            values.setdefault(m, np.full(shape, np.nan))[i, j] = v
            ns.setdefault(m, np.zeros(shape, dtype=np.int64))[i, j] = int(got["n_sample" if m in SAMPLED else "n"])
    return TimestepHeatmap(plan.hooks, plan.timesteps, values, ns, plan.provenance())


def timestep_heatmap(a: tuple[ActivationDataset, Sequence[str]], b: Any, *, timesteps: Sequence[int] | None = None,
                     settings: TimestepHeatmapSettings | None = None, compute: AnalyzeCompute | None = None,
                     executor: Executor | None = None, **fields: Any) -> TimestepHeatmap:
    """A metric of every (denoiser hook, timestep) against one fixed layer (see the module docstring
    and :func:`plan_timestep_heatmap`)."""
    return run_timestep_heatmap(plan_timestep_heatmap(a, b, timesteps=timesteps, settings=settings, compute=compute, **fields), executor)
