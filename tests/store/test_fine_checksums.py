"""Fine block checksums (issue 15): a shard carries, besides its table of 64 KiB block digests,
a table of digests of a few whole rows each, so a scattered read hashes the rows it returns
rather than their 64 KiB blocks. Each byte a read returns is still checked; shards written
before the fine table existed (64 KiB digests only) still read, checked at that granularity.

The tests flip real bytes in real shard files and read through the public dataset API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _data import token_table

from strata import store
from strata.store import layout
from strata.store.commit import protocol
from strata.store.datasets import shards

H = "blocks.0.hook_resid_post"
D = 768  # float32 rows of 3 KiB: two per 6 KiB fine block, 21 and a third per 64 KiB block
CTX, UNIT_CONTEXTS, UNITS = 8, 32, 3
ROWS = CTX * UNIT_CONTEXTS  # 256 rows, 768 KiB a unit: twelve 64 KiB blocks
RB = D * 4


def _write(root, *, dtype: str = "float32", name: str = "ds") -> tuple[store.Store, np.ndarray]:
    s = store.open(root)
    w = s.create_dataset(name, hooks={H: D}, context_size=CTX, dtype=dtype, num_units=UNITS, unit_contexts=UNIT_CONTEXTS)
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((UNITS * ROWS, D)).astype(np.float32)
    for u in range(UNITS):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS, unit_contexts=UNIT_CONTEXTS), acts={H: ref[u * ROWS : (u + 1) * ROWS]})
    return s, ref


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _entry(root, unit: int) -> dict:
    return json.loads((root / layout.commit_key("ds", H, unit)).read_text())["files"][0]


@pytest.fixture
def fresh(tmp_path):
    s, ref = _write(tmp_path)
    return tmp_path, s, ref


def test_new_shards_carry_a_fine_table_of_row_block_digests(fresh):
    root, s, ref = fresh
    f = _entry(root, 1)
    raw = (root / f["key"]).read_bytes()
    body = ROWS * RB
    (t_off, t_len, _), (f_off, f_len, f_digest), (i_off, i_len, _) = f["table"], f["fine"], f["tail"]
    # [chunks][64 KiB digests][one digest per two 3 KiB rows][Zarr index]
    assert (t_off, t_len) == (body, 8 * -(-body // (64 << 10)))
    assert (f["fine_block_size"], f_off, f_len) == (2 * RB, t_off + t_len, 8 * ROWS // 2)
    assert i_off == f_off + f_len and i_off + i_len == len(raw) == f["nbytes"]
    import xxhash

    fine = np.frombuffer(raw[f_off:i_off], "<u8")
    assert fine.tolist() == [xxhash.xxh3_64_intdigest(raw[r * RB : (r + 2) * RB]) for r in range(0, ROWS, 2)]
    assert f_digest == xxhash.xxh3_64_hexdigest(raw[f_off:i_off])
    assert s.dataset("ds").verify().ok


@pytest.mark.parametrize("at", [0, 1, RB // 2, RB - 1])  # first, second, middle and last byte of the row
def test_a_flipped_byte_anywhere_in_a_scattered_row_raises_at_the_fine_granularity(fresh, at):
    root, s, ref = fresh
    row = 30  # unit 1's row 30: bytes 92160..95231, inside 64 KiB block 1 with its neighbours
    _flip(root / layout.shard_key("ds", H, 1), row * RB + at)
    ds = s.dataset("ds")
    g = ROWS + row
    want = rf"unit 1 .*checksum mismatch in bytes {row * RB}\.\.{(row + 2) * RB - 1} \(fine block {row // 2}\)"
    with pytest.raises(store.CorruptionError, match=want):
        ds.read(H, rows=[5, g, 2 * ROWS + 9])
    # Rows of other fine blocks in the same 64 KiB block are intact, and a scattered read of
    # them checks only their own blocks: before fine checksums, the damaged 64 KiB block made
    # them unreadable too.
    near = np.array([g - 2, g + 2, g + 4])
    np.testing.assert_array_equal(ds.read(H, rows=near), ref[near])
    # A long read through the damaged row checks its 64 KiB blocks, and raises too.
    with pytest.raises(store.CorruptionError, match=r"unit 1 .*checksum mismatch in bytes 65536\.\.131071 \(block 1\)"):
        ds.read(H, rows=slice(ROWS, 2 * ROWS))
    assert [(p.unit, p.hook) for p in ds.verify().problems] == [(1, H)]


def test_scattered_and_contiguous_reads_equal_numpy(fresh):
    root, s, ref = fresh
    ds = s.dataset("ds")
    rng = np.random.default_rng(3)
    for k in (1, 2, 64, 300):
        idx = rng.choice(UNITS * ROWS, k, replace=False)  # unsorted
        np.testing.assert_array_equal(ds.read(H, rows=idx), ref[idx])
    idx = np.array([700, 3, 3, 255, 256, 257, 2, 700])  # repeats, unit edges, adjacent rows
    np.testing.assert_array_equal(ds.read(H, rows=idx), ref[idx])
    # Short ranges are checked in row blocks, long ones in 64 KiB blocks.
    for a, b in [(0, UNITS * ROWS), (100, 700), (170, 171), (ROWS - 1, ROWS + 1), (5, 250)]:
        np.testing.assert_array_equal(ds.read(H, rows=slice(a, b)), ref[a:b])
    np.testing.assert_array_equal(ds.read(H, rows=slice(1, 700, 7)), ref[1:700:7])
    np.testing.assert_array_equal(ds.read(H), ref)
    docs = [0, 17, 30]  # documents of 11 rows (_data.token_table)
    np.testing.assert_array_equal(ds.read(H, docs=docs), np.concatenate([ref[d * 11 : d * 11 + 11] for d in docs]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_converting_reads_of_narrow_rows_equal_numpy(tmp_path, dtype):
    import torch

    s, ref = _write(tmp_path, dtype=dtype)
    stored = torch.from_numpy(ref).to(getattr(torch, dtype)).float().numpy()  # what the store keeps, widened
    f = _entry(tmp_path, 0)
    assert f["fine_block_size"] == 5 * D * 2  # 1.5 KiB rows: five to a fine block
    ds = s.dataset("ds")
    idx = np.array([600, 1, 2, 129, 767])
    np.testing.assert_array_equal(ds.read(H, rows=idx, dtype="float32"), stored[idx])
    np.testing.assert_array_equal(ds.read(H, rows=slice(3, 700), dtype="float32"), stored[3:700])
    # A flipped byte in row 129 of unit 0 (fine block 25): reads of the row raise, whatever their form.
    _flip(tmp_path / layout.shard_key("ds", H, 0), 129 * D * 2 + 5)
    ds = s.dataset("ds")
    with pytest.raises(store.CorruptionError, match=r"\(fine block 25\)"):
        ds.read(H, rows=[129, 700])
    with pytest.raises(store.CorruptionError, match=r"\(block 3\)"):
        ds.read(H, rows=slice(3, 700))


def test_a_flip_deep_in_a_long_read_raises_and_nothing_is_returned(fresh):
    root, s, ref = fresh
    # Unit 2, row 200: deep in a whole-unit read, checked in 64 KiB blocks.
    _flip(root / layout.shard_key("ds", H, 2), 200 * RB + 11)
    ds = s.dataset("ds")
    b = (200 * RB + 11) // (64 << 10)
    with pytest.raises(store.CorruptionError, match=rf"unit 2 .*checksum mismatch in bytes {b * 65536}\.\.{b * 65536 + 65535} \(block {b}\)"):
        ds.read(H, rows=slice(2 * ROWS, 3 * ROWS))
    with pytest.raises(store.CorruptionError, match=r"unit 2 "):
        ds.read(H)
    np.testing.assert_array_equal(ds.read(H, rows=slice(0, 2 * ROWS)), ref[: 2 * ROWS])


def test_a_damaged_fine_table_fails_scattered_reads_and_verify(fresh):
    root, s, ref = fresh
    f = _entry(root, 0)
    _flip(root / f["key"], f["fine"][0] + 8 * 40 + 2)  # the digest of rows 80 and 81
    protocol.forget_checked_tables()  # a fresh process: tables are checked when first loaded
    ds = s.dataset("ds")
    with pytest.raises(store.CorruptionError, match=r"unit 0 .*fine table of block checksums is damaged"):
        ds.read(H, rows=[7])
    report = ds.verify()
    assert [(p.unit, p.hook) for p in report.problems] == [(0, H)] and "fine table" in report.problems[0].message


def test_fine_blocks_are_whole_rows_up_to_8_kib():
    def fine(d: int, itemsize: int, unit_rows: int = 4096) -> int:
        return shards.ShardLayout(unit_rows, unit_rows, d, itemsize).fine_block_bytes

    assert fine(768, 4) == 6144  # two 3 KiB rows
    assert fine(768, 2) == 7680  # five 1.5 KiB rows
    assert fine(64, 2) == 8192  # 64 rows of 128 bytes
    assert fine(100, 4) == 8000  # 20 rows of 400 bytes
    assert fine(3000, 4) == 12000  # a 12 KB row is its own block
    assert fine(4096, 4) == 16384  # a 16 KiB row is its own block
    assert fine(16384, 4) == 0  # 64 KiB rows: the coarse table is already per row
    assert fine(768, 4, unit_rows=1) == 0  # a unit of one block: nothing finer to check


# -- shards written before fine tables (64 KiB digests only) -----------------------------------


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    """A dataset whose shards are laid out as before fine tables: rows wider than any fine
    block make the writer leave the fine table out, exactly the old layout and record."""
    with monkeypatch.context() as m:
        m.setattr(shards, "FINE_BLOCK_BYTES", 1 << 40)
        s, ref = _write(tmp_path)
    return tmp_path, s, ref


def test_old_shards_without_a_fine_table_still_read(legacy):
    root, s, ref = legacy
    f = _entry(root, 1)
    body = ROWS * RB
    assert "fine" not in f and "fine_block_size" not in f
    assert f["tail"][0] == f["table"][0] + f["table"][1] == body + 8 * -(-body // (64 << 10))
    ds = s.dataset("ds")
    assert ds.verify().ok
    idx = np.array([600, 1, 2, 300, 767, 2])
    np.testing.assert_array_equal(ds.read(H, rows=idx), ref[idx])
    np.testing.assert_array_equal(ds.read(H, rows=slice(10, 700)), ref[10:700])
    np.testing.assert_array_equal(ds.read(H), ref)


def test_old_shards_still_detect_damage_at_the_64_kib_granularity(legacy):
    root, s, ref = legacy
    row = 30
    _flip(root / layout.shard_key("ds", H, 1), row * RB + 100)
    ds = s.dataset("ds")
    g = ROWS + row
    # The damaged row and its neighbours in the same 64 KiB block (rows 21..42) raise: that
    # block is the finest these shards check.
    for r in (g, g - 1, g + 5):
        with pytest.raises(store.CorruptionError, match=r"unit 1 .*checksum mismatch in bytes 65536\.\.131071 \(block 1\)"):
            ds.read(H, rows=[3, r])
    with pytest.raises(store.CorruptionError, match=r"\(block 1\)"):
        ds.read(H, rows=slice(ROWS, 2 * ROWS))
    np.testing.assert_array_equal(ds.read(H, rows=[ROWS + 10, ROWS + 50]), ref[[ROWS + 10, ROWS + 50]])  # blocks 0 and 2
    assert [(p.unit, p.hook) for p in ds.verify().problems] == [(1, H)]
