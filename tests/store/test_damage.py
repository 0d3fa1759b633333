"""Damage every file of every artifact kind, one byte at a time: `strata verify` must report it
(exit 1, naming the file), only the damaged artifact may fail its check, and reads of it must
raise CorruptionError, never hand back other data and never raise anything else.

A few files are not read by Strata's own reads, and for them a read must give exactly the intact
data: the Zarr metadata (for other Zarr readers; Strata reads shards by its manifest) and the
commit index and commit records of a dataset (each has a checked copy in the other: readers use
the index, and fall back to the records when the index is damaged), and the Zarr shard index at
the end of each shard (Strata finds rows by the manifest; the shard index is for other readers)."""

from __future__ import annotations

from pathlib import Path

import _full_store as F
import pytest

from strata import store
from strata.jobs.cli import main
from strata.store.errors import CorruptionError
from strata.store.lifecycle.fsck import verify_store

# Files whose damage a read survives with exactly the intact data (see the module docstring).
_READ_NEED_NOT_RAISE = ("/zarr.json", "/aux/commit_index-", "datasets/ds/commits/")


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage") / "acts"
    F.build(root)
    baseline = {k: F.read_outcome(root, k) for k in F.NAMES}
    assert all(isinstance(v, str) for v in baseline.values()), baseline
    return root, baseline


def _flip(path: Path, at: int) -> bytes:
    raw = path.read_bytes()
    bad = bytearray(raw)
    bad[at] ^= 0x01
    path.write_bytes(bytes(bad))
    return raw


@pytest.mark.slow
def test_every_damaged_file_is_reported_and_never_read(full_store, capsys):
    root, baseline = full_store
    files = F.artifact_files(root)
    assert {k: len(v) for k, v in files.items()} == {"dataset": 15, "sae": 5, "features": 12, "analysis": 3}
    cases = 0
    failures: list[str] = []
    reported = raised = survived = 0
    for kind, keys in files.items():
        for key in keys:
            path = root / key
            size = path.stat().st_size
            for at in sorted({size // 2, size - 1}):
                cases += 1
                raw = _flip(path, at)
                try:
                    where = f"{key} byte {at}"
                    problems = []
                    code = main(["verify", str(root)])
                    out = capsys.readouterr().out
                    if code == 1 and key in out:
                        reported += 1
                    else:
                        problems.append(f"verify exit {code}, file named: {key in out}")
                    report = verify_store(store.open(root, create=False))
                    state = {(c.kind, c.name): c.ok for c in report.checks}
                    if state != {(k, n): k != kind for k, n in F.NAMES.items()}:
                        problems.append(f"checks {state}")
                    got = F.read_outcome(root, kind)
                    if isinstance(got, CorruptionError):
                        raised += 1
                    elif got == baseline[kind] and (any(p in key for p in _READ_NEED_NOT_RAISE) or ("/c/" in key and at == size - 1)):
                        survived += 1
                    else:
                        problems.append("read gave other data" if got != baseline[kind] else "read did not raise")
                    for other in F.NAMES:  # the others read as before (a feature table shows its dataset's text)
                        if other != kind:
                            o = F.read_outcome(root, other)
                            if o != baseline[other] and not (other == "features" and kind == "dataset" and isinstance(o, CorruptionError)):
                                problems.append(f"{other} reads {'raise' if isinstance(o, Exception) else 'other data'}")
                except Exception as e:  # noqa: BLE001 - any other exception is a finding too
                    problems.append(f"{type(e).__name__}: {e}")
                finally:
                    path.write_bytes(raw)
                if problems:
                    failures.append(f"{where}: {'; '.join(problems)}")
    summary = f"{reported} of {cases} damage cases reported by verify; reads raised in {raised}, gave the intact data in {survived}"
    print(summary)
    assert not failures and reported == cases == raised + survived, "\n".join([summary, *failures])
    assert main(["verify", str(root)]) == 0  # every file restored: clean again
