"""Reading: slices, index arrays, documents, committed-only visibility, damage detection."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from _data import CTX, HOOKS, UNIT_CONTEXTS, make_dataset, token_table

from strata import store
from strata.store import layout

H0 = "blocks.0.hook_resid_post"
ROWS = UNIT_CONTEXTS * CTX


@pytest.fixture
def full(tmp_path):
    s, data = make_dataset(tmp_path, dtype="float16", num_units=4, last_contexts=2)
    ref = {h: np.concatenate([data[u][h].astype(np.float16) for u in range(4)]) for h in HOOKS}
    return tmp_path, s, ref


def test_info_and_hooks(full):
    _, s, _ = full
    ds = s.dataset("ds")
    assert ds.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert ds.info.model == "tiny" and ds.info.revision == "r0" and ds.info.context_size == CTX
    assert ds.info.dtype == "float16" and ds.info.num_units == 4 and ds.is_complete
    assert s.datasets() == ["ds"]


@pytest.mark.parametrize("sl", [slice(0, 5), slice(3, 70), slice(30, 34), slice(None), slice(10, None, 3), slice(-5, None), slice(40, 40)])
def test_read_slices(full, sl):
    _, s, ref = full
    got = s.dataset("ds").read(H0, rows=sl)
    np.testing.assert_array_equal(got, ref[H0][sl])


def test_read_index_arrays_any_order_with_repeats(full):
    _, s, ref = full
    idx = np.array([100, 3, 3, 64, 0, 99, 31, 32, 101])
    np.testing.assert_array_equal(s.dataset("ds").read(H0, rows=idx), ref[H0][idx])
    t = s.dataset("ds").read("blocks.1.hook_mlp_out", rows=idx.tolist(), as_="torch", dtype=torch.float32)
    assert t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(ref["blocks.1.hook_mlp_out"][idx].astype(np.float32)))


def test_tokens_row_aligned_and_docs(full):
    _, s, ref = full
    ds = s.dataset("ds")
    toks = ds.tokens()
    assert toks.num_rows == ds.num_rows(H0) == len(ref[H0])
    np.testing.assert_array_equal(toks.column("row").to_numpy(), np.arange(len(ref[H0])))
    assert toks.column_names[:6] == list(store.TOKEN_COLUMNS)
    docs = [3, 7]
    mask = pc.is_in(toks.column("doc_id"), value_set=__import__("pyarrow").array(docs)).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(mask)
    got = ds.read(H0, docs=docs, as_="torch")
    assert got.shape == (len(rows), 16) and len(rows) == 22  # two 11-token documents
    assert torch.equal(got, torch.from_numpy(ref[H0][rows]))


def test_uncommitted_rows_raise(tmp_path):
    s, data = make_dataset(tmp_path, num_units=4, write=False)
    w = s.writer("ds")
    for u in (0, 2):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=data[u])
    ds = s.dataset("ds")
    assert ds.committed_units(H0) == [0, 2] and ds.num_rows(H0) == 2 * ROWS
    np.testing.assert_array_equal(ds.read(H0, rows=slice(64, 70)), data[2][H0][:6])
    with pytest.raises(store.NotCommittedError, match=r"unit 1 \(rows 32\.\.63\) is not committed \(2 of 4 units"):
        ds.read(H0, rows=slice(30, 40))
    with pytest.raises(store.NotCommittedError):
        ds.read(H0, rows=[0, 3 * ROWS + 1])
    # Everything committed, in unit order, is what read(hook) with no selection returns.
    np.testing.assert_array_equal(ds.read(H0), np.concatenate([data[0][H0], data[2][H0]]))
    assert ds.tokens(H0).column("row").to_numpy()[ROWS] == 2 * ROWS


def test_reader_opened_mid_write_sees_committed_only_until_refresh(tmp_path):
    s, data = make_dataset(tmp_path, num_units=3, write=False)
    w = s.writer("ds")
    w.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    ds = s.dataset("ds")
    # A unit whose shard is written but not yet committed (a writer mid-unit) stays invisible.
    w._write_tokens(1, token_table(1, UNIT_CONTEXTS), ROWS, {"host": "h", "pid": 1, "attempt": "x"}, "t")
    (tmp_path / layout.shard_key("ds", H0, 1)).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / layout.shard_key("ds", H0, 1)).write_bytes(b"half a shard")
    assert s.dataset("ds").committed_units(H0) == [0]
    w.write_unit(2, tokens=token_table(2, UNIT_CONTEXTS), acts=data[2])
    assert ds.committed_units(H0) == [0]  # a consistent snapshot
    assert ds.refresh().committed_units(H0) == [0, 2]
    np.testing.assert_array_equal(ds.read(H0, rows=slice(2 * ROWS, 3 * ROWS)), data[2][H0])


def test_unknown_dataset_and_hook(full):
    _, s, _ = full
    with pytest.raises(store.DatasetNotFoundError, match=r"no dataset 'nope'.*it holds: ds"):
        s.dataset("nope")
    with pytest.raises(LookupError):
        s.dataset("nope")
    with pytest.raises(store.HookNotFoundError, match=r"has no hook 'blocks\.7\.x'; it has: blocks\.0\.hook_resid_post, blocks\.1\.hook_mlp_out"):
        s.dataset("ds").read("blocks.7.x")
    with pytest.raises(ValueError, match="as_ must be"):
        s.dataset("ds").read(H0, as_="pandas")


# -- damage ---------------------------------------------------------------------------------


def _shard(root, unit, hook=H0):
    return root / layout.shard_key("ds", hook, unit)


def test_verify_clean(full):
    _, s, _ = full
    report = s.dataset("ds").verify()
    assert report.ok and report.units_checked == 4 and report.files_checked == 12


def test_flipped_byte_found_by_verify_and_reader(full):
    root, s, _ = full
    p = _shard(root, 2)
    raw = bytearray(p.read_bytes())
    raw[100] ^= 0x40
    p.write_bytes(bytes(raw))
    report = s.dataset("ds").verify()
    assert not report.ok
    assert [(q.hook, q.unit, q.file) for q in report.problems] == [(H0, 2, layout.shard_key("ds", H0, 2))]
    assert "checksum mismatch" in report.problems[0].message
    with pytest.raises(store.CorruptionError, match=r"unit 2 .*checksum mismatch"):
        list(s.dataset("ds").iter_batches(H0, batch_size=16))


@pytest.mark.parametrize("damage", ["truncate", "delete", "index"])
def test_truncated_missing_or_bad_index_shard(full, damage):
    root, s, ref = full
    p = _shard(root, 1)
    raw = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "delete":
        p.unlink()
    else:
        p.write_bytes(raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:])
    ds = s.dataset("ds")
    if damage == "index":
        # Reads return only chunk bytes, each checked; the damaged index (the last block, which
        # other Zarr readers use) is found by verify.
        np.testing.assert_array_equal(ds.read(H0, rows=slice(ROWS + 1, ROWS + 3)), ref[H0][ROWS + 1 : ROWS + 3])
        np.testing.assert_array_equal(ds.read(H0), ref[H0])
    else:
        pattern = {"truncate": "truncated", "delete": "file is missing"}[damage]
        with pytest.raises(store.CorruptionError, match=pattern):
            ds.read(H0, rows=slice(ROWS + 1, ROWS + 3))
        with pytest.raises(store.CorruptionError, match=rf"unit 1 .*{pattern}"):
            ds.read(H0)
    report = ds.verify()
    assert [(q.unit, q.file) for q in report.problems] == [(1, layout.shard_key("ds", H0, 1))]
    if damage == "index":
        # the index follows the 1024 bytes of chunks and the 8-byte table of block checksums
        assert "checksum mismatch in bytes 1032..1051 (tail)" in report.problems[0].message
    # Other units still read.
    ds.read(H0, rows=slice(0, ROWS))


def test_damaged_token_table_found(full):
    root, s, _ = full
    rec = s.writer("ds").read_commit(3, None)
    p = root / rec.file.key
    p.write_bytes(p.read_bytes()[:-10])
    report = s.dataset("ds").verify()
    assert [(q.hook, q.unit) for q in report.problems] == [(None, 3)]
    with pytest.raises(store.CorruptionError, match=r"tokens unit 3 .*truncated"):
        s.dataset("ds").tokens()
