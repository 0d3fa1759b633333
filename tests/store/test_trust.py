"""What the store must never do: return damaged or partial data without a word, follow a forged
commit record out of its dataset, or create a store by reading one. Each test here failed
before the commit protocol was hardened (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from _data import CTX, UNIT_CONTEXTS, make_dataset, token_table

from strata import store
from strata.store import layout
from strata.store.commit import sealed

ROWS = UNIT_CONTEXTS * CTX
D = 16384  # float32 rows of 64 KiB: a unit of 32 rows (2 MiB) spans two 1 MiB chunks
H = "blocks.0.hook_resid_post"


def files(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def wide(tmp_path):
    """Four units of a wide float32 hook: each unit's shard holds several Zarr chunks."""
    s, data = make_dataset(tmp_path, dtype="float32", num_units=4, hooks={H: D})
    info = s.manifest("ds")
    assert info.hooks[H].chunk_rows < ROWS  # several chunks per unit
    ref = np.concatenate([data[u][H] for u in range(4)])
    return tmp_path, s, ref, info.hooks[H].chunk_rows


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


# -- finding 4: every partial read checks what it returns --------------------------------------


@pytest.mark.parametrize("how", ["slice", "index", "docs"])
def test_partial_reads_of_a_damaged_chunk_raise(wide, how):
    root, s, ref, chunk_rows = wide
    # Damage row 5 of unit 2 (in its first chunk); reads of it raise, whatever their form.
    _flip(root / layout.shard_key("ds", H, 2), 5 * D * 4 + 7)
    ds = s.dataset("ds")
    sel = {"slice": dict(rows=slice(2 * ROWS + 4, 2 * ROWS + 6)), "index": dict(rows=[3, 2 * ROWS + 5]),
           "docs": dict(docs=[(2 * ROWS + 5) // 11])}[how]  # _data's documents are 11 rows long
    # Row 5 is 64 KiB, exactly checksum block 5 of its shard.
    want = r"hook 'blocks\.0\.hook_resid_post' unit 2 .*checksum mismatch in bytes 327680\.\.393215 \(block 5\)"
    with pytest.raises(store.CorruptionError, match=want):
        ds.read(H, **sel)
    # Rows of other blocks of the same unit are intact and read (each block checked on its own).
    far = 2 * ROWS + chunk_rows + 1
    np.testing.assert_array_equal(ds.read(H, rows=[far, 0]), ref[[far, 0]])
    np.testing.assert_array_equal(ds.read(H, rows=slice(far, far + 2)), ref[far : far + 2])


def test_a_truncated_shard_fails_partial_reads(wide):
    root, s, ref, chunk_rows = wide
    p = root / layout.shard_key("ds", H, 1)
    p.write_bytes(p.read_bytes()[: chunk_rows * D * 4 + 100])
    ds = s.dataset("ds")
    # Its table of block checksums (after the chunks) is cut off: no row of it can be checked.
    for row in (ROWS + 1, 2 * ROWS - 1):
        with pytest.raises(store.CorruptionError, match="truncated"):
            ds.read(H, rows=[row])
    np.testing.assert_array_equal(ds.read(H, rows=[0, 2 * ROWS]), ref[[0, 2 * ROWS]])  # other units read


# -- finding 5: token tables are checked ------------------------------------------------------------


def test_flipped_bytes_in_a_token_file_raise_instead_of_wrong_ids(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=2)
    rec = s.writer("ds").read_commit(1, None)
    p = tmp_path / rec.file.key
    raw = bytearray(p.read_bytes())
    # A byte inside the column data (after the magic, far from the footer): Parquet itself may
    # decode it into other values without any error.
    raw[len(raw) // 3] ^= 0x01
    p.write_bytes(bytes(raw))
    ds = s.dataset("ds")
    with pytest.raises(store.CorruptionError, match=r"tokens unit 1 .*checksum mismatch"):
        ds.tokens()
    with pytest.raises(store.CorruptionError):
        list(ds.iter_batches(H, batch_size=8))  # the special-token mask comes from the same table
    assert ds.tokens(units=[0]).num_rows == ROWS  # the other unit reads


# -- finding 3: records may only name files inside their dataset -------------------------------------


@pytest.mark.parametrize("target", ["../../other-store/secret.bin", "/etc/hostname", "datasets/other/acts/h/c/0/0"])
def test_a_forged_record_cannot_make_reads_leave_the_dataset(tmp_path, target):
    s, _ = make_dataset(tmp_path / "root", num_units=2)
    outside = tmp_path / "other-store" / "secret.bin"
    outside.parent.mkdir()
    outside.write_bytes(b"s" * 12345)
    key = tmp_path / "root" / layout.commit_key("ds", H, 1)
    rec = json.loads(key.read_text())
    rec["files"][0]["key"] = target
    rec = sealed.seal({k: v for k, v in rec.items() if k != "checksum"})  # a forger recomputes the checksum
    key.write_text(json.dumps(rec))
    ds = s.dataset("ds")
    with pytest.raises(store.CorruptionError, match="names a file outside what it may name") as info:
        ds.read(H, rows=slice(ROWS, ROWS + 2))
    assert "12345" not in str(info.value)  # nothing about the outside file leaks
    report = ds.verify()
    assert [(p.hook, p.unit, p.file) for p in report.problems] == [(H, 1, layout.commit_key("ds", H, 1))]
    ds.read(H, rows=slice(0, ROWS))  # the other unit reads


# -- finding 10: a damaged record or manifest is one problem, not an unopenable store ----------------


def test_a_truncated_commit_record_is_one_problem(tmp_path):
    s, data = make_dataset(tmp_path, num_units=3)
    key = tmp_path / layout.commit_key("ds", H, 1)
    key.write_bytes(key.read_bytes()[:40])
    ds = s.dataset("ds")  # opens
    np.testing.assert_array_equal(ds.read(H, rows=slice(0, ROWS)), data[0][H])
    with pytest.raises(store.CorruptionError, match=r"unit 1: .*damaged commit record"):
        ds.read(H, rows=slice(ROWS, ROWS + 1))
    report = ds.verify()
    assert not report.ok and [(p.hook, p.unit, p.file) for p in report.problems] == [(H, 1, layout.commit_key("ds", H, 1))]
    assert "damaged commit record" in str(report)


def test_a_damaged_manifest_is_a_one_line_error(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=1)
    make_dataset(tmp_path, "fine", num_units=1)
    (tmp_path / layout.manifest_key("ds")).write_text('{"format": "strata.activ')
    with pytest.raises(store.CorruptionError, match=r"datasets/ds/manifest\.json: damaged manifest") as info:
        s.dataset("ds")
    assert "\n" not in str(info.value)
    assert s.catalog(live=True).column("name").to_pylist() == ["fine"]


# -- finding 11: repair --------------------------------------------------------------------------------


def test_repair_removes_exactly_the_damaged_units_and_a_rewrite_restores_them(tmp_path):
    s, data = make_dataset(tmp_path, num_units=4)
    _flip(tmp_path / layout.shard_key("ds", H, 2), 3)
    bad_tokens = s.writer("ds").read_commit(3, None).file.key
    _flip(tmp_path / bad_tokens, 30)
    ds = s.dataset("ds")
    report = ds.verify()
    assert sorted((p.unit, p.hook) for p in report.problems) == [(2, H), (3, None)]
    fixed = ds.repair(report)
    assert fixed.units == [2, 3] and "recomputes exactly those" in str(fixed)
    after = ds.verify()
    assert not after.problems and not after.complete and after.committed["tokens"] == 3 and after.committed[H] == 2
    assert not (tmp_path / layout.shard_key("ds", H, 2)).exists() and not (tmp_path / bad_tokens).exists()
    w = s.writer("ds")
    for u in (2, 3):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=data[u])
    assert ds.verify().ok
    np.testing.assert_array_equal(ds.read(H, rows=slice(2 * ROWS, 4 * ROWS)), np.concatenate([data[2][H], data[3][H]]))


# -- finding 6 and 15: documents, and the edges of `read` -----------------------------------------------


def _doc_index(num_units: int, doc_len: int = 11) -> pa.Table:
    n = num_units * ROWS
    ids = np.arange(-(-n // doc_len))
    return pa.table({"doc_id": ids, "row_start": ids * doc_len, "row_end": np.minimum((ids + 1) * doc_len, n),
                     "dropped_tokens": np.zeros(ids.size, np.int64)})


def test_docs_raise_for_partly_committed_and_unknown_documents(tmp_path):
    s, data = make_dataset(tmp_path, num_units=3, write=False)
    w = s.writer("ds")
    w.write_documents(_doc_index(3).append_column("x", pa.array(np.zeros(9, np.int8))).slice(0, 9))
    for u in (0, 2):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=data[u])
    ds = s.dataset("ds")
    ref = {0: data[0][H], 2: data[2][H]}
    # Document 1 (rows 11..21) lies in unit 0: read whole.
    np.testing.assert_array_equal(ds.read(H, docs=[1]), ref[0][11:22])
    # Document 2 (rows 22..32) spans units 0 and 1; unit 1 is not committed: an error, not 10 of 11 rows.
    with pytest.raises(store.NotCommittedError, match=r"document 2 has rows 22\.\.32 in unit\(s\) \[0, 1\], of which \[1\] is not committed"):
        ds.read(H, docs=[2])
    for unknown in ([-1], [9], [1, 12345]):
        with pytest.raises(store.UnknownDocumentError, match=r"has no document\(s\) \[(-1|9|12345)\]; it holds 9 documents with ids from 0 to 8"):
            ds.read(H, docs=unknown)
    with pytest.raises(TypeError, match=r"`docs` must be integer document ids, got 'a' \(str\)"):
        ds.read(H, docs=["a"])
    with pytest.raises(TypeError, match="sequence of integer"):
        ds.read(H, docs="abc")
    assert ds.read(H, docs=[]).shape == (0, 16)
    assert ds.docs().num_rows == 9


def test_docs_without_an_index_need_every_unit(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, write=False)
    s.writer("ds").write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    ds = s.dataset("ds")
    with pytest.raises(store.NotCommittedError, match="has no document index"):
        ds.read(H, docs=[0])
    s.writer("ds").write_unit(1, tokens=token_table(1, UNIT_CONTEXTS), acts=data[1])
    ds.refresh()
    np.testing.assert_array_equal(ds.read(H, docs=[2]), np.concatenate([data[0][H], data[1][H]])[22:33])
    with pytest.raises(store.UnknownDocumentError, match=r"\[-1\]"):
        ds.read(H, docs=[-1])


def test_read_edges(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, last_contexts=1)
    ds = s.dataset("ds")
    n = ROWS + CTX
    assert ds.read(H, rows=[]).shape == (0, 16) and ds.read(H, rows=np.array([], np.int64), as_="torch").shape == (0, 16)
    # A slice past the end and an index past it behave alike.
    for sel in (slice(0, n + 1), slice(n + 5, None), [n], np.array([0, n + 100])):
        with pytest.raises(store.RowOutOfRangeError, match=rf"past the end; the dataset has {n} rows \(0\.\.{n - 1}\)"):
            ds.read(H, rows=sel)
    np.testing.assert_array_equal(ds.read(H, rows=slice(n - 2, n)), data[1][H][-2:])
    assert ds.read(H, rows=slice(n, None)).shape == (0, 16)
    with pytest.raises(TypeError, match="integer row indices"):
        ds.read(H, rows=[0.5])


# -- finding 19 and 20: readable without Strata -----------------------------------------------------------


def test_hooks_in_model_order(tmp_path):
    hooks = {h: 4 for h in ["ln_final.hook_normalized", "blocks.10.hook_resid_post", "blocks.2.hook_mlp_out",
                            "blocks.2.hook_resid_pre", "hook_embed", "blocks.2.hook_attn_out", "blocks.2.hook_resid_post"]}
    s = store.open(tmp_path)
    s.create_dataset("o", hooks=hooks, context_size=CTX, num_units=1, unit_contexts=UNIT_CONTEXTS)
    assert s.dataset("o").hooks == ["hook_embed", "blocks.2.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out",
                                    "blocks.2.hook_resid_post", "blocks.10.hook_resid_post", "ln_final.hook_normalized"]


def test_xarray_and_duckdb_read_the_store_without_strata(tmp_path):
    import xarray as xr

    s, data = make_dataset(tmp_path, dtype="float32", num_units=3, last_contexts=2)
    s.update_catalog("ds")
    acts = xr.open_zarr(tmp_path, group="datasets/ds/acts", consolidated=False)
    da = acts[H]
    assert da.dims == ("row", "d_16") and da.shape == (3 * ROWS, 16)
    assert acts["blocks.1.hook_mlp_out"].dims == ("row", "d_8")  # hooks of other widths open alongside
    np.testing.assert_array_equal(da.isel(row=slice(ROWS, ROWS + 5)).values, data[1][H][:5])
    con = duckdb.connect()
    toks = con.execute(f"SELECT row, context_id, position FROM '{tmp_path}/datasets/ds/tokens/*.parquet' ORDER BY row").fetchall()
    assert [r[0] for r in toks] == list(range(2 * ROWS + 2 * CTX))
    assert all(r[1] == r[0] // CTX and r[2] == r[0] % CTX for r in toks)
    cat = con.execute(f"SELECT name, committed_units, rows, complete FROM '{tmp_path}/catalog/*.parquet'").fetchall()
    assert cat == [("ds", 3, 2 * ROWS + 2 * CTX, True)]


def test_catalog_counts_never_writes_and_forgets_deleted_datasets(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, write=False)
    make_dataset(tmp_path, "other", num_units=1)
    s.writer("ds").write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    before = files(tmp_path)
    live = {r["name"]: r for r in s.catalog(live=True).to_pylist()}
    assert (live["ds"]["committed_units"], live["ds"]["rows"], live["ds"]["complete"]) == (1, ROWS, False)
    assert live["other"]["complete"] is True
    s.catalog()
    assert files(tmp_path) == before  # reading the catalog writes nothing
    s.update_catalog("ds")
    assert {r["name"]: r["committed_units"] for r in s.catalog().to_pylist()} == {"ds": 1, "other": 0}
    s.delete_dataset("other")
    assert s.datasets() == ["ds"] and s.catalog().column("name").to_pylist() == ["ds"]
    assert not (tmp_path / layout.catalog_key("other")).exists()
    with pytest.raises(store.DatasetNotFoundError):
        s.dataset("other")


# -- finding 14: readers never create a store ---------------------------------------------------------------


def test_readers_never_create_a_store(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(store.StoreNotFoundError, match="the folder does not exist"):
        store.open(missing, create=False)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.StoreNotFoundError, match="no Strata store at"):
        store.open(tmp_path / "empty", create=False)
    assert os.listdir(tmp_path / "empty") == []
    for bad in ("", "   "):
        with pytest.raises(store.StorageError, match="store URI is empty"):
            store.open(bad)
    store.open(tmp_path / "new")  # writers create it, marked as a store
    assert json.loads((tmp_path / "new" / "strata.json").read_text())["format"] == "strata.store"
    assert store.open(tmp_path / "new", create=False).datasets() == []


# -- finding 13: iterators never abort the interpreter --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("close", ["exit", "with", "del"])
def test_taking_one_batch_and_exiting_ends_cleanly(tmp_path, close):
    make_dataset(tmp_path, num_units=4)
    body = {
        "exit": "it = ds.iter_batches(H, batch_size=8, epochs=None)\nnext(it)",
        "with": ("with ds.iter_batches(H, batch_size=8) as it:\n    next(it)\n"
                 "assert not [t for t in threading.enumerate() if t.name.startswith('strata-batches')]"),
        "del": "it = ds.iter_batches(H, batch_size=8, epochs=None)\nnext(it)\ndel it\nimport gc; gc.collect(); time.sleep(0.5)\n"
               "assert not [t for t in threading.enumerate() if t.name.startswith('strata-batches')]",
    }[close]
    script = textwrap.dedent(f"""
        import threading, time
        from strata import store
        H = {H!r}
        ds = store.open({str(tmp_path)!r}, create=False).dataset("ds")
    """) + body + "\nprint('done')\n"
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
        assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
        assert "terminate called" not in r.stderr
