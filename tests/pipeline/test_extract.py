"""End-to-end extraction on the session Ray: exactly once, resume, crashes, incremental runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

import store
from pipeline.corpus import CorpusSource
from pipeline.errors import CorpusError
from pipeline.extract import ExtractJob, plan, prepare, run_extract, tokenize
from pipeline.models import ModelRef
from pipeline.tiny import synthetic_docs, write_jsonl
from store.errors import DatasetExistsError, LeaseHeldError

pytestmark = pytest.mark.ray

CTX, UC = 16, 10
HOOKS = ("blocks.*.hook_resid_post",)


def _job(tmp_path: Path, model: Path, corpus: Path, **kw) -> ExtractJob:
    base = dict(
        store=str(tmp_path / "acts"), name="tiny", model=ModelRef(str(model)), corpus=CorpusSource(str(corpus)), hooks=HOOKS,
        context_size=CTX, unit_contexts=UC, batch_tokens=UC * CTX, dtype="float32", progress=False, max_restarts=3,
    )
    base.update(kw)
    return ExtractJob(**base)


def _planned(job: ExtractJob):
    p = prepare(job)
    return plan(p, tokenize(p.corpus, p.tokenizer, chunk_docs=1000, use_ray=False))


def _reference(model_dir: Path, token_id: np.ndarray) -> dict[str, torch.Tensor]:
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = {}
    for i, block in enumerate(model.h):
        block.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"blocks.{i}.hook_resid_post", o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(token_id.astype(np.int64)))
    return got


def _commits(root: Path, name: str = "tiny") -> dict[str, dict[str, dict]]:
    """Every commit record on disk, by hook (or 'tokens') and file name."""
    out: dict[str, dict[str, dict]] = {}
    base = root / "datasets" / name / "commits"
    for f in base.rglob("*.json"):
        out.setdefault(str(f.parent.relative_to(base)), {})[f.name] = json.loads(f.read_text())
    return out


def _assert_exactly_once(root: Path, units: int, hooks: list[str], name: str = "tiny") -> None:
    ds = store.open(root).dataset(name)
    assert ds.committed_units() == list(range(units))
    for h in hooks:
        assert ds.committed_units(h) == list(range(units)), h
    # one token table per unit: no file of a lost or crashed attempt is left beside the committed one
    assert len(list((root / "datasets" / name / "tokens").glob("*.parquet"))) == units
    rep = ds.verify()
    assert rep.ok, str(rep)


def test_extract_then_noop_then_added_hook(ray_session, tmp_path, tiny_gpt2, corpus_file):
    job = _job(tmp_path, tiny_gpt2, corpus_file)
    ctx = _planned(job)
    units = -(-len(ctx) // UC)
    assert units >= 3 and len(ctx) % UC  # a partial last unit is part of the test

    r = run_extract(job)
    assert (r.num_units, r.units_run, r.noop) == (units, units, False)
    assert r.tokens == ctx.token_id.size
    root = tmp_path / "acts"
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    _assert_exactly_once(root, units, hooks)
    ds = store.open(root).dataset("tiny")
    mapping = ds.info.meta["hook_modules"]  # every hook of the model: hooks added later use it too
    assert mapping["blocks.1.hook_resid_post"] == "h.1:output" and mapping["blocks.1.hook_resid_pre"] == "h.1:input"
    assert ds.info.meta["revision"].startswith("local-xxh3:") and ds.info.meta["family"] == "gpt2"
    toks = ds.tokens()
    assert np.array_equal(toks.column("token_id").to_numpy(), ctx.token_id.reshape(-1))
    assert np.array_equal(toks.column("doc_id").to_numpy(), ctx.doc_id.reshape(-1))
    for u in (0, units - 1):  # a full unit and the partial last one, each one forward batch
        part = ctx.slice(u * UC, (u + 1) * UC)
        ref = _reference(tiny_gpt2, part.token_id)
        lo = u * UC * CTX
        for h in hooks:
            got = ds.read(h, rows=slice(lo, lo + part.token_id.size), as_="torch")
            assert torch.equal(got, ref[h]), (u, h)

    before = _commits(root)
    again = run_extract(job)
    assert again.noop and again.units_run == 0 and "nothing to do" in again.message
    assert _commits(root) == before

    more = run_extract(replace(job, hooks=(*HOOKS, "blocks.0.hook_mlp_out")))
    assert more.units_run == units and more.hooks[-1] == "blocks.1.hook_resid_post"
    after = _commits(root)
    for k in before:  # old hooks and token tables untouched
        assert after[k] == before[k], k
    assert len(after["acts/blocks.0.hook_mlp_out"]) == units
    _assert_exactly_once(root, units, [*hooks, "blocks.0.hook_mlp_out"])


@pytest.mark.slow
def test_worker_killed_mid_unit_is_retried(ray_session, tmp_path, tiny_gpt2, corpus_file, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("STRATA_TEST_CRASH_AFTER_UNITS", "1")
    monkeypatch.setenv("STRATA_TEST_CRASH_MARKER", str(marker))
    job = _job(tmp_path, tiny_gpt2, corpus_file)
    r = run_extract(job)
    assert marker.exists()  # a worker did die in the middle of a unit
    root = tmp_path / "acts"
    _assert_exactly_once(root, r.num_units, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    pids = {rec["writer"]["pid"] for rec in _commits(root)["tokens"].values()}
    assert len(pids) == 2  # the restarted worker finished the job
    ctx = _planned(job)
    ref = _reference(tiny_gpt2, ctx.slice(UC, 2 * UC).token_id)["blocks.1.hook_resid_post"]
    got = store.open(root).dataset("tiny").read("blocks.1.hook_resid_post", rows=slice(UC * CTX, 2 * UC * CTX), as_="torch")
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_killed_driver_then_rerun_computes_only_missing_units(ray_session, tmp_path, tiny_gpt2, corpus_file):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "store": str(tmp_path / "acts"), "name": "tiny", "model": {"id": str(tiny_gpt2)}, "corpus": {"path": str(corpus_file)},
        "tokenize": {"context_size": CTX}, "hooks": list(HOOKS), "dtype": "float32",
        "compute": {"unit_contexts": UC, "batch_tokens": UC * CTX},
    }))
    env = {**os.environ, "STRATA_TEST_DRIVER_EXIT_AFTER_UNITS": "2", "RAY_ADDRESS": "", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run([sys.executable, "-m", "jobs.extract", str(spec), "--no-progress", "--set", "compute.cpus_per_worker=1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    root = tmp_path / "acts"
    ds = store.open(root).dataset("tiny")
    done = ds.committed_units("blocks.1.hook_resid_post")
    total = ds.info.num_units
    assert 2 <= len(done) < total
    assert (root / "datasets" / "tiny" / "lease.json").exists()  # the killed driver never released it

    r = run_extract(_job(tmp_path, tiny_gpt2, corpus_file))  # takes over the dead driver's lease
    # units the dead driver's workers committed (some may land just after it died) are skipped
    assert r.units_skipped >= len(done) and r.units_run == total - r.units_skipped > 0
    _assert_exactly_once(root, total, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert not (root / "datasets" / "tiny" / "lease.json").exists()


def test_growing_corpus_adds_units_and_keeps_committed_ones(ray_session, tmp_path, tiny_gpt2):
    docs = synthetic_docs(40, seed=11)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs[:20])
    job = _job(tmp_path, tiny_gpt2, corpus, growing=True)
    small = _planned(job)
    r1 = run_extract(job)
    assert r1.num_units == len(small) // UC and r1.held_back_contexts == len(small) % UC > 0
    root = tmp_path / "acts"
    before = _commits(root)

    write_jsonl(corpus, docs)  # 20 documents appended at the end
    big = _planned(job)
    r2 = run_extract(job)
    assert r2.num_units == len(big) // UC > r1.num_units
    assert r2.units_run == r2.num_units - r1.num_units
    after = _commits(root)
    for k, recs in before.items():
        assert {f: after[k][f] for f in recs} == recs  # committed units untouched
    ds = store.open(root).dataset("tiny")
    n = r2.num_units * UC
    assert np.array_equal(ds.tokens().column("token_id").to_numpy(), big.token_id[:n].reshape(-1))
    _assert_exactly_once(root, r2.num_units, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])

    # A document changed in the middle: a different corpus, refused before anything runs.
    write_jsonl(corpus, docs[:10] + ["A changed document."] + docs[11:])
    with pytest.raises(DatasetExistsError, match="corpus_fingerprint"):
        run_extract(job)


def test_partial_last_unit_then_appended_corpus_is_refused(ray_session, tmp_path, tiny_gpt2):
    docs = synthetic_docs(40, seed=5)
    n = 20
    corpus = write_jsonl(tmp_path / "c.jsonl", docs[:n])
    job = _job(tmp_path, tiny_gpt2, corpus, growing=False)
    while len(_planned(job)) % UC == 0:  # make sure the last unit is partial
        n -= 1
        write_jsonl(corpus, docs[:n])
    r1 = run_extract(job)
    assert r1.held_back_contexts == 0
    write_jsonl(corpus, docs)
    with pytest.raises(CorpusError, match=r"partial last unit.*corpus.growing"):
        run_extract(job)


def test_a_second_job_on_a_leased_dataset_is_refused(ray_session, tmp_path, tiny_gpt2, corpus_file):
    job = _job(tmp_path, tiny_gpt2, corpus_file)
    s = store.open(tmp_path / "acts")
    with s.lease("tiny", owner="another job"):
        with pytest.raises(LeaseHeldError, match="another job"):
            run_extract(job)
    assert s.datasets() == []


@pytest.mark.s3
def test_extract_into_an_s3_store(ray_session, s3_bucket, tmp_path, tiny_gpt2, corpus_file):
    uri = f"{s3_bucket}/acts"
    job = _job(tmp_path, tiny_gpt2, corpus_file, store=uri, hooks=("blocks.1.hook_resid_post",), dtype="float16")
    r = run_extract(job)
    ds = store.open(uri).dataset("tiny")
    assert ds.is_complete and ds.verify().ok and r.units_run == ds.info.num_units
    ctx = _planned(job)
    ref = _reference(tiny_gpt2, ctx.slice(0, UC).token_id)["blocks.1.hook_resid_post"]
    assert torch.equal(ds.read("blocks.1.hook_resid_post", rows=slice(0, UC * CTX), as_="torch"), ref.half())
    assert run_extract(job).noop


def test_cpu_cluster_gets_cpu_actors_never_a_gpu_request(ray_session, tmp_path, tiny_gpt2, corpus_file):
    from pipeline.extract import _pool_shape

    job = _job(tmp_path, tiny_gpt2, corpus_file, num_workers=4)
    n, res, threads = _pool_shape(job, todo=3)
    assert "num_gpus" not in res and n == 3  # no more actors than units
    assert res["num_cpus"] == threads >= 1
    n, res, threads = _pool_shape(replace(job, num_workers=None), todo=10)
    assert n == 1 and res == {"num_cpus": 2} and threads == 2  # one CPU worker using the node's cores
