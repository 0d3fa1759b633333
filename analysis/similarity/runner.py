"""The analyses of a spec, each checked first (:func:`prepare`), then computed into the files of
its result folder (:meth:`Prepared.compute`); ``jobs.analyze_run`` commits them.

A result folder holds ``results.parquet`` (the main table), kind-specific tables and PNG plots,
and ``provenance.json``: the analysis's spec, its inputs (datasets with their fingerprints, hooks
and the committed units used; SAEs with their commit times), the alignment (method, pairs, the
fraction of each side that paired), sample sizes and seeds, and the software versions. The same
provenance, less the versions, decides whether a rerun is a no-op (:attr:`Prepared.identity`).
"""

from __future__ import annotations

import json
import logging
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from strata.analysis.layers import geometry, label_fields, lens_hooks, logit_lens, probe
from strata.store.commit import parquet
from strata.store.datasets.aligned import align_tokens

from .compare import plan_compare, run_compare
from .errors import AnalysisError
from .heatmap import match_hooks, plan_heatmap, run_heatmap
from .matching import match_saes
from .plots import heatmap_png, lines_png, short_hook
from .spec import SAMPLED, AnalyzeSpec, CompareSpec, HeatmapSpec, LayersSpec, MatchSpec, ProbeSpec, TimestepHeatmapSpec
from .timesteps import plan_timestep_heatmap, run_timestep_heatmap

if TYPE_CHECKING:
    from strata.pipeline.executor import Executor
    from strata.store import ActivationDataset, Store

log = logging.getLogger(__name__)

__all__ = ["Prepared", "prepare", "versions"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("strata", "numpy", "scipy", "torch", "pyarrow", "ray", "sae-lens", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _parquet(table: pa.Table) -> bytes:
    return parquet.to_bytes(table)


def _json(obj: Any) -> bytes:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    return json.dumps(clean(obj), indent=2, sort_keys=True, default=str).encode()


def _dataset_input(ds: ActivationDataset, hooks: list[str], units: Any) -> dict[str, Any]:
    return {"dataset": ds.name, "fingerprint": ds.info.fingerprint, "hooks": list(hooks), "units": sorted(int(u) for u in units)}


def _common_units(ds: ActivationDataset, hooks: list[str]) -> list[int]:
    units = set(ds.committed_units(None))
    for h in hooks:
        units &= set(ds.committed_units(h))
    return sorted(units)


@dataclass
class Prepared:
    """One analysis, checked: its plan and its inputs."""

    spec: Any
    inputs: list[dict[str, Any]]
    plan: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def identity(self) -> dict[str, Any]:
        """What the result depends on: a committed result with the same identity is reused."""
        return json.loads(_json({"kind": self.spec.kind, "spec": self.spec.model_dump(mode="json"), "inputs": self.inputs}))

    def compute(self, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The result folder's files and its provenance, which is also written as the folder's
        checked ``provenance.json`` (the one source of it: the commit record keeps the identity only)."""
        files, prov = _COMPUTE[self.spec.kind](self, ex)
        meta = {**self.identity, "provenance": prov, "versions": versions()}
        files["provenance.json"] = _json(meta)
        return files, json.loads(_json(meta))


# -- prepare (nothing is read but token tables and manifests) --------------------------------------


def prepare(spec: AnalyzeSpec, s: Store) -> list[Prepared]:
    """Check every analysis of ``spec`` against the store; the first problem raises a one-line error."""
    out = []
    for a in spec.analyses:
        out.append(_PREPARE[a.kind](a, s, spec))
    return out


def _prep_compare(a: CompareSpec, s: Store, spec: AnalyzeSpec) -> Prepared:
    da, db = s.dataset(a.a.dataset), s.dataset(a.b.dataset)
    plan = plan_compare((da, a.a.hook, a.a.timestep), (db, a.b.hook, a.b.timestep), settings=a, compute=spec.compute)
    if plan.alignment is not None:
        ua, ub = plan.alignment.units
    else:
        ua, ub = _common_units(da, [a.a.hook]), _common_units(db, [a.b.hook])
    return Prepared(a, [_dataset_input(da, [a.a.hook], ua), _dataset_input(db, [a.b.hook], ub)], plan)


def _prep_heatmap(a: HeatmapSpec, s: Store, spec: AnalyzeSpec) -> Prepared:
    da = s.dataset(a.a.dataset)
    side_b = None if a.b is None else (s.dataset(a.b.dataset), a.b.hooks)
    # A heatmap's chunk comes from its memory budget, as it always has: the spec's `chunk_rows` is left unset.
    c = spec.compute
    compute = type(c).model_validate({k: getattr(c, k) for k in c.model_fields_set if k != "chunk_rows"})
    plan = plan_heatmap((da, a.a.hooks), side_b, settings=a, compute=compute)
    inputs = [_dataset_input(da, plan.hooks_a, plan.alignment.units[0])]
    if plan.side_b is not None:
        inputs.append(_dataset_input(plan.side_b[0], plan.side_b[1], plan.alignment.units[1]))
    return Prepared(a, inputs, plan)


def _prep_timesteps(a: TimestepHeatmapSpec, s: Store, spec: AnalyzeSpec) -> Prepared:
    da, db = s.dataset(a.a.dataset), s.dataset(a.b.dataset)
    plan = plan_timestep_heatmap((da, a.a.hooks), (db, a.b.hook, a.b.timestep), timesteps=a.a.timesteps, settings=a,
                                 compute=spec.compute)
    return Prepared(a, [_dataset_input(da, plan.hooks, _common_units(da, plan.hooks)), _dataset_input(db, [a.b.hook], _common_units(db, [a.b.hook]))],
                    plan)


def _prep_layers(a: LayersSpec, s: Store, spec: AnalyzeSpec) -> Prepared:
    ds = s.dataset(a.dataset)
    hooks = match_hooks(ds, a.hooks)
    units = _common_units(ds, hooks)
    if not units:
        raise AnalysisError(f"dataset {ds.name!r} has no unit committed for every hook of {hooks}")
    p = Prepared(a, [_dataset_input(ds, hooks, units)], (ds, hooks))
    if "logit_lens" in a.metrics:
        from strata.analysis.sae.evaluate import load_causal_lm  # lazy: strata.analysis.sae imports sae_lens (~3 s)

        if not lens_hooks(hooks):
            raise AnalysisError(f"`logit_lens` needs residual-stream hooks (hook_embed, blocks.L.hook_resid_pre/mid/post, ln_final.*); "
                                f"{a.name!r} has {hooks}")
        model, why = load_causal_lm(ds.info.meta)
        if model is None:
            raise AnalysisError(f"`logit_lens` of dataset {ds.name!r} needs its causal LM on this machine: {why}")
        p.extra["model"] = model
    return p


def _prep_probe(a: ProbeSpec, s: Store, spec: AnalyzeSpec) -> Prepared:
    ds = s.dataset(a.dataset)
    hooks = match_hooks(ds, a.hooks)
    valid = label_fields(ds, a.level)
    if a.label not in valid:
        have = ", ".join(valid) if valid else "none (extract with `corpus.keep_fields: [...]`)"
        raise AnalysisError(f"dataset {ds.name!r} has no {a.level}-level label {a.label!r}; labels it has: {have}")
    return Prepared(a, [_dataset_input(ds, hooks, _common_units(ds, hooks))], (ds, hooks))


def _prep_match(a: MatchSpec, s: Store, spec: AnalyzeSpec) -> Prepared:
    sides, saes = [], []
    for ref in (a.a, a.b):
        h = s.sae(ref.sae)
        h.check_inputs()  # its dataset replaced under the same name: its rows are not the SAE's
        lin = h.lineage
        if "dataset" not in lin or "hook" not in lin:
            raise AnalysisError(f"SAE {ref.sae!r} has no `dataset` and `hook` in its lineage.json; cannot find its rows")
        sides.append((s.dataset(lin["dataset"]), lin["hook"]))
        saes.append({"sae": ref.sae, "committed_at": h.artifact.record.committed_at, "dataset": lin["dataset"], "hook": lin["hook"]})
    al = align_tokens(sides)
    if a.max_rows is not None:
        al = al.subset(slice(0, a.max_rows))
    if len(al) < 3:
        raise AnalysisError(f"SAE matching needs at least 3 aligned rows, got {len(al)}")
    inputs = [_dataset_input(ds, [hook], u) for (ds, hook), u in zip(sides, al.units)] + saes
    return Prepared(a, inputs, (sides, al))


_PREPARE = {"compare": _prep_compare, "heatmap": _prep_heatmap, "timestep_heatmap": _prep_timesteps,
            "layers": _prep_layers, "probe": _prep_probe, "sae_match": _prep_match}


# -- compute ----------------------------------------------------------------------------------------


def _run_compare(p: Prepared, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
    values, prov = run_compare(p.plan, ex)
    a, b = p.spec.a, p.spec.b
    names = [k for k in values if k not in ("n", "n_sample")]
    n_of = {k: values.get("n_sample" if k in SAMPLED else "n") for k in names}
    table = pa.table({"dataset_a": [a.dataset] * len(names), "hook_a": [a.hook] * len(names), "dataset_b": [b.dataset] * len(names),
                      "hook_b": [b.hook] * len(names), "metric": names, "value": [values[k] for k in names],
                      "n": np.array([int(n_of[k]) for k in names], dtype=np.int64)})
    return {"results.parquet": _parquet(table)}, {**prov, "values": values}


def _run_heatmap(p: Prepared, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
    res = run_heatmap(p.plan, ex)
    a, b = p.spec.a, p.spec.b or p.spec.a
    title = f"{res.provenance['metric']} ({res.method}, n={res.n:,})"
    png = heatmap_png(res.values, res.hooks_a, res.hooks_b, title=title, xlabel=f"hook of {b.dataset}", ylabel=f"hook of {a.dataset}",
                      metric=res.provenance["metric"])
    return {"results.parquet": _parquet(res.table()), "heatmap.png": png}, res.provenance


def _run_timesteps(p: Prepared, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
    res = run_timestep_heatmap(p.plan, ex)
    b = p.spec.b
    files = {"results.parquet": _parquet(res.table())}
    for m in res.values:
        n = int(res.n[m].max()) if res.n[m].size else 0
        title = f"{m} ({p.spec.align}, n={n:,}): {p.spec.a.dataset}\nvs {b.dataset} {short_hook(b.hook)}"
        files[f"heatmap_{m}.png"] = res.png(m, title=title)
    return files, res.provenance


def _line_plots(table: pa.Table, title: str, skip: tuple[str, ...] = ("hook",)) -> dict[str, bytes]:
    hooks = table.column("hook").to_pylist()
    out = {}
    for col in table.column_names:
        if col in skip:
            continue
        vals = np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=float)
        if np.isfinite(vals).any():
            out[f"{col}.png"] = lines_png(hooks, {col: vals}, title=f"{title}: {col}", ylabel=col)
    return out


def _run_layers(p: Prepared, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
    ds, hooks = p.plan
    a: LayersSpec = p.spec
    geo = [m for m in a.metrics if m != "logit_lens"]
    table = pa.table({"hook": hooks})
    prov: dict[str, Any] = {}
    if geo:
        t, prov["geometry"] = geometry(ds, hooks, geo, sample_rows=a.sample_rows, sample_contexts=a.sample_contexts, seed=a.seed, executor=ex)
        table = t
    if "logit_lens" in a.metrics:
        lt, prov["logit_lens"] = logit_lens(ds, hooks, contexts=a.lens_contexts, seed=a.seed, model=p.extra["model"])
        idx = {h: i for i, h in enumerate(lt.column("hook").to_pylist())}
        for col in lt.column_names[1:]:
            v = lt.column(col).to_pylist()
            table = table.append_column(f"lens_{col}", pa.array([v[idx[h]] if h in idx else None for h in hooks], pa.float64()))
    files = {"results.parquet": _parquet(table), **_line_plots(table, f"{ds.name}")}
    return files, prov


def _run_probe(p: Prepared, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
    ds, hooks = p.plan
    a: ProbeSpec = p.spec
    table, prov = probe(ds, hooks, a)
    series = {k: table.column(k).to_numpy() for k in ("score", "control", "chance")}
    png = lines_png(hooks, series, title=f"{ds.name}: probe of {a.label!r} ({a.level}, {prov['metric']})", ylabel=prov["metric"])
    return {"results.parquet": _parquet(table), "probe.png": png}, prov


def _run_match(p: Prepared, ex: Executor) -> tuple[dict[str, bytes], dict[str, Any]]:
    (side_a, side_b), al = p.plan
    a: MatchSpec = p.spec
    s = side_a[0].store
    sae_a, sae_b = s.sae(a.a.sae).load(), s.sae(a.b.sae).load()
    # The alignment is already cut to `max_rows` (when preparing), so the settings' own cut is a no-op.
    table, summary, prov = match_saes((sae_a, *side_a), (sae_b, *side_b), settings=a, alignment=al)
    files = {"results.parquet": _parquet(table), "summary.parquet": _parquet(pa.table({k: [v] for k, v in summary.items()}))}
    return files, {**prov, "summary": summary}


_COMPUTE = {"compare": _run_compare, "heatmap": _run_heatmap, "timestep_heatmap": _run_timesteps,
            "layers": _run_layers, "probe": _run_probe, "sae_match": _run_match}
