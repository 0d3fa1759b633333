"""What every kind's plan shares: the job record, the step a plan returns, the pipeline's naming
rules, and :class:`PlanState`, the store as this run will leave it.

Plans run in dependency order against one :class:`PlanState`: an extraction's plan records the
dataset version it makes current and the units it adds (:meth:`PlanState.add_dataset`), an SAE
job's plan the SAEs it trains (:meth:`PlanState.add_sae`), so the plans of the jobs that read them
see the store as it will be, while nothing is written yet.
"""

from __future__ import annotations

import hashlib
import importlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from strata import store
from strata.jobs.spec import format_error
from strata.pipeline.errors import SpecError
from strata.pipeline.hooks import match_hooks
from strata.store.commit import artifacts
from strata.store.core import Store
from strata.store.datasets.state import DatasetState
from strata.store.errors import StoreNotFoundError
from strata.store.layout import check_name

_SAMPLE_HEX = "0123456789abcdef0123456789abcdef01234567"

Policy = Literal["retrain", "keep", "recompute"]
Ref = tuple[str, str]  # (artifact kind, name): ("dataset", "tiny"), ("sae", "tsae"), ...


@dataclass(frozen=True)
class JobKind:
    """One kind of job. Subclasses give :meth:`io`, :meth:`plan` and :meth:`run`."""

    name: str
    spec_path: str  # "module:Class" of the spec type
    entry: str  # module run as `python -m ENTRY SPEC.yaml`
    path_keys: tuple[str, ...]  # dotted spec keys holding local paths (resolved before a submission)
    signature: tuple[str, ...]  # top-level keys that only this kind's specs have
    policy: Policy | None = None  # reprocess's default `on_change`; None: the kind is always incremental

    def spec_type(self) -> type[BaseModel] | None:
        module, _, cls = self.spec_path.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            return None  # a kind whose code is not installed here

    def validate(self, raw: dict[str, Any], where: str) -> Any:
        """``raw`` as this kind's spec; a bad key or value is a :class:`SpecError` naming ``where``."""
        spec_type = self.spec_type()
        if spec_type is None:
            raise SpecError(f"{where}: the code of {self.name} jobs ({self.spec_path}) is not installed here")
        try:
            return spec_type.model_validate(raw)
        except ValidationError as e:
            raise SpecError(f"{where}: " + "; ".join(format_error(x, spec_type) for x in e.errors())) from None

    def io(self, spec: Any) -> tuple[set[Ref], set[Ref]]:
        """(what a job of this spec writes, what it reads). A stem an SAE job writes (``sae``,
        ``name``) provides every SAE named ``name.…``."""
        raise NotImplementedError(f"job kind {self.name!r} does not say what it reads and writes")

    def provides(self, written: Ref, need: Ref) -> bool:
        """Whether an output this kind writes (one of :meth:`io`'s) is what a job ``need``s
        (by default the same reference)."""
        return written == need

    def plan(self, state: PlanState, job: Job, ctx: PlanContext) -> Step:
        """What the job must do so the store holds its outputs, and why (reads only). Records in
        ``state`` what the store will hold after it, for the jobs that read its outputs."""
        raise NotImplementedError(f"job kind {self.name!r} has no plan")

    def prepare(self, step: Step) -> None:
        """What runs before the job, in this process even when it is submitted (nothing by default)."""

    def run(self, spec: Any) -> None:
        """Run a job of this spec here, printing its outcome in a line or a few."""
        raise NotImplementedError(f"job kind {self.name!r} cannot run here")

    def needs_ray(self, spec: Any) -> bool:
        """Whether running it here starts (or joins) Ray, so reprocess shares one among its jobs."""
        return False



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

    def updated(self, **changes: Any) -> Any:
        """The job's spec with top-level ``changes``, validated like the spec file itself."""
        return self.kind.validate({**self.raw, **changes}, self.entry)


@dataclass(frozen=True)
class PlanContext:
    """The pipeline's rules that plans apply."""

    path: str  # the pipeline file
    version_pattern: str  # a dataset's new version when its model revision moves: {name}, {revision}
    retrain_pattern: str  # an SAE, feature table or analysis on changed inputs: {name}, {version}


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

    def spec(self) -> Any:
        """The spec the step runs: the job's, with the plan's overrides, validated."""
        return self.job.updated(**self.overrides)


@dataclass(frozen=True)
class SAERef:
    """An SAE as a later job reads it."""

    name: str  # the SAE's name in the store (a new version's name, when retrained)
    dataset: str
    hook: str
    trains: bool = False  # trained by this run
    version: str | None = None  # the version suffix's value, when retrained under a new name


class NoStore:
    """Stands for a store that does not exist yet (a pipeline's first run): it holds nothing."""

    uri = "(a new store)"

    def datasets(self) -> list[str]:
        return []


def store_holds(s: Store | None, kind: str, name: str) -> bool:
    """Whether the store holds an artifact of that kind and name (kinds it does not know: no)."""
    if s is None:
        return False
    listing = {"dataset": s.datasets, "sae": s.saes, "features": s.feature_tables, "analysis": s.analyses}.get(kind)
    return listing is not None and name in listing()


class PlanState:
    """The store as this run will leave it, built up job by job in dependency order."""

    def __init__(self, s: Store | None) -> None:
        self.s = s
        self.current: dict[str, str] = {}  # the name a spec reads -> the version this run makes current
        self._datasets: dict[str, DatasetState] = {}
        self._gained: dict[str, dict[str | None, set[int]]] = {}  # dataset -> hook -> units this run adds
        self.saes: dict[str, SAERef] = {}  # the name a spec reads -> the SAE it gets

    def dataset(self, name: str, *, actual: bool = False) -> DatasetState:
        """The state of the dataset a spec names (its current version), or with ``actual`` of the
        dataset of that very name (an SAE's lineage names one)."""
        actual_name = name if actual else self.current.get(name, name)
        if actual_name not in self._datasets:
            if self.s is None or actual_name not in self.s.datasets():
                raise SpecError(f"no job of the pipeline writes dataset {name!r}, and the store holds no dataset of that name")
            self._datasets[actual_name] = self.s.dataset_state(actual_name)
        return self._datasets[actual_name]

    def add_dataset(self, base: str, state: DatasetState, gained: Mapping[str | None, set[int]]) -> None:
        """Record that this run makes ``state`` the current version of ``base``, adding ``gained``."""
        self.current[base] = state.name
        self._datasets[state.name] = state
        self._gained[state.name] = {h: set(us) for h, us in gained.items()}

    def gained(self, name: str, hook: str | None) -> set[int]:
        """Units this run adds to one hook of dataset ``name`` (by its actual name)."""
        return set(self._gained.get(name, {}).get(hook, set()))

    def gains(self, ds: DatasetState, patterns: Sequence[str]) -> set[int]:
        """Units this run adds to any hook of ``ds`` matching ``patterns``."""
        hooks = match_hooks(patterns, ds.hooks, skip_missing=True)
        return set().union(*(self.gained(ds.name, h) for h in hooks))

    def sae(self, name: str) -> SAERef:
        if name not in self.saes:
            if self.s is None or name not in self.s.saes():
                trained = f" (its jobs train {names(sorted(self.saes), 6)})" if self.saes else ""
                raise SpecError(f"no job of the pipeline trains SAE {name!r}{trained}, and the store holds no SAE of that name")
            lin = self.s.sae(name).lineage
            self.saes[name] = SAERef(name, str(lin.get("dataset")), str(lin.get("hook")))
        return self.saes[name]

    def add_sae(self, spec_name: str, ref: SAERef) -> None:
        """Record the SAE a spec naming ``spec_name`` reads after this run."""
        self.saes[spec_name] = ref

    def artifact(self, kind: str, name: str) -> artifacts.Artifact | None:
        """The committed artifact (SAE, analysis) of that kind and name, or None."""
        return None if self.s is None else artifacts.get(self.s.storage, kind, name)


def names(items: Sequence[str], most: int = 3) -> str:
    """``a, b, c (+2 more)``."""
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")


def revision_value(revision: str) -> str:
    """What ``{revision}`` means in a pattern: the commit hash, or a local folder's content hash."""
    return revision.split(":", 1)[-1]


def version_hash(lines: Sequence[str]) -> str:
    """8 hex digits naming a new version made of ``lines``."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]


def retrained_name(ctx: PlanContext, name: str, version: str, *, what: str = "dataset") -> str:
    """``retrain_pattern`` applied: the name of a result made again on changed inputs."""
    return check_name(ctx.retrain_pattern.format(name=name, version=version), what=what)


def rewrite(d: Any, datasets: Mapping[str, str], saes: Mapping[str, str]) -> Any:
    """A spec section (plain JSON) reading the current versions of its datasets and SAEs."""
    if isinstance(d, dict):
        return {k: (datasets.get(v, v) if k == "dataset" else saes.get(v, v) if k == "sae" else rewrite(v, datasets, saes))
                for k, v in d.items()}
    if isinstance(d, list):
        return [rewrite(v, datasets, saes) for v in d]
    return d


def renamed(datasets: Mapping[str, str], saes: Mapping[str, str]) -> list[str]:
    """The versions read in place of the names a spec gives."""
    return sorted(v for m in (datasets, saes) for k, v in m.items() if v != k)


def check_pattern(v: str, *, fields: tuple[str, ...], required: str) -> str:
    """A naming pattern checked: only ``fields``, ``required`` among them, and a valid name made."""
    try:
        used = {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        sample = v.format(**{k: "name" if k == "name" else _SAMPLE_HEX for k in fields})
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{v!r} is not a format pattern with the fields {', '.join(fields)} ({e})") from None
    if required not in used:
        raise ValueError(f"{v!r} must use {{{required}}}: without it every version would get one name")
    check_name(sample)
    return v


def open_store(uri: str, options: dict[str, Any] | None) -> Store | None:
    """The store at ``uri`` for reading, or None when there is none yet: planning never creates one."""
    try:
        return store.open(uri, storage_options=options, create=False)
    except StoreNotFoundError:
        return None


def lease_holder(s: Store | None, names: Sequence[str]) -> str | None:
    """The message of the first of these datasets whose write lease another job holds."""
    if s is None:
        return None
    for name in names:
        lease = s.lease(name)
        holder = lease.holder()
        if holder is not None:
            return lease.held_message(holder)
    return None
