"""End-to-end extraction: exactly once, resume, crashes, incremental runs, the lease,
determinism, secrets. In this process (``compute.executor: local``) where Ray is not the point;
on the session Ray for restarts of killed workers, credentials handed to workers, and the
check that both give the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _faults
import numpy as np
import pytest
import torch
from transformers import AutoModel

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.errors import CorpusError
from strata.pipeline.extract import plan, prepare, run_extract
from strata.pipeline.tiny import synthetic_docs, write_jsonl
from strata.store import layout
from strata.store.errors import DatasetExistsError, LeaseHeldError

CTX, UC = 16, 10
HOOKS = ("blocks.*.hook_resid_post",)
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def _spec(tmp_path: Path, model: Path, corpus: Path, *, store_uri: str | None = None, hooks=HOOKS, dtype: str = "float32",
          growing: bool = False, storage_options=None, executor: str = "local", **compute) -> ExtractSpec:
    return ExtractSpec(
        store=store_uri or str(tmp_path / "acts"), name="tiny", model={"id": str(model)},
        corpus={"path": str(corpus), "growing": growing}, tokenize={"context_size": CTX}, hooks=list(hooks), dtype=dtype,
        compute={"executor": executor, "unit_contexts": UC, "batch_tokens": UC * CTX, "max_restarts": 3, **compute},
        storage_options=storage_options,
    )


def _planned(spec: ExtractSpec):
    s = store.open(spec.store, storage_options=spec.storage_options)
    return plan(prepare(spec, s))


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
    for f in base.rglob("*.json"):  # records live in folders of 1000 units: key them by part
        out.setdefault(str(f.parent.parent.relative_to(base)), {})[f.name] = json.loads(f.read_text())
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


def test_extract_then_noop_then_added_hook(tmp_path, tiny_gpt2, corpus_file):
    spec = _spec(tmp_path, tiny_gpt2, corpus_file)
    pl = _planned(spec)
    ctx = pl.all_contexts()
    units = -(-len(ctx) // UC)
    assert units >= 3 and len(ctx) % UC  # a partial last unit is part of the test

    r = run_extract(spec)
    assert (r.num_units, r.units_run, r.noop) == (units, units, False)
    assert r.tokens == ctx.token_id.size and (r.private_cluster, r.cluster_address) == (False, "local")
    root = tmp_path / "acts"
    _assert_exactly_once(root, units, [H0, H1])
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
        for h in (H0, H1):
            got = ds.read(h, rows=slice(lo, lo + part.token_id.size), as_="torch")
            assert torch.equal(got, ref[h]), (u, h)
    # The document index: every document's rows, exactly the rows whose doc_id is it.
    flat = ctx.doc_id.reshape(-1)
    for doc in (0, 5, int(flat.max())):
        rows = np.flatnonzero(flat == doc)
        assert torch.equal(ds.read(H1, docs=[doc], as_="torch"), ds.read(H1, rows=rows, as_="torch"))
    plan_meta = ds.info.meta["plan"]
    assert plan_meta["units"] == units and plan_meta["dropped_tokens"] == r.dropped_tokens == pl.dropped_tokens

    before = _commits(root)
    again = run_extract(spec)
    assert again.noop and again.units_run == 0 and "nothing to do" in again.message
    assert "never been verified" not in again.message  # _assert_exactly_once verified it
    assert _commits(root) == before

    more = run_extract(spec.updated(hooks=[*HOOKS, "blocks.0.hook_mlp_out"]))
    assert more.units_run == units and more.hooks == ["blocks.0.hook_mlp_out", H0, H1]
    after = _commits(root)
    for k in before:  # old hooks and token tables untouched
        assert after[k] == before[k], k
    assert len(after["acts/blocks.0.hook_mlp_out"]) == units
    _assert_exactly_once(root, units, [H0, H1, "blocks.0.hook_mlp_out"])
    assert store.open(root).dataset("tiny").hooks == ["blocks.0.hook_mlp_out", H0, H1]  # model order


def test_concat_tail_and_the_local_model_identity(tmp_path, tiny_gpt2, corpus_file):
    """The tail shorter than one context is reported, not dropped silently; a local model is
    the same model whatever path names it."""
    spec = _spec(tmp_path, tiny_gpt2, corpus_file)
    pl = _planned(spec)
    assert pl.dropped_tokens > 0 and pl.dropped_docs + pl.partial_docs >= 1
    r = run_extract(spec)
    assert (r.dropped_tokens, r.dropped_docs, r.partial_docs) == (pl.dropped_tokens, pl.dropped_docs, pl.partial_docs)
    assert f"{pl.dropped_tokens:,} corpus tokens are in no context" in r.message and "concat tail" in r.message
    ds = store.open(tmp_path / "acts").dataset("tiny")
    docs = ds.docs()
    dropped = docs.filter(docs.column("row_start").to_numpy() < 0).column("doc_id").to_pylist()
    assert len(dropped) == pl.dropped_docs
    if dropped:
        with pytest.raises(store.UnknownDocumentError, match="concat tail shorter than one context dropped them"):
            ds.read(H0, docs=dropped[:1])
    assert sum(docs.column("dropped_tokens").to_pylist()) == pl.dropped_tokens
    assert ds.info.meta["model"] == "local" and ds.info.meta["model_path"] == str(tiny_gpt2)
    # A relative path to the same folder is the same dataset: the rerun is a no-op.
    rel = os.path.relpath(tiny_gpt2)
    again = run_extract(spec.updated(model=spec.model.updated(id=rel)))
    assert again.noop


@pytest.mark.slow
@pytest.mark.ray
def test_worker_killed_mid_unit_is_retried(ray_session, tmp_path, tiny_gpt2, corpus_file):
    marker = tmp_path / "crashed"
    spec = _spec(tmp_path, tiny_gpt2, corpus_file, executor="ray")
    r = run_extract(spec, worker_cls=_faults.crashing(after=1, marker=str(marker)))
    assert marker.exists()  # a worker did die in the middle of a unit
    root = tmp_path / "acts"
    _assert_exactly_once(root, r.num_units, [H0, H1])
    pids = {rec["writer"]["pid"] for rec in _commits(root)["tokens"].values()}
    assert len(pids) == 2  # the restarted worker finished the job
    ctx = _planned(spec).all_contexts()
    ref = _reference(tiny_gpt2, ctx.slice(UC, 2 * UC).token_id)[H1]
    got = store.open(root).dataset("tiny").read(H1, rows=slice(UC * CTX, 2 * UC * CTX), as_="torch")
    assert torch.equal(got, ref)


def _driver_script(spec: ExtractSpec, body: str) -> str:
    return textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from strata.pipeline.config import ExtractSpec
        from strata.pipeline.extract import run_extract
        spec = ExtractSpec.model_validate(json.loads({spec.model_dump_json()!r}))
    """) + textwrap.dedent(body)


@pytest.mark.slow
def test_killed_driver_then_rerun_computes_only_missing_units(tmp_path, tiny_gpt2, corpus_file):
    spec = _spec(tmp_path, tiny_gpt2, corpus_file, cpus_per_worker=1)
    script = _driver_script(spec, """
        done = []
        def killed_after_two(status):
            done.append(status)
            if len(done) == 2:
                os._exit(3)  # as if the driver were killed
        run_extract(spec, progress=False, on_unit=killed_after_two)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 3, proc.stderr[-2000:]
    root = tmp_path / "acts"
    ds = store.open(root).dataset("tiny")
    done = ds.committed_units(H1)
    total = ds.info.num_units
    assert 2 <= len(done) < total
    lease = store.open(root).lease("tiny")
    assert lease.holder() is None  # the dead driver's lease is free to take (its pid is gone)

    r = run_extract(_spec(tmp_path, tiny_gpt2, corpus_file))  # takes over the dead driver's lease
    # units the dead driver's workers committed (some may land just after it died) are skipped
    assert r.units_skipped >= len(done) and r.units_run == total - r.units_skipped > 0
    _assert_exactly_once(root, total, [H0, H1])


@pytest.mark.slow
def test_a_job_whose_lease_is_taken_over_stops_and_fails(tmp_path, tiny_gpt2):
    """Finding 8: job A is paused past its lease's stale time; job B takes the lease over and
    finishes. When A resumes it stops (its workers are fenced out) and exits non-zero, and no
    unit is committed twice or after the takeover by A."""
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(60, seed=4))
    spec = _spec(tmp_path, tiny_gpt2, corpus, lease_stale_s=3.0, cpus_per_worker=1)
    progress = tmp_path / "a-progress"
    script = _driver_script(spec, f"""
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import _faults
        from strata.store.errors import StrataError
        def note(status):
            with open({str(progress)!r}, "a") as f:
                f.write(str(status["unit"]) + "\\n")
        try:
            run_extract(spec, progress=False, worker_cls=_faults.slow(1.5), on_unit=note)
        except StrataError as e:
            print(f"strata: error: {{e}}", file=sys.stderr)
            sys.exit(2)
        print("A finished")
    """)
    a = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 180
        while not (progress.exists() and progress.read_text().strip()) and time.time() < deadline and a.poll() is None:
            time.sleep(0.2)
        assert a.poll() is None and progress.exists(), "job A never committed a unit"
        os.kill(a.pid, signal.SIGSTOP)  # A is paused: no more heartbeats
        time.sleep(4.0)
        takeover = time.time()
        b = run_extract(spec)  # B takes the stale lease over and computes what is missing
        assert b.units_run >= 1
        os.kill(a.pid, signal.SIGCONT)
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
    assert a.returncode == 2, (out, err[-3000:])
    assert "A finished" not in out
    assert "took over this job's write lease" in err or "the lease is now at generation" in err, err[-3000:]
    root = tmp_path / "acts"
    _assert_exactly_once(root, b.num_units, [H0, H1])
    fences = {rec["fence"] for part in _commits(root).values() for rec in part.values()}
    assert fences <= {1, 2} and 2 in fences
    for part in _commits(root).values():
        for rec in part.values():
            if rec["fence"] == 1:  # A's commits all happened before B took over
                t = time.mktime(time.strptime(rec["committed_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
                assert t <= takeover + 1.0, rec


def test_growing_corpus_adds_units_and_keeps_committed_ones(tmp_path, tiny_gpt2):
    docs = synthetic_docs(40, seed=11)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs[:20])
    spec = _spec(tmp_path, tiny_gpt2, corpus, growing=True)
    small = _planned(spec).all_contexts()
    r1 = run_extract(spec)
    assert r1.num_units == len(small) // UC and r1.held_back_contexts == len(small) % UC > 0
    root = tmp_path / "acts"
    before = _commits(root)
    # A document in the held-back contexts is not committed yet: an error, never a partial read.
    ds = store.open(root).dataset("tiny")
    last_doc = int(small.doc_id.reshape(-1).max())
    with pytest.raises(store.NotCommittedError, match="held back until the corpus fills a unit"):
        ds.read(H0, docs=[last_doc])

    write_jsonl(corpus, docs)  # 20 documents appended at the end
    big = _planned(spec).all_contexts()
    r2 = run_extract(spec)
    assert r2.num_units == len(big) // UC > r1.num_units
    assert r2.units_run == r2.num_units - r1.num_units
    after = _commits(root)
    for k, recs in before.items():
        assert {f: after[k][f] for f in recs} == recs  # committed units untouched
    ds = store.open(root).dataset("tiny")
    n = r2.num_units * UC
    assert np.array_equal(ds.tokens().column("token_id").to_numpy(), big.token_id[:n].reshape(-1))
    _assert_exactly_once(root, r2.num_units, [H0, H1])
    rows = np.flatnonzero(big.doc_id.reshape(-1) == last_doc)
    assert torch.equal(ds.read(H0, docs=[last_doc], as_="torch"), ds.read(H0, rows=rows, as_="torch"))
    # The grown corpus again: a quick no-op that writes nothing (not even the manifest).
    manifest = (root / "datasets/tiny/manifest.json").read_bytes()
    r3 = run_extract(spec)
    assert r3.noop and r3.units_run == 0 and "nothing to do" in r3.message
    assert (root / "datasets/tiny/manifest.json").read_bytes() == manifest

    # A document changed in the middle: a different corpus, refused before anything runs.
    write_jsonl(corpus, docs[:10] + ["A changed document."] + docs[11:])
    with pytest.raises(DatasetExistsError, match="corpus_fingerprint"):
        run_extract(spec)


def test_partial_last_unit_then_appended_corpus_is_refused(tmp_path, tiny_gpt2):
    docs = synthetic_docs(40, seed=5)
    n = 20
    corpus = write_jsonl(tmp_path / "c.jsonl", docs[:n])
    spec = _spec(tmp_path, tiny_gpt2, corpus)
    while len(_planned(spec).all_contexts()) % UC == 0:  # make sure the last unit is partial
        n -= 1
        write_jsonl(corpus, docs[:n])
    r1 = run_extract(spec)
    assert r1.held_back_contexts == 0
    write_jsonl(corpus, docs)
    with pytest.raises(CorpusError, match=r"partial last unit.*corpus.growing"):
        run_extract(spec)


def test_a_second_job_is_refused_before_anything_starts(tmp_path, tiny_gpt2, corpus_file, monkeypatch):
    import strata.pipeline.extract as ex

    started = []
    monkeypatch.setattr(ex, "prepare", lambda *a, **k: started.append("prepare"))
    monkeypatch.setattr(ex, "open_executor", lambda *a, **k: started.append("ray"))
    spec = _spec(tmp_path, tiny_gpt2, corpus_file, executor="ray")
    s = store.open(tmp_path / "acts")
    with s.lease("tiny", owner="another job"):
        with pytest.raises(LeaseHeldError) as info:
            run_extract(spec)
    msg = str(info.value)
    assert "(another job, pid " in msg and msg.count(" on ") == 1 and "\n" not in msg
    assert started == []  # no model, corpus or Ray before the lease check
    assert s.datasets() == []


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
def test_extract_into_an_s3_store_records_no_secret(ray_session, s3_bucket, tmp_path, tiny_gpt2, corpus_file, caplog, capsys):
    secret = "strata-test-SECRET-5c1d9e"
    uri = f"{s3_bucket}/acts"
    spec = _spec(tmp_path, tiny_gpt2, corpus_file, store_uri=uri, hooks=(H1,), dtype="float16",
                 storage_options={"key": "testing", "secret": secret, "client_kwargs": {"region_name": "us-east-1"}}, executor="ray")
    caplog.set_level("DEBUG")
    statuses: list = []
    r = run_extract(spec, worker_cls=_faults.EnvReporter, on_unit=statuses.append)
    # The private Ray's workers got the job's own credentials (they are its children).
    assert statuses and all(st["storage_options"]["secret"] == secret for st in statuses)
    ds = store.open(uri).dataset("tiny")
    assert ds.is_complete and ds.verify().ok and r.units_run == ds.info.num_units
    ctx = _planned(spec).all_contexts()
    ref = _reference(tiny_gpt2, ctx.slice(0, UC).token_id)[H1]
    assert torch.equal(ds.read(H1, rows=slice(0, UC * CTX), as_="torch"), ref.half())
    assert run_extract(spec).noop
    # Nothing stored anywhere holds the secret; the recorded spec keeps the non-secret options.
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    assert len(keys) > 20
    for k in keys:
        assert secret.encode() not in client.get_object(Bucket=bucket, Key=k)["Body"].read(), k
    assert ds.info.meta["spec"]["storage_options"] == {"client_kwargs": {"region_name": "us-east-1"}}
    from strata.jobs.cli import main as cli_main

    assert cli_main(["show", uri, "tiny"]) == 0
    assert secret not in capsys.readouterr().out
    assert secret not in caplog.text


def test_units_are_bit_identical_whatever_the_batch_or_thread_count(tmp_path, tiny_gpt2, corpus_file):
    """Finding 16: a unit recomputed (other threads, other batch size) has the same bytes."""
    spec = _spec(tmp_path, tiny_gpt2, corpus_file, dtype="float16", cpus_per_worker=2)
    statuses: list[dict] = []
    run_extract(spec, worker_cls=_faults.EnvReporter, on_unit=statuses.append)
    assert {st["threads"] for st in statuses} == {2}
    root = tmp_path / "acts"
    first = {k: v for k, v in _commits(root).items()}
    s = store.open(root)
    for u in (1, 2):  # forget two units, as a repair would
        for hook in (None, H0, H1):
            s.storage.delete(layout.commit_key("tiny", hook, u))
        s.storage.delete(layout.shard_key("tiny", H0, u))
        s.storage.delete(layout.shard_key("tiny", H1, u))
    s.writer("tiny").compact_commits(full=True)  # as a repair does: the index forgets them too
    statuses.clear()
    threads = torch.get_num_threads()
    r = run_extract(spec.updated(compute=spec.compute.updated(cpus_per_worker=1, batch_tokens=3 * CTX)),
                    worker_cls=_faults.EnvReporter, on_unit=statuses.append)
    assert r.units_run == 2 and {st["threads"] for st in statuses} == {1}
    assert torch.get_num_threads() == threads  # a local worker's threads were this process's for the run only
    again = _commits(root)
    for part in (f"acts/{H0}", f"acts/{H1}"):
        for u in (1, 2):
            f = f"{u:08d}.json"
            # the digest of the shard's table of block checksums, and of its index: every byte
            a, b = again[part][f]["files"][0], first[part][f]["files"][0]
            assert (a["table"], a["tail"], a["nbytes"]) == (b["table"], b["tail"], b["nbytes"]), (part, u)


def test_tokenizer_character_spans_and_kept_document_fields(tmp_path, tiny_gpt2):
    texts = synthetic_docs(30, seed=9)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "label": i % 3, "lang": "en" if i % 2 else "fr"}) + "\n" for i, t in enumerate(texts)))
    spec = _spec(tmp_path, tiny_gpt2, corpus).updated(corpus={"path": str(corpus), "keep_fields": ["label", "lang"]})
    run_extract(spec)
    ds = store.open(tmp_path / "acts").dataset("tiny")
    docs = ds.docs()
    assert docs.column("label").to_pylist() == [i % 3 for i in range(30)]
    assert docs.column("lang").to_pylist()[:2] == ["fr", "en"]
    tok, toks = ds.tokenizer(), ds.tokens()
    ids, doc, start, end = (toks.column(c).to_numpy() for c in ("token_id", "doc_id", "char_start", "char_end"))
    body = start >= 0
    assert body.sum() > 100 and (~body == toks.column("special").to_numpy()).all()
    for r in np.flatnonzero(body)[:200]:  # each token is exactly the text its span covers
        assert tok.decode([int(ids[r])]) == texts[doc[r]][start[r] : end[r]], r
    # Changing the kept fields later rewrites the document table (no unit is recomputed).
    again = run_extract(spec.updated(corpus=spec.corpus.updated(keep_fields=["label"])))
    assert again.units_run == 0
    assert store.open(tmp_path / "acts").dataset("tiny").docs().column_names[-2:] == ["dropped_tokens", "label"]


@pytest.mark.slow
@pytest.mark.ray
def test_local_and_ray_executors_store_the_same_bytes(ray_session, tmp_path, tiny_gpt2, corpus_file):
    """``compute.executor: local`` (no Ray) and the Ray actor pool compute the same dataset:
    every hook's rows, the token table and the document index are equal, exactly."""
    hooks = ("blocks.*.hook_resid_post", "blocks.0.hook_mlp_out")
    local = _spec(tmp_path, tiny_gpt2, corpus_file, store_uri=str(tmp_path / "local"), hooks=hooks, dtype="float16",
                  cpus_per_worker=2)
    on_ray = _spec(tmp_path, tiny_gpt2, corpus_file, store_uri=str(tmp_path / "ray"), hooks=hooks, dtype="float16",
                   cpus_per_worker=2, executor="ray")
    pids: list[int] = []
    a = run_extract(local, progress=False, on_unit=lambda st: pids.append(st["pid"]))
    assert a.cluster_address == "local" and set(pids) == {os.getpid()}  # no Ray: this process computed every unit
    pids.clear()
    b = run_extract(on_ray, progress=False, on_unit=lambda st: pids.append(st["pid"]))
    assert b.private_cluster and os.getpid() not in pids  # a Ray worker did
    assert a.units_run == b.units_run == a.num_units >= 3
    da, db = store.open(tmp_path / "local").dataset("tiny"), store.open(tmp_path / "ray").dataset("tiny")
    assert da.hooks == db.hooks and len(da.hooks) == 3
    for h in da.hooks:
        rows = da.num_rows(h)
        assert rows == db.num_rows(h) == a.tokens
        x, y = da.read(h, rows=slice(0, rows)), db.read(h, rows=slice(0, rows))
        assert x.dtype == y.dtype == np.float16 and x.shape == y.shape == (rows, 32)
        assert x.tobytes() == y.tobytes(), h
    assert da.tokens().equals(db.tokens())
    assert da.docs().equals(db.docs())
