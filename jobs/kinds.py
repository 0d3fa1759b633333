"""The kinds of Strata jobs: each with its spec type, its Ray-job entrypoint and the spec keys
that hold local paths. A spec file says which kind it is by the keys it has: the first kind
whose spec validates it."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from strata.jobs.spec import format_error, read_raw
from strata.pipeline.errors import SpecError


@dataclass(frozen=True)
class JobKind:
    name: str
    spec_path: str  # "module:Class" of the spec type
    entry: str  # module run as `python -m ENTRY SPEC.yaml`
    path_keys: tuple[str, ...]  # dotted spec keys holding local paths (resolved before a submission)
    signature: tuple[str, ...]  # top-level keys that only this kind's specs have

    def spec_type(self) -> type[BaseModel] | None:
        module, _, cls = self.spec_path.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            return None  # a kind whose code is not installed here


KINDS = (
    JobKind("extract", "strata.pipeline.config:ExtractSpec", "strata.jobs.extract", ("store", "corpus.path", "model.id"), ("model", "corpus")),
    JobKind("sae", "strata.analysis.sae.config:SAETrainSpec", "strata.jobs.sae_train", ("store",), ("architecture",)),
    JobKind("features", "strata.pipeline.encode:EncodeSpec", "strata.jobs.features_encode", ("store",), ("sae",)),
    JobKind("analysis", "strata.analysis.similarity.spec:AnalyzeSpec", "strata.jobs.analyze_run", ("store",), ("analyses",)),
)


def detect(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[JobKind, BaseModel, dict[str, Any]]:
    """The kind of a spec file, its validated spec, and its raw mapping (overrides applied)."""
    raw = read_raw(path, overrides)
    candidates = [k for k in KINDS if all(key in raw for key in k.signature)] or list(KINDS)
    errors: list[str] = []
    for kind in candidates:
        spec_type = kind.spec_type()
        if spec_type is None:
            continue
        try:
            return kind, spec_type.model_validate(raw), raw
        except ValidationError as e:
            errors.append(f"as a {kind.name} spec: " + "; ".join(format_error(x, spec_type) for x in e.errors()))
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
