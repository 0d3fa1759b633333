"""Tokenized corpus shards (``datasets/NAME/shards/KEY``) in the store's housekeeping: ``verify``
checks each one the plan names and ``--repair`` removes a damaged one with the units it fed (the
next extraction tokenizes it again and recomputes exactly those); ``gc`` collects the shards the plan
no longer names and keeps a dry run's; ``rm`` deletes them with their dataset."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from strata import store
from strata.jobs.cli import main
from strata.pipeline.config import ExtractSpec
from strata.pipeline.dryrun import dry_run_extract
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl
from strata.store.commit import artifacts
from strata.store.datasets.tokenized import TOKENS, TokenizedShard, shards_kind
from strata.store.datasets.verify import REMOVED, SHARD
from strata.store.lifecycle import gc
from strata.store.lifecycle.fsck import verify_store

CTX, UC = 16, 4
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def _spec(root: Path, model: Path, corpus: Path) -> ExtractSpec:
    return ExtractSpec(store=str(root / "acts"), name="sh", model={"id": str(model)}, corpus={"path": str(corpus)},
                       tokenize={"context_size": CTX}, hooks=[H0, H1], dtype="float32",
                       compute={"executor": "local", "unit_contexts": UC, "batch_tokens": UC * CTX})


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, Path]:
    """A model, and a folder holding a 3-shard corpus and its extracted store (the store copied per
    test; the corpus stays: its place is part of the dataset's identity)."""
    base = tmp_path_factory.mktemp("sharded")
    model = build_tiny(base / "gpt2", family="gpt2", layers=2, d_model=32, heads=4, max_positions=256, vocab_size=400, seed=0)
    (base / "corpus").mkdir()
    for i, n in enumerate([9, 6, 11]):
        write_jsonl(base / "corpus" / f"part-{i:03d}.jsonl", synthetic_docs(n, seed=i))
    res = run_extract(_spec(base, model, base / "corpus"), progress=False)
    assert res.shards == 3 and res.shards_tokenized == 3
    return model, base


@pytest.fixture
def work(extracted, tmp_path) -> tuple[Path, Path]:
    model, base = extracted
    shutil.copytree(base / "acts", tmp_path / "acts")
    return model, tmp_path


def _again(model: Path, root: Path, extracted) -> ExtractSpec:
    return _spec(root, model, extracted[1] / "corpus")


def _snapshot(ds) -> tuple[dict[int, list], dict[str, np.ndarray], list]:
    tables = {u: ds.unit_tokens(u).to_pylist() for u in range(ds.info.num_units)}
    rows = ds.tokens(H0).column("row").to_numpy()
    return tables, {h: ds.read(h, rows=rows) for h in (H0, H1)}, ds.docs().to_pylist()


def _age_all(folder: Path, seconds: float = 10.0) -> None:
    t = time.time() - seconds
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (t, t))


def test_a_damaged_tokenized_shard_is_reported_repaired_and_tokenized_again(work, extracted, capsys):
    model, root = work
    s = store.open(str(root / "acts"))
    ds = s.dataset("sh")
    clean = ds.verify()
    assert clean.ok and not clean.problems
    shards = ds.shards().to_pylist()
    # Every tokenized shard's record and files are counted: 3 files per shard on top of the units'.
    units_files = len(ds.committed_units(None)) * 3
    assert clean.files_checked == units_files + len(ds.info.aux) + 3 * 3
    before = _snapshot(ds)
    sh = shards[1]
    key, first, n = sh["key"], sh["first_unit"], sh["units"]
    assert n > 0
    path = root / "acts" / shards_kind("sh") / key / TOKENS
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))

    rep = ds.verify()
    assert not rep.ok
    assert [(p.unit, p.shard, p.file) for p in rep.problems] == [(SHARD, key, f"{shards_kind('sh')}/{key}/{TOKENS}")]
    assert sh["name"] in str(rep) and f"units {first}-{first + n - 1}" in str(rep)
    assert main(["verify", str(root / "acts"), "sh"]) != 0
    assert f"{key}/{TOKENS}" in capsys.readouterr().out

    fixed = ds.repair(rep)
    assert fixed.shard_units == list(range(first, first + n)) and fixed.units == fixed.shard_units and fixed.rerun
    assert key in str(fixed) and "recomputes exactly those" in str(fixed)
    assert TokenizedShard.open(s.storage, "sh", key) is None and not list((path.parent).glob("*"))
    ds.refresh()
    assert set(ds.committed_units(None)) == set(range(ds.info.num_units)) - set(range(first, first + n))
    assert set(ds.committed_units(H1)) == set(ds.committed_units(None))
    assert ds.shards().column("key").to_pylist()[1] == key + REMOVED  # the others are as they were
    assert ds.shards().drop_columns(["key"]).to_pylist() == [{k: v for k, v in r.items() if k != "key"} for r in shards]
    after = ds.verify()  # until the extraction runs again: the shard is still missing, named
    assert [(p.unit, p.shard) for p in after.problems] == [(SHARD, key + REMOVED)] and "removed by a repair" in str(after)

    res = run_extract(_again(model, root, extracted), progress=False)
    assert res.shards_tokenized == 1 and res.units_run == n and res.units_recomputed == []
    ds = s.dataset("sh")
    final = ds.verify()
    assert final.ok and final.complete
    assert ds.shards().to_pylist() == shards  # the plan as before, under the shard's own key again
    got = _snapshot(ds)
    assert got[0] == before[0] and got[2] == before[2]
    for h in (H0, H1):
        np.testing.assert_allclose(got[1][h], before[1][h], rtol=1e-6, atol=1e-6)
    # No tokenized shard was left behind for gc (only the driver files the manifest replaced).
    _age_all(root / "acts")
    left = [g.key for g in gc.collect(s, grace_s=0).garbage]
    assert left and all(k.startswith("datasets/sh/aux/") for k in left), left


def test_a_missing_tokenized_shard_and_a_damaged_plan(work, capsys):
    _, root = work
    s = store.open(str(root / "acts"))
    ds = s.dataset("sh")
    first, key = ds.shards().column("key").to_pylist()[0::2]
    (root / "acts" / shards_kind("sh") / key / artifacts.COMMIT).unlink()
    docs = root / "acts" / shards_kind("sh") / first / "docs.parquet"
    raw = bytearray(docs.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    docs.write_bytes(bytes(raw))
    rep = ds.verify()
    assert [(p.shard, p.file) for p in rep.problems] == [(first, f"{shards_kind('sh')}/{first}/docs.parquet"),
                                                         (key, f"{shards_kind('sh')}/{key}")]
    assert rep.problems[1].message.endswith("missing (no commit record)") and "checksum" in rep.problems[0].message
    # `strata verify STORE` goes through the same checks, and repairs the same way.
    assert main(["verify", str(root / "acts"), "--repair"]) != 0
    out = capsys.readouterr().out
    assert key in out and first in out and "removed tokenized shard" in out
    assert ds.refresh() is not None and ds.shards().column("key").to_pylist()[0::2] == [first + REMOVED, key + REMOVED]
    assert ds.committed_units(None) == [u for u in range(ds.info.num_units)
                                        if not any(r["first_unit"] <= u < r["first_unit"] + r["units"] for r in ds.shards().to_pylist()[0::2])]
    # A damaged plan is reported, and left for the user (it alone says which unit came from which shard).
    plan_key = ds.info.aux["shards"]["key"]
    p = root / "acts" / plan_key
    raw = bytearray(p.read_bytes())
    raw[-20] ^= 0xFF
    p.write_bytes(bytes(raw))
    rep = verify_store(s, kinds=["dataset"])
    assert not rep.ok and plan_key in str(rep)
    fixed = ds.repair(rep.checks[0].dataset)
    assert p.exists() and "strata rm" in str(fixed) and plan_key in str(fixed)


def test_gc_collects_tokenized_shards_the_plan_does_not_name_after_grace(work, capsys):
    _, root = work
    s = store.open(str(root / "acts"))
    ds = s.dataset("sh")
    named = ds.shards().column("key").to_pylist()
    kind = shards_kind("sh")
    # A changed shard's old tokenization (committed, named by no plan) and a task that died before its record.
    with s.lease("sh", owner="test") as lease:
        artifacts.put(s.storage, kind, "sold", {TOKENS: b"\0" * 12, "docs.parquet": b"x"}, meta={"tokens": 1}, lease=lease)
    dead = root / "acts" / kind / "sdead" / TOKENS
    dead.parent.mkdir()
    dead.write_bytes(b"half a stream")
    # A file inside a named shard that its record does not name.
    stray = root / "acts" / kind / named[0] / "extra.bin"
    stray.write_bytes(b"?")
    assert gc.collect(s).garbage == []  # younger than the default grace period
    _age_all(root / "acts")
    report = gc.collect(s, grace_s=0)
    want = [f"{kind}/sold/{artifacts.COMMIT}", f"{kind}/sold/docs.parquet", f"{kind}/sold/{TOKENS}", f"{kind}/sdead/{TOKENS}",
            f"{kind}/{named[0]}/extra.bin"]
    assert sorted(g.key for g in report.garbage) == sorted(want)
    got = [g.key for g in report.garbage if "/sold/" in g.key]
    assert got[0].endswith(artifacts.COMMIT)  # the record goes first
    why = {g.key: g.why for g in report.garbage}
    assert why[want[0]] == "tokenized shard the dataset's plan no longer names" and "never committed" in why[want[3]]
    assert main(["gc", str(root / "acts"), "--grace", "0", "--apply"]) == 0 and "deleted 5 file(s)" in capsys.readouterr().out
    assert not dead.exists() and not stray.exists() and artifacts.get(s.storage, kind, "sold") is None
    assert all(TokenizedShard.open(s.storage, "sh", k) is not None for k in named)
    assert ds.verify().ok and ds.docs().num_rows == 26


def test_gc_keeps_a_dry_runs_shards_until_abandoned_and_verify_ignores_them(extracted, tmp_path, capsys):
    model, base = extracted
    spec = _spec(tmp_path, model, base / "corpus")
    dry = dry_run_extract(spec)
    assert dry.shards == 3 and dry.shards_tokenized == 3
    s = store.open(str(tmp_path / "acts"))
    kind = shards_kind("sh")
    assert len(artifacts.names(s.storage, kind)) == 3 and not (tmp_path / "acts" / "datasets" / "sh" / "manifest.json").exists()
    dead = tmp_path / "acts" / kind / "sdead" / TOKENS
    dead.parent.mkdir()
    dead.write_bytes(b"half a stream")
    _age_all(tmp_path / "acts")
    report = gc.collect(s, grace_s=0)
    assert [g.key for g in report.garbage] == [f"{kind}/sdead/{TOKENS}"]
    [w] = report.in_progress
    assert (w.kind, w.name, w.prefix, w.live) == ("dataset", "sh", "datasets/sh", False)
    assert w.state == "planned by a dry run: 3 tokenized shard(s), no dataset yet (its extraction reuses them)"
    assert len(w.keys) == 9 and all(k.startswith(f"{kind}/") for k in w.keys)
    # Not damage: verify checks the shards and notes them as planned.
    rep = verify_store(s)
    assert rep.ok and [(c.kind, c.name, c.files) for c in rep.checks] == [("dataset", "sh", 9)]
    assert main(["verify", str(tmp_path / "acts")]) == 0
    assert "dataset sh: OK: 9 files" in capsys.readouterr().out and w.state in str(rep)
    # Plain gc keeps them; --abandoned deletes them (and the dead attempt), under the lease.
    assert main(["gc", str(tmp_path / "acts"), "--grace", "0", "--apply"]) == 0
    assert len(artifacts.names(s.storage, kind)) == 3 and not dead.exists()
    capsys.readouterr()
    assert main(["gc", str(tmp_path / "acts"), "--grace", "0", "--abandoned", "sh", "--apply"]) == 0
    assert "deleted 9 file(s)" in capsys.readouterr().out
    assert artifacts.names(s.storage, kind) == [] and not [p for p in (tmp_path / "acts" / kind).rglob("*") if p.is_file()]
    assert gc.collect(s, grace_s=0).in_progress == []


def test_a_dry_runs_shards_are_reused_then_named_by_the_plan(extracted, tmp_path):
    model, base = extracted
    spec = _spec(tmp_path, model, base / "corpus")
    dry_run_extract(spec)
    res = run_extract(spec, progress=False)
    assert res.shards_tokenized == 0 and res.shards == 3
    s = store.open(str(tmp_path / "acts"))
    _age_all(tmp_path / "acts")
    report = gc.collect(s, grace_s=0)
    assert report.garbage == [] and report.in_progress == []
    assert s.dataset("sh").verify().ok


def test_rm_deletes_the_tokenized_shards_with_the_dataset(work):
    _, root = work
    s = store.open(str(root / "acts"))
    kind = shards_kind("sh")
    assert len(artifacts.names(s.storage, kind)) == 3
    assert main(["rm", str(root / "acts"), "sh", "--yes"]) == 0
    assert s.datasets() == [] and not [p for p in (root / "acts" / "datasets" / "sh").rglob("*") if p.is_file() and "/lease/" not in str(p)]
    assert gc.collect(s, grace_s=0).in_progress == []


def test_a_damaged_dry_run_shard_is_reported_removed_and_tokenized_again(extracted, tmp_path, capsys):
    model, base = extracted
    spec = _spec(tmp_path, model, base / "corpus")
    dry_run_extract(spec)
    s = store.open(str(tmp_path / "acts"))
    kind = shards_kind("sh")
    key = artifacts.names(s.storage, kind)[0]
    path = tmp_path / "acts" / kind / key / TOKENS
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    rep = verify_store(s, name="sh")
    assert not rep.ok and [p.split(": ", 1)[0] for p in rep.checks[0].problems] == [f"{kind}/{key}/{TOKENS}"]
    assert main(["verify", str(tmp_path / "acts"), "sh", "--repair"]) == 1
    assert f"{kind}/{key}: removed the damaged tokenized shard" in capsys.readouterr().out
    assert artifacts.get(s.storage, kind, key) is None and len(artifacts.names(s.storage, kind)) == 2
    res = run_extract(spec, progress=False)
    assert res.shards_tokenized == 1 and s.dataset("sh").verify().ok


def test_on_s3_verify_repair_and_gc_of_tokenized_shards(extracted, s3_bucket):
    model, base = extracted
    uri = f"{s3_bucket}/acts"
    spec = ExtractSpec.model_validate({**_spec(base, model, base / "corpus").model_dump(), "store": uri})
    run_extract(spec, progress=False)
    s = store.open(uri)
    ds = s.dataset("sh")
    before = _snapshot(ds)
    sh = ds.shards().to_pylist()[0]
    kind = shards_kind("sh")
    key = f"{kind}/{sh['key']}/{TOKENS}"
    raw = bytearray(s.storage.read(key))
    raw[-1] ^= 0x01
    s.storage.write(key, bytes(raw))
    rep = ds.verify()
    assert [(p.shard, p.file) for p in rep.problems] == [(sh["key"], key)]
    assert ds.repair(rep).shard_units == list(range(sh["first_unit"], sh["first_unit"] + sh["units"]))
    assert not s.storage.list(f"{kind}/{sh['key']}")
    res = run_extract(spec, progress=False)
    assert res.shards_tokenized == 1 and res.units_run == sh["units"]
    ds = s.dataset("sh")
    assert ds.verify().ok
    got = _snapshot(ds)
    assert got[0] == before[0] and got[2] == before[2]
    # gc on S3: a shard no plan names, and a dead task's file.
    with s.lease("sh", owner="test") as lease:
        artifacts.put(s.storage, kind, "sold", {TOKENS: b"\0" * 12}, meta={}, lease=lease)
    s.storage.write(f"{kind}/sdead/{TOKENS}", b"half")
    report = gc.collect(s, grace_s=0)
    mine = [g.key for g in report.garbage if g.key.startswith(f"{kind}/")]
    assert mine == [f"{kind}/sdead/{TOKENS}", f"{kind}/sold/{artifacts.COMMIT}", f"{kind}/sold/{TOKENS}"]  # a record before its files
    gc.apply(s, report, grace_s=0)
    assert sorted(artifacts.names(s.storage, kind)) == sorted(ds.shards().column("key").to_pylist())
    assert not s.storage.list(f"{kind}/sdead") and ds.verify().ok
