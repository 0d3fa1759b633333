"""`strata gc` and work in progress: an unfinished SAE run's checkpoints, a feature table being
encoded, files under a live lease are listed apart and never collected (only `--abandoned NAME`
deletes a run); failed feature-table attempts are collected; one damaged record never makes gc
fail for the whole store."""

from __future__ import annotations

import json
import os
import time

import duckdb
import numpy as np

from strata import store
from strata.analysis.features.synthetic import synthetic_dataset, write_table
from strata.analysis.sae import checkpoint
from strata.jobs.cli import main
from strata.store.commit import artifacts
from strata.store.features.format import FeatureTableInfo, unit_key, unit_records
from strata.store.features.stats import HIST_BINS, HIST_HI, HIST_LO
from strata.store.features.writer import FeatureWriter, create_or_open, table_lease
from strata.store.lifecycle import gc

H = "blocks.0.hook_resid_post"


def _age_all(root, seconds: float = 7200) -> None:
    t = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.utime(p, (t, t))


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _checkpoint(s, name: str, step: int) -> None:
    """A checkpoint committed as the trainer commits it (same function, its SAE's lease)."""
    files = {"cfg.json": b'{"d_in": 8}', "sae_weights.safetensors": b"w" * 64,
             checkpoint.STATE_JSON: json.dumps({"format": checkpoint.FORMAT, "version": 1}).encode()}
    with s.artifact_lease("saes", name, owner="strata sae train") as lease:
        checkpoint.commit(s.storage, name, step, files, meta={"config_hash": "abc"}, lease=lease)


def test_unfinished_sae_checkpoints_survive_gc_until_abandoned_by_name(tmp_path, capsys):
    s = store.open(tmp_path)
    _checkpoint(s, "run-1", 700)
    (tmp_path / "saes" / "never").mkdir()
    (tmp_path / "saes" / "never" / "cfg.json").write_bytes(b"{}")  # a crashed commit, no checkpoint
    assert main(["sae", "ls", str(tmp_path)]) == 0
    assert "run-1\tunfinished: checkpoint at step 700 (rerun its job to resume)" in capsys.readouterr().out
    ckpt = set(k for k in _files(tmp_path) if k.startswith("saes/run-1/checkpoints/"))
    assert len(ckpt) == 4  # three files and the commit record
    _age_all(tmp_path)

    assert main(["gc", str(tmp_path), "--grace", "0s", "--apply"]) == 0
    out = capsys.readouterr().out
    assert "in progress saes/run-1\t4 file(s)" in out and "unfinished: checkpoint at step 700" in out
    assert "deleted 1 file(s)" in out  # the crashed commit's file only
    assert ckpt <= _files(tmp_path) and not (tmp_path / "saes" / "never" / "cfg.json").exists()
    assert [st for st, _ in checkpoint.committed(s.storage, "run-1")] == [700]

    # Asked by name: listed first, deleted with --apply (records first, under the SAE's lease).
    assert main(["gc", str(tmp_path), "--abandoned", "nope"]) == 2
    assert "no work in progress of that name; work in progress: saes/run-1" in capsys.readouterr().err
    assert main(["gc", str(tmp_path), "--abandoned", "run-1"]) == 0
    out = capsys.readouterr().out
    assert "would delete 4 file(s)" in out and ckpt <= _files(tmp_path)
    with s.artifact_lease("saes", "run-1", owner="resumed job"):  # a rerun resuming it: not abandoned
        assert main(["gc", str(tmp_path), "--abandoned", "run-1", "--apply"]) == 2
        assert "resumed job" in capsys.readouterr().err
    assert ckpt <= _files(tmp_path)
    assert main(["gc", str(tmp_path), "--abandoned", "saes/run-1", "--apply"]) == 0
    assert "deleted 4 file(s)" in capsys.readouterr().out
    assert not any(k.startswith("saes/run-1/checkpoints/") for k in _files(tmp_path))
    assert checkpoint.committed(s.storage, "run-1") == []


def test_partial_files_under_a_live_lease_are_never_collected(tmp_path, capsys):
    s, _ = _dataset(tmp_path)
    partial = tmp_path / "datasets" / "syn" / "tokens" / ".unit-00001.x.parquet.abc.partial"
    partial.write_bytes(b"being written")
    stray = tmp_path / "catalog" / ".x.partial"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"died")
    _age_all(tmp_path)
    with s.lease("syn", owner="extract job"):
        assert main(["gc", str(tmp_path), "--grace", "0s", "--apply"]) == 0
        out = capsys.readouterr().out
        assert partial.exists() and "in progress datasets/syn\tin flight: extract job" in out
        assert not stray.exists() and "deleted 1 file(s)" in out and "deleted 1 1" not in out
    assert [g.key for g in gc.collect(s, grace_s=0).garbage] == [str(partial.relative_to(tmp_path))]


def _dataset(tmp_path):
    s = store.open(tmp_path)
    synthetic_dataset(s, "syn", hook=H, d=8, units=3, unit_contexts=2, context_size=8)
    return s, s.dataset("syn")


def _entries(ds, unit: int, seed: int = 0):
    rows = ds.record(H, unit).rows
    rng = np.random.default_rng([seed, unit])
    r = np.repeat(np.arange(rows), 2) + unit * ds.info.unit_rows
    f = np.tile([1, 3], rows).astype(np.int32)
    return r, f, rng.random(2 * rows).astype(np.float32) + 0.5, rows


def _info(ds, name: str) -> FeatureTableInfo:
    return FeatureTableInfo(
        name=name, sae="synthetic", sae_fingerprint="synthetic", dataset=ds.name, dataset_fingerprint=ds.info.fingerprint,
        hook=H, d_in=8, d_sae=8, unit_rows=ds.info.unit_rows, top_k=4, skip_special=True,
        hist={"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS}, sample={"quantiles": 2, "per_quantile": 1, "seed": 0}, block_features=4)


def _failed_attempt(root, name: str, unit: int, data: bytes) -> str:
    key = unit_key(name, unit, "deadbeef0001")
    (root / key).write_bytes(data)
    return key


def test_feature_units_in_flight_are_never_collected_and_failed_attempts_are(tmp_path, capsys):
    s, ds = _dataset(tmp_path)
    with table_lease(s.storage, "ft", owner="strata features encode") as lease:
        info = create_or_open(s.storage, _info(ds, "ft"), lease=lease)
        w = FeatureWriter(s.storage, info, fence=lease.fence())
        r, f, v, n = _entries(ds, 0)
        w.write_unit(0, rows=ds.record(H, 0).rows, encoded_rows=n, row=r, feature=f, value=v)
        # A worker's attempt at unit 1, its file written, its record not yet.
        in_flight = _failed_attempt(tmp_path, "ft", 1, (tmp_path / unit_records(s.storage, info)[0][0].file.key).read_bytes())
        _age_all(tmp_path)
        before = _files(tmp_path)
        assert main(["gc", str(tmp_path), "--grace", "0s", "--apply"]) == 0
        out = capsys.readouterr().out
        assert "in progress features/ft\tin flight: strata features encode" in out
        assert _files(tmp_path) == before and (tmp_path / in_flight).exists()
    # The encode job died: unit 1's file is a failed attempt now; the table is unfinished.
    report = gc.collect(s, grace_s=0)
    assert [g.key for g in report.garbage] == [in_flight]
    assert [(w.prefix, w.live, w.state) for w in report.in_progress] == [
        ("features/ft", False, "unfinished: 1 unit(s) encoded, not merged (rerun its job to finish)")]
    gc.apply(s, report, grace_s=0)
    assert report.deleted == 1 and not (tmp_path / in_flight).exists()
    assert unit_records(s.storage, info)[0].keys() == {0}


def _readme_query() -> str:
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    section = text.split("## Feature tables", 1)[1].split("\n## ", 1)[0]
    return section.split("```sql\n", 1)[1].split("```", 1)[0]


def test_readme_duckdb_query_reads_committed_units_only(tmp_path):
    s, ds = _dataset(tmp_path)
    entries = {u: _entries(ds, u) for u in range(3)}
    fs = write_table(s, "tiny-topk", dataset="syn", hook=H, d_sae=8, units=[0, 1, 2], entries=lambda u: entries[u], top_k=4, block_features=4)
    # A failed attempt at unit 1 (another attempt committed it): the same rows again.
    _failed_attempt(tmp_path, "tiny-topk", 1, (tmp_path / fs.storage.list("features/tiny-topk/units")[1]).read_bytes())
    assert len(s.storage.list("features/tiny-topk/units")) == 4
    bare = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/features/tiny-topk/units/*.parquet'").fetchall()[0][0]
    sql = _readme_query().replace("'acts/", f"'{tmp_path}/")
    got = duckdb.sql(sql).fetchall()
    want = sorted((int(r), int(f), float(v)) for u in range(3) for r, f, v in zip(*entries[u][:3]))
    assert sorted((int(r), int(f), float(v)) for r, f, v in got) == want  # float32 values, exactly
    assert len(got) == sum(len(entries[u][0]) for u in range(3)) < bare  # a bare glob counts unit 1 twice


def test_a_damaged_sae_record_does_not_fail_gc_for_the_store(tmp_path, capsys):
    s = store.open(tmp_path)
    for name in ("good", "bad"):
        with s.artifact_lease("saes", name) as lease:
            artifacts.put(s.storage, "saes", name, {"cfg.json": b"{}"}, lease=lease)
    (tmp_path / "saes" / "bad" / "commit.json").write_bytes(b"{not json")
    (tmp_path / "saes" / "bad" / "stray.bin").write_bytes(b"?")
    (tmp_path / "saes" / "good" / "stray.bin").write_bytes(b"left by a crashed attempt")
    (tmp_path / "features" / "ft").mkdir(parents=True)
    (tmp_path / "features" / "ft" / "manifest.json").write_bytes(b'{"format": "strata.features"')
    (tmp_path / "saes" / "-odd name").mkdir()  # not a name Strata writes, with a record in it
    (tmp_path / "saes" / "-odd name" / "commit.json").write_bytes(b"{}")
    _age_all(tmp_path)
    assert main(["gc", str(tmp_path), "--grace", "0s", "--apply"]) == 0
    out = capsys.readouterr().out
    assert "skipped saes/bad: damaged commit record" in out and "deleted 1 file(s)" in out
    assert "skipped feature table 'ft': " in out and "skipped saes/-odd name: invalid artifact name" in out
    assert (tmp_path / "features" / "ft" / "manifest.json").exists() and (tmp_path / "saes" / "-odd name" / "commit.json").exists()
    assert not (tmp_path / "saes" / "good" / "stray.bin").exists() and (tmp_path / "saes" / "bad" / "stray.bin").exists()
