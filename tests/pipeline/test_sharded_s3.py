"""Sharded corpora on S3 (moto's server on loopback): a prefix of `.jsonl`, `.jsonl.gz` and
`.jsonl.zst` shards extracts exactly as the same files on local disk, with the endpoint and
credentials in `corpus.storage_options` and never written or logged; an overwritten object is
refused or recomputed as `on_change` says; bad input is one line naming the URL and writes nothing."""

from __future__ import annotations

import gzip
import json
import logging
import re
import socket
from pathlib import Path

import boto3
import numpy as np
import pytest
import zstandard

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.errors import CorpusError
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import synthetic_docs
from strata.store.datasets.tokenized import TokenizedShard

pytestmark = pytest.mark.s3

CTX, UC = 16, 4
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
KEY, SECRET = "AKIA-STRATA-FAKE-KEY", "strata-s3-test-SECRET-not-for-the-store"
# Shard i's file name: plain, gzip and zstd JSON lines under one prefix.
NAMES = ["part-000.jsonl.gz", "part-001.jsonl.gz", "part-002.jsonl.zst", "part-003.jsonl", "part-004.jsonl.gz"]
SIZES = [9, 6, 11, 7, 8]


def _encode(name: str, docs: list[str]) -> bytes:
    plain = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    if name.endswith(".gz"):
        return gzip.compress(plain, mtime=0)
    if name.endswith(".zst"):
        return zstandard.ZstdCompressor().compress(plain)
    return plain


def _corpus(seed: int = 0) -> dict[str, list[str]]:
    out = {}
    for i, (name, n) in enumerate(zip(NAMES, SIZES)):
        docs = synthetic_docs(n, seed=seed + i)
        if i == 1:
            docs.insert(2, "  ")  # an empty record: skipped, and counted by the ordinal ids of later shards
        out[name] = docs
    return out


def _put(endpoint: str, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1")
    for name, data in files.items():
        s3.put_object(Bucket=bucket.removeprefix("s3://"), Key=f"{prefix}/{name}", Body=data)


def _write_local(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _options(endpoint: str) -> dict:
    return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}


def _spec(root: Path, model: Path, path: str, name: str = "c", **corpus) -> ExtractSpec:
    return ExtractSpec(store=str(root), name=name, model={"id": str(model)}, corpus={"path": path, **corpus},
                       tokenize={"context_size": CTX}, hooks=HOOKS, dtype="float32",
                       compute={"executor": "local", "unit_contexts": UC, "batch_tokens": UC * CTX})


@pytest.fixture
def no_aws_env(s3_env, monkeypatch):
    """Only `corpus.storage_options` says where S3 is and who we are (the bucket exists already)."""
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    return s3_env


def _same_dataset(a, b) -> None:
    """Token tables, activations and document index of two datasets are identical."""
    assert a.info.num_units == b.info.num_units > 0
    for h in HOOKS:
        ta, tb = a.tokens(h), b.tokens(h)
        assert ta.equals(tb)
    for u in range(a.info.num_units):
        ua, ub = a.unit_tokens(u), b.unit_tokens(u)
        assert ua.equals(ub), u
        rows = ua.column("row").to_numpy() if "row" in ua.column_names else None
        r0 = u * UC * CTX
        n = ua.num_rows
        if rows is not None:
            assert rows.tolist() == list(range(r0, r0 + n))
        for h in HOOKS:
            np.testing.assert_array_equal(a.read(h, rows=slice(r0, r0 + n)), b.read(h, rows=slice(r0, r0 + n)))
    assert a.docs().equals(b.docs())


def _no_files(root: Path, name: str) -> None:
    d = root / "datasets" / name
    left = sorted(str(p) for p in d.rglob("*") if p.is_file()) if d.exists() else []
    assert not left, left


@pytest.mark.slow
def test_s3_prefix_extracts_as_local_files_and_keeps_no_secret(tmp_path, tiny_gpt2, s3_bucket, no_aws_env, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="strata")
    docs = _corpus()
    files = {n: _encode(n, d) for n, d in docs.items()}
    _put(no_aws_env, s3_bucket, "corpus", files)
    _write_local(tmp_path / "local", files)
    opts = _options(no_aws_env)
    res = run_extract(_spec(tmp_path / "s3acts", tiny_gpt2, f"{s3_bucket}/corpus/", storage_options=opts), progress=False)
    assert opts == _options(no_aws_env)  # not changed
    assert res.shards == res.shards_tokenized == len(NAMES)
    assert sorted(res.shard_nodes) == [f"{s3_bucket}/corpus/{n}" for n in NAMES]
    local = run_extract(_spec(tmp_path / "localacts", tiny_gpt2, str(tmp_path / "local")), progress=False)
    assert local.num_units == res.num_units and local.tokens == res.tokens > 0
    s3ds = store.open(str(tmp_path / "s3acts")).dataset("c")
    lds = store.open(str(tmp_path / "localacts")).dataset("c")
    assert s3ds.info.meta["plan_kind"] == lds.info.meta["plan_kind"] == "sharded"
    _same_dataset(s3ds, lds)
    n_docs = sum(1 for d in docs.values() for t in d if t.strip())
    assert s3ds.docs().num_rows == n_docs
    shards = s3ds.shards()
    assert shards.column("name").to_pylist() == [f"{s3_bucket}/corpus/{n}" for n in NAMES]
    assert shards.column("records").to_pylist() == [len(d) for d in docs.values()]
    assert all(f.startswith("etag:") for f in shards.column("fingerprint").to_pylist())
    # The credentials are nowhere: not in the manifest, the shards table, the tokenized shards'
    # records, any file of the store, the logs or the output.
    storage = store.open(str(tmp_path / "s3acts")).storage
    texts = [json.dumps(s3ds.info.meta), json.dumps(shards.to_pylist(), default=str), caplog.text, *capsys.readouterr()]
    texts += [json.dumps(TokenizedShard.open(storage, "c", k).meta) for k in shards.column("key").to_pylist()]
    blobs = [p.read_bytes() for p in (tmp_path / "s3acts").rglob("*") if p.is_file()]
    assert len(blobs) > len(NAMES) * 3
    for secret in (KEY, SECRET):
        assert not any(secret in t for t in texts)
        assert not any(secret.encode() in b for b in blobs)


@pytest.mark.slow
def test_an_overwritten_s3_object_is_refused_or_recomputed(tmp_path, tiny_gpt2, s3_bucket, no_aws_env):
    docs = _corpus(seed=10)
    files = {n: _encode(n, d) for n, d in docs.items()}
    _put(no_aws_env, s3_bucket, "c", files)
    url = f"{s3_bucket}/c/"
    spec = _spec(tmp_path / "acts", tiny_gpt2, url, storage_options=_options(no_aws_env))
    run_extract(spec, progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("c")
    table = ds.shards()
    first, units = table.column("first_unit").to_pylist(), table.column("units").to_pylist()
    before = {u: ds.record(HOOKS[0], u).committed_at for u in range(ds.info.num_units)}
    # The zstd shard is overwritten: one word of one document changes, as many records as before.
    name = NAMES[2]
    changed = list(docs[name])
    changed[3] = changed[3].replace(changed[3].split()[0], "zebra", 1)
    _put(no_aws_env, s3_bucket, "c", {name: _encode(name, changed)})
    refuse = _spec(tmp_path / "acts", tiny_gpt2, url, storage_options=_options(no_aws_env), on_change="refuse")
    with pytest.raises(CorpusError, match=r"1 shard\(s\) changed .*" + re.escape(f"{s3_bucket}/c/{name}")) as info:
        run_extract(refuse, progress=False)
    assert "\n" not in str(info.value) and SECRET not in str(info.value)
    ds.refresh()
    assert {u: ds.record(HOOKS[0], u).committed_at for u in range(ds.info.num_units)} == before  # refused: nothing touched
    res = run_extract(spec, progress=False)
    mine = set(range(first[2], first[2] + units[2]))
    assert set(res.units_recomputed) == mine and res.shards_tokenized == 1 and res.units_run == len(mine)
    ds.refresh()
    after = {u: ds.record(HOOKS[0], u).committed_at for u in range(ds.info.num_units)}
    assert {u for u in before if after[u] != before[u]} == mine
    # And the dataset is now the changed corpus's, as extracted from local files.
    _write_local(tmp_path / "local", {**files, name: _encode(name, changed)})
    run_extract(_spec(tmp_path / "localacts", tiny_gpt2, str(tmp_path / "local")), progress=False)
    _same_dataset(ds, store.open(str(tmp_path / "localacts")).dataset("c"))


def _one_line_error(tmp_path: Path, spec: ExtractSpec, pattern: str) -> str:
    with pytest.raises(CorpusError, match=pattern) as info:
        run_extract(spec, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and SECRET not in msg and KEY not in msg, msg
    _no_files(tmp_path / "acts", spec.name)
    return msg


def test_a_prefix_matching_nothing_is_one_line_and_writes_nothing(tmp_path, tiny_gpt2, s3_bucket, no_aws_env):
    _put(no_aws_env, s3_bucket, "there", {"a.jsonl": _encode("a.jsonl", synthetic_docs(3))})
    url = f"{s3_bucket}/nothing/"
    _one_line_error(tmp_path, _spec(tmp_path / "acts", tiny_gpt2, url, storage_options=_options(no_aws_env)), re.escape(url.rstrip("/")))


def test_a_truncated_zst_shard_is_one_line_and_writes_nothing(tmp_path, tiny_gpt2, s3_bucket, no_aws_env):
    good = _encode("a.jsonl.gz", synthetic_docs(40, seed=3))
    data = _encode("b.jsonl.zst", synthetic_docs(200, seed=4))
    _put(no_aws_env, s3_bucket, "t", {"a.jsonl.gz": good, "b.jsonl.zst": data[: len(data) - 7]})
    spec = _spec(tmp_path / "acts", tiny_gpt2, f"{s3_bucket}/t/", storage_options=_options(no_aws_env))
    _one_line_error(tmp_path, spec, re.escape(f"{s3_bucket}/t/b.jsonl.zst") + r".*truncated")


def test_an_unreachable_endpoint_is_one_line_and_writes_nothing(tmp_path, tiny_gpt2, s3_bucket, no_aws_env):
    with socket.socket() as s:  # a loopback port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"{s3_bucket}/corpus/"
    spec = _spec(tmp_path / "acts", tiny_gpt2, url, storage_options=_options(f"http://127.0.0.1:{port}"))
    msg = _one_line_error(tmp_path, spec, re.escape(url.rstrip("/")) + r".*cannot reach the s3 endpoint")
    assert str(port) not in msg
