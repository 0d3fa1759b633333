"""pipeline/sources.py: listing corpus shards locally and on S3 (moto's server), reading them
compressed or not, splitting large Parquet files, and the one-line errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
import zstandard
from botocore.exceptions import ClientError

from strata.pipeline.config import CorpusSpec
from strata.pipeline.corpus import corpus_files, read_corpus
from strata.pipeline.errors import CorpusError, ShardChangedError
from strata.pipeline.sources import ShardReader, ShardRef, list_shards, storage_error

SECRET = "SeCrEtKeY-do-not-print-1234"


def _docs(n: int, tag: str = "") -> list[dict]:
    return [{"text": f"document {tag}{i} " + "word " * (i % 7), "id": f"{tag}{i}"} for i in range(n)]


def _jsonl_bytes(recs: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in recs).encode("utf-8")


def _read(refs: list[ShardRef], src: CorpusSpec, **kw) -> list[dict]:
    return [rec for r in refs for rec, _, _ in ShardReader(r, src, **kw).records()]


def _tree(root: Path) -> dict[str, bytes]:
    """A small corpus folder: nested files, a hidden and a `_` file that must be left out."""
    files = {
        "a.jsonl": _jsonl_bytes(_docs(5, "a")),
        "sub/b.jsonl": _jsonl_bytes(_docs(3, "b")),
        "sub/deeper/c.jsonl": _jsonl_bytes(_docs(4, "c")),
        "_SUCCESS": b"",
        ".hidden.jsonl": b"not json\n",
        "_tmp/d.jsonl": b"not json either\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _s3(s3_env: str):
    return boto3.client("s3", endpoint_url=s3_env)


def _put_tree(s3_env: str, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    c = _s3(s3_env)
    for rel, data in files.items():
        c.put_object(Bucket=bucket.removeprefix("s3://"), Key=f"{prefix}/{rel}", Body=data)


# ------------------------------------------------------------------ local


def test_local_file_folder_and_glob_list_the_same_records(tmp_path):
    files = _tree(tmp_path / "c")
    folder = list_shards(CorpusSpec(path=str(tmp_path / "c")))
    assert [r.url for r in folder] == sorted(str(tmp_path / "c" / f) for f in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl"))
    for r in folder:
        st = os.stat(r.url)
        assert (r.size, r.mtime_ns, r.compression, r.format, r.remote, r.etag) == (st.st_size, st.st_mtime_ns, None, "jsonl", False, None)
    src = CorpusSpec(path=str(tmp_path / "c"))
    expect = [json.loads(line) for f in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl") for line in files[f].splitlines()]
    assert _read(folder, src) == expect
    glob = list_shards(CorpusSpec(path=str(tmp_path / "c" / "**" / "*.jsonl")))
    assert [r.url for r in glob] == [r.url for r in folder]
    assert list_shards(CorpusSpec(path=f"file://{tmp_path / 'c'}")) == folder
    one = list_shards(CorpusSpec(path=str(tmp_path / "c" / "sub" / "b.jsonl")))
    assert len(one) == 1 and _read(one, src) == expect[5:8]


def test_listing_round_trips_and_where_names_url_and_line(tmp_path):
    _tree(tmp_path)
    ref = list_shards(CorpusSpec(path=str(tmp_path / "a.jsonl")))[0]
    assert ShardRef.from_listing(json.loads(json.dumps(ref.listing()))) == ref
    split = ShardRef("s3://b/k.parquet", "parquet", None, 10, etag="e", row_groups=(2, 5))
    assert ShardRef.from_listing(json.loads(json.dumps(split.listing()))) == split
    assert split.name == "s3://b/k.parquet#row-groups 2-5" and split.remote and split.listed_fingerprint() == "etag:e:10"
    assert ShardRef("s3://b/k", "jsonl", None, 3, version="v1").listed_fingerprint() == "version:v1:3"
    assert ref.listed_fingerprint() is None and ref.name == ref.url
    wheres = [w for _, _, w in ShardReader(ref, CorpusSpec(path=ref.url)).records()]
    assert wheres == [f"{ref.url}:{i}" for i in range(1, 6)]


@pytest.mark.parametrize("fmt,text_unit", [("jsonl", "file"), ("text", "line"), ("text", "file")])
def test_compressed_files_read_as_the_uncompressed_one(tmp_path, fmt, text_unit):
    plain = _jsonl_bytes(_docs(300)) if fmt == "jsonl" else "".join(f"line {i} é\n" for i in range(300)).encode()
    ext = ".jsonl" if fmt == "jsonl" else ".txt"
    (tmp_path / f"p{ext}").write_bytes(plain)
    (tmp_path / f"g{ext}.gz").write_bytes(gzip.compress(plain))
    # Two zstd frames, as pzstd writes them: both are read.
    (tmp_path / f"z{ext}.zst").write_bytes(zstandard.ZstdCompressor().compress(plain[:1000]) + zstandard.ZstdCompressor().compress(plain[1000:]))
    got = {}
    for name in ("p", "g", "z"):
        path = str(next(tmp_path.glob(f"{name}{ext}*")))
        src = CorpusSpec(path=path, format=fmt, text_unit=text_unit)
        refs = list_shards(src)
        got[name] = [rec["text"] for rec in _read(refs, src)]
        reader = ShardReader(refs[0], src)
        list(reader.records())
        assert reader.fingerprint == f"xxh3_128:{xxhash.xxh3_128_hexdigest(Path(path).read_bytes())}"  # the stored bytes
    assert refs[0].compression == "zstd"
    assert got["g"] == got["p"] and got["z"] == got["p"] and len(got["p"]) == (1 if (fmt, text_unit) == ("text", "file") else 300)
    # And the one-corpus path reads them too.
    assert read_corpus(CorpusSpec(path=str(tmp_path / f"z{ext}.zst"), format=fmt, text_unit=text_unit)).texts == [t for t in got["p"] if t.strip()]


@pytest.mark.parametrize("ext", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
def test_a_truncated_compressed_file_is_one_line_naming_it(tmp_path, ext):
    plain = _jsonl_bytes(_docs(2000))
    data = gzip.compress(plain) if ext.endswith(".gz") else zstandard.ZstdCompressor().compress(plain)
    path = tmp_path / f"c{ext}"
    path.write_bytes(data[: len(data) // 2])
    src = CorpusSpec(path=str(path), format="jsonl" if ".jsonl" in ext else "text", text_unit="line")
    with pytest.raises(CorpusError, match="truncated") as info:
        _read(list_shards(src), src)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CorpusError, match="truncated"):
        read_corpus(src)


def test_a_shard_rewritten_after_listing_is_refused(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(_jsonl_bytes(_docs(10)))
    src = CorpusSpec(path=str(p))
    ref = list_shards(src)[0]
    p.write_bytes(_jsonl_bytes(_docs(11)))  # another size
    with pytest.raises(ShardChangedError, match="changed since it was listed") as info:
        list(ShardReader(ref, src).records())
    assert str(p) in str(info.value) and isinstance(info.value, CorpusError)
    # Same size, new mtime: changed too; and a change during the read is caught at its end.
    ref = list_shards(src)[0]
    data = p.read_bytes()
    os.utime(p, ns=(ref.mtime_ns + 10**9, ref.mtime_ns + 10**9))
    with pytest.raises(ShardChangedError, match="mtime_ns"):
        list(ShardReader(ref, src).records())
    ref = list_shards(src)[0]
    it = ShardReader(ref, src).records()
    next(it)
    p.write_bytes(data + b'{"text": "appended"}\n')
    with pytest.raises(ShardChangedError, match="after the read"):
        list(it)
    p.unlink()
    with pytest.raises(ShardChangedError, match="no longer exists"):
        list(ShardReader(ref, src).records())


def test_a_large_parquet_file_splits_into_row_group_ranges(tmp_path):
    recs = _docs(1000)
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=100)
    src = CorpusSpec(path=str(tmp_path), format="parquet", id_field="id")
    meta = pq.ParquetFile(path).metadata
    rg = sum(meta.row_group(0).column(c).total_compressed_size for c in range(meta.num_columns))
    refs = list_shards(src, shard_bytes=3 * rg)
    ranges = [r.row_groups for r in refs]
    assert ranges[0] == (0, 3) and ranges[-1][1] == 10 and len(refs) >= 3
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # consecutive, covering all
    assert all(r.url == str(path) and r.name.endswith(f"#row-groups {r.row_groups[0]}-{r.row_groups[1]}") for r in refs)
    assert _read(refs, src) == [{"text": r["text"], "id": r["id"]} for r in recs]
    # Not split: one ref, the whole file.
    assert [r.row_groups for r in list_shards(src)] == [None]
    # Each range has its own fingerprint; the same range read twice has the same one.
    fps = []
    for r in refs + refs[:1]:
        reader = ShardReader(r, src)
        list(reader.records())
        fps.append(reader.fingerprint)
    assert len(set(fps[:-1])) == len(refs) and fps[-1] == fps[0]


def test_local_errors_are_one_line(tmp_path):
    _tree(tmp_path / "c")
    pq.write_table(pa.Table.from_pylist(_docs(3)), tmp_path / "c" / "x.parquet")
    with pytest.raises(CorpusError, match=r"mixes formats: .*a\.jsonl \(jsonl\) and .*x\.parquet \(parquet\).*glob") as info:
        list_shards(CorpusSpec(path=str(tmp_path / "c")))
    assert "\n" not in str(info.value)
    with pytest.raises(CorpusError, match="mixes formats"):
        list_shards(CorpusSpec(path=str(tmp_path / "c" / "*")))
    with pytest.raises(CorpusError, match="matches no jsonl files"):
        list_shards(CorpusSpec(path=str(tmp_path / "c" / "*.csv")))
    (tmp_path / "t").mkdir()
    pq.write_table(pa.Table.from_pylist(_docs(3)), tmp_path / "t" / "x.parquet")
    with pytest.raises(CorpusError, match=r"matches no jsonl files \(it holds parquet files such as .*x\.parquet"):
        list_shards(CorpusSpec(path=str(tmp_path / "t")))
    with pytest.raises(CorpusError, match="does not exist"):
        list_shards(CorpusSpec(path=str(tmp_path / "nothing")))
    with pytest.raises(CorpusError, match=r"foo://x/y: fsspec has no protocol 'foo'"):
        list_shards(CorpusSpec(path="foo://x/y"))
    # hf:// is fsspec's (HfFileSystem), unchanged: offline, it cannot be reached; it is not an unknown protocol.
    with pytest.raises(CorpusError, match=r"^hf://datasets/someone/c/\*\.parquet: cannot reach the hf endpoint"):
        list_shards(CorpusSpec(path="hf://datasets/someone/c/*.parquet", format="parquet"))


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_says_what_to_install():
    with pytest.raises(CorpusError, match=r"gs://b/c\.jsonl: .*pip install strata\[gcs\]"):
        list_shards(CorpusSpec(path="gs://b/c.jsonl"))


def test_auth_errors_are_named_without_the_key():
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
        e = ClientError({"Error": {"Code": code, "Message": f"The key {SECRET} is wrong"}}, "ListObjectsV2")
        try:
            raise PermissionError(str(e)) from e
        except PermissionError as wrapped:
            msg = str(storage_error(wrapped, "s3://b/k", storage_options={"secret": SECRET}))
        assert msg.startswith("s3://b/k: access refused") and code in msg and SECRET not in msg and "\n" not in msg
    other = storage_error(OSError(f"weird failure with {SECRET}"), "s3://b/k", storage_options={"key": "k", "secret": SECRET})
    assert SECRET not in str(other) and "s3://b/k" in str(other)


# ------------------------------------------------------------------ S3 (moto's server)


@pytest.mark.s3
def test_s3_prefix_glob_and_object_read_as_the_local_files(tmp_path, s3_env, s3_bucket):
    files = _tree(tmp_path / "c")
    files["z/e.jsonl.gz"] = gzip.compress(_jsonl_bytes(_docs(6, "e")))
    (tmp_path / "c" / "z").mkdir()
    (tmp_path / "c" / "z" / "e.jsonl.gz").write_bytes(files["z/e.jsonl.gz"])
    _put_tree(s3_env, s3_bucket, "corpus", files)
    local_src = CorpusSpec(path=str(tmp_path / "c"))
    local = _read(list_shards(local_src), local_src)
    for url in (f"{s3_bucket}/corpus", f"{s3_bucket}/corpus/"):
        src = CorpusSpec(path=url)
        refs = list_shards(src)
        assert [r.url for r in refs] == [f"{s3_bucket}/corpus/{k}" for k in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl", "z/e.jsonl.gz")]
        assert all(r.remote and r.etag and '"' not in r.etag and r.mtime_ns is None for r in refs)
        assert [r.size for r in refs] == [len(files[k]) for k in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl", "z/e.jsonl.gz")]
        assert _read(refs, src) == local
    glob = CorpusSpec(path=f"{s3_bucket}/corpus/z/*.jsonl.gz")
    refs = list_shards(glob)
    assert [r.compression for r in refs] == ["gzip"] and _read(refs, glob) == local[-6:]
    one = CorpusSpec(path=f"{s3_bucket}/corpus/a.jsonl")
    reader = ShardReader(list_shards(one)[0], one)
    assert [rec for rec, _, _ in reader.records()] == local[:5]
    assert reader.fingerprint == f"etag:{reader.ref.etag}:{len(files['a.jsonl'])}"
    # The one-corpus path takes the URL too.
    assert corpus_files(CorpusSpec(path=f"{s3_bucket}/corpus")) == [r.url for r in list_shards(CorpusSpec(path=f"{s3_bucket}/corpus"))]
    assert read_corpus(CorpusSpec(path=f"{s3_bucket}/corpus/", id_field="id")).texts == [r["text"] for r in local]


@pytest.mark.s3
def test_s3_parquet_split_and_explicit_storage_options(tmp_path, s3_env, s3_bucket, monkeypatch):
    recs = _docs(400)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "p.parquet", row_group_size=50)
    _put_tree(s3_env, s3_bucket, "pq", {"p.parquet": (tmp_path / "p.parquet").read_bytes()})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = {"client_kwargs": {"endpoint_url": s3_env}, "key": "testing", "secret": "testing"}
    src = CorpusSpec(path=f"{s3_bucket}/pq/", format="parquet", storage_options=opts)
    refs = list_shards(src, shard_bytes=1)
    assert [r.row_groups for r in refs] == [(i, i + 1) for i in range(8)]
    assert _read(refs, src) == [{"text": r["text"]} for r in recs]
    assert opts == {"client_kwargs": {"endpoint_url": s3_env}, "key": "testing", "secret": "testing"}  # not changed


@pytest.mark.s3
def test_s3_object_overwritten_after_listing_is_refused(s3_env, s3_bucket):
    _put_tree(s3_env, s3_bucket, "c", {"a.jsonl": _jsonl_bytes(_docs(4))})
    src = CorpusSpec(path=f"{s3_bucket}/c/a.jsonl")
    ref = list_shards(src)[0]
    _put_tree(s3_env, s3_bucket, "c", {"a.jsonl": _jsonl_bytes(_docs(4, "x"))})  # new bytes, new ETag
    with pytest.raises(ShardChangedError, match=r"a\.jsonl: the shard changed since it was listed \(at open: .*ETag"):
        list(ShardReader(ref, src).records())


@pytest.mark.s3
def test_s3_truncated_zst_and_errors_are_one_line_without_secrets(s3_env, s3_bucket, monkeypatch):
    data = zstandard.ZstdCompressor().compress(_jsonl_bytes(_docs(3000)))
    _put_tree(s3_env, s3_bucket, "t", {"c.jsonl.zst": data[: len(data) - 7]})
    src = CorpusSpec(path=f"{s3_bucket}/t/c.jsonl.zst")
    with pytest.raises(CorpusError, match=r"c\.jsonl\.zst: the zstd stream is truncated"):
        _read(list_shards(src), src)
    with pytest.raises(CorpusError, match=r"matches no files"):
        list_shards(CorpusSpec(path=f"{s3_bucket}/t/*.parquet"))
    with pytest.raises(CorpusError, match=r"does not exist"):
        list_shards(CorpusSpec(path=f"{s3_bucket}/nothing/"))
    pq_buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(_docs(2)), pq_buf)
    _put_tree(s3_env, s3_bucket, "mixed", {"a.jsonl": b'{"text": "x"}\n', "b.parquet": pq_buf.getvalue().to_pybytes()})
    with pytest.raises(CorpusError, match=r"mixes formats: .*a\.jsonl \(jsonl\) and .*b\.parquet \(parquet\)"):
        list_shards(CorpusSpec(path=f"{s3_bucket}/mixed"))
    secret_opts = {"key": "AKIAEXAMPLE", "secret": SECRET}
    with pytest.raises(CorpusError, match=r"no such bucket 'strata-no-such-bucket'") as info:
        list_shards(CorpusSpec(path="s3://strata-no-such-bucket/c/", storage_options=secret_opts))
    assert SECRET not in str(info.value) and "\n" not in str(info.value)
    # An endpoint that does not answer: fast, one line, no secret.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    closed = {**secret_opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    t = time.monotonic()
    with pytest.raises(CorpusError, match=r"cannot reach the s3 endpoint") as info:
        list_shards(CorpusSpec(path="s3://somebucket/c/", storage_options=closed))
    assert time.monotonic() - t < 8
    assert SECRET not in str(info.value) and "\n" not in str(info.value) and str(port) not in str(info.value)


def test_multi_frame_files_larger_than_a_read_chunk(tmp_path):
    """Frames and gzip members that straddle the 1 MiB reads, and a line longer than one read."""
    rng = __import__("random").Random(0)
    recs = [{"text": "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 3000)))} for _ in range(3000)]
    recs.append({"text": "x" * (3 << 20)})
    plain = _jsonl_bytes(recs)
    thirds = [plain[: len(plain) // 3], plain[len(plain) // 3: 2 * len(plain) // 3], plain[2 * len(plain) // 3:]]
    (tmp_path / "c.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor(level=1).compress(p) for p in thirds))
    (tmp_path / "c.jsonl.gz").write_bytes(b"".join(gzip.compress(p, compresslevel=1) for p in thirds))
    assert min((tmp_path / n).stat().st_size for n in ("c.jsonl.gz", "c.jsonl.zst")) > 1 << 20
    for name in ("c.jsonl.zst", "c.jsonl.gz"):
        src = CorpusSpec(path=str(tmp_path / name))
        assert _read(list_shards(src), src) == recs


@pytest.fixture
def s3_auth(s3_env):
    """moto's server checking credentials (it accepts any by default) for one test: keys it
    never issued are then refused with InvalidAccessKeyId, as S3 refuses them."""
    def post(value: str) -> str:
        with urllib.request.urlopen(urllib.request.Request(f"{s3_env}/moto-api/reset-auth", data=value.encode(), method="POST",
                                                           headers={"Content-Type": "application/octet-stream"})) as r:
            return json.loads(r.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]

    previous = post("0")
    try:
        yield s3_env
    finally:
        post(previous)


@pytest.mark.s3
def test_s3_wrong_credentials_are_one_line_without_the_secret(s3_bucket, s3_auth):
    src = CorpusSpec(path=f"{s3_bucket}/c/", storage_options={"key": "AKIANOTISSUED000", "secret": SECRET})
    # A refused HEAD has no body, so only its status (403) names the refusal.
    with pytest.raises(CorpusError, match=r"^s3://strata-\w+/c/: access refused \((InvalidAccessKeyId|403)\)") as info:
        list_shards(src)
    assert SECRET not in str(info.value) and "AKIANOTISSUED000" not in str(info.value) and "\n" not in str(info.value)
