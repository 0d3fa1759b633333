"""The analysis write path: two runs of one analysis name on one store compute and write it
exactly once (issue 16.12); every value an analysis shows comes from a checked file, and a flipped
value in its commit record is caught or never read (issue 16.6). Real runs of `run_analyze` on
the session Ray, racing in two threads; the only instrumentation wraps the real
`check_committed` and `compute` to hold one run at a chosen point and count computations."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from strata import store
from strata.analysis.features.synthetic import synthetic_dataset
from strata.analysis.similarity import runner
from strata.analysis.similarity.spec import AnalyzeSpec
from strata.jobs import analyze_run
from strata.jobs.analyze_run import run_analyze
from strata.jobs.cli import main
from strata.store.errors import CorruptionError, LeaseHeldError

pytestmark = pytest.mark.ray

H = "blocks.0.hook_resid_post"


def _setup(tmp_path: Path) -> AnalyzeSpec:
    s = store.open(tmp_path / "acts")
    synthetic_dataset(s, "a", hook=H, d=8, units=2, seed=0)
    return AnalyzeSpec(store=str(tmp_path / "acts"), compute={"tasks": 1},
                       analyses=[{"kind": "compare", "name": "cmp", "a": {"dataset": "a", "hook": H}, "b": {"dataset": "a", "hook": H},
                                  "metrics": ["linear_cka"]}])


class _Counted:
    """Counts real computations of each analysis (and can hold one thread inside one)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        self.computing = threading.Event()
        self.release = threading.Event()
        self.hold: str | None = None
        real = runner.Prepared.compute

        def compute(p, ex):
            self.calls.append(threading.current_thread().name)
            if threading.current_thread().name == self.hold:
                self.computing.set()
                assert self.release.wait(120)
            return real(p, ex)

        monkeypatch.setattr(runner.Prepared, "compute", compute)


def _in_thread(name: str, spec: AnalyzeSpec, results: dict) -> threading.Thread:
    def go() -> None:
        try:
            results[name] = run_analyze(spec)
        except BaseException as e:  # handed to the test
            results[name] = e

    t = threading.Thread(target=go, name=name)
    t.start()
    return t


def test_a_second_run_while_the_first_computes_is_refused_naming_the_holder(tmp_path, ray_session, monkeypatch):
    spec = _setup(tmp_path)
    c = _Counted(monkeypatch)
    c.hold = "first"
    results: dict = {}
    t = _in_thread("first", spec, results)
    try:
        assert c.computing.wait(120)
        with pytest.raises(LeaseHeldError, match=r"analyses 'cmp' is being written by another job \(strata analyze cmp, pid \d+"):
            run_analyze(spec)
    finally:
        c.release.set()
        t.join(120)
    assert [o.status for o in results["first"]] == ["written"]
    assert c.calls == ["first"]  # the refused run computed nothing
    assert [o.status for o in run_analyze(spec)] == ["unchanged"] and c.calls == ["first"]


def test_a_run_that_checked_before_the_other_committed_finds_the_result_unchanged(tmp_path, ray_session, monkeypatch):
    """The race of the issue: B looked (nothing committed), A computed and committed, then B
    went on. B must not compute again and say "written" a second time."""
    spec = _setup(tmp_path)
    c = _Counted(monkeypatch)
    b_checked, a_done = threading.Event(), threading.Event()
    real_check = analyze_run.check_committed

    def check_committed(spec_, s):
        out = real_check(spec_, s)  # B finds nothing committed, then waits here for A
        if threading.current_thread().name == "B":
            b_checked.set()
            assert a_done.wait(120)
        return out

    monkeypatch.setattr(analyze_run, "check_committed", check_committed)
    results: dict = {}
    t = _in_thread("B", spec, results)
    try:
        assert b_checked.wait(120)
        a = run_analyze(spec)
    finally:
        a_done.set()
        t.join(120)
    assert [o.status for o in a] == ["written"]
    assert not isinstance(results["B"], BaseException), results["B"]
    assert [o.status for o in results["B"]] == ["unchanged"]
    assert c.calls == ["MainThread"]  # computed exactly once


def _record(root: Path) -> Path:
    return root / "analyses" / "cmp" / "commit.json"


def test_values_come_from_checked_files_and_a_flip_in_the_record_is_caught_or_unread(tmp_path, ray_session, capsys):
    spec = _setup(tmp_path)
    root = tmp_path / "acts"
    assert [o.status for o in run_analyze(spec)] == ["written"]
    s = store.open(root, create=False)
    cka = {r["metric"]: r["value"] for r in s.analysis("cmp").table().to_pylist()}["linear_cka"]
    assert cka == pytest.approx(1.0, abs=1e-9)  # a hook against itself
    rec = json.loads(_record(root).read_text())
    meta = rec["extra"]["meta"]
    assert set(meta) == {"kind", "spec", "inputs"}  # identity only: no results, no provenance in the record
    assert s.analysis("cmp").meta["provenance"]["values"]["linear_cka"] == cka  # from provenance.json, checked

    # A new record: any flipped value in it is a CorruptionError on read.
    flipped = json.loads(_record(root).read_text())
    flipped["extra"]["meta"]["inputs"][0]["units"] = [0]
    _record(root).write_text(json.dumps(flipped))
    with pytest.raises(CorruptionError, match="commit.json"):
        store.open(root, create=False).analysis("cmp")
    capsys.readouterr()  # the run's own log lines, when an earlier test left INFO logging on
    assert main(["analyze", "show", str(root), "cmp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata: error: ") and err.count("\n") == 1, err
    assert main(["verify", str(root)]) != 0  # verify no longer says OK
    assert "analyses/cmp/commit.json" in capsys.readouterr().out

    # A record as the old code wrote it (no checksum, the provenance and the results again in
    # `meta`), with a flipped linear_cka there: nobody reads it.
    old = dict(rec)
    old.pop("checksum", None)
    old_meta = json.loads((root / "analyses" / "cmp" / "provenance.json").read_text())
    old_meta["provenance"]["values"]["linear_cka"] = -0.5
    old["extra"] = {**rec["extra"], "meta": old_meta}
    _record(root).write_text(json.dumps(old))
    h = store.open(root, create=False).analysis("cmp")
    assert h.meta["provenance"]["values"]["linear_cka"] == cka
    capsys.readouterr()
    assert main(["analyze", "show", str(root), "cmp", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance"]["values"]["linear_cka"] == cka and shown["results"]["head"][0]["value"] == cka
    assert [o.status for o in run_analyze(spec)] == ["unchanged"]  # the identity, read from the checked file, still matches

    # The checked file itself flipped: refused on read, by show and by a rerun.
    prov = root / "analyses" / "cmp" / "provenance.json"
    prov.write_bytes(prov.read_bytes().replace(b'"linear_cka": 1', b'"linear_cka": 7', 1))
    with pytest.raises(CorruptionError, match="provenance.json"):
        _ = store.open(root, create=False).analysis("cmp").meta  # reading it checks the file
    with pytest.raises(CorruptionError, match="provenance.json"):
        run_analyze(spec)
