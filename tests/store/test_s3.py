"""Activation datasets on S3, against moto's server on loopback: round trips per dtype, writer
processes in parallel and racing on one unit, corruption and truncation, a reader opened while
units are still being written."""

from __future__ import annotations

import json
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import boto3
import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr

from strata import store
from strata.store.storage import FsspecStorage

try:
    from tests.store.helpers import CONTEXT_SIZE, HOOK, HOOK2, UNIT_ROWS, D, create_small, token_table, unit_acts, write_units, writer_process
except ImportError:  # pytest's default rootdir import mode puts tests/store itself on sys.path
    from helpers import CONTEXT_SIZE, HOOK, HOOK2, UNIT_ROWS, D, create_small, token_table, unit_acts, write_units, writer_process

pytestmark = pytest.mark.s3

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT_VIEW = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}

# Values where a wrong conversion shows: signed zero, a float32 subnormal, float16's largest
# finite value and the first value that rounds to inf, float16 subnormal and underflow,
# bfloat16 round-to-nearest-even ties (1 + 2**-8 -> 1, 1 + 3 * 2**-8 -> 1 + 2**-6), huge, -inf.
SPECIAL = np.array(
    [0.0, -0.0, 1e-40, 65504.0, 65520.0, 6e-8, 1e-8, 1.00390625, 1.01171875, 3.0e38, -np.inf, -2.5, 1 / 3, 1e4, -7e-3, 0.1],
    dtype=np.float32,
)


def _bucket_and_key(uri: str, key: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, f"{prefix}/{key}" if prefix else key


def _s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


def _shard_key(name: str, hook: str, unit: int) -> str:
    # Zarr v3's default chunk key encoding of shard (unit, 0) of the hook's array.
    return f"datasets/{name}/acts/{hook}/c/{unit}/0"


def _expected(units, *, dtype: str = "float16", seed: int = 0) -> np.ndarray:
    """What ``read`` returns for these units, converted independently with torch."""
    ref = torch.from_numpy(np.concatenate([unit_acts(k, seed=seed) for k in units])).to(TORCH[dtype])
    return ref.float().numpy() if dtype == "bfloat16" else ref.numpy()


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 65520 -> inf in float16, on purpose
def test_round_trip_per_dtype(s3_bucket: str, dtype: str) -> None:
    uri = f"{s3_bucket}/acts"
    s = store.open(uri)
    w = create_small(s, "rt", dtype=dtype, num_units=2, hooks={HOOK: D, HOOK2: 4})
    a0 = unit_acts(0)
    a0[0] = SPECIAL  # row 0 holds the special values
    a1 = unit_acts(1)
    b = np.random.default_rng(7).standard_normal((2 * UNIT_ROWS, 4)).astype(np.float32)
    # torch input for one unit, NumPy for the other: both are accepted.
    assert w.write_unit(0, tokens=token_table(0), acts={HOOK: a0, HOOK2: b[:UNIT_ROWS]}) == {
        "tokens": "committed",
        HOOK: "committed",
        HOOK2: "committed",
    }
    w.write_unit(1, tokens=token_table(1), acts={HOOK: torch.from_numpy(a1), HOOK2: torch.from_numpy(b[UNIT_ROWS:])})

    ds = store.open(uri).dataset("rt")  # a second open of the store sees everything
    assert ds.info.dtype == dtype and ds.hooks == [HOOK, HOOK2]
    assert ds.num_rows(HOOK) == ds.num_rows(HOOK2) == ds.num_rows() == 2 * UNIT_ROWS
    for hook, full in ((HOOK, np.concatenate([a0, a1])), (HOOK2, b)):
        ref = torch.from_numpy(full).to(TORCH[dtype])
        got_t = ds.read(hook, as_="torch")
        assert got_t.dtype == TORCH[dtype] and tuple(got_t.shape) == tuple(full.shape)
        # bit-exact, so -0.0 and inf count
        assert torch.equal(got_t.view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype]))
        got = ds.read(hook)
        want = ref.float().numpy() if dtype == "bfloat16" else ref.numpy()
        assert got.dtype == want.dtype
        assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
        # a row slice across the unit boundary and an index array in any order
        assert np.array_equal(ds.read(hook, rows=slice(10, 20)), want[10:20])
        idx = np.array([31, 0, 17, 16, 3])
        assert np.array_equal(ds.read(hook, rows=idx), want[idx])

    toks = ds.tokens()
    expect = pa.concat_tables([token_table(0), token_table(1)])
    for col in store.TOKEN_COLUMNS:
        assert toks.column(col).to_pylist() == expect.column(col).to_pylist(), col
    assert toks.column("row").to_pylist() == list(range(2 * UNIT_ROWS))

    # The shards are Zarr v3: zarr itself reads the same values through the same S3 endpoint
    # (bfloat16 as its uint16 bits, the logical dtype in the attributes).
    arr = zarr.open_array(store=s.zarr_store, path=f"datasets/rt/acts/{HOOK}", mode="r")
    assert arr.attrs["strata"]["dtype"] == dtype
    ref = torch.from_numpy(np.concatenate([a0, a1])).to(TORCH[dtype])
    assert np.array_equal(arr[: 2 * UNIT_ROWS].view(f"u{arr.dtype.itemsize}"), ref.view(INT_VIEW[dtype]).numpy().view(f"u{arr.dtype.itemsize}"))

    assert s.datasets() == ["rt"]
    report = ds.verify()
    assert report.ok, str(report)
    assert report.units_checked == 2 and report.files_checked == 2 * 3  # tokens + 2 hooks per unit


def test_datasets_and_catalog_on_s3(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/cat"
    s = store.open(uri)
    assert s.datasets() == []
    create_small(s, "b-set", num_units=3, meta={"model": "m-b"})
    create_small(s, "a-set", num_units=5, dtype="float32", meta={"model": "m-a"})
    s2 = store.open(uri)
    assert s2.datasets() == ["a-set", "b-set"]
    cat = s2.catalog().sort_by("name").to_pydict()
    assert cat["name"] == ["a-set", "b-set"]
    assert cat["num_units"] == [5, 3]
    assert cat["model"] == ["m-a", "m-b"]
    assert cat["dtype"] == ["float32", "float16"]
    with pytest.raises(store.DatasetNotFoundError, match="a-set, b-set"):
        s2.dataset("c-set")


def test_bucket_root_store_and_short_last_unit(s3_bucket: str) -> None:
    s = store.open(s3_bucket)  # the bucket itself, no prefix
    w = create_small(s, "short", num_units=2)
    w.write_unit(0, tokens=token_table(0), acts={HOOK: unit_acts(0)})
    # the last unit of a corpus may hold fewer contexts
    assert w.write_unit(1, tokens=token_table(1, contexts=1), acts={HOOK: unit_acts(1, rows=8)})[HOOK] == "committed"
    ds = store.open(s3_bucket + "/").dataset("short")
    assert ds.num_rows(HOOK) == UNIT_ROWS + 8
    want = torch.from_numpy(np.concatenate([unit_acts(0), unit_acts(1, rows=8)])).half().numpy()
    assert np.array_equal(ds.read(HOOK), want)
    assert np.array_equal(ds.read(HOOK, rows=[UNIT_ROWS + 7, 2]), want[[UNIT_ROWS + 7, 2]])
    with pytest.raises(store.RowOutOfRangeError, match="the dataset has 24 rows"):
        ds.read(HOOK, rows=[UNIT_ROWS + 8])  # past the short unit's rows
    with pytest.raises(store.RowOutOfRangeError, match="the dataset has 24 rows"):
        ds.read(HOOK, rows=slice(0, UNIT_ROWS + 9))  # a slice past the end behaves alike
    assert ds.verify().ok
    assert store.open(s3_bucket).datasets() == ["short"]


def test_open_missing_bucket_is_a_storage_error(s3_env: str) -> None:
    with pytest.raises(store.StorageError, match="no-such-bucket-xyz") as e:
        store.open("s3://no-such-bucket-xyz/p")
    assert "does not exist" in str(e.value)
    assert isinstance(e.value, OSError)


# -- writer processes --------------------------------------------------------------------------


def _run_writers(uri: str, name: str, plan: list[list[int]], *, barrier: bool = False) -> dict[int, dict]:
    """Run one spawned writer process per entry of ``plan``; returns ``{pid: {unit: status}}``.
    The children inherit ``os.environ``, where ``s3_env`` put the AWS settings."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    bar = ctx.Barrier(len(plan)) if barrier else None
    procs = [ctx.Process(target=writer_process, args=(uri, name, units, queue, bar)) for units in plan]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = {pid: r for pid, r in results.items() if isinstance(r, str)}
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert set(results) == {p.pid for p in procs}
    return results


def _commit(uri: str, endpoint: str, name: str, hook: str | None, unit: int) -> dict:
    sub = "tokens" if hook is None else f"acts/{hook}"
    bucket, key = _bucket_and_key(uri, f"datasets/{name}/commits/{sub}/{unit // 1000:06d}/{unit:08d}.json")
    return json.loads(_s3(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read())


def _keys(uri: str, endpoint: str, sub: str) -> list[str]:
    bucket, prefix = _bucket_and_key(uri, sub)
    pages = _s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def processes_wrote(s3_server: str) -> tuple[str, dict[int, dict]]:
    """One round of writer processes for the tests below (spawning costs seconds: each child
    imports torch): two processes wait at a barrier, both write unit 6 at once (a re-run racing
    the first run), then units 0, 2, 4 and 1, 3, 5 respectively. Returns (uri, {pid: {unit: status}})."""
    import uuid

    with pytest.MonkeyPatch.context() as mp:
        # conftest's `s3_env` is per test; the same settings, for this module-scoped setup.
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        bucket = f"strata-mp-{uuid.uuid4().hex[:8]}"
        _s3(s3_server).create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/mp"
        create_small(store.open(uri), "mp", num_units=7)
        return uri, _run_writers(uri, "mp", [[6, 0, 2, 4], [6, 1, 3, 5]], barrier=True)


def test_writer_processes_commit_every_unit_once(processes_wrote, s3_env: str) -> None:
    uri, results = processes_wrote
    assert len(results) == 2
    writer_of: dict[int, int] = {}
    for pid, statuses in results.items():
        assert sorted(statuses) in ([0, 2, 4, 6], [1, 3, 5, 6])
        for unit, st in statuses.items():
            if unit != 6:
                assert st == {"tokens": "committed", HOOK: "committed"}, (pid, unit, st)
                writer_of[unit] = pid
    assert sorted(writer_of) == list(range(6))
    # Exactly one commit record per unit and hook, each naming the process that wrote it, and
    # exactly one token table per unit.
    units = list(range(7))
    assert _keys(uri, s3_env, "datasets/mp/commits/tokens") == [f"000000/{u:08d}.json" for u in units]
    assert _keys(uri, s3_env, f"datasets/mp/commits/acts/{HOOK}") == [f"000000/{u:08d}.json" for u in units]
    tables = _keys(uri, s3_env, "datasets/mp/tokens")
    assert [t.split(".")[0] for t in tables] == [f"unit-{u:08d}" for u in units]
    for u in range(6):
        for hook in (None, HOOK):
            rec = _commit(uri, s3_env, "mp", hook, u)
            assert rec["writer"]["pid"] == writer_of[u] and rec["rows"] == UNIT_ROWS

    ds = store.open(uri).dataset("mp")
    assert ds.committed_units(HOOK) == units
    assert np.array_equal(ds.read(HOOK), _expected(units))
    assert ds.tokens(HOOK).column("context_id").to_pylist() == [r // CONTEXT_SIZE for r in range(7 * UNIT_ROWS)]
    report = ds.verify()
    assert report.ok and report.units_checked == 7, str(report)


def test_two_processes_racing_on_one_unit(processes_wrote, s3_env: str) -> None:
    uri, results = processes_wrote
    statuses = {pid: r[6] for pid, r in results.items()}
    for what in ("tokens", HOOK):
        got = sorted(st[what] for st in statuses.values())
        assert got == ["already committed", "committed"], (what, statuses)
        winner = next(pid for pid, st in statuses.items() if st[what] == "committed")
        assert _commit(uri, s3_env, "mp", None if what == "tokens" else HOOK, 6)["writer"]["pid"] == winner
    # The loser's token table is gone; the winner's is the one the record names.
    tables = [t for t in _keys(uri, s3_env, "datasets/mp/tokens") if t.startswith("unit-00000006.")]
    assert len(tables) == 1
    assert _commit(uri, s3_env, "mp", None, 6)["files"][0]["key"] == f"datasets/mp/tokens/{tables[0]}"
    ds = store.open(uri).dataset("mp")
    assert np.array_equal(ds.read(HOOK, rows=slice(6 * UNIT_ROWS, 7 * UNIT_ROWS)), _expected([6]))
    assert ds.tokens(HOOK, units=[6]).column("token_id").to_pylist() == token_table(6).column("token_id").to_pylist()


# -- corruption -------------------------------------------------------------------------------


@pytest.fixture
def written(s3_bucket: str, s3_env: str):
    """A float16 dataset with units 0 and 1 committed: (uri, boto3 client)."""
    uri = f"{s3_bucket}/bad"
    w = create_small(store.open(uri), "bad", num_units=2)
    write_units(w, [0, 1])
    return uri, _s3(s3_env)


def _rewrite(uri: str, client, key: str, change) -> None:
    bucket, full = _bucket_and_key(uri, key)
    body = bytearray(client.get_object(Bucket=bucket, Key=full)["Body"].read())
    client.put_object(Bucket=bucket, Key=full, Body=bytes(change(body)))


def _only_problem(report, *, unit: int, hook: str | None, file: str):
    assert not report.ok
    assert [(p.unit, p.hook, p.file) for p in report.problems] == [(unit, hook, file)], str(report)
    return report.problems[0]


def test_overwritten_shard_found_by_verify_and_read(written) -> None:
    uri, client = written
    key = _shard_key("bad", HOOK, 1)
    rng = np.random.default_rng(3)
    _rewrite(uri, client, key, lambda b: rng.integers(0, 256, len(b), dtype=np.uint8).tobytes())

    ds = store.open(uri).dataset("bad")
    _only_problem(ds.verify(), unit=1, hook=HOOK, file=key)
    with pytest.raises(store.CorruptionError) as e:
        store.open(uri).dataset("bad").read(HOOK)
    assert "unit 1" in str(e.value) and key in str(e.value)
    # The good unit still reads, exactly.
    assert np.array_equal(store.open(uri).dataset("bad").read(HOOK, rows=slice(0, UNIT_ROWS)), _expected([0]))


def test_changed_value_found_by_verify(written) -> None:
    uri, client = written
    key = _shard_key("bad", HOOK, 1)

    def flip(b: bytearray) -> bytearray:
        b[2 * 5] ^= 0x40  # one bit of value [0, 5]: the shard index stays valid
        return b

    _rewrite(uri, client, key, flip)
    problem = _only_problem(store.open(uri).dataset("bad").verify(), unit=1, hook=HOOK, file=key)
    assert "checksum" in problem.message


def test_changed_value_raises_on_read(written) -> None:
    uri, client = written

    def flip(b: bytearray) -> bytearray:
        b[2 * 5] ^= 0x40
        return b

    _rewrite(uri, client, _shard_key("bad", HOOK, 1), flip)
    with pytest.raises(store.CorruptionError, match="unit 1"):
        store.open(uri).dataset("bad").read(HOOK)


def test_truncated_shard_found(written) -> None:
    uri, client = written
    key = _shard_key("bad", HOOK, 0)
    _rewrite(uri, client, key, lambda b: b[:-40])

    problem = _only_problem(store.open(uri).dataset("bad").verify(), unit=0, hook=HOOK, file=key)
    assert "truncated" in problem.message
    for rows in (None, slice(0, 3), [5]):  # whole-unit and ranged reads both check the size
        with pytest.raises(store.CorruptionError) as e:
            store.open(uri).dataset("bad").read(HOOK, rows=rows)
        assert "unit 0" in str(e.value) and key in str(e.value)


def test_corrupted_token_table_found(written) -> None:
    uri, client = written
    rec = _commit(uri, client.meta.endpoint_url, "bad", None, 1)
    _rewrite(uri, client, rec["files"][0]["key"], lambda b: b[:10] + bytes(len(b) - 10))

    _only_problem(store.open(uri).dataset("bad").verify(), unit=1, hook=None, file=rec["files"][0]["key"])
    with pytest.raises(store.CorruptionError, match="unit 1"):
        store.open(uri).dataset("bad").tokens()


def test_verify_report_text_names_file(written) -> None:
    uri, client = written
    key = _shard_key("bad", HOOK, 1)
    _rewrite(uri, client, key, lambda b: b[:-40])
    text = str(store.open(uri).dataset("bad").verify())
    assert "unit 1" in text and key in text


# -- readers while a job writes ----------------------------------------------------------------


@pytest.mark.slow
def test_reader_opened_mid_write_sees_committed_units_only(s3_bucket: str, s3_env: str) -> None:
    uri = f"{s3_bucket}/mid"
    w = create_small(store.open(uri), "mid", num_units=4)
    write_units(w, [0, 1])
    # Unit 2 is half written: its shard and a token table are on S3, its commit records are not
    # (a worker that died, or one still running).
    client = _s3(s3_env)
    bucket, src = _bucket_and_key(uri, _shard_key("mid", HOOK, 1))
    _, dst = _bucket_and_key(uri, _shard_key("mid", HOOK, 2))
    client.copy_object(Bucket=bucket, Key=dst, CopySource={"Bucket": bucket, "Key": src})
    _, tkey = _bucket_and_key(uri, "datasets/mid/tokens/unit-00000002.deadbeef0000.parquet")
    client.put_object(Bucket=bucket, Key=tkey, Body=b"PAR1 not really")

    ds = store.open(uri).dataset("mid")
    assert ds.committed_units() == ds.committed_units(HOOK) == [0, 1]
    assert ds.num_rows(HOOK) == ds.num_rows() == 2 * UNIT_ROWS
    assert ds.tokens().num_rows == 2 * UNIT_ROWS
    assert np.array_equal(ds.read(HOOK), _expected([0, 1]))
    for rows in ([2 * UNIT_ROWS + 3], [0, 40], np.arange(20, 2 * UNIT_ROWS + 1)):
        with pytest.raises(store.NotCommittedError, match="unit 2"):
            ds.read(HOOK, rows=rows)
    assert ds.verify(committed_only=True).ok  # uncommitted files are not the reader's business
    assert not ds.verify().ok  # but the dataset is incomplete

    # The worker now finishes unit 2 (replacing the planted shard once it counts as orphaned: 1 s
    # here instead of a minute): the open reader keeps its consistent view until refresh().
    w.orphan_after_s = 1.0
    assert w.write_unit(2, tokens=token_table(2), acts={HOOK: unit_acts(2)})[HOOK] == "committed"
    with pytest.raises(store.NotCommittedError):
        ds.read(HOOK, rows=[2 * UNIT_ROWS])
    assert ds.committed_units(HOOK) == [0, 1]
    ds.refresh()
    assert ds.committed_units(HOOK) == [0, 1, 2]
    assert np.array_equal(ds.read(HOOK), _expected([0, 1, 2]))
    assert ds.tokens(HOOK).column("token_id").to_pylist()[2 * UNIT_ROWS :] == token_table(2).column("token_id").to_pylist()


def test_readers_during_concurrent_writes_see_whole_units(s3_bucket: str, s3_env: str) -> None:
    uri = f"{s3_bucket}/live"
    n = 6
    w = create_small(store.open(uri), "live", num_units=n)
    expected = {k: _expected([k]) for k in range(n)}
    seen: list[list[int]] = []
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(write_units, w, range(n))
        while True:
            done = fut.done()
            ds = store.open(uri).dataset("live")
            units = ds.committed_units(HOOK)
            seen.append(units)
            for u in units:
                assert np.array_equal(ds.read(HOOK, rows=slice(u * UNIT_ROWS, (u + 1) * UNIT_ROWS)), expected[u]), u
            assert ds.tokens(HOOK).num_rows == len(units) * UNIT_ROWS
            if done:
                break
        fut.result()
    assert seen[-1] == list(range(n))
    # commits only ever grow, and always a prefix here (one writer, in order)
    assert all(s == list(range(len(s))) for s in seen)
    assert [len(s) for s in seen] == sorted(len(s) for s in seen)


def test_slice_into_uncommitted_rows_raises(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/clip"
    w = create_small(store.open(uri), "clip", num_units=4)
    write_units(w, [0, 1])
    ds = store.open(uri).dataset("clip")
    for rows in (slice(2 * UNIT_ROWS - 2, 2 * UNIT_ROWS + 8), slice(2 * UNIT_ROWS, 3 * UNIT_ROWS)):
        with pytest.raises(store.NotCommittedError, match="unit 2"):
            ds.read(HOOK, rows=rows)


class _PausingStorage(FsspecStorage):
    """The real S3 backend, except that shard writes wait for a signal: it forces one
    interleaving of two writers of one unit (no behaviour of Strata is replaced)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.at_shard = threading.Event()
        self.go = threading.Event()

    def put_if_absent(self, key, data) -> bool:
        if "/acts/" in key and "/c/" in key:
            self.at_shard.set()
            assert self.go.wait(30)
        return super().put_if_absent(key, data)


def test_rerun_with_different_values_keeps_committed_unit_intact(s3_bucket: str) -> None:
    # A re-run of a unit whose first run is still alive (a retried straggler) computes slightly
    # different values (GPU non-determinism). Whatever wins, the committed unit must be whole.
    uri = f"{s3_bucket}/rerun"
    create_small(store.open(uri), "rerun", num_units=1)
    first, second = unit_acts(0, seed=1), unit_acts(0, seed=2)
    slow = _PausingStorage(uri)
    late = store.Store(slow).writer("rerun")
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(late.write_unit, 0, tokens=token_table(0), acts={HOOK: second})
        try:
            assert slow.at_shard.wait(30)  # the late writer saw no commit and is about to write
            status = store.open(uri).writer("rerun").write_unit(0, tokens=token_table(0), acts={HOOK: first})
            assert status[HOOK] == "committed"
        finally:
            slow.go.set()
        try:
            fut.result()
        except store.CorruptionError:
            pass  # the late writer may report that it lost to different values
    ds = store.open(uri).dataset("rerun")
    assert ds.verify().ok, str(ds.verify())
    assert np.array_equal(ds.read(HOOK), torch.from_numpy(first).half().numpy())


@pytest.mark.parametrize("damage", ["none", "flip", "truncate"])
def test_batches_fetch_shards_in_ranged_parts_and_check_them(written, monkeypatch, damage) -> None:
    """With parts smaller than a shard, the iterator fetches each unit as several ranged GETs;
    what it hands back is exact, and a flipped or truncated shard is refused, not returned."""
    uri, client = written
    key = _shard_key("bad", HOOK, 1)
    if damage == "flip":
        _rewrite(uri, client, key, lambda b: b[:10] + bytes([b[10] ^ 0x40]) + b[11:])
    elif damage == "truncate":
        _rewrite(uri, client, key, lambda b: b[:-40])
    monkeypatch.setattr(FsspecStorage, "FETCH_PART", 100)  # a shard here is ~600 bytes: several parts
    parts: list[int] = []
    real = FsspecStorage.read_ranges

    def spy(self, k, ranges):
        parts.append(len(ranges))
        return real(self, k, ranges)

    monkeypatch.setattr(FsspecStorage, "read_ranges", spy)
    ds = store.open(uri).dataset("bad")
    if damage != "none":
        with pytest.raises(store.CorruptionError, match="unit 1"):
            with ds.iter_batches(HOOK, batch_size=8, shuffle=False, epochs=1, skip_special=False) as it:
                list(it)
        return
    with ds.iter_batches(HOOK, batch_size=8, shuffle=False, epochs=1, skip_special=False) as it:
        got = torch.cat([b.float() for b in it]).numpy()
    assert np.array_equal(got, _expected([0, 1]).astype(np.float32))
    assert len(parts) == 2 and min(parts) > 1  # each unit: one call, several ranged GETs
