"""``strata reprocess PIPELINE.yaml [--dry-run] [--submit ADDRESS] [--store URI]``: keep a store
up to date with a pipeline of jobs, computing only what is missing.

A pipeline file lists job specs of any kind; the dependency graph comes from what each job
reads and writes (an SAE job reads a dataset, a feature encoding reads an SAE, an analysis reads
datasets and SAEs)::

    store: ./acts                              # every job runs against this store
    version_pattern: "{name}@{revision:.8}"    # a dataset's new version when its model revision moves
    retrain_pattern: "{name}@{version}"        # an SAE retrained on changed inputs (never an overwrite)
    jobs:
      - examples/quickstart.yaml
      - {spec: examples/sae.yaml, on_change: keep}
      - {spec: examples/features.yaml, set: [top_k=32]}   # `set`: the spec's keys, as --set takes them

The plan is computed against the store, reading only, and printed as a table (job, output, what
is missing, why); then exactly that work runs, in dependency order, here or, with ``--submit``, as
Ray Jobs through :func:`jobs.submit.submit`, one after the other. A run that finds nothing missing
says "nothing to do" and writes nothing. This module only composes: each job kind (:mod:`jobs.kinds`)
says what its jobs read and write, plans them (with the ``on_change`` policies and the versions
the patterns name) and runs them; a kind registered there needs no change here.

Overlapping runs are safe: a run that finds another job holding a write lease it needs exits 0
saying so, leaving the work to that job. Bad input (an unknown key, a missing or invalid spec, an
input no job and no store provides, two jobs writing one output, a cycle) is one line and exit
code 2, before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from strata import store
from strata.jobs import submit as submission
from strata.jobs.kinds import KINDS, Policy, Ref, detect
from strata.jobs.kinds.planning import Job, PlanContext, PlanState, Step, check_pattern, lease_holder, open_store, store_holds
from strata.jobs.spec import format_error, read_raw
from strata.pipeline.cluster import connect
from strata.pipeline.errors import SpecError
from strata.pipeline.spec import Section
from strata.store.errors import LeaseHeldError, StrataError
from strata.store.layout import unit_ranges as ranges
from strata.store.views.html import esc, page, rows_table, section, status

__all__ = ["Job", "JobEntry", "Pipeline", "PipelineSpec", "Plan", "Step", "execute", "load_pipeline", "plan_pipeline", "ranges",
           "reprocess", "toposort"]


# -- the pipeline file -----------------------------------------------------------------------------


class JobEntry(Section):
    spec: str = Field(min_length=1)
    """A job spec file of any kind (extract, sae, features, analysis): a path relative to the
    working directory (or, failing that, to the pipeline file's folder)."""
    on_change: Policy | None = None
    """SAE and analysis jobs, when their inputs or spec changed: ``keep`` the committed result, or
    ``retrain``/``recompute`` it under a new name (see :mod:`jobs.kinds`). Default: the kind's."""
    set: list[str] = []
    """``key=value`` overrides of the spec, as ``--set`` takes them."""


class PipelineSpec(Section):
    store: str | None = None
    """The store every job runs against (each spec's own ``store`` is replaced); default: the
    store the specs name, which must then be one."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for an S3 store, given to every job (credentials used, never recorded)."""
    version_pattern: str = "{name}@{revision:.8}"
    """A dataset's new version when its model revision moves: ``name`` is the spec's name,
    ``revision`` the commit it resolves to (a local model folder: the hash of weights and config)."""
    retrain_pattern: str = "{name}@{version}"
    """The name of an SAE (and its feature table) trained again on changed inputs: ``name`` is
    the spec's name, ``version`` 8 hex digits of a hash of the new SAEs' data and config."""
    jobs: list[JobEntry] = Field(min_length=1)
    """Spec files (or ``{spec: PATH, on_change: ..., set: [...]}``), in any order."""

    @field_validator("jobs", mode="before")
    @classmethod
    def _plain_paths(cls, v: Any) -> Any:
        return [{"spec": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @field_validator("version_pattern")
    @classmethod
    def _version_pattern(cls, v: str) -> str:
        return check_pattern(v, fields=("name", "revision"), required="revision")

    @field_validator("retrain_pattern")
    @classmethod
    def _retrain_pattern(cls, v: str) -> str:
        return check_pattern(v, fields=("name", "version"), required="version")


@dataclass(frozen=True)
class Pipeline:
    path: str
    spec: PipelineSpec
    store: str
    storage_options: dict[str, Any] | None
    jobs: list[Job]  # in dependency order


def _find_spec(entry: str, base: Path, where: str) -> Path:
    p = Path(os.path.expanduser(entry))
    for candidate in [p] if p.is_absolute() else [p, base / p]:
        if candidate.is_file():
            return candidate
    looked = str(p.parent) if p.is_absolute() else " and ".join(dict.fromkeys([os.getcwd(), str(base)]))
    raise SpecError(f"{where}: spec file {entry!r} does not exist (looked in {looked})")


def load_pipeline(path: str | os.PathLike[str], *, store_uri: str | None = None) -> Pipeline:
    """Read and check a pipeline file and every spec it names; order the jobs by dependency
    (without looking at a store: :func:`plan_pipeline` checks inputs against it)."""
    try:
        raw = read_raw(path)
    except SpecError as e:
        raise SpecError(str(e).replace("spec file", "pipeline file", 1).replace("spec path", "pipeline path", 1)) from None
    try:
        p = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        msgs = (format_error(x, PipelineSpec).replace("Value error, ", "") for x in e.errors())
        raise SpecError(f"{path}: " + "; ".join(msgs)) from None
    base = Path(path).resolve().parent
    uri = store_uri or p.store
    jobs: list[Job] = []
    for i, entry in enumerate(p.jobs):
        where = f"{path}: `jobs.{i}` ({entry.spec})"
        file = _find_spec(entry.spec, base, where)
        kind, _, job_raw = detect(file, entry.set)
        if uri is not None:
            job_raw["store"] = uri
        if p.storage_options is not None:
            job_raw["storage_options"] = dict(p.storage_options)
        if entry.on_change is not None and kind.policy is None:
            kinds = " and ".join(k.name for k in KINDS if k.policy is not None)
            raise SpecError(f"{where}: `on_change` applies to {kinds} jobs; {kind.name} jobs are always incremental")
        spec = kind.validate(job_raw, entry.spec)
        jobs.append(Job(i, entry.spec, file, kind, job_raw, spec, entry.on_change or kind.policy, tuple(entry.set)))
    stores = {(u.rstrip("/") if "://" in u else os.path.abspath(os.path.expanduser(u))): u for u in (j.spec.store for j in jobs)}
    if len(stores) > 1:
        raise SpecError(f"{path}: the jobs name different stores ({', '.join(sorted(stores.values()))}); set `store` in the pipeline")
    return Pipeline(str(path), p, next(iter(stores.values())), p.storage_options or jobs[0].spec.storage_options, _order(jobs, str(path)))


# -- the dependency graph --------------------------------------------------------------------------


def _provider(need: Ref, writes: dict[Ref, Job]) -> Job | None:
    """The job writing what ``need`` names (the most specific one, when several kinds' outputs
    provide it: an SAE stem ``name`` provides ``name.HOOK``)."""
    found = [(w, j) for w, j in writes.items() if j.kind.provides(w, need)]
    return max(found, key=lambda x: len(x[0][1]))[1] if found else None


def _order(jobs: list[Job], where: str) -> list[Job]:
    """The jobs in dependency order (file order among independent ones); two jobs writing one
    output, or a cycle, are errors."""
    writes: dict[Ref, Job] = {}
    for j in jobs:
        for out in j.kind.io(j.spec)[0]:
            if out in writes:
                raise SpecError(f"{where}: jobs {writes[out].entry} and {j.entry} both write {out[0]} {out[1]!r}")
            writes[out] = j
    deps = {j.index: {p.index for need in j.kind.io(j.spec)[1] if (p := _provider(need, writes)) is not None and p is not j} for j in jobs}
    return [jobs[i] for i in toposort(deps, [j.entry for j in jobs], where=where)]


def toposort(deps: dict[int, set[int]], labels: Sequence[str], *, where: str = "pipeline") -> list[int]:
    """Node ids ordered so each comes after those it depends on (smallest id first among the
    ready ones); a cycle is a :class:`SpecError` naming it."""
    left = {n: set(d) for n, d in deps.items()}
    out: list[int] = []
    while left:
        ready = sorted(n for n, d in left.items() if not d - set(out))
        if not ready:
            start = min(left)
            path, n = [start], start
            while True:
                n = min(d for d in left[n] if d in left)
                if n in path:
                    cycle = path[path.index(n):] + [n]
                    break
                path.append(n)
            raise SpecError(f"{where}: the jobs depend on each other in a cycle: {' -> '.join(labels[i] for i in cycle)}")
        out.append(ready[0])
        del left[ready[0]]
    return out


def _check_inputs(p: Pipeline, s: store.Store | None) -> None:
    """Every input is written by a job of the pipeline or held by the store."""
    writes = {out: j for j in p.jobs for out in j.kind.io(j.spec)[0]}
    for j in p.jobs:
        for kind, name in sorted(j.kind.io(j.spec)[1]):
            if _provider((kind, name), writes) is None and not store_holds(s, kind, name):
                raise SpecError(f"{p.path}: {j.entry} reads {kind} {name!r}, which no job of the pipeline writes and "
                                f"store {p.store} does not hold")


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    pipeline: Pipeline
    store: str
    steps: list[Step]

    @property
    def todo(self) -> list[Step]:
        return [st for st in self.steps if st.run]

    def __repr__(self) -> str:
        return f"Plan({str(self.pipeline.path)!r}, store={self.store!r}, jobs={len(self.steps)}, to run={len(self.todo)})"

    def _repr_html_(self) -> str:
        """Jupyter's view of the plan: each job's output, what is missing and why it runs (or is up to date)."""
        rows = [(st.job.entry, st.output, st.missing,
                 status("runs", "warn") if st.run else status("up to date", "ok"), esc(st.why)) for st in self.steps]
        sub = esc(f"{len(self.todo)} of {len(self.steps)} job(s) to run against {self.store}")
        body = section("jobs", rows_table(["job", "output", "missing", "status", "why"], rows, html_cols=(3, 4)), count=len(rows), open=True)
        return page("Plan", str(self.pipeline.path), sub, [body])

    def table(self) -> str:
        rows = [("JOB", "OUTPUT", "MISSING", "WHY")] + [(st.job.entry, st.output, st.missing, st.why) for st in self.steps]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(r[i].ljust(w[i]) for i in range(3)) + "  " + r[3] for r in rows)


def plan_pipeline(p: Pipeline) -> Plan:
    """What each job of the pipeline will do, computed against the store (reads only): each
    job's kind plans it, in dependency order, against the store as the jobs before leave it."""
    s = open_store(p.store, p.storage_options)
    _check_inputs(p, s)
    state, ctx = PlanState(s), PlanContext(p.path, p.spec.version_pattern, p.spec.retrain_pattern)
    steps = []
    for job in p.jobs:
        try:
            steps.append(job.kind.plan(state, job, ctx))
        except StrataError as e:
            if str(e).startswith((job.entry, p.path)):
                raise
            raise type(e)(f"{job.entry}: {e}") from None
    return Plan(p, s.uri if s is not None else p.store, steps)


# -- running the plan -----------------------------------------------------------------------------------


def _submit(step: Step, p: Pipeline, address: str) -> int:
    """Run one step's job as a Ray Job on the cluster at ``address`` and wait for it."""
    sets = [*step.job.overrides, f"store={json.dumps(step.job.spec.store)}"]
    if p.spec.storage_options is not None:
        sets.append(f"storage_options={json.dumps(p.spec.storage_options)}")  # `submit` keeps only non-secret options
    sets += [f"{k}={json.dumps(v)}" for k, v in step.overrides.items()]  # JSON is YAML: `--set` parses it back
    return submission.submit(str(step.job.path), sets, address=address, wait=True)


def _leave(held: str) -> int:
    print(f"another run is at work: {held}; leaving it to that run (exit 0)")
    return 0


def execute(plan: Plan, *, submit: str | None = None) -> int:
    """Run the plan's jobs in order; the exit code."""
    todo = plan.todo
    if held := lease_holder(open_store(plan.store, plan.pipeline.storage_options), [st.lease for st in todo if st.lease]):
        return _leave(held)
    addresses = {getattr(getattr(st.job.spec, "compute", None), "address", None) for st in todo}
    shared: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if submit is None and sum(st.job.kind.needs_ray(st.job.spec) for st in todo) > 1 and len(addresses) == 1:
        shared = connect(addresses.pop())  # one Ray for every job, not one start per job
    try:
        with shared:
            for i, step in enumerate(todo, 1):
                print(f"==> [{i}/{len(todo)}] {step.job.entry}: {step.output}: {step.missing}")
                step.job.kind.prepare(step)  # here, even when submitted: the submitter shares the cluster's store
                if submit is None:
                    step.job.kind.run(step.spec())
                elif (rc := _submit(step, plan.pipeline, submit)) != 0:
                    print(f"{step.job.entry}: the Ray job failed (exit {rc}); later jobs were not submitted", file=sys.stderr)
                    return 1
    except LeaseHeldError as e:
        return _leave(str(e))
    print(f"done: {len(todo)} job(s) of {plan.pipeline.path} ran")
    return 0


def reprocess(path: str, *, dry_run: bool = False, submit: str | None = None, store_uri: str | None = None) -> int:
    """``strata reprocess``: load, plan, print the plan, run it; the exit code (StrataError for bad input)."""
    p = load_pipeline(path, store_uri=store_uri)
    if not dry_run:
        datasets = [name for j in p.jobs for kind, name in j.kind.io(j.spec)[0] if kind == "dataset"]
        if held := lease_holder(open_store(p.store, p.storage_options), datasets):  # before planning, which reads the corpus
            return _leave(held)
    plan = plan_pipeline(p)
    print(plan.table())
    kept = sum(len(st.kept) for st in plan.steps)
    note = f" ({kept} result(s) kept by policy)" if kept else ""
    if not plan.todo:
        print(f"nothing to do: every job of {path} is up to date in {plan.store}{note}")
        return 0
    if dry_run:
        print(f"dry run: nothing was run; {len(plan.todo)} job(s) would run{note}")
        held = lease_holder(open_store(p.store, p.storage_options), [st.lease for st in plan.todo if st.lease])
        if held:
            print(f"note: {held}")
        return 0
    return execute(plan, submit=submit)


# -- the command line -----------------------------------------------------------------------------------


def _cmd_reprocess(args: argparse.Namespace) -> int:
    return reprocess(args.pipeline, dry_run=args.dry_run, submit=args.submit, store_uri=args.store)


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("pipeline", help="a pipeline file (YAML): store, version_pattern, jobs")
    q.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    q.add_argument("--submit", metavar="ADDRESS",
                   help="run the jobs as Ray Jobs, one after the other, on the cluster whose job server is ADDRESS (http://HEAD:8265)")
    q.add_argument("--store", metavar="URI", help="the store every job runs against (replaces the pipeline's `store`)")


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    q = sub.add_parser("reprocess", help="bring a store up to date with a pipeline of jobs: plan, then run only what is missing")
    add_arguments(q)
    q.set_defaults(func=_cmd_reprocess)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m strata.jobs.reprocess PIPELINE.yaml``: the same as ``strata reprocess``."""
    p = argparse.ArgumentParser(prog="python -m strata.jobs.reprocess", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _cmd_reprocess(args)
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
