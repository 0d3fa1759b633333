"""Operational faults (issue 9): a worker node lost mid-job on a multi-node cluster, an S3
endpoint that fails one request in eleven, a worker whose disk fills up, and two `strata
reprocess` runs started at once. Each ends with every unit committed exactly once and values
bit-identical to a clean run's (which test_extract.py checks against a direct forward pass)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _faults_ops
import numpy as np
import pytest
import torch
import yaml
from test_extract import CTX, H0, H1, UC, _planned, _reference
from test_extract import _spec as _extract_spec

from strata import store
from strata.pipeline.errors import WorkerError
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import synthetic_docs, write_jsonl
from strata.store import layout
from strata.store.commit import protocol

pytestmark = pytest.mark.ray


def _spec(*args: object, executor: str = "ray", **kw: object):
    """test_extract's spec, on Ray: the faults here happen to Ray workers and nodes (and a full
    disk is a worker process's file-size limit, which must not be the test process's)."""
    return _extract_spec(*args, executor=executor, **kw)  # type: ignore[arg-type]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# -- a clean run, and what every faulty run must equal --------------------------------------------


@pytest.fixture(scope="module")
def clean(ray_session, tmp_path_factory, tiny_gpt2):
    """A corpus (24 documents: 14 units of 10 contexts of 16 tokens) and its clean extraction,
    whose unit 0 equals a direct forward pass."""
    folder = tmp_path_factory.mktemp("clean")
    corpus = write_jsonl(folder / "corpus.jsonl", synthetic_docs(24, seed=7))
    spec = _spec(folder, tiny_gpt2, corpus, executor="local")  # the reference: in this process, no Ray
    r = run_extract(spec, progress=False)
    assert r.units_run == r.num_units >= 10
    ds = store.open(folder / "acts", create=False).dataset("tiny")
    ref = _reference(tiny_gpt2, _planned(spec).all_contexts().slice(0, UC).token_id)
    for h in (H0, H1):
        assert torch.equal(ds.read(h, rows=slice(0, UC * CTX), as_="torch"), ref[h])
    return {"root": folder / "acts", "corpus": corpus, "units": r.num_units, "model": tiny_gpt2}


def _exactly_once(s: store.Store, units: int, hooks=(H0, H1), *, strays_ok: bool = False) -> store.ActivationDataset:
    """Every unit of every hook committed once, each record naming whole files (verify checks
    every byte); without ``strays_ok``, no token table of a failed attempt is left beside the
    committed ones. With it (a node killed mid-write may leave one), strays are never named by a
    commit record, so readers never see them."""
    ds = s.dataset("tiny")
    assert ds.committed_units() == list(range(units))
    for h in hooks:
        assert ds.committed_units(h) == list(range(units)), h
    tables = {k for k in s.storage.list(layout.tokens_dir("tiny")) if k.endswith(".parquet")}
    named = {protocol.read_record(s.storage, layout.commit_key("tiny", None, u)).file.key for u in range(units)}
    assert len(named) == units and named <= tables
    if not strays_ok:
        assert tables == named, sorted(tables - named)
    rep = ds.verify()
    assert rep.ok, str(rep)
    return ds


def _assert_equal_to_clean(ds: store.ActivationDataset, clean: dict, hooks=(H0, H1)) -> None:
    ref = store.open(clean["root"], create=False).dataset("tiny")
    assert np.array_equal(ds.tokens().column("token_id").to_numpy(), ref.tokens().column("token_id").to_numpy())
    for h in hooks:
        got, want = ds.read(h), ref.read(h)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), h  # every bit


# -- 1. a worker node lost mid-job ------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_loss(clean, tmp_path_factory):
    """Run the multi-node scenario once, in a fresh process (see _faults_ops.multinode_main)."""
    folder = tmp_path_factory.mktemp("multinode")
    spec = _spec(folder, clean["model"], clean["corpus"], num_workers=2, cpus_per_worker=1)
    report = folder / "report.json"
    # A short temp dir of its own: socket paths stay short, and Ray's discovery file
    # (ray_current_cluster) of this machine is not pointed at a cluster that will be gone.
    ray_tmp = tempfile.mkdtemp(prefix="strata-mn-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    try:
        proc = subprocess.run([sys.executable, str(HERE / "_faults_ops.py"), spec.model_dump_json(), str(report), "0.7"],
                              capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0 and report.exists(), proc.stderr[-4000:]
    out = json.loads(report.read_text())
    assert out.get("killed"), (out, proc.stderr[-4000:])
    return {"report": out, "root": folder / "acts", "spec": spec, "stderr": proc.stderr}


@pytest.mark.slow
def test_node_lost_mid_job_leaves_every_committed_unit_whole(node_loss, clean):
    """The node running a worker is killed once that worker committed a unit. Whatever the
    job then does, what it committed is whole and correct, and a rerun computes exactly the
    rest (once)."""
    out = node_loss["report"]
    assert out["committed_at_kill"] < clean["units"]  # the node died mid-job
    s = store.open(node_loss["root"], create=False)
    before = s.dataset("tiny").committed_units(H1)
    assert len(before) >= out["committed_before_kill"]
    r = run_extract(node_loss["spec"], progress=False)  # on the session's Ray
    assert r.units_run == clean["units"] - len(before) and r.units_skipped == len(before)
    ds = _exactly_once(store.open(node_loss["root"], create=False), clean["units"], strays_ok=True)
    _assert_equal_to_clean(ds, clean)


@pytest.mark.slow
def test_node_lost_mid_job_the_job_itself_finishes(node_loss, clean):
    """Ray restarts the lost worker on the other node and its units run there: the job that
    lost a node finishes by itself, every unit once."""
    out = node_loss["report"]
    assert out["ok"], out.get("error")
    assert out["units_run"] == clean["units"]


# -- 2. an S3 endpoint that fails one request in eleven ---------------------------------------------


@pytest.mark.s3
@pytest.mark.slow
def test_s3_answering_500_to_every_eleventh_request(ray_session, s3_bucket, s3_env, tmp_path, clean):
    """botocore retries each failed request (a backoff of up to a second or so each: one hook
    only, to keep the test short)."""
    uri = f"{s3_bucket}/acts"
    with _faults_ops.FlakyProxy(s3_env, every=11) as proxy:
        opts = {"endpoint_url": proxy.url}
        spec = _spec(tmp_path, clean["model"], clean["corpus"], store_uri=uri, storage_options=opts, hooks=(H1,))
        r = run_extract(spec, progress=False)
        assert r.units_run == clean["units"]
        assert proxy.failed >= 10 and {"PUT", "GET"} <= set(proxy.failed_methods), proxy.failed_methods
        s = store.open(uri, storage_options=opts, create=False)
        ds = _exactly_once(s, clean["units"], hooks=(H1,))
        seen = proxy.failed
        _assert_equal_to_clean(ds, clean, hooks=(H1,))  # the reader, through the proxy too
        assert proxy.failed > seen  # reads were failed (and retried) as well
        assert run_extract(spec, progress=False).noop
    # Straight to the server: the same bytes.
    _assert_equal_to_clean(store.open(uri, create=False).dataset("tiny"), clean, hooks=(H1,))


# -- 3. a worker whose disk fills up ----------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_fails_in_one_line_and_shows_nothing_half_written(ray_session, tmp_path, clean):
    spec = _spec(tmp_path, clean["model"], clean["corpus"], num_workers=1, cpus_per_worker=1)
    # Token tables (a few KiB) still fit; a hook's shard (10 x 16 rows x 32 float32 = 20 KiB) does not.
    with pytest.raises(WorkerError) as info:
        run_extract(spec, progress=False, worker_cls=_faults_ops.disk_full_after(2, 12 << 10))
    msg = str(info.value)
    assert "\n" not in msg and "File too large" in msg and "failed in a worker" in msg, msg
    root = tmp_path / "acts"
    s = store.open(root, create=False)
    ds = s.dataset("tiny")
    done = {h: ds.committed_units(h) for h in (H0, H1)}
    assert done[H0] == done[H1] and 2 <= len(done[H0]) < clean["units"]
    # Nothing half-written is visible: no temporary file left, every commit names whole files,
    # every committed unit has its shard, and units that are not committed read as not committed
    # (a worker stopped between writing a shard and its record leaves the shard for `strata gc`).
    assert s.storage.list_temporary(layout.dataset_dir("tiny")) == []
    assert ds.verify(committed_only=True).ok
    for h in (H0, H1):
        for u in done[h]:
            assert s.storage.exists(layout.shard_key("tiny", h, u)), (h, u)
    missing = next(u for u in range(clean["units"]) if u not in done[H1])
    with pytest.raises(store.NotCommittedError):
        ds.read(H1, rows=slice(missing * UC * CTX, (missing + 1) * UC * CTX))
    # Room again: the rerun computes exactly the rest.
    r = run_extract(spec, progress=False)
    assert r.units_run == clean["units"] - len(done[H1])
    _assert_equal_to_clean(_exactly_once(store.open(root, create=False), clean["units"], strays_ok=True), clean)


# -- 4. two reprocess runs at once ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_reprocess_runs_at_once(tmp_path, clean):
    """Both exit 0: one computes the dataset, the other leaves it to that run (or, started
    after it, finds nothing to do); every unit is committed once."""
    (tmp_path / "model").symlink_to(clean["model"])
    shutil.copy(clean["corpus"], tmp_path / "corpus.jsonl")
    extract = {"store": "acts", "name": "tiny", "model": {"id": "./model"}, "corpus": {"path": "corpus.jsonl"},
               "tokenize": {"context_size": CTX}, "hooks": ["blocks.*.hook_resid_post"], "dtype": "float32",
               "compute": {"unit_contexts": UC, "batch_tokens": UC * CTX, "num_workers": 1, "cpus_per_worker": 1}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(extract))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"store": "./acts", "jobs": ["extract.yaml"]}))
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [str(Path(sys.executable).parent / "strata"), "reprocess", "pipeline.yaml"]
    runs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in runs]
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0, (out, err[-3000:])
    worked = [out for out, _ in outs if "computed" in out and "done: 1 job(s)" in out]
    assert len(worked) == 1, outs
    other = next(out for out, _ in outs if out is not worked[0])
    assert "another run is at work" in other or "nothing to do" in other, other
    assert "computed" not in other
    ds = _exactly_once(store.open(tmp_path / "acts", create=False), clean["units"])
    _assert_equal_to_clean(ds, clean)
    rc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0 and "nothing to do" in rc.stdout, rc.stdout
