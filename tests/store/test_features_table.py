"""Feature tables through the store's writer and reader (no SAE, no Ray): queries equal a dense
brute force, merges are exact after growth, readers see committed units only, every read is
checked, DuckDB reads every table."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from strata import store
from strata.analysis.features.synthetic import synthetic_dataset, write_table, write_unit
from strata.store.commit import sealed
from strata.store.errors import CorruptionError, NotCommittedError, RowOutOfRangeError
from strata.store.features import merge as feature_merge
from strata.store.features.format import FeatureOutOfRangeError, FeatureTableExistsError, FeatureTableNotFoundError, unit_records
from strata.store.features.writer import FeatureWriter, clean_orphans, create_or_open, table_lease

H = "blocks.0.hook_resid_post"
D_SAE = 70  # 5 blocks of 16: the last one short
CTX, UC = 16, 4
UR = CTX * UC


def _dense(unit: int, rows: int) -> np.ndarray:
    """Latents of a unit: sparse, with ties, zero on special rows (position 0), a dead feature."""
    rng = np.random.default_rng([9, unit])
    z = np.round(rng.exponential(1.0, (rows, D_SAE)), 1).astype(np.float32) * (rng.random((rows, D_SAE)) < 0.15)
    z[:, 5] = 0
    z[:, 6] = np.where(rng.random(rows) < 0.3, 3.0, 0).astype(np.float32)  # ties everywhere
    z[np.arange(rows) % CTX == 0] = 0
    return z


def _entries(unit: int, rows: int):
    z = _dense(unit, rows)
    r, f = np.nonzero(z)
    return r + unit * UR, f, z[r, f], int(np.sum(np.arange(rows) % CTX != 0))


@pytest.fixture
def table(tmp_path):
    s = store.open(tmp_path)
    synthetic_dataset(s, "syn", hook=H, d=8, units=5, unit_contexts=UC, context_size=CTX, last_contexts=2)
    ds = s.dataset("syn")
    rows = {u: ds.record(H, u).rows for u in range(5)}
    fs = write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=list(range(5)), entries=lambda u: _entries(u, rows[u]),
                     top_k=6, block_features=16)
    dense = np.concatenate([_dense(u, rows[u]) for u in range(5)])
    return s, fs, dense


def _check_against(fs, dense: np.ndarray, encoded_rows: int) -> None:
    st = fs.stats().to_pydict()
    assert st["feature"] == list(range(D_SAE)) and fs.encoded_rows == encoded_rows
    for f in range(D_SAE):
        col = dense[:, f]
        nz = np.flatnonzero(col)
        assert st["count"][f] == nz.size
        assert st["density"][f] == pytest.approx(nz.size / encoded_rows, rel=1e-12)
        assert st["mean_activation"][f] == pytest.approx(float(col[nz].astype(np.float64).mean()) if nz.size else 0.0, rel=1e-9)
        assert st["max_activation"][f] == (col.max() if nz.size else 0)
        act = fs.activations(f)
        assert act.column("row").to_numpy().tolist() == nz.tolist()
        assert np.array_equal(act.column("activation").to_numpy(), col[nz])
        want = sorted(nz.tolist(), key=lambda r: (-col[r], r))[:6]
        top = fs.top(f, k=6)
        assert top.column("row").to_pylist() == want and np.array_equal(top.column("activation").to_numpy(), col[want])
        assert int(fs.histogram(f).column("count").to_numpy().sum()) == nz.size


def test_queries_equal_dense_brute_force(table, monkeypatch):
    s, fs, dense = table
    assert fs.units == fs.merged_units == [0, 1, 2, 3, 4] and not fs.stale and s.feature_tables() == ["ft"]
    encoded = int(np.sum(np.arange(dense.shape[0]) % CTX != 0))
    _check_against(fs, dense, encoded)
    rows = np.array([70, 3, 0, 250, 70, 64])
    got = fs.latents(rows=rows)
    assert got.is_sparse and np.array_equal(got.to_dense().numpy(), dense[rows])
    assert np.array_equal(fs.latents(rows=slice(60, 130), dense=True).numpy(), dense[60:130])
    assert fs.latents(rows=[]).shape == (0, D_SAE)
    # top rows come with their tokens and a context window inside their own context
    ds = s.dataset("syn")
    toks = ds.tokens(H)
    top = fs.top(7, k=3, before=2, after=1).to_pylist()
    for r in top:
        assert r["token"] == f"w{toks.column('token_id')[r['row']].as_py()}"
        assert r["position"] == r["row"] % CTX and r["doc_id"] == r["row"] // CTX
        i = r["row"]
        lo, hi = max(i - 2, i - i % CTX), min(i + 1, i - i % CTX + CTX - 1)
        words = [f"w{t}" for t in toks.column("token_id").to_numpy()[lo : hi + 1]]
        assert r["context"] == "".join(words[: i - lo]) + f"[[{words[i - lo]}]]" + "".join(words[i - lo + 1 :])
    samp = fs.sample(7)
    assert set(samp.column("quantile").to_pylist()) <= {0, 1, 2, 3} and samp.num_rows == 8
    assert all(dense[r, 7] == v for r, v in zip(samp.column("row").to_pylist(), samp.column("activation").to_pylist()))


def test_bad_queries(table):
    s, fs, _ = table
    with pytest.raises(FeatureOutOfRangeError, match=r"feature 70 is out of range: feature table 'ft' has features 0\.\.69 \(d_sae=70\)"):
        fs.top(70)
    with pytest.raises(FeatureOutOfRangeError, match="out of range"):
        fs.activations(-1)
    with pytest.raises(TypeError):
        fs.top("3")
    with pytest.raises(ValueError, match=r"k must be an int in 1\.\.6"):
        fs.top(3, k=7)
    with pytest.raises(FeatureTableNotFoundError, match="no feature table 'nope' .* it holds: ft"):
        s.features("nope")
    with pytest.raises(RowOutOfRangeError):
        fs.latents(rows=[4 * UR + 2 * CTX])  # past the short last unit
    with pytest.raises(NotCommittedError, match="unit 7"):
        fs.latents(rows=[7 * UR])


def test_growth_merges_incrementally_and_equals_a_full_build(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_merge, "ROW_GROUP_ENTRIES", 40)  # many row groups per block
    s = store.open(tmp_path)
    w = synthetic_dataset(s, "syn", hook=H, d=8, units=3, unit_contexts=UC, context_size=CTX)
    ent = lambda u: _entries(u, UR)  # noqa: E731
    fs = write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 1, 2], entries=ent, top_k=6, memory_bytes=1)
    gen1 = fs.info.merged
    old_records = {p.name: p.read_bytes() for p in (tmp_path / "features" / "ft" / "commits").iterdir()}
    w.grow(6)
    for u in range(3, 6):
        write_unit(w, u, hook=H)
    fs2 = write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[3, 4, 5], entries=ent, top_k=6, memory_bytes=1)
    assert fs2._generation().record.extra["incremental"] is True and fs2.merged_units == list(range(6))
    assert {p.name: p.read_bytes() for p in (tmp_path / "features" / "ft" / "commits").iterdir() if p.name in old_records} == old_records
    dense = np.concatenate([_dense(u, UR) for u in range(6)])
    _check_against(fs2, dense, 6 * (UR - UC))
    # The reader opened before the rebuild still reads its own generation; refresh moves on.
    assert fs.info.merged == gen1 and fs.activations(3).num_rows == int(np.count_nonzero(dense[: 3 * UR, 3]))
    # A full build over the same units gives the same files' contents.
    full = write_table(s, "full", dataset="syn", hook=H, d_sae=D_SAE, units=list(range(6)), entries=ent, top_k=6)
    assert full._generation().record.extra["incremental"] is False
    for name in ("stats", "top", "sample"):
        assert fs2._read(f"{name}.parquet", pq.read_schema(full.storage.root / full._generation().files[f"{name}.parquet"].key)) \
            .equals(full._read(f"{name}.parquet", pq.read_schema(full.storage.root / full._generation().files[f"{name}.parquet"].key)))


def test_a_unit_inside_the_merged_range_rebuilds_everything(tmp_path):
    s = store.open(tmp_path)
    synthetic_dataset(s, "syn", hook=H, d=8, units=4, unit_contexts=UC, context_size=CTX)
    ent = lambda u: _entries(u, UR)  # noqa: E731
    write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 2, 3], entries=ent, top_k=6)
    fs = write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[1], entries=ent, top_k=6)
    assert fs._generation().record.extra["incremental"] is False
    _check_against(fs, np.concatenate([_dense(u, UR) for u in range(4)]), 4 * (UR - UC))
    # only the current generation and the one before it are kept
    assert len(list((tmp_path / "features" / "ft" / "merged").iterdir())) == 2


def test_committed_units_only_and_exactly_once(tmp_path):
    s = store.open(tmp_path)
    synthetic_dataset(s, "syn", hook=H, d=8, units=3, unit_contexts=UC, context_size=CTX)
    fs = write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 1], entries=lambda u: _entries(u, UR), top_k=6)
    info = fs.info
    units = tmp_path / "features" / "ft" / "units"
    # A crashed attempt: a data file without a record is invisible.
    (units / "unit-00000002.0123456789ab.parquet").write_bytes(b"half written")
    fs.refresh()
    assert fs.units == [0, 1]
    with pytest.raises(NotCommittedError, match="unit 2"):
        fs.latents(rows=[2 * UR + 1])
    w = FeatureWriter(s.storage, info)
    r, f, v, n = _entries(0, UR)
    assert w.write_unit(0, rows=UR, encoded_rows=n, row=r, feature=f, value=v) == "already committed"
    with pytest.raises(store.WriteMismatchError, match="sorted by row"):
        w.write_unit(2, rows=UR, encoded_rows=1, row=np.array([2 * UR + 3, 2 * UR + 1]), feature=np.array([1, 1]), value=np.ones(2))
    # Orphans are removed by the driver once old enough, never committed files.
    with table_lease(s.storage, "ft") as lease:
        assert clean_orphans(s.storage, info, lease=lease, older_than_s=3600) == 0
        assert clean_orphans(s.storage, info, lease=lease, older_than_s=0) == 1
    assert len(list(units.iterdir())) == 2
    # Another identity under the same name is refused, never overwritten.
    with table_lease(s.storage, "ft") as lease, pytest.raises(FeatureTableExistsError, match=r"top_k: 6 -> 7"):
        create_or_open(s.storage, info.with_changes(top_k=7), lease=lease)


def test_damaged_files_and_forged_records_raise(table):
    s, fs, _ = table
    gen = fs._generation()
    block = s.storage.root / gen.files["fm/block-00000.parquet"].key
    raw = bytearray(block.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    block.write_bytes(bytes(raw))
    fresh = s.features("ft")
    with pytest.raises(CorruptionError, match="checksum mismatch"):
        for f in range(16):
            fresh.activations(f)
    assert any("block-00000" in p for p in fresh.verify())
    unit = s.storage.root / fs._records[1].file.key
    unit.write_bytes(unit.read_bytes()[:-5])
    with pytest.raises(CorruptionError, match="unit 1"):
        fresh.latents(rows=[UR + 1])
    # A record naming a file outside its own place is damaged, and only that unit is unreadable.
    rec_path = s.storage.root / "features" / "ft" / "commits" / "00000002.json"
    rec = json.loads(rec_path.read_text())
    rec["files"][0]["key"] = "datasets/syn/manifest.json"
    rec = sealed.seal({k: v for k, v in rec.items() if k != "checksum"})  # a forger recomputes the checksum
    rec_path.write_text(json.dumps(rec))
    fresh.refresh()
    assert 2 in fresh.damaged and fresh.units == [0, 1, 3, 4]
    with pytest.raises(CorruptionError, match="outside what it may name"):
        fresh.latents(rows=[2 * UR + 1])
    assert fresh.latents(rows=[3 * UR + 1]).shape == (1, D_SAE)
    good, bad = unit_records(s.storage, fresh.info)
    assert sorted(bad) == [2]


def test_duckdb_reads_every_table(table):
    s, fs, dense = table
    root = s.storage.root
    gen = root / "features" / "ft" / "merged" / fs.info.merged
    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM '{root}/features/ft/units/*.parquet'").fetchone()[0]
    assert n == np.count_nonzero(dense)
    rows = con.execute(f"SELECT row, value FROM '{gen}/fm/*.parquet' WHERE feature = 9 ORDER BY row").fetchall()
    act = fs.activations(9)
    assert [r for r, _ in rows] == act.column("row").to_pylist()
    top = con.execute(f"SELECT row FROM '{root}/features/ft/units/*.parquet' WHERE feature = 9 ORDER BY value DESC, row LIMIT 6").fetchall()
    assert [r for (r,) in top] == fs.top(9, k=6).column("row").to_pylist()
    st = con.execute(f"SELECT feature, count, density FROM '{gen}/stats.parquet' ORDER BY feature").fetchall()
    assert [c for _, c, _ in st] == fs.stats().column("count").to_pylist()
    for name in ("top", "sample", "index"):
        assert con.execute(f"SELECT count(*) FROM '{gen}/{name}.parquet'").fetchone()[0] > 0
