"""`strata submit` and `strata jobs` against a real cluster started with `ray start --head`
(the session fixture `ray_head`): the project ships with the job, relative paths are resolved,
no secret leaves the machine, a spec already running is not started twice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from strata import store
from strata.jobs.cli import main
from strata.jobs.submit import client, prepare
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl

pytestmark = pytest.mark.slow
SECRET = "strata-test-SECRET-never-submitted"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("m") / "gpt2", family="gpt2", layers=2, d_model=32, max_positions=128, vocab_size=400)


@pytest.fixture
def spec(tmp_path, model_dir, monkeypatch):
    """A spec with relative paths, as a user writes it in their project folder."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "corpus.jsonl", synthetic_docs(12, seed=2))
    os.symlink(model_dir, tmp_path / "model")
    raw = {
        "store": "./acts", "name": "sub", "model": {"id": "./model"}, "corpus": {"path": "corpus.jsonl"},
        "tokenize": {"context_size": 16}, "hooks": ["blocks.0.hook_resid_post"], "dtype": "float16",
        "compute": {"unit_contexts": 8}, "storage_options": {"key": "AKIA-x", "secret": SECRET, "endpoint_url": "http://127.0.0.1:9"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _status(c, job_id: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(getattr(c.get_job_status(job_id), "value", c.get_job_status(job_id)))
        if status not in ("PENDING", "RUNNING"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def test_prepare_resolves_paths_and_removes_secrets(spec, tmp_path):
    kind, raw, base, text = prepare(str(spec), [])
    assert kind.name == "extract" and kind.entry == "strata.jobs.extract"
    assert raw["store"] == str(tmp_path / "acts") and raw["corpus"]["path"] == str(tmp_path / "corpus.jsonl")
    assert raw["model"]["id"] == str(tmp_path / "model")
    assert raw["storage_options"] == {"endpoint_url": "http://127.0.0.1:9"} and SECRET not in text
    assert base.startswith("strata-extract-sub-") and prepare(str(spec), [])[2] == base  # content-derived
    assert prepare(str(spec), ["dtype=float32"])[2] != base


def test_submit_wait_then_resubmit_then_jobs_commands(ray_head, spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", ray_head["dashboard"])
    rc = main(["submit", str(spec), "--wait"])  # waits while a fresh head's job agent comes up
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0, (out[-3000:], cap.err[-3000:])
    assert "submitted strata-extract-sub-" in out and "computed" in out and "SUCCEEDED" in out
    job_id = out.split("submitted ", 1)[1].split()[0]
    ds = store.open(tmp_path / "acts", create=False).dataset("sub")  # the relative store, resolved on the submitter's side
    assert ds.is_complete and ds.verify().ok
    # Resubmitting the finished spec starts a new run (suffix -2), a no-op this time.
    assert main(["submit", str(spec), "--wait"]) == 0
    out = capsys.readouterr().out
    assert f"submitted {job_id}-2" in out and "nothing to do" in out
    # A spec still running is reported, not started again.
    c = client(None)
    assert main(["submit", str(spec), "--set", "hooks=[blocks.1.hook_resid_post]"]) == 0
    first = capsys.readouterr().out.split("submitted ", 1)[1].split()[0]
    assert main(["submit", str(spec), "--set", "hooks=[blocks.1.hook_resid_post]"]) == 0
    again = capsys.readouterr().out
    if _status(c, first) and "already running" in again:
        assert first in again
    else:  # it finished before the second call: then a second run was started, which is also right
        assert f"submitted {first}-2" in again
    assert main(["jobs", "ls"]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and f"{job_id}-2" in listing
    assert main(["jobs", "status", job_id]) == 0 and "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id]) == 0 and "computed" in capsys.readouterr().out
    # Nothing the cluster received holds the secret: not the runtime environment, not the spec.
    for j in c.list_jobs():
        if (j.submission_id or "").startswith("strata-extract-sub-"):
            assert SECRET not in json.dumps(j.runtime_env or {}) and SECRET not in (j.entrypoint or "")
            assert SECRET not in c.get_job_logs(j.submission_id)


def test_bad_submissions_are_one_line_and_start_nothing(ray_head, spec, tmp_path, capsys):
    for argv in (["submit", str(spec), "--address", "http://127.0.0.1:1"],
                 ["submit", str(tmp_path / "nope.yaml"), "--address", ray_head["dashboard"]],
                 ["submit", str(spec), "--set", "bogus=1", "--address", ray_head["dashboard"]], ["jobs", "ls", "--address", "http://127.0.0.1:1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("strata: error: ") and err.count("\n") == 1, err
    assert not (Path(tmp_path) / "acts").exists()
