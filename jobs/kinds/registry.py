"""The registry of job kinds. A kind is a spec type, a Ray-job entrypoint, the spec keys that hold
local paths, and what ``strata reprocess`` asks of it: what a job reads and writes, its plan
against the store, and its run. A spec file says which kind it is by the keys it has: the first
registered kind whose spec validates it.

A kind is one module that subclasses :class:`JobKind` and calls :func:`register`; ``detect``,
``strata submit`` and ``strata reprocess`` find it here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from strata.jobs.spec import format_error, read_raw
from strata.pipeline.errors import SpecError

if TYPE_CHECKING:  # type only: planning imports the registry's JobKind for its Job record
    from strata.jobs.kinds.planning import Job, PlanContext, PlanState, Step

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


KINDS: list[JobKind] = []


def register(kind: JobKind) -> JobKind:
    """Add ``kind`` (replacing a kind of its name, keeping its place); returns it."""
    for i, k in enumerate(KINDS):
        if k.name == kind.name:
            KINDS[i] = kind
            return kind
    KINDS.append(kind)
    return kind


def unregister(name: str) -> None:
    """Remove the kind of that name (a test's own kind, say); unknown names are ignored."""
    KINDS[:] = [k for k in KINDS if k.name != name]


def kind(name: str) -> JobKind:
    """The registered kind of that name."""
    for k in KINDS:
        if k.name == name:
            return k
    raise SpecError(f"no job kind {name!r}; the kinds are {', '.join(k.name for k in KINDS)}")


def detect(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[JobKind, BaseModel, dict[str, Any]]:
    """The kind of a spec file, its validated spec, and its raw mapping (overrides applied)."""
    raw = read_raw(path, overrides)
    candidates = [k for k in KINDS if all(key in raw for key in k.signature)] or list(KINDS)
    errors: list[str] = []
    for k in candidates:
        spec_type = k.spec_type()
        if spec_type is None:
            continue
        try:
            return k, spec_type.model_validate(raw), raw
        except ValidationError as e:
            errors.append(f"as a {k.name} spec: " + "; ".join(format_error(x, spec_type) for x in e.errors()))
    names = ", ".join(f"{k.name} (keys {', '.join(k.signature)})" for k in KINDS)
    detail = errors[0] if len(errors) == 1 else ("; ".join(errors) if errors else "no job kind's code is installed")
    raise SpecError(f"{path}: not a valid job spec of any kind ({names}): {detail}")


def _get(raw: dict[str, Any], dotted: str) -> Any:
    cur: Any = raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = raw
    for part in parts[:-1]:
        cur = cur[part]
    cur[parts[-1]] = value


def localize(kind: JobKind, raw: dict[str, Any], *, base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The spec with its relative local paths made absolute (against ``base``, the submitter's
    working directory): a job on a cluster runs elsewhere. Hub ids and URIs are left alone."""
    out = _copy(raw)
    root = Path(base or os.getcwd())
    for key in kind.path_keys:
        v = _get(out, key)
        if not isinstance(v, str) or "://" in v or os.path.isabs(os.path.expanduser(v)):
            continue
        candidate = Path(os.path.abspath(root / os.path.expanduser(v)))  # absolute, links kept as the user named them
        if key == "model.id" and not candidate.exists():
            continue  # a hub id such as gpt2 or EleutherAI/pythia-70m
        _put(out, key, str(candidate))
    return out


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x
