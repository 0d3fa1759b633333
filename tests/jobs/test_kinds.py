"""Job kinds own their planning: a kind registered in one module (here, a tiny "note" kind that
records how many units of a dataset are committed) is detected, ordered, planned against the
store's dataset state and run by `strata reprocess`, with no change to jobs/reprocess.py."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from strata import store
from strata.jobs import kinds
from strata.jobs.cli import main
from strata.jobs.kinds import JobKind, Ref, register, unregister
from strata.jobs.kinds.planning import Job, PlanContext, PlanState, Step
from strata.jobs.reprocess import load_pipeline
from tests.jobs._small_store import CTX, UNIT_CONTEXTS, H, tokens

D = 16


class NoteSpec(BaseModel):
    """Write ``notes/NOTE.json`` in the store: dataset ``dataset``'s committed units of hook
    ``hook`` (and the note ``after`` names, which must come first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    store: str
    storage_options: dict[str, Any] | None = None
    note: str
    dataset: str
    hook: str
    after: str | None = None


def _path(spec: NoteSpec, name: str) -> Path:
    return Path(spec.store) / "notes" / f"{name}.json"


class NoteKind(JobKind):
    def spec_type(self) -> type[BaseModel]:
        return NoteSpec

    def io(self, spec: Any) -> tuple[set[Ref], set[Ref]]:
        return {("note", spec.note)}, {("dataset", spec.dataset)} | ({("note", spec.after)} if spec.after else set())

    def plan(self, state: PlanState, job: Job, ctx: PlanContext) -> Step:
        ds = state.dataset(job.spec.dataset)  # a DatasetState: metadata, never activations
        units = ds.committed_units(job.spec.hook)
        p = _path(job.spec, job.spec.note)
        step = Step(job, f"note {job.spec.note}")
        old = json.loads(p.read_text())["units"] if p.exists() else None
        if old != units:
            step.run, step.missing = True, f"note of {len(units)} unit(s)"
            step.why = "new note" if old is None else f"dataset {ds.name} has {len(units)} unit(s), the note says {len(old)}"
        return step

    def run(self, spec: Any) -> None:
        if spec.after is not None and not _path(spec, spec.after).exists():
            raise AssertionError(f"note {spec.after} must be written before note {spec.note}")
        units = store.open(spec.store, create=False).dataset(spec.dataset).committed_units(spec.hook)
        _path(spec, spec.note).parent.mkdir(exist_ok=True)
        _path(spec, spec.note).write_text(json.dumps({"units": units}))
        print(f"note {spec.note}: {len(units)} unit(s)")


@pytest.fixture()
def note_kind():
    kind = register(NoteKind("note", "tests.jobs.test_kinds:NoteSpec", "-", ("store",), ("note",)))
    try:
        yield kind
    finally:
        unregister("note")


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A store with dataset `tiny` (3 of 5 units of hook H committed) and a pipeline of two notes,
    listed against their dependency order."""
    monkeypatch.chdir(tmp_path)
    s = store.open(tmp_path / "acts")
    w = s.create_dataset("tiny", hooks={H: D}, context_size=CTX, dtype="float32", num_units=5, unit_contexts=UNIT_CONTEXTS,
                         meta={"model": "no-such-model", "revision": "r0"})
    for u in range(3):
        w.write_unit(u, tokens=tokens(u), acts={H: [[0.5] * D] * (UNIT_CONTEXTS * CTX)})
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"store": "acts", "note": "b", "dataset": "tiny", "hook": H, "after": "a"}))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"store": "acts", "note": "a", "dataset": "tiny", "hook": H}))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"store": "./acts", "jobs": ["b.yaml", "a.yaml"]}))
    return tmp_path, w


def test_a_registered_kind_is_planned_and_run_by_reprocess(note_kind, project):
    root, w = project
    assert [k.name for k in kinds.KINDS][-1] == "note"
    p = load_pipeline("pipeline.yaml")
    assert [(j.entry, j.kind.name) for j in p.jobs] == [("a.yaml", "note"), ("b.yaml", "note")]  # b reads a's note

    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    assert "note a: 3 unit(s)" in out and "note b: 3 unit(s)" in out and "done: 2 job(s)" in out
    assert json.loads((root / "acts/notes/b.json").read_text()) == {"units": [0, 1, 2]}

    rc, out, _ = cli("reprocess", "pipeline.yaml")
    assert rc == 0 and "nothing to do" in out

    w.write_unit(3, tokens=tokens(3), acts={H: [[0.5] * D] * (UNIT_CONTEXTS * CTX)})
    rc, out, _ = cli("reprocess", "pipeline.yaml", "--dry-run")
    assert rc == 0 and "dataset tiny has 4 unit(s), the note says 3" in out and "2 job(s) would run" in out
    rc, out, _ = cli("reprocess", "pipeline.yaml")
    assert rc == 0 and json.loads((root / "acts/notes/a.json").read_text()) == {"units": [0, 1, 2, 3]}


def test_a_kinds_inputs_are_checked_before_any_work(note_kind, project):
    root, _ = project
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"store": "./acts", "jobs": ["b.yaml"]}))
    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 2 and out == "" and "b.yaml reads note 'a', which no job of the pipeline writes" in err
    assert not (root / "acts/notes").exists()


def test_without_the_kind_its_specs_are_not_jobs(project):
    rc, out, err = cli("reprocess", "pipeline.yaml", "--dry-run")
    assert rc == 2 and "not a valid job spec of any kind" in err and "note" not in [k.name for k in kinds.KINDS]
