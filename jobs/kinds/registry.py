"""The registry of job kinds. A kind (:class:`~strata.jobs.kinds.planning.JobKind`) is a spec
type, a Ray-job entrypoint, the spec keys that hold local paths, and what ``strata reprocess`` asks
of it: what a job reads and writes, its plan against the store, and its run. A spec file says which
kind it is by the keys it has: the first registered kind whose spec validates it.

A kind is one module that subclasses ``JobKind`` and calls :func:`register`; ``detect``,
``strata submit`` and ``strata reprocess`` find it here. (``JobKind`` lives in ``planning`` with
the plan records its methods take, so the two modules import one way only.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from strata.jobs.kinds.planning import JobKind
from strata.jobs.spec import format_error, read_raw
from strata.pipeline.errors import SpecError

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
