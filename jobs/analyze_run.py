"""``strata analyze SPEC.yaml [--set key=value ...]``, also the entrypoint of a Ray job (the store
must then be an absolute path every node sees, or S3):

    ray job submit --working-dir . -- python -m jobs.analyze_run examples/analyze.yaml --set store=$PWD/acts

1. Every analysis is checked against the store before anything is computed or written (datasets,
   hooks, metrics, alignment, rows per metric, labels, SAEs, the model of a logit lens); the
   first problem is a one-line error, exit 2.
2. An analysis whose result is committed with the same identity (spec and inputs: datasets,
   fingerprints, committed units, SAEs) is unchanged: a no-op. One committed with another
   identity is refused (choose a new name), before anything runs.
3. The driver takes the write lease of every analysis left, up front: a run of the same name
   that holds it already refuses this one at once (one line naming the holder, exit 2). Under
   the leases the committed results are looked at again: one committed meanwhile is unchanged.
4. The rest are computed (partial moments as Ray tasks on the job's cluster: a private Ray
   unless ``compute.address`` names one) and committed one by one. The commit record holds the
   identity only; values and provenance live in the result's checked files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from strata import store
from strata.jobs.spec import load_spec
from strata.pipeline.executor import open_executor
from strata.store.analyses.handles import ANALYSES, AnalysisHandle
from strata.store.commit import artifacts
from strata.store.commit.artifacts import ArtifactExistsError
from strata.store.errors import LeaseHeldError, StrataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str
    status: str  # "written" | "unchanged"
    files: tuple[str, ...]


def check_committed(spec: object, s: object) -> tuple[list, list[Outcome], list]:
    """(analyses to compute, those committed with the same identity, all of them prepared), read
    from store ``s``; one committed with another identity raises. Reads only: the job and
    ``strata submit``'s pre-submit check (:mod:`jobs.checks`) refuse through this one function."""
    from strata.analysis.similarity.runner import prepare  # lazy: torch: CLI start-up

    prepared = prepare(spec, s)  # type: ignore[arg-type]
    return (*_split(s, prepared), prepared)


def _split(s: Any, prepared: list) -> tuple[list, list[Outcome]]:
    """(analyses still to compute, outcomes of those committed with the same identity)."""
    todo, out = [], []
    for p in prepared:
        done = _committed(s, p)
        if done is None:
            todo.append(p)
        else:
            out.append(done)
    return todo, out


def _committed(s: Any, p: Any) -> Outcome | None:
    """``unchanged`` when analysis ``p`` is committed with its identity, None when it is not
    committed; committed with another identity raises. The identity is read from the result's
    checked ``provenance.json`` (:attr:`~store.analyses.handles.AnalysisHandle.meta`), never from an
    unchecked copy."""

    if artifacts.get(s.storage, ANALYSES, p.name) is None:
        return None
    h = AnalysisHandle(s, p.name)
    old = {k: h.meta.get(k) for k in ("kind", "spec", "inputs")}
    if old != p.identity:
        what = "spec" if old.get("spec") != p.identity["spec"] else "inputs (datasets, their committed units or SAEs)"
        raise ArtifactExistsError(
            f"analysis {p.name!r} is committed already with another {what}; choose a new `name` "
            f"(or inspect it: strata analyze show {s.uri} {p.name})"
        )
    return Outcome(p.name, p.spec.kind, "unchanged", tuple(h.files))


def run_analyze(spec: object) -> list[Outcome]:
    """Run an :class:`~analysis.similarity.spec.AnalyzeSpec` (see the module docstring)."""
    from strata.pipeline.extract import check_store_path  # lazy: torch: CLI start-up

    check_store_path(spec)  # type: ignore[arg-type]
    s = store.open(spec.store, storage_options=spec.storage_options, create=False)  # type: ignore[attr-defined]
    todo, out, prepared = check_committed(spec, s)
    if not todo:
        return out
    with ExitStack() as stack:
        leases = _leases(s, [p.name for p in todo], stack)
        # Checked again under the leases: a job that committed between our check and our lease
        # left its result there, and computing it a second time would only say "written" twice.
        again, found = _split(s, todo)
        out.extend(found)
        if again:
            with open_executor(spec.compute.executor, spec.compute.address) as ex:  # type: ignore[attr-defined]
                for p in again:
                    log.info("analysis %r (%s): computing", p.name, p.spec.kind)
                    files, _ = p.compute(ex)
                    # The record's meta is the identity alone (the record is checksummed); results
                    # and provenance live in the result's checked files (provenance.json).
                    art = artifacts.put(s.storage, ANALYSES, p.name, files, meta=p.identity, lease=leases[p.name])
                    out.append(Outcome(p.name, p.spec.kind, "written", tuple(art.files)))
    order = {p.name: i for i, p in enumerate(prepared)}
    return sorted(out, key=lambda o: order[o.name])


def _leases(s: Any, names: list[str], stack: ExitStack) -> dict[str, Any]:
    """Take the write lease of every analysis to compute, up front, as ``sae train`` does: a
    second run of the same names is refused at once, naming the holder, before anything is
    computed or a cluster started."""

    leases = {n: s.artifact_lease(ANALYSES, n, owner=f"strata analyze {n}") for n in names}
    for lease in leases.values():  # read-only first: refused before any lease is taken
        holder = lease.holder()
        if holder is not None:
            raise LeaseHeldError(lease.held_message(holder))
    for lease in leases.values():  # two runs that pass the check together: one takes it, the other is refused
        stack.enter_context(lease)
    return leases


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata analyze", description="Run the analyses of a spec and commit their results to the store.")
    p.add_argument("spec", help="an analysis spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. compute.tasks=4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (as `strata submit` runs it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from strata.analysis.similarity.spec import AnalyzeSpec  # lazy: torch: CLI start-up

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = load_spec(AnalyzeSpec, args.spec, args.set)
        outcomes = run_analyze(spec)
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    for o in outcomes:
        what = "unchanged (committed with the same inputs)" if o.status == "unchanged" else "written"
        print(f"analysis {o.name} ({o.kind}): {what}: {', '.join(o.files)}")
    print(f"read them with: store.open({spec.store!r}).analysis(NAME).table(), or `strata analyze show {spec.store} NAME`")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
