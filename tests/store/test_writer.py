"""Writing units: round trips per dtype, layout (one shard per unit), reruns, and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xxhash
import zarr
from _data import CTX, HOOKS, UNIT_CONTEXTS, make_dataset, token_table, unit_values

from strata import store
from strata.store import layout

ROWS = UNIT_CONTEXTS * CTX


def files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_every_dtype_and_hook(tmp_path, dtype):
    s, data = make_dataset(tmp_path, dtype=dtype, last_contexts=2)
    ds = s.dataset("ds")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for hook in HOOKS:
        expect = torch.cat([torch.from_numpy(data[u][hook]).to(tdt) for u in range(4)])
        got = ds.read(hook, as_="torch")
        assert got.dtype == tdt
        assert torch.equal(got, expect)  # exact: the stored values are the rounded inputs
        # NumPy output: float16/float32 as stored, bfloat16 widened exactly to float32.
        np.testing.assert_array_equal(ds.read(hook), expect.float().numpy() if dtype == "bfloat16" else expect.numpy())
        assert ds.num_rows(hook) == 3 * ROWS + 2 * CTX


def test_torch_input_and_bfloat16_bits(tmp_path):
    s = store.open(tmp_path)
    w = s.create_dataset("b", hooks={"h": 4}, context_size=CTX, dtype="bfloat16", num_units=1, unit_contexts=UNIT_CONTEXTS)
    x = torch.randn(ROWS, 4, dtype=torch.float64)
    w.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts={"h": x})
    arr = zarr.open_array(store=s.zarr_store, path=layout.array_path("b", "h"))
    assert arr.dtype == np.uint16 and arr.attrs["strata"]["dtype"] == "bfloat16"
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(arr[:ROWS], bits)


def test_zarr_reads_the_shards_and_shards_are_units(tmp_path):
    s, data = make_dataset(tmp_path, dtype="float16", last_contexts=3)
    for hook, d in HOOKS.items():
        arr = zarr.open_array(store=s.zarr_store, path=layout.array_path("ds", hook))
        assert arr.shape == (4 * ROWS, d)
        assert arr.shards == (ROWS, d)
        assert ROWS % arr.chunks[0] == 0
        for u in range(4):
            n = data[u][hook].shape[0]
            np.testing.assert_array_equal(arr[u * ROWS : u * ROWS + n], data[u][hook].astype(np.float16))
        shard_files = sorted(f for f in files(tmp_path) if f.startswith(f"datasets/ds/acts/{hook}/c/"))
        assert shard_files == [f"datasets/ds/acts/{hook}/c/{u}/0" for u in range(4)]


def test_chunks_are_about_a_mebibyte(tmp_path):
    s = store.open(tmp_path)
    s.create_dataset("big", hooks={"h": 768}, context_size=128, dtype="float16", num_units=1, unit_contexts=256)
    arr = zarr.open_array(store=s.zarr_store, path=layout.array_path("big", "h"))
    assert arr.shards == (32768, 768)  # 48 MiB of float16 per unit shard
    assert 0.5 * 2**20 <= arr.chunks[0] * 768 * 2 <= 2**20


def test_rerun_unit_is_harmless(tmp_path):
    s, data = make_dataset(tmp_path)
    key = layout.commit_key("ds", "blocks.0.hook_resid_post", 1)
    before = (tmp_path / key).read_bytes()
    w = s.writer("ds")
    status = w.write_unit(1, tokens=token_table(1, UNIT_CONTEXTS), acts=data[1])
    assert status == {"tokens": "already committed", **{h: "already committed" for h in HOOKS}}
    assert (tmp_path / key).read_bytes() == before
    assert s.dataset("ds").verify().ok
    # Only one token table per unit: a rerun leaves no second file behind.
    assert sum(1 for f in files(tmp_path) if f.startswith("datasets/ds/tokens/unit-00000001")) == 1


def test_commit_record_contents(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, last_contexts=1)
    rec = json.loads((tmp_path / layout.commit_key("ds", "blocks.1.hook_mlp_out", 1)).read_text())
    assert rec["rows"] == CTX and rec["unit"] == 1 and rec["hook"] == "blocks.1.hook_mlp_out"
    assert rec["writer"]["pid"] == os.getpid() and rec["fence"] is None
    (f,) = rec["files"]
    assert f["key"] == layout.shard_key("ds", "blocks.1.hook_mlp_out", 1)
    raw = (tmp_path / f["key"]).read_bytes()
    assert f["nbytes"] == len(raw) and f["algo"] == "xxh3_64" and f["block_size"] == 64 << 10
    # The shard: its chunks (one here: 8 rows of 8 float32), then the table of 64 KiB block
    # checksums of the chunks, then the Zarr index; the record checksums the table and the index.
    chunk_bytes = s.manifest("ds").hooks["blocks.1.hook_mlp_out"].chunk_rows * 8 * 4
    (t_off, t_len, t_digest), (i_off, i_len, i_digest) = f["table"], f["tail"]
    assert t_off == chunk_bytes and t_len == 8 and i_off == t_off + t_len and i_off + i_len == len(raw)
    table = np.frombuffer(raw[t_off : t_off + t_len], "<u8")
    assert table.tolist() == [xxhash.xxh3_64_intdigest(raw[:chunk_bytes])]
    assert t_digest == xxhash.xxh3_64_hexdigest(raw[t_off:i_off]) and i_digest == xxhash.xxh3_64_hexdigest(raw[i_off:])
    assert len(json.dumps(rec)) < 600  # small, whatever the size of the shard
    tok = json.loads((tmp_path / layout.commit_key("ds", None, 1)).read_text())
    assert tok["special"] == 1  # one BOS per context
    # The token file carries the global `row` column, so it joins with the arrays without Strata.
    t = pq.read_table(tmp_path / tok["files"][0]["key"])
    assert t.column("row").to_pylist() == list(range(ROWS, ROWS + CTX))


def test_grow_and_add_hook(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2)
    w = s.writer("ds")
    w.grow(3)
    w.add_hooks({"blocks.2.hook_resid_post": 5})
    # A worker opened before the growth still writes the new unit (it re-reads the manifest).
    extra = {h: unit_values(2, ROWS, d) for h, d in HOOKS.items()}
    status = w.write_unit(2, tokens=token_table(2, UNIT_CONTEXTS), acts=extra)
    assert status["tokens"] == "committed"
    new = unit_values(0, ROWS, 5)
    assert s.writer("ds").write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts={"blocks.2.hook_resid_post": new})["tokens"] == "already committed"
    ds = s.dataset("ds")
    assert ds.info.num_units == 3
    assert ds.committed_units("blocks.2.hook_resid_post") == [0]
    np.testing.assert_array_equal(ds.read("blocks.2.hook_resid_post", rows=slice(0, ROWS)), new)
    np.testing.assert_array_equal(ds.read("blocks.0.hook_resid_post", rows=slice(2 * ROWS, 3 * ROWS)), extra["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="cannot shrink"):
        w.grow(1)


def test_create_existing(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=2)
    shape = dict(hooks=HOOKS, context_size=CTX, dtype="float32", num_units=2, unit_contexts=UNIT_CONTEXTS)
    with pytest.raises(store.DatasetExistsError, match="exist_ok"):
        s.create_dataset("ds", **shape, meta={"model": "tiny", "revision": "r0"})
    with pytest.raises(store.DatasetExistsError, match=r"revision: 'r0' -> 'r1'"):
        s.create_dataset("ds", **shape, meta={"model": "tiny", "revision": "r1"}, exist_ok=True)
    w = s.create_dataset("ds", hooks={**HOOKS, "blocks.3.hook_resid_post": 2}, context_size=CTX, dtype="float32", num_units=5,
                         unit_contexts=UNIT_CONTEXTS, meta={"model": "tiny", "revision": "r0"}, exist_ok=True)
    assert w.info.num_units == 5 and "blocks.3.hook_resid_post" in w.info.hooks
    assert s.dataset("ds").num_rows("blocks.0.hook_resid_post") == 2 * ROWS


# -- bad input: a clear error, and nothing written ------------------------------------------


@pytest.fixture
def ready(tmp_path):
    s, data = make_dataset(tmp_path, num_units=3, write=False)
    s.writer("ds").write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    return tmp_path, s, data


def _bad_writes(data):
    good = data[1]
    h0 = "blocks.0.hook_resid_post"
    t1 = token_table(1, 4)
    return [
        (store.HookNotFoundError, r"unknown hook.*blocks\.9", dict(unit=1, tokens=t1, acts={**good, "blocks.9.hook_x": good[h0]})),
        (store.WriteMismatchError, r"shape \(32, 15\), expected \(32, 16\)", dict(unit=1, tokens=t1, acts={**good, h0: good[h0][:, :15]})),
        (store.WriteMismatchError, r"shape \(31, 16\)", dict(unit=1, tokens=t1, acts={**good, h0: good[h0][:31]})),
        (store.WriteMismatchError, r"dtype int64 is not floating", dict(unit=1, tokens=t1, acts={**good, h0: good[h0].astype(np.int64)})),
        (store.WriteMismatchError, r"multiple of context_size=8", dict(unit=1, tokens=token_table(1, 4).slice(0, 30), acts=good)),
        (store.WriteMismatchError, r"up to unit_rows=32", dict(unit=1, tokens=token_table(1, 5), acts=good)),
        (store.WriteMismatchError, r"not contexts 4\.\. of unit 1", dict(unit=1, tokens=token_table(2, 4), acts=good)),
        (store.WriteMismatchError, r"lacks column\(s\) \['special'\]", dict(unit=1, tokens=token_table(1, 4).drop(["special"]), acts=good)),
        (store.UnitOutOfRangeError, r"units 0\.\.2", dict(unit=3, tokens=token_table(3, 4), acts=good)),
        (store.UnitOutOfRangeError, r"units 0\.\.2", dict(unit=-1, tokens=token_table(0, 4), acts=good)),
        (store.WriteMismatchError, r"already committed with 32 rows, this write has 16",
         dict(unit=0, tokens=token_table(0, 2), acts={h: a[:16] for h, a in data[0].items()})),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_write_is_refused_and_writes_nothing(ready, case):
    root, s, data = ready
    exc, pattern, kw = _bad_writes(data)[case]
    before = {f: (root / f).stat().st_mtime_ns for f in files(root)}
    with pytest.raises(exc, match=pattern) as info:
        s.writer("ds").write_unit(kw.pop("unit"), **kw)
    assert "\n" not in str(info.value)
    assert {f: (root / f).stat().st_mtime_ns for f in files(root)} == before


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "a..b", "/abs", "x" * 201, None, "sp ace"])
def test_bad_dataset_names(tmp_path, name):
    s = store.open(tmp_path / "root")
    with pytest.raises(store.InvalidNameError):
        s.create_dataset(name, hooks={"h": 4}, context_size=8, num_units=1)
    with pytest.raises(store.InvalidNameError):
        s.dataset(name)
    assert files(tmp_path / "root") == {"strata.json"}
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(hooks={}), "at least one hook"),
        (dict(hooks={"../h": 4}), "invalid hook name"),
        (dict(hooks={"h": 0}), "positive int"),
        (dict(context_size=0), "`context_size` must be a positive int"),
        (dict(num_units=-2), "`num_units` must be a positive int"),
        (dict(dtype="float64"), "valid: float32, float16, bfloat16"),
    ],
)
def test_bad_create_arguments(tmp_path, kw, pattern):
    s = store.open(tmp_path / "root")
    args = dict(hooks={"h": 4}, context_size=8, num_units=1, dtype="float16")
    args.update(kw)
    with pytest.raises(ValueError, match=pattern):
        s.create_dataset("d", **args)
    assert s.datasets() == []
