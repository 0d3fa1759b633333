"""The analysis kind: similarity and layer analyses over datasets and SAEs, as stored results.

Its plan (``on_change``, default ``recompute``): an analysis whose inputs change (datasets gain
units of its hooks, a new dataset version, a retrained SAE) or whose spec changed is ``kept
(policy)``, or with ``recompute``/``retrain`` computed again: over grown inputs, the old result is
deleted under its lease, then computed again under its name; on a new dataset version or a
retrained SAE, the new result gets a versioned name (the versions' common suffix,
``name@1a2b3c4d``, else ``retrain_pattern``) and the old one stays until ``strata rm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strata import store
from strata.jobs.analyze_run import run_analyze
from strata.jobs.kinds.planning import Job, JobKind, PlanContext, PlanState, Ref, Step, names, renamed, retrained_name, rewrite, version_hash
from strata.jobs.kinds.registry import register
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts
from strata.store.layout import check_name
from strata.store.layout import unit_ranges as ranges


def analysis_refs(a: Any) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The datasets (with hook patterns) and SAEs one analysis reads."""
    if a.kind == "compare":
        return [(a.a.dataset, [a.a.hook]), (a.b.dataset, [a.b.hook])], []
    if a.kind == "heatmap":
        return [(a.a.dataset, list(a.a.hooks))] + ([(a.b.dataset, list(a.b.hooks))] if a.b is not None else []), []
    if a.kind == "timestep_heatmap":
        return [(a.a.dataset, list(a.a.hooks)), (a.b.dataset, [a.b.hook])], []
    if a.kind == "sae_match":
        return [], [a.a.sae, a.b.sae]
    return [(a.dataset, list(a.hooks))], []  # layers, probe


def analysis_version(name: str, datasets: Mapping[str, str], saes: Mapping[str, str], ctx: PlanContext) -> str:
    """An analysis result's name: its spec's name while it reads the inputs its spec names. Once
    it reads other versions of them, the versions' common suffix (``norms@1a2b3c4d`` on dataset
    ``tiny@1a2b3c4d``), or, when they differ, ``retrain_pattern`` with ``version`` = 8 hex digits of
    a hash of the versions it reads."""
    pairs = sorted((kind, k, v) for kind, m in (("dataset", datasets), ("sae", saes)) for k, v in m.items() if v != k)
    if not pairs:
        return name
    suffixes = {v[len(k):] if v.startswith(k) else "" for _, k, v in pairs}
    if len(suffixes) == 1 and (suffix := suffixes.pop()) and suffix[0] in "@+=-_.":
        return check_name(name + suffix, what="analysis")
    return retrained_name(ctx, name, version_hash([f"{kind}:{k}={v}" for kind, k, v in pairs]), what="analysis")


class AnalysisKind(JobKind):
    def io(self, spec: Any) -> tuple[set[Ref], set[Ref]]:
        reads: set[Ref] = set()
        for a in spec.analyses:
            datasets, saes = analysis_refs(a)
            reads |= {("dataset", d) for d, _ in datasets} | {("sae", x) for x in saes}
        return {("analysis", a.name) for a in spec.analyses}, reads

    def plan(self, state: PlanState, job: Job, ctx: PlanContext) -> Step:
        # lazy: the runner imports torch for its metrics; detecting a spec's kind must not pay for it
        from strata.analysis.similarity.runner import prepare  # lazy: torch: CLI start-up

        spec = job.spec
        step = Step(job, "analysis " + ", ".join(a.name for a in spec.analyses))
        compute: list[dict[str, Any]] = []
        reasons: list[str] = []
        for a in spec.analyses:
            named, saes = analysis_refs(a)
            changes: list[str] = []
            ds_map, sae_map = {}, {}
            reads = [(d, patterns, False) for d, patterns in named]
            for x in saes:
                sv = state.sae(x)
                sae_map[x] = sv.name
                if sv.trains:
                    changes.append(f"SAE {sv.name} is trained in this run")
                reads.append((sv.dataset, [sv.hook], True))
            for d, patterns, actual in reads:
                ds = state.dataset(d, actual=actual)
                if not actual:
                    ds_map[d] = ds.name
                gained = state.gains(ds, patterns)
                if not ds.exists:
                    changes.append(f"dataset {ds.name} is new")
                elif gained:
                    changes.append(f"dataset {ds.name} gains unit(s) {ranges(gained)}")
            body = rewrite(a.model_dump(mode="json"), ds_map, sae_map)
            # A result on other versions of its inputs (a new dataset version, a retrained SAE) is a
            # new result under a versioned name: the one on the old versions stays until `rm`.
            name = analysis_version(a.name, ds_map, sae_map, ctx)
            body["name"] = name
            art = state.artifact(ANALYSES, name)
            if art is None and name != a.name and job.policy == "keep" and state.artifact(ANALYSES, a.name) is not None:
                step.kept.append(a.name)
                reasons.append(f"{a.name}: kept (policy): {(changes or [f'it reads {names(renamed(ds_map, sae_map))}'])[0]}")
                continue
            if art is None:
                compute.append(body)
                reasons.append(f"{a.name}: new" if name == a.name else
                               f"{name}: new, on {names(renamed(ds_map, sae_map))}; {a.name} is left as it is")
                continue
            if not changes:
                one = job.updated(analyses=[body])
                old = {k: art.meta.get(k) for k in ("kind", "spec", "inputs")}
                if prepare(one, state.s)[0].identity == old:
                    continue
                changes.append("its spec or inputs changed since it was committed")
            if job.policy == "keep":
                step.kept.append(name)
                reasons.append(f"{name}: kept (policy): {changes[0]}")
            else:
                step.delete.append(name)
                compute.append(body)
                reasons.append(f"{name}: {changes[0]}; `{job.policy}` replaces it")
        step.names = [c["name"] for c in compute]
        if compute:
            step.run, step.overrides = True, {"analyses": compute}
            step.missing = ("recompute " if step.delete else "compute ") + names(step.names)
        step.why = "; ".join(reasons) if reasons else "up to date"
        return step

    def prepare(self, step: Step) -> None:
        """Delete the results the plan replaces, each under its lease (here: the submitter reads
        and writes the same store as a cluster would)."""
        spec = step.job.spec
        s = store.open(spec.store, storage_options=spec.storage_options, create=False)
        for name in step.delete:
            with s.artifact_lease(ANALYSES, name, owner="strata reprocess") as lease:
                if artifacts.get(s.storage, ANALYSES, name) is not None:
                    artifacts.delete(s.storage, ANALYSES, name, lease=lease)
            print(f"analysis {name}: old result deleted (`{step.job.policy}`)")

    def needs_ray(self, spec: Any) -> bool:
        return spec.compute.executor != "local"

    def run(self, spec: Any) -> None:
        for o in run_analyze(spec):
            print(f"analysis {o.name} ({o.kind}): {o.status}")


KIND = register(AnalysisKind("analysis", "strata.analysis.similarity.spec:AnalyzeSpec", "strata.jobs.analyze_run", ("store",),
                             ("analyses",), policy="recompute"))
