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
is missing, why); then exactly that work runs, in dependency order, in this process (each kind's
own run function) or, with ``--submit``, as Ray Jobs through :func:`jobs.submit.submit`, one
after the other. A run that finds nothing missing says "nothing to do" and writes nothing.

* **extract**: new documents of a growing corpus are new units; new hooks are computed for every
  unit; units an earlier run left unfinished are computed. A model whose revision now resolves
  to another commit (for a local folder: other weights or config, :func:`pipeline.models.
  folder_revision`) is a new dataset version, named by ``version_pattern``; the old dataset is
  left as it is. Downstream jobs read the current version.
* **sae** (``on_change``, default ``keep``): an SAE whose inputs changed (its dataset grew or is
  a new version) or whose spec changed is ``kept (policy)``, or with ``retrain``/``recompute``
  trained again under a new name, ``retrain_pattern`` with ``version`` = 8 hex digits of a hash
  of what the new SAEs are (dataset, its fingerprint and units, and the training config): a
  committed SAE is never overwritten. Feature tables of a retrained SAE get new names too.
* **features**: the units its SAE's dataset gained are encoded (the job itself is incremental).
* **analysis** (``on_change``, default ``recompute``): an analysis whose inputs change
  (datasets gain units of its hooks, a new dataset version, a retrained SAE) or whose spec
  changed is ``kept (policy)``, or with ``recompute``/``retrain`` computed again: over grown
  inputs, the old result is deleted under its lease, then computed again under its name; on a new
  dataset version or a retrained SAE, the new result gets a versioned name (the versions' common
  suffix, ``name@1a2b3c4d``, else ``retrain_pattern``) and the old one stays until ``strata rm``.

Overlapping runs are safe: a run that finds another job holding a write lease it needs (the
dataset's, an SAE's, a feature table's) exits 0 saying so, leaving the work to that job. Bad
input (an unknown key, a missing or invalid spec file, a job whose input no job and no store
provides, two jobs writing one output, a cycle) is one line and exit code 2, before any work.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import json
import logging
import os
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from strata.jobs.kinds import JobKind, detect
from strata.jobs.spec import format_error, read_raw
from strata.pipeline.errors import SpecError
from strata.store.errors import LeaseHeldError, StoreNotFoundError, StrataError
from strata.store.layout import check_name, hook_order
from strata.store.layout import unit_ranges as ranges

log = logging.getLogger(__name__)

Policy = Literal["retrain", "keep", "recompute"]
DEFAULT_POLICY: dict[str, Policy] = {"sae": "keep", "analysis": "recompute"}
_SAMPLE_HEX = "0123456789abcdef0123456789abcdef01234567"


# -- the pipeline file -----------------------------------------------------------------------------


def _check_pattern(v: str, *, fields: tuple[str, ...], required: str) -> str:
    try:
        used = {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        sample = v.format(**{k: "name" if k == "name" else _SAMPLE_HEX for k in fields})
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{v!r} is not a format pattern with the fields {', '.join(fields)} ({e})") from None
    if required not in used:
        raise ValueError(f"{v!r} must use {{{required}}}: without it every version would get one name")
    check_name(sample)
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class JobEntry(_Section):
    spec: str = Field(min_length=1)
    """A job spec file of any kind (extract, sae, features, analysis): a path relative to the
    working directory (or, failing that, to the pipeline file's folder)."""
    on_change: Policy | None = None
    """SAE and analysis jobs: what to do when their inputs (or their spec) changed. ``keep``:
    leave the committed result; ``retrain``/``recompute``: an SAE is trained again under a new
    name, an analysis computed again (under a versioned name when it reads a new version of its
    inputs). Default: keep SAEs, recompute analyses."""
    set: list[str] = []
    """``key=value`` overrides of the spec, as ``--set`` takes them."""


class PipelineSpec(_Section):
    store: str | None = None
    """The store every job runs against (each spec's own ``store`` is replaced); default: the
    store the specs name, which must then be one."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for an S3 store, given to every job (credentials used, never recorded)."""
    version_pattern: str = "{name}@{revision:.8}"
    """The name of a dataset's new version when its model revision moves: ``name`` is the
    spec's name, ``revision`` the commit the revision resolves to (for a local model folder, the
    hex hash of its weights and config)."""
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
        return _check_pattern(v, fields=("name", "revision"), required="revision")

    @field_validator("retrain_pattern")
    @classmethod
    def _retrain_pattern(cls, v: str) -> str:
        return _check_pattern(v, fields=("name", "version"), required="version")


@dataclass(frozen=True)
class Job:
    """One job of a pipeline: its spec, validated, with the pipeline's store applied."""

    index: int
    entry: str  # the spec path as the pipeline names it
    path: Path
    kind: JobKind
    raw: dict[str, Any]
    spec: Any
    policy: Policy | None
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    path: str
    spec: PipelineSpec
    store: str
    storage_options: dict[str, Any] | None
    jobs: list[Job]  # in dependency order


def _store_key(uri: str) -> str:
    return uri.rstrip("/") if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _find_spec(entry: str, base: Path, where: str) -> Path:
    p = Path(os.path.expanduser(entry))
    for candidate in [p] if p.is_absolute() else [p, base / p]:
        if candidate.is_file():
            return candidate
    looked = str(p.parent) if p.is_absolute() else " and ".join(dict.fromkeys([os.getcwd(), str(base)]))
    raise SpecError(f"{where}: spec file {entry!r} does not exist (looked in {looked})")


def _validate(kind: JobKind, raw: dict[str, Any], where: str) -> Any:
    spec_type = kind.spec_type()
    try:
        return spec_type.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{where}: " + "; ".join(format_error(x, spec_type) for x in e.errors())) from None


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
        if entry.on_change is not None and kind.name not in DEFAULT_POLICY:
            raise SpecError(f"{where}: `on_change` applies to SAE and analysis jobs; {kind.name} jobs are always incremental")
        spec = _validate(kind, job_raw, f"{entry.spec}")
        jobs.append(Job(i, entry.spec, file, kind, job_raw, spec, entry.on_change or DEFAULT_POLICY.get(kind.name), tuple(entry.set)))
    stores = {_store_key(j.spec.store): j.spec.store for j in jobs}
    if len(stores) > 1:
        raise SpecError(f"{path}: the jobs name different stores ({', '.join(sorted(stores.values()))}); set `store` in the pipeline")
    return Pipeline(str(path), p, next(iter(stores.values())), p.storage_options or jobs[0].spec.storage_options, _order(jobs, str(path)))


# -- the dependency graph --------------------------------------------------------------------------


def _analysis_refs(a: Any) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The datasets (with hook patterns) and SAEs one analysis reads."""
    if a.kind == "compare":
        return [(a.a.dataset, [a.a.hook]), (a.b.dataset, [a.b.hook])], []
    if a.kind == "heatmap":
        return [(a.a.dataset, list(a.a.hooks))] + ([(a.b.dataset, list(a.b.hooks))] if a.b is not None else []), []
    if a.kind == "sae_match":
        return [], [a.a.sae, a.b.sae]
    return [(a.dataset, list(a.hooks))], []  # layers, probe


def _io(job: Job) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(what the job writes, what it reads), as (kind, name). An SAE job writes the stem of its
    SAEs' names (``name``, ``name.HOOK``, ``name.HOOK.k=32``, ...)."""
    s, kind = job.spec, job.kind.name
    if kind == "extract":
        return {("dataset", s.name)}, set()
    if kind == "sae":
        return {("sae", s.name)}, {("dataset", s.dataset)}
    if kind == "features":
        return {("features", s.table)}, {("sae", s.sae)}
    reads: set[tuple[str, str]] = set()
    for a in s.analyses:
        datasets, saes = _analysis_refs(a)
        reads |= {("dataset", d) for d, _ in datasets} | {("sae", x) for x in saes}
    return {("analysis", a.name) for a in s.analyses}, reads


def _provider(need: tuple[str, str], writes: dict[tuple[str, str], Job]) -> Job | None:
    kind, name = need
    if kind != "sae":
        return writes.get(need)
    stems = [(stem, j) for (k, stem), j in writes.items() if k == "sae" and (name == stem or name.startswith(stem + "."))]
    return max(stems, key=lambda x: len(x[0]))[1] if stems else None


def _order(jobs: list[Job], where: str) -> list[Job]:
    """The jobs in dependency order (file order among independent ones); two jobs writing one
    output, or a cycle, are errors."""
    writes: dict[tuple[str, str], Job] = {}
    for j in jobs:
        for out in _io(j)[0]:
            if out in writes:
                raise SpecError(f"{where}: jobs {writes[out].entry} and {j.entry} both write {out[0]} {out[1]!r}")
            writes[out] = j
    deps = {j.index: {p.index for need in _io(j)[1] if (p := _provider(need, writes)) is not None and p is not j} for j in jobs}
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


# -- what the store holds, and will hold after this run --------------------------------------------


@dataclass
class DatasetView:
    """A dataset as it will be once this run's extraction is done (as it is, when no job of the
    pipeline writes it). Quacks enough like a dataset for the SAE planner."""

    name: str
    fingerprint: str
    widths: dict[str, int]
    units: dict[str | None, set[int]]  # committed units per hook (None: the token table)
    gained: dict[str | None, set[int]] = field(default_factory=dict)  # what this run adds
    new: bool = False  # created by this run
    rows: dict[int, int] = field(default_factory=dict)  # token rows of each committed unit
    context_size: int = 1
    unit_rows: int = 0  # a unit this run adds counts as whole (its SAEs retrain anyway)

    @classmethod
    def of(cls, ds: Any) -> DatasetView:
        units: dict[str | None, set[int]] = {h: set(ds.committed_units(h)) for h in ds.hooks}
        units[None] = set(ds.committed_units(None))
        rows = {u: ds.unit_counts(None, u)[0] for u in units[None] if (None, u) not in ds.damaged}
        return cls(ds.name, ds.info.fingerprint, {h: ds.info.hooks[h].d for h in ds.hooks}, units, rows=rows,
                   context_size=ds.info.context_size, unit_rows=ds.info.unit_rows)

    @property
    def info(self) -> Any:
        return SimpleNamespace(fingerprint=self.fingerprint, hooks={h: SimpleNamespace(d=d) for h, d in self.widths.items()},
                               context_size=self.context_size)

    def unit_counts(self, hook: str | None, unit: int) -> tuple[int, int]:
        """``(rows, 0)`` of a unit (the SAE planner's held-out split reads its contexts)."""
        return self.rows.get(unit, self.unit_rows), 0

    @property
    def hooks(self) -> list[str]:
        return sorted(self.widths, key=hook_order)

    def committed_units(self, hook: str | None = None) -> list[int]:
        return sorted(self.units.get(hook, set()))

    def gains(self, patterns: Sequence[str]) -> set[int]:
        """Units this run adds to any hook matching ``patterns``."""
        hooks = [h for h in self.hooks if any(fnmatch.fnmatchcase(h, p) for p in patterns)]
        return set().union(*(self.gained.get(h, set()) for h in hooks)) if hooks else set()


@dataclass(frozen=True)
class SAEView:
    name: str  # the SAE's name in the store (a new version's name, when retrained)
    dataset: str
    hook: str
    trains: bool = False  # trained by this run
    version: str | None = None  # the version suffix's value, when retrained under a new name


class _NoStore:
    """Stands for a store that does not exist yet (a pipeline's first run): it holds nothing."""

    uri = "(a new store)"

    def datasets(self) -> list[str]:
        return []


class _State:
    def __init__(self, s: Any) -> None:
        self.s = s
        self.datasets: dict[str, str] = {}  # the name a spec reads -> the version this run makes current
        self.views: dict[str, DatasetView] = {}
        self.saes: dict[str, SAEView] = {}  # the name a spec reads -> the SAE it gets

    def dataset(self, name: str, *, actual: bool = False) -> DatasetView:
        """The view of the dataset a spec names (its current version), or with ``actual`` of the
        dataset of that very name (an SAE's lineage names one)."""
        actual_name = name if actual else self.datasets.get(name, name)
        if actual_name not in self.views:
            if self.s is None or actual_name not in self.s.datasets():
                raise SpecError(f"no job of the pipeline writes dataset {name!r}, and the store holds no dataset of that name")
            self.views[actual_name] = DatasetView.of(self.s.dataset(actual_name))
        return self.views[actual_name]

    def sae(self, name: str) -> SAEView:
        if name not in self.saes:
            if self.s is None or name not in self.s.saes():
                trained = f" (its jobs train {_names(sorted(self.saes), 6)})" if self.saes else ""
                raise SpecError(f"no job of the pipeline trains SAE {name!r}{trained}, and the store holds no SAE of that name")
            lin = self.s.sae(name).lineage
            self.saes[name] = SAEView(name, str(lin.get("dataset")), str(lin.get("hook")))
        return self.saes[name]

    def artifact(self, kind: str, name: str) -> Any:
        from strata.store.commit import artifacts

        return None if self.s is None else artifacts.get(self.s.storage, kind, name)


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class Step:
    """What one job will do in this run."""

    job: Job
    output: str
    missing: str = "-"
    why: str = "up to date"
    run: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # top-level spec keys set for the run
    units: list[int] = field(default_factory=list)  # extract: units with a hook missing; features: units to encode
    hooks: dict[str, list[int]] = field(default_factory=dict)  # extract: hook -> its missing units
    names: list[str] = field(default_factory=list)  # sae: SAEs to train; analysis: analyses to compute
    delete: list[str] = field(default_factory=list)  # analysis: results replaced (deleted first)
    kept: list[str] = field(default_factory=list)  # results left as they are by policy
    lease: str | None = None  # extract: the dataset whose write lease the job takes


@dataclass
class Plan:
    pipeline: Pipeline
    store: str
    steps: list[Step]

    @property
    def todo(self) -> list[Step]:
        return [st for st in self.steps if st.run]

    def table(self) -> str:
        rows = [("JOB", "OUTPUT", "MISSING", "WHY")] + [(st.job.entry, st.output, st.missing, st.why) for st in self.steps]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(r[i].ljust(w[i]) for i in range(3)) + "  " + r[3] for r in rows)


def _names(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _revision_value(revision: str) -> str:
    """What ``{revision}`` means in a pattern: the commit hash, or a local folder's content hash."""
    return revision.split(":", 1)[-1]


def _plan_extract(job: Job, st: _State, p: Pipeline) -> Step:
    from strata.pipeline import models
    from strata.pipeline.extract import _check_committed, prepare
    from strata.pipeline.extract import plan as plan_units
    from strata.store.datasets.manifest import fingerprint

    spec = job.spec
    base, target, moved = spec.name, spec.name, ""
    m = models.resolve(spec.model)
    if st.s is not None and base in st.s.datasets():
        old = st.s.manifest(base).meta
        if old.get("model") != m.identity:
            raise SpecError(f"{job.entry}: dataset {base!r} holds model {old.get('model')!r}, but the spec names {m.identity!r}: "
                            "another model is another dataset; choose a new `name`")
        if old.get("revision") != m.revision:
            target = check_name(p.spec.version_pattern.format(name=base, revision=_revision_value(m.revision)))
            moved = f"{_revision_value(str(old.get('revision')))[:12]} -> {_revision_value(m.revision)[:12]}"
    spec_t = spec.model_copy(update={"name": target})
    pr = prepare(spec_t, st.s if st.s is not None else _NoStore())
    ds = pr.existing
    if ds is not None and pr.scan.docs == pr.corpus_docs:
        n = ds.info.num_units  # the corpus is the one the dataset was made of: its units are known
    else:
        pl = plan_units(pr, use_ray=False)  # tokenizes in this process (no Ray) to count the units
        try:
            _check_committed(pr, pl)
            n = pl.units
        finally:
            pl.packer.source.remove()
    old_hooks = set(ds.hooks) if ds is not None else set()
    have: dict[str | None, set[int]] = {h: set(ds.committed_units(h)) if h in old_hooks else set() for h in pr.hooks}
    have[None] = set(ds.committed_units(None)) if ds is not None else set()
    planned = set(range(n))
    missing = {h: sorted(planned - have[h]) for h in pr.hooks if planned - have[h]}
    units = sorted(set().union(*missing.values(), planned - have[None]))

    if ds is not None:
        view = DatasetView.of(ds)
    else:  # the identity the extraction will give it: the same function of the same fields
        fp = fingerprint(context_size=spec.tokenize.context_size, dtype=spec.dtype, meta=pr.meta)
        view = DatasetView(target, fp, {}, {None: set()}, new=True, context_size=spec.tokenize.context_size,
                           unit_rows=spec.compute.unit_contexts * spec.tokenize.context_size)
    for h in [*pr.hooks, None]:
        view.gained[h] = planned - have[h]
        view.units[h] = view.units.get(h, set()) | planned
    for h in pr.hooks:
        view.widths[h] = int(pr.config.hidden_size)
    st.datasets[base], st.views[target] = target, view

    step = Step(job, f"dataset {target}", lease=target, units=units, hooks=missing,
                overrides={"name": target, "version_of": base} if target != base else {})
    if n == 0:
        step.why = "the corpus fills no unit yet"
        return step
    if not units:
        step.why = f"up to date (the current version of {base}, whose model revision moved: {moved})" if moved else "up to date"
        return step
    step.run = True
    groups: dict[tuple[int, ...], list[str]] = {}
    for h, us in missing.items():
        groups.setdefault(tuple(us), []).append(h)
    if ds is None:
        step.missing = f"units {ranges(units)} x {len(pr.hooks)} hook(s)"
        step.why = f"model revision moved ({moved}): a new version; {base} is left as it is" if moved else "new dataset"
        return step
    parts = [f"units {ranges(us)}" + (f" ({len(hs)} hooks)" if len(hs) == len(pr.hooks) and len(hs) > 1 else
                                      "" if len(hs) == len(pr.hooks) else f" of {', '.join(hs)}") for us, hs in groups.items()]
    step.missing = "; ".join(parts) if parts else f"units {ranges(units)} (token table)"
    new_units = [u for u in units if u >= ds.info.num_units]
    new_hooks = [h for h in pr.hooks if h not in old_hooks]
    old_missing = [u for h, us in missing.items() if h in old_hooks for u in us if u < ds.info.num_units]
    why = []
    if new_units:
        why.append(f"the corpus grew: {len(new_units)} new unit(s)")
    if new_hooks:
        why.append(f"new hook(s) {', '.join(new_hooks)}")
    if old_missing:
        why.append(f"unit(s) {ranges(set(old_missing))} unfinished (an earlier run stopped)")
    step.why = "; ".join(why)
    return step


def _plan_sae(job: Job, st: _State, p: Pipeline) -> Step:
    from strata.analysis.sae.config import combinations, concrete, resolve_hooks, run_name
    from strata.analysis.sae.plan import config_hash, describe_diff, heldout_contexts_needed, resolved_config, split_units
    from strata.store.saes.handles import SAES

    spec = job.spec
    view = st.dataset(spec.dataset)
    try:
        hooks = resolve_hooks(spec.hooks, view.hooks, dataset=f"dataset {view.name!r}")
    except ValueError as e:
        raise SpecError(f"{job.entry}: {e}") from None
    units, holdout = split_units(view, hooks, spec.data.holdout_units, min_contexts=heldout_contexts_needed(spec))
    runs: list[tuple[str, str, dict[str, Any], str]] = []  # (name as the spec makes it, hook, config, hash)
    current = spec.model_copy(update={"dataset": view.name})  # the config records the dataset's (version) name
    for params in combinations(spec):
        for hook in hooks:
            name = run_name(spec, hook=hook, params=params, several_hooks=len(hooks) > 1)
            cfg = resolved_config(concrete(current, params, hook=hook, name=name), view, hook=hook, units=units, holdout=holdout)
            runs.append((name, hook, cfg, config_hash(cfg)))

    def state(name: str, cfg: dict[str, Any], h: str) -> tuple[str, str]:
        art = st.artifact(SAES, name)
        if art is None:
            return "new", ""
        if art.meta.get("config_hash") == h:
            return "same", ""
        return "changed", describe_diff(art.meta.get("config", {}), cfg) or "its config differs"

    states = [state(n, cfg, h) for n, _, cfg, h in runs]
    changed = [(n, why) for (n, *_), (s, why) in zip(runs, states) if s == "changed"]
    step = Step(job, f"SAE {spec.name}" + (f" ({len(runs)})" if len(runs) > 1 else ""))
    overrides: dict[str, Any] = {"dataset": view.name} if view.name != spec.dataset else {}
    stem, version = spec.name, None
    if changed and job.policy == "keep":
        step.kept = [n for n, _ in changed]
        new = [n for (n, *_), (s, _) in zip(runs, states) if s == "new"]
        step.why = f"kept (policy): inputs changed ({changed[0][1]})" + (
            f"; {_names(new)} not trained: the job's other SAEs are kept" if new else "")
        for n, hook, _, _ in runs:
            st.saes[n] = SAEView(n, _lineage_dataset(st, n, view.name), hook)
        return step
    if changed:  # retrain / recompute: a new name, never an overwrite
        version = hashlib.sha256("\n".join(sorted(h for *_, h in runs)).encode()).hexdigest()[:8]
        stem = check_name(p.spec.retrain_pattern.format(name=spec.name, version=version))
        step.output = f"SAE {stem}" + (f" ({len(runs)})" if len(runs) > 1 else "")
        overrides["name"] = stem
        states = [state(stem + n[len(spec.name):], cfg, h) for n, _, cfg, h in runs]
        if any(s == "changed" for s, _ in states):
            raise SpecError(f"{job.entry}: SAE {stem!r} is committed already with another config; change `retrain_pattern`")
    todo = [stem + n[len(spec.name):] for (n, *_), (s, _) in zip(runs, states) if s != "same"]
    _check_checkpoints(job, st, [(stem + n[len(spec.name):], cfg, h) for n, _, cfg, h in runs if stem + n[len(spec.name):] in todo])
    for n, hook, _, _ in runs:
        actual = stem + n[len(spec.name):]
        st.saes[n] = SAEView(actual, view.name, hook, trains=actual in todo, version=version)
    step.overrides, step.names = overrides, todo
    if not todo:
        step.why = "up to date" + (f" (retrained as {stem} when its inputs changed)" if changed else "")
        return step
    step.run = True
    step.missing = f"train {_names(todo)}"
    step.why = (f"inputs changed ({changed[0][1]}); `{job.policy}` trains new SAEs: committed ones are never overwritten"
                if changed else "new SAE(s)" + (f" on dataset {view.name}" if view.new else ""))
    return step


def _check_checkpoints(job: Job, st: _State, runs: list[tuple[str, dict[str, Any], str]]) -> None:
    """An SAE this run trains must not have checkpoints of another config: the job refuses to
    resume them (:func:`analysis.sae.plan.plan`), so the plan refuses first, before any work."""
    from strata.analysis.sae import checkpoint
    from strata.analysis.sae.plan import describe_diff
    from strata.store.commit.artifacts import ArtifactExistsError

    if st.s is None:
        return
    for name, cfg, h in runs:
        for at, meta in checkpoint.committed(st.s.storage, name):
            if meta.get("config_hash") != h:
                diff = describe_diff(meta.get("config", {}), cfg) or "its config hash differs"
                raise ArtifactExistsError(
                    f"{job.entry}: SAE {name!r} has a checkpoint (step {at}) of another config ({diff}), which its job would refuse "
                    f"to resume: run the spec with that config to finish it, or `strata sae train {job.entry} --fresh` to start over")


def _lineage_dataset(st: _State, name: str, default: str) -> str:
    from strata.store.saes.handles import SAES

    art = st.artifact(SAES, name)
    return str(art.read_json("lineage.json").get("dataset", default)) if art is not None else default


def _plan_features(job: Job, st: _State, p: Pipeline) -> Step:
    from strata.pipeline.encode import check_table
    from strata.store.features.format import FeatureTableExistsError, load_info, unit_records
    from strata.store.features.merge import load_generation

    spec = job.spec
    sv = st.sae(spec.sae)
    table = spec.name or sv.name
    if spec.name and sv.version:
        table = check_name(p.spec.retrain_pattern.format(name=spec.name, version=sv.version))
    overrides = {k: v for k, v, old in (("sae", sv.name, spec.sae), ("name", table, spec.name or spec.sae)) if v != old}
    step = Step(job, f"features {table}", overrides=overrides)
    view = st.dataset(sv.dataset, actual=True)
    units = view.committed_units(sv.hook)
    if sv.trains:
        # A table of that name holds the latents of another SAE commit (the SAE was removed, or
        # its name was taken): encoding with the SAE this run trains would meet another identity.
        # Found here, so the dry run says it and the real run stops before training anything.
        old = load_info(st.s.storage, table) if st.s is not None else None
        if old is not None:
            raise FeatureTableExistsError(
                f"{job.entry}: feature table {table!r} already exists, encoded with an earlier commit of SAE {old.sae!r} "
                f"(fingerprint {old.sae_fingerprint}); SAE {sv.name} is trained in this run, so the table would get another "
                "identity; choose a new `name` for the table")
        step.units, step.why = units, f"SAE {sv.name} is trained in this run"
    else:
        _, _, old = check_table(spec.model_copy(update={"sae": sv.name, "name": table}), st.s)
        records = unit_records(st.s.storage, old)[0] if old is not None else {}
        step.units = sorted(set(units) - set(records))
        if not step.units:
            merged = old is not None and old.merged and set(load_generation(st.s.storage, old, old.merged).units) == set(records)
            if not merged:
                step.run, step.missing, step.why = True, "merge", "units encoded but not merged (an earlier run stopped)"
            return step
        gained = set(step.units) & view.gained.get(sv.hook, set())
        step.why = ("new feature table" if old is None else
                    f"dataset {view.name} gains unit(s) {ranges(gained)}" if gained else "units not encoded yet (an earlier run stopped)")
    step.run = bool(step.units)
    step.missing = f"encode units {ranges(step.units)}" if step.units else "-"
    if not step.units:
        step.why = f"SAE {sv.name}'s dataset has no committed unit yet"
    return step


def _rewrite(d: Any, datasets: dict[str, str], saes: dict[str, str]) -> Any:
    """An analysis spec (plain JSON) reading the current versions of its datasets and SAEs."""
    if isinstance(d, dict):
        return {k: (datasets.get(v, v) if k == "dataset" else saes.get(v, v) if k == "sae" else _rewrite(v, datasets, saes))
                for k, v in d.items()}
    if isinstance(d, list):
        return [_rewrite(v, datasets, saes) for v in d]
    return d


def _renamed(datasets: dict[str, str], saes: dict[str, str]) -> list[str]:
    """The versions an analysis reads in place of the names its spec gives."""
    return sorted(v for m in (datasets, saes) for k, v in m.items() if v != k)


def _analysis_version(name: str, datasets: dict[str, str], saes: dict[str, str], p: Pipeline) -> str:
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
    version = hashlib.sha256("\n".join(f"{kind}:{k}={v}" for kind, k, v in pairs).encode()).hexdigest()[:8]
    return check_name(p.spec.retrain_pattern.format(name=name, version=version), what="analysis")


def _plan_analysis(job: Job, st: _State, p: Pipeline) -> Step:
    from strata.analysis.similarity.runner import prepare
    from strata.store.saes.handles import ANALYSES

    spec = job.spec
    step = Step(job, "analysis " + ", ".join(a.name for a in spec.analyses))
    compute: list[dict[str, Any]] = []
    reasons: list[str] = []
    for a in spec.analyses:
        named, saes = _analysis_refs(a)
        changes: list[str] = []
        ds_map, sae_map = {}, {}
        reads = [(d, patterns, False) for d, patterns in named]
        for x in saes:
            sv = st.sae(x)
            sae_map[x] = sv.name
            if sv.trains:
                changes.append(f"SAE {sv.name} is trained in this run")
            reads.append((sv.dataset, [sv.hook], True))
        for d, patterns, actual in reads:
            view = st.dataset(d, actual=actual)
            if not actual:
                ds_map[d] = view.name
            gained = view.gains(patterns)
            if view.new:
                changes.append(f"dataset {view.name} is new")
            elif gained:
                changes.append(f"dataset {view.name} gains unit(s) {ranges(gained)}")
        body = _rewrite(a.model_dump(mode="json"), ds_map, sae_map)
        # A result on other versions of its inputs (a new dataset version, a retrained SAE) is a
        # new result under a versioned name: the one on the old versions stays until `rm`.
        name = _analysis_version(a.name, ds_map, sae_map, p)
        body["name"] = name
        art = st.artifact(ANALYSES, name)
        if art is None and name != a.name and job.policy == "keep" and st.artifact(ANALYSES, a.name) is not None:
            step.kept.append(a.name)
            reasons.append(f"{a.name}: kept (policy): {(changes or [f'it reads {_names(_renamed(ds_map, sae_map))}'])[0]}")
            continue
        if art is None:
            compute.append(body)
            reasons.append(f"{a.name}: new" if name == a.name else
                           f"{name}: new, on {_names(_renamed(ds_map, sae_map))}; {a.name} is left as it is")
            continue
        if not changes:
            one = _validate(job.kind, {**job.raw, "analyses": [body]}, job.entry)
            old = {k: art.meta.get(k) for k in ("kind", "spec", "inputs")}
            if prepare(one, st.s)[0].identity == old:
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
        step.missing = ("recompute " if step.delete else "compute ") + _names(step.names)
    step.why = "; ".join(reasons) if reasons else "up to date"
    return step


_PLANNERS = {"extract": _plan_extract, "sae": _plan_sae, "features": _plan_features, "analysis": _plan_analysis}


def _open_store(uri: str, options: dict[str, Any] | None) -> Any:
    from strata import store

    try:
        return store.open(uri, storage_options=options, create=False)  # planning never creates a store
    except StoreNotFoundError:
        return None


def _check_inputs(p: Pipeline, s: Any) -> None:
    """Every input is written by a job of the pipeline or held by the store."""
    writes = {out: j for j in p.jobs for out in _io(j)[0]}
    for j in p.jobs:
        for kind, name in sorted(_io(j)[1]):
            if _provider((kind, name), writes) is not None:
                continue
            held = s is not None and name in (s.datasets() if kind == "dataset" else s.saes())
            if not held:
                raise SpecError(f"{p.path}: {j.entry} reads {kind} {name!r}, which no job of the pipeline writes and "
                                f"store {p.store} does not hold")


def plan_pipeline(p: Pipeline) -> Plan:
    """What each job of the pipeline will do, computed against the store (reads only)."""
    s = _open_store(p.store, p.storage_options)
    _check_inputs(p, s)
    st = _State(s)
    steps = []
    for job in p.jobs:
        try:
            steps.append(_PLANNERS[job.kind.name](job, st, p))
        except StrataError as e:
            if str(e).startswith((job.entry, p.path)):
                raise
            raise type(e)(f"{job.entry}: {e}") from None
    return Plan(p, s.uri if s is not None else p.store, steps)


# -- running the plan -----------------------------------------------------------------------------------


def _spec_for(step: Step) -> Any:
    return _validate(step.job.kind, {**copy.deepcopy(step.job.raw), **step.overrides}, step.job.entry)


def _delete_analyses(step: Step) -> None:
    from strata import store
    from strata.store.commit import artifacts
    from strata.store.saes.handles import ANALYSES

    spec = step.job.spec
    s = store.open(spec.store, storage_options=spec.storage_options, create=False)
    for name in step.delete:
        with s.artifact_lease(ANALYSES, name, owner="strata reprocess") as lease:
            if artifacts.get(s.storage, ANALYSES, name) is not None:
                artifacts.delete(s.storage, ANALYSES, name, lease=lease)
        print(f"analysis {name}: old result deleted (`{step.job.policy}`)")


def _run_here(step: Step) -> None:
    """Run one step's job in this process, with its kind's own run function."""
    spec, kind = _spec_for(step), step.job.kind.name
    progress = sys.stderr.isatty()
    if kind == "extract":
        from strata.pipeline.extract import run_extract

        print(run_extract(spec, progress=progress).message)
    elif kind == "sae":
        from strata.analysis.sae.job import run_job

        for o in run_job(spec).outcomes:
            print(f"SAE {o.name}: {o.status}" + (f" in {o.seconds:.1f}s" if o.status != "unchanged" else ""))
    elif kind == "features":
        from strata.pipeline.encode import run_encode

        print(run_encode(spec, progress=progress).message)
    else:
        from strata.jobs.analyze_run import run_analyze

        _delete_analyses(step)
        for o in run_analyze(spec):
            print(f"analysis {o.name} ({o.kind}): {o.status}")


def _submit(step: Step, p: Pipeline, address: str) -> int:
    """Run one step's job as a Ray Job on the cluster at ``address`` and wait for it."""
    from strata.jobs.submit import submit

    if step.job.kind.name == "analysis":
        _delete_analyses(step)  # here: the submitter reads and writes the same store as the cluster
    sets = [*step.job.overrides, f"store={json.dumps(step.job.spec.store)}"]
    if p.spec.storage_options is not None:
        sets.append(f"storage_options={json.dumps(p.spec.storage_options)}")  # `submit` keeps only non-secret options
    sets += [f"{k}={json.dumps(v)}" for k, v in step.overrides.items()]  # JSON is YAML: `--set` parses it back
    return submit(str(step.job.path), sets, address=address, wait=True)


def _needs_ray(step: Step) -> bool:
    return step.job.kind.name != "sae" or bool(step.job.spec.sweep)


def _held(s: Any, names: Sequence[str]) -> str | None:
    """The message of the first of these datasets whose write lease another job holds."""
    if s is None:
        return None
    for name in names:
        lease = s.lease(name)
        holder = lease.holder()
        if holder is not None:
            return lease.held_message(holder)
    return None


def execute(plan: Plan, *, submit: str | None = None) -> int:
    """Run the plan's jobs in order; the exit code."""
    import contextlib

    todo = plan.todo
    held = _held(_open_store(plan.store, plan.pipeline.storage_options), [st.lease for st in todo if st.lease])
    if held:
        print(f"another run is at work: {held}; leaving it to that run (exit 0)")
        return 0
    addresses = {getattr(st.job.spec.compute, "address", None) for st in todo}
    shared = contextlib.nullcontext()
    if submit is None and sum(_needs_ray(st) for st in todo) > 1 and len(addresses) == 1:
        from strata.pipeline.cluster import connect

        shared = connect(addresses.pop())  # one Ray for every job, not one start per job
    try:
        with shared:
            for i, step in enumerate(todo, 1):
                print(f"==> [{i}/{len(todo)}] {step.job.entry}: {step.output}: {step.missing}")
                if submit is None:
                    _run_here(step)
                elif (rc := _submit(step, plan.pipeline, submit)) != 0:
                    print(f"{step.job.entry}: the Ray job failed (exit {rc}); later jobs were not submitted", file=sys.stderr)
                    return 1
    except LeaseHeldError as e:
        print(f"another run is at work: {e}; leaving it to that run (exit 0)")
        return 0
    print(f"done: {len(todo)} job(s) of {plan.pipeline.path} ran")
    return 0


def reprocess(path: str, *, dry_run: bool = False, submit: str | None = None, store_uri: str | None = None) -> int:
    """``strata reprocess``: load, plan, print the plan, run it; the exit code (StrataError for bad input)."""
    p = load_pipeline(path, store_uri=store_uri)
    if not dry_run:
        held = _held(_open_store(p.store, p.storage_options), [j.spec.name for j in p.jobs if j.kind.name == "extract"])
        if held:  # before planning, which reads the whole corpus
            print(f"another run is at work: {held}; leaving it to that run (exit 0)")
            return 0
    plan = plan_pipeline(p)
    print(plan.table())
    kept = sum(len(st.kept) for st in plan.steps)
    note = f" ({kept} result(s) kept by policy)" if kept else ""
    if not plan.todo:
        print(f"nothing to do: every job of {path} is up to date in {plan.store}{note}")
        return 0
    if dry_run:
        print(f"dry run: nothing was run; {len(plan.todo)} job(s) would run{note}")
        held = _held(_open_store(p.store, p.storage_options), [st.lease for st in plan.todo if st.lease])
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
    """``python -m jobs.reprocess PIPELINE.yaml``: the same as ``strata reprocess``."""
    p = argparse.ArgumentParser(prog="python -m jobs.reprocess", description=__doc__.splitlines()[0])
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
