"""Committed artifact folders (SAEs, analysis results): whole or invisible, checked on read,
written under a lease, never overwritten with other contents."""

from __future__ import annotations

import json

import pytest

from strata import store
from strata.store.commit import artifacts, sealed

FILES = {"cfg.json": b'{"d_in": 4}', "weights.bin": bytes(range(256)) * 100, "sub/notes.txt": b"hello"}


def _put(s, name="a", files=FILES, meta=None, kind="saes"):
    with s.artifact_lease(kind, name) as lease:
        return artifacts.put(s.storage, kind, name, files, meta=meta or {"k": 1}, lease=lease)


def test_put_then_read_list_and_rerun(tmp_path):
    s = store.open(tmp_path)
    art = _put(s)
    assert sorted(art.files) == sorted(FILES) and art.meta == {"k": 1}
    assert s.saes() == ["a"] and artifacts.names(s.storage, "analyses") == []
    got = artifacts.get(s.storage, "saes", "a")
    assert got.read("weights.bin") == FILES["weights.bin"] and got.read_json("cfg.json") == {"d_in": 4}
    assert (got.local_path() / "sub" / "notes.txt").read_bytes() == b"hello"  # the folder itself, checked
    assert _put(s).record == art.record  # the same contents: a no-op
    with pytest.raises(store.ArtifactExistsError, match="committed already with other contents"):
        _put(s, meta={"k": 2})
    with pytest.raises(store.ArtifactExistsError):
        _put(s, files={**FILES, "cfg.json": b"{}"})


def test_invisible_until_committed_and_a_crashed_attempt_is_overwritten(tmp_path):
    s = store.open(tmp_path)
    (tmp_path / "saes" / "b").mkdir(parents=True)
    (tmp_path / "saes" / "b" / "cfg.json").write_bytes(b"half written by a crashed job")
    assert s.saes() == [] and artifacts.get(s.storage, "saes", "b") is None
    with pytest.raises(store.ArtifactNotFoundError, match="no SAE 'b'"):
        s.sae("b")
    _put(s, "b")
    assert artifacts.get(s.storage, "saes", "b").read("cfg.json") == FILES["cfg.json"]


def test_damaged_files_and_forged_records_raise(tmp_path):
    s = store.open(tmp_path)
    _put(s)
    p = tmp_path / "saes" / "a" / "weights.bin"
    raw = bytearray(p.read_bytes())
    raw[7] ^= 1
    p.write_bytes(bytes(raw))
    art = artifacts.get(s.storage, "saes", "a")
    with pytest.raises(store.CorruptionError, match=r"saes 'a' \(saes/a/weights.bin\): checksum mismatch"):
        art.read("weights.bin")
    with pytest.raises(store.CorruptionError, match="weights.bin"):
        art.local_path()  # never hands a damaged folder to another tool
    assert artifacts.verify(s.storage, art) and art.read("cfg.json") == FILES["cfg.json"]
    rec = json.loads((tmp_path / "saes" / "a" / "commit.json").read_text())
    rec["files"][0]["key"] = "datasets/x/manifest.json"
    rec = sealed.seal({k: v for k, v in rec.items() if k != "checksum"})  # a forger recomputes the checksum
    (tmp_path / "saes" / "a" / "commit.json").write_text(json.dumps(rec))
    with pytest.raises(store.CorruptionError, match="outside what it may name"):
        artifacts.get(s.storage, "saes", "a")


def test_bad_names_and_a_lease_held_elsewhere(tmp_path):
    s = store.open(tmp_path)
    for bad in ("../x", "a/b", ""):
        with pytest.raises(store.InvalidNameError):
            _put(s, bad)
    with pytest.raises(ValueError, match="invalid artifact file name"):
        _put(s, "c", files={"../escape": b"x"})
    with pytest.raises(ValueError, match="invalid artifact file name"):
        _put(s, "c", files={"commit.json": b"x"})
    with s.artifact_lease("saes", "d", owner="job one"):
        with pytest.raises(store.LeaseHeldError, match="job one"):
            s.artifact_lease("saes", "d").acquire()


def test_delete(tmp_path):
    s = store.open(tmp_path)
    _put(s, "gone", kind="analyses")
    with s.artifact_lease("analyses", "gone") as lease:
        artifacts.delete(s.storage, "analyses", "gone", lease=lease)
    assert s.analyses() == [] and not (tmp_path / "analyses" / "gone" / "cfg.json").exists()


@pytest.mark.s3
def test_s3_artifacts_download_checked_into_a_cache(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    s = store.open(f"{s3_bucket}/st")
    _put(s)
    path = artifacts.get(s.storage, "saes", "a").local_path()
    assert path.is_relative_to(tmp_path / "cache") and (path / "weights.bin").read_bytes() == FILES["weights.bin"]
    assert artifacts.get(s.storage, "saes", "a").local_path() == path  # reused


def test_a_fence_lets_another_process_commit_for_the_holder_until_a_takeover(tmp_path):
    import pickle

    s = store.open(tmp_path)
    for name, taken_over in (("f", False), ("g", True)):
        lease = s.artifact_lease("saes", name, stale_after_s=60).acquire()
        try:
            fence = pickle.loads(pickle.dumps(lease.fence()))  # as a Ray task receives it
            if taken_over:  # another job's generation appears before the task commits
                (tmp_path / "saes" / name / "lease" / f"{lease.token + 1:012d}.json").write_text("{}")
                with pytest.raises(store.LeaseLostError, match="now at generation"):
                    artifacts.put(s.storage, "saes", name, FILES, meta={}, lease=fence)
            else:
                artifacts.put(s.storage, "saes", name, FILES, meta={}, lease=fence)
        finally:
            lease.release()
    assert s.saes() == ["f"]
