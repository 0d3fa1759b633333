"""`strata gc` collects what dead attempts left, never a committed file; `strata rm` deletes,
refused while a job holds the lease."""

from __future__ import annotations

import os
import time

from _data import UNIT_CONTEXTS, make_dataset, token_table

from strata.jobs.cli import main
from strata.store import layout
from strata.store.commit import artifacts
from strata.store.lifecycle import gc

H = "blocks.0.hook_resid_post"


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_gc_collects_leftovers_only_after_the_grace_period(tmp_path, capsys):
    s, data = make_dataset(tmp_path, num_units=3, write=False)
    w = s.writer("ds")
    for u in (0, 1):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=data[u])
    # What crashed attempts leave: a lost token file, a shard with no commit, a temp file, an
    # uncommitted artifact folder.
    lost = tmp_path / layout.tokens_key("ds", 1, "deadbeef0001")
    lost.write_bytes(b"a token table of a losing attempt")
    orphan = tmp_path / layout.shard_key("ds", H, 2)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a shard")
    tmp = tmp_path / "datasets" / "ds" / "tokens" / ".x.partial"
    tmp.write_bytes(b"partial")
    (tmp_path / "saes" / "never").mkdir(parents=True)
    (tmp_path / "saes" / "never" / "cfg.json").write_bytes(b"{}")
    committed = {str(p) for p in tmp_path.rglob("*") if p.is_file()} - {str(lost), str(orphan), str(tmp), str(tmp_path / "saes/never/cfg.json")}

    assert gc.collect(s).garbage == []  # all of it younger than the grace period
    for p in tmp_path.rglob("*"):
        if p.is_file():
            _age(p, 7200)
    report = gc.collect(s)
    found = {g.key for g in report.garbage}
    assert found == {str(p.relative_to(tmp_path)) for p in (lost, orphan, tmp, tmp_path / "saes/never/cfg.json")}, found
    assert main(["gc", str(tmp_path)]) == 0 and "would delete 4 file(s)" in capsys.readouterr().out
    assert lost.exists()  # listing deletes nothing
    assert main(["gc", str(tmp_path), "--apply"]) == 0 and "deleted 4" in capsys.readouterr().out
    assert not any(p.exists() for p in (lost, orphan, tmp))
    assert {str(p) for p in tmp_path.rglob("*") if p.is_file()} >= committed  # every committed file is still there
    assert s.dataset("ds").verify(committed_only=True).ok
    s.writer("ds").write_unit(2, tokens=token_table(2, UNIT_CONTEXTS), acts=data[2])  # the unit is written anew
    assert s.dataset("ds").verify().ok


def test_gc_leaves_a_dataset_alone_while_a_job_holds_its_lease(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=1, write=False)
    junk = tmp_path / layout.tokens_key("ds", 0, "deadbeef0002")
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"x")
    _age(junk, 7200)
    with s.lease("ds", owner="a job"):
        report = gc.collect(s)
        assert report.garbage == []
        assert [(w.prefix, w.live) for w in report.in_progress] == [("datasets/ds", True)] and "a job" in report.in_progress[0].state
    assert [g.key for g in gc.collect(s).garbage] == [str(junk.relative_to(tmp_path))]


def test_rm_asks_refuses_while_leased_and_deletes(tmp_path, capsys, monkeypatch):
    s, _ = make_dataset(tmp_path, num_units=2)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["rm", str(tmp_path), "ds"]) == 2 and "pass --yes" in capsys.readouterr().err
    with s.lease("ds", owner="busy job"):
        assert main(["rm", str(tmp_path), "ds", "--yes"]) == 2 and "busy job" in capsys.readouterr().err
    assert s.datasets() == ["ds"]
    assert main(["rm", str(tmp_path), "ds", "--yes"]) == 0
    assert s.datasets() == [] and not list((tmp_path / "datasets" / "ds" / "acts").rglob("c/*/0"))
    for argv in (["rm", str(tmp_path), "nope", "--yes"], ["gc", str(tmp_path / "missing")], ["rm", str(tmp_path / "missing"), "x", "--yes"]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "missing").exists()
    with s.artifact_lease("saes", "one") as lease:
        artifacts.put(s.storage, "saes", "one", {"cfg.json": b"{}"}, lease=lease)
    assert main(["rm", str(tmp_path), "one", "--kind", "sae", "--yes"]) == 0 and s.saes() == []
