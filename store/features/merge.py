"""The merged generation of a feature table: its feature-major copy and per-feature statistics,
built by the encode job's driver after its workers, holding the table's lease.

Feature-major layout. Features are cut into blocks of ``block_features`` consecutive features,
one Parquet file per block (``fm/block-B.parquet``), sorted by ``(feature, row)``, with row
groups cut at feature boundaries (about :data:`ROW_GROUP_ENTRIES` entries each; a feature with
more has a row group of its own). ``index.parquet`` says, per feature, which row group holds it
and where, so one feature's activations are one row-group read of one file: a few hundred KiB,
checked block by block.

How it is built. In passes over feature ranges sized to ``memory_bytes``: each pass reads, for
its features, the sources' entries, sorts them by feature (stable: rows stay ascending), computes
:mod:`store.features.stats` per block and writes the block files. The sources are every committed
unit (a full build), or, when every new unit lies after every unit of the previous generation (a
dataset that grew), the previous generation's blocks followed by the new units only: the SAE never
runs again, and old activations are read from the feature-major copy, not from the unit tables.

A generation is committed whole (``merged/GEN/commit.json``, put-if-absent, fenced) before the
manifest points at it; it names every file with its checksums, and which units it covers.
"""

from __future__ import annotations

import logging
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from strata.store.commit import parquet, protocol
from strata.store.commit.lease import Lease
from strata.store.commit.protocol import CommitRecord, FileEntry
from strata.store.errors import CorruptionError
from strata.store.features.format import (
    BLOCK_CHECK_BYTES,
    BLOCK_SCHEMA,
    UNIT_SCHEMA,
    FeatureTableInfo,
    block_name,
    generation_dir,
    read_table,
)
from strata.store.features.stats import DECODER_NORMS, BlockStats, block_stats, decoder_norms, hist_edges
from strata.store.storage import Storage

log = logging.getLogger(__name__)

ROW_GROUP_ENTRIES = 32_768
#: Peak bytes a pass holds per entry (its arrays, their sorted copy and the sort's index).
BYTES_PER_ENTRY = 64
INDEX_SCHEMA = pa.schema([("feature", pa.int32()), ("row_group", pa.int32()), ("start", pa.int64()), ("count", pa.int64())])


@dataclass(frozen=True)
class Generation:
    """A committed merged generation."""

    name: str
    record: CommitRecord
    files: dict[str, FileEntry]  # by name relative to the generation folder

    @property
    def units(self) -> list[int]:
        return list(self.record.extra["units"])

    @property
    def encoded_rows(self) -> int:
        return int(self.record.extra["encoded_rows"])

    @property
    def entries(self) -> int:
        return int(self.record.extra["entries"])

    @property
    def rows(self) -> int:
        return int(self.record.rows)


def load_generation(storage: Storage, info: FeatureTableInfo, gen: str) -> Generation:
    """The generation's record, every file key checked to lie in its folder."""
    prefix = generation_dir(info.name, gen)
    key = f"{prefix}/commit.json"
    rec = protocol.read_record(storage, key)
    if rec is None:
        raise CorruptionError(f"feature table {info.name!r}: merged generation {gen} named by the manifest has no commit record")
    files = {}
    for f in rec.files:
        protocol.check_key(f.key, protocol.check_inside(prefix), where=key)
        files[f.key[len(prefix) + 1 :]] = f
    n_blocks = -(-info.d_sae // info.block_features)
    need = {"stats.parquet", "top.parquet", "sample.parquet", "index.parquet", *(block_name(b) for b in range(n_blocks))}
    units = rec.extra.get("units")
    if not need <= set(files) or not isinstance(units, list) or not all(isinstance(u, int) for u in units):
        raise CorruptionError(f"{key}: damaged commit record (it lacks files or units of a merged generation)")
    return Generation(gen, rec, files)


def _next_name(previous: str | None) -> str:
    seq = int(previous[1:7]) + 1 if previous else 1
    return f"g{seq:06d}-{uuid.uuid4().hex[:8]}"


def _sort_by_feature(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], lo: int, hi: int) -> tuple[np.ndarray, ...]:
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    feature = np.concatenate([p[0] for p in parts])
    row = np.concatenate([p[1] for p in parts])
    value = np.concatenate([p[2] for p in parts])
    # Stable, so each feature's rows keep their order; 16-bit keys get NumPy's radix sort.
    key = (feature - lo).astype(np.uint16 if hi - lo <= 1 << 16 else np.int32)
    order = np.argsort(key, kind="stable")
    return feature[order], row[order], value[order]


def _block_file(feature: np.ndarray, row: np.ndarray, value: np.ndarray, lo: int, hi: int) -> tuple[bytes, np.ndarray]:
    """A block's Parquet bytes, and per feature ``(row_group, start, count)``."""
    n = hi - lo
    bounds = np.searchsorted(feature, np.arange(lo, hi + 1))
    index = np.zeros((n, 3), np.int64)
    index[:, 0] = -1
    table = pa.table({"feature": feature, "row": row, "value": value}, schema=BLOCK_SCHEMA)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, BLOCK_SCHEMA, compression="lz4", use_dictionary=False, write_statistics=["feature"],
                          column_encoding={"feature": "DELTA_BINARY_PACKED", "row": "DELTA_BINARY_PACKED"}) as w:
        rg, f = 0, 0
        while f < n:
            g = f
            while g < n and (g == f or bounds[g + 1] - bounds[f] <= ROW_GROUP_ENTRIES):
                g += 1  # features f..g-1 share a row group
            a, b = int(bounds[f]), int(bounds[g])
            if b > a:
                w.write_table(table.slice(a, b - a), row_group_size=b - a)
                for i in range(f, g):
                    index[i] = (rg, bounds[i] - a, bounds[i + 1] - bounds[i])
                rg += 1
            f = g
    return sink.getvalue().to_pybytes(), index


def build(
    storage: Storage,
    info: FeatureTableInfo,
    records: dict[int, CommitRecord],
    *,
    previous: Generation | None,
    lease: Lease,
    memory_bytes: int = 4 << 30,
    threads: int = 4,
) -> str:
    """Build and commit a merged generation over the committed units ``records``; returns its
    name (the caller points the manifest at it)."""
    units = sorted(records)
    base = previous
    if base is not None and not (set(base.units) <= set(units) and all(u > max(base.units, default=-1) for u in units if u not in base.units)):
        base = None  # a unit inside the old range is new: build everything afresh
    new_units = [u for u in units if base is None or u not in set(base.units)]
    bf, d_sae = info.block_features, info.d_sae
    n_blocks = -(-d_sae // bf)
    total = sum(int(records[u].extra["entries"]) for u in units)
    passes = max(1, min(n_blocks, math.ceil(total * BYTES_PER_ENTRY / max(1, memory_bytes))))
    per_pass = -(-n_blocks // passes)
    gen = _next_name(info.merged)
    prefix = generation_dir(info.name, gen)
    log.info("feature table %r: merging %d unit(s) (%d new) into generation %s, %d pass(es)", info.name, len(units), len(new_units), gen, passes)

    edges = hist_edges(info.hist["lo"], info.hist["hi"], info.hist["bins"])
    entries: list[FileEntry] = []
    stats: list[BlockStats] = []
    index = np.zeros((d_sae, 3), np.int64)

    def read_unit(u: int) -> tuple[np.ndarray, ...]:
        rec = records[u]
        t = read_table(storage, rec.file, UNIT_SCHEMA, where=f"feature table {info.name!r} unit {u} ({rec.file.key})")
        if t.num_rows != int(rec.extra["entries"]):
            raise CorruptionError(f"feature table {info.name!r} unit {u}: {t.num_rows} entries, its record says {rec.extra['entries']}")
        return t.column("feature").to_numpy(), t.column("row").to_numpy(), t.column("value").to_numpy()

    def read_block(b: int) -> tuple[np.ndarray, ...]:
        assert base is not None
        t = read_table(storage, base.files[block_name(b)], BLOCK_SCHEMA, where=f"feature table {info.name!r} {base.name}/{block_name(b)}")
        return t.column("feature").to_numpy(), t.column("row").to_numpy(), t.column("value").to_numpy()

    with ThreadPoolExecutor(threads, thread_name_prefix="strata-merge") as pool:
        for b0 in range(0, n_blocks, per_pass):
            b1 = min(n_blocks, b0 + per_pass)
            flo, fhi = b0 * bf, min(d_sae, b1 * bf)
            parts = list(pool.map(read_block, range(b0, b1))) if base is not None else []
            for f, r, v in pool.map(read_unit, new_units):
                if passes > 1:
                    m = (f >= flo) & (f < fhi)
                    f, r, v = f[m], r[m], v[m]
                parts.append((f, r, v))
            feature, row, value = _sort_by_feature(parts, flo, fhi)
            del parts
            for b in range(b0, b1):
                lo, hi = b * bf, min(d_sae, (b + 1) * bf)
                a, z = (int(x) for x in np.searchsorted(feature, [lo, hi]))
                f, r, v = feature[a:z], row[a:z], value[a:z]
                stats.append(block_stats(f, r, v, lo=lo, hi=hi, top_k=info.top_k, edges=edges, **info.sample))
                data, idx = _block_file(f, r, v, lo, hi)
                index[lo:hi] = idx
                entries.append(_put(storage, f"{prefix}/{block_name(b)}", data, block_size=BLOCK_CHECK_BYTES))
                lease.check()

    encoded_rows = sum(int(records[u].extra["encoded_rows"]) for u in units)
    rows = sum(int(records[u].rows) for u in units)
    entries += _summary_files(storage, prefix, stats, index, d_sae, encoded_rows, norms=decoder_norms(storage, info.sae, info.sae_lineage))
    rec = CommitRecord(None, info.hook, rows, tuple(entries), protocol.writer_identity(), protocol.utcnow(), fence=lease.token,
                       extra={"units": units, "encoded_rows": encoded_rows, "entries": total, "generation": gen,
                              "incremental": base is not None})
    lease.check()
    protocol.commit(storage, f"{prefix}/commit.json", rec)
    return gen


def _put(storage: Storage, key: str, data: bytes, *, block_size: int | None = None) -> FileEntry:
    if not storage.put_if_absent(key, data):  # pragma: no cover - generation names are fresh
        raise CorruptionError(f"{key}: already exists in a fresh merged generation")
    return FileEntry.of(key, data, block_size=block_size)


def _summary_files(storage: Storage, prefix: str, stats: list[BlockStats], index: np.ndarray, d_sae: int, encoded_rows: int, *,
                   norms: pa.Array | None = None) -> list[FileEntry]:
    count = np.concatenate([s.count for s in stats])
    total = np.concatenate([s.sum for s in stats])
    mx = np.concatenate([s.max for s in stats])
    hist = np.concatenate([s.hist for s in stats])
    mean = np.divide(total, count, out=np.zeros(d_sae), where=count > 0)
    density = count / encoded_rows if encoded_rows else np.zeros(d_sae)
    nb = hist.shape[1]
    stats_t = pa.table({
        "feature": np.arange(d_sae, dtype=np.int32), "count": count, "density": density, "mean_activation": mean,
        "max_activation": mx, "sum_activation": total,
        "hist": pa.ListArray.from_arrays(np.arange(0, d_sae * nb + 1, nb, dtype=np.int32), hist.reshape(-1)),
    })
    if norms is not None and len(norms) == d_sae:  # a crosscoder's per-source decoder norms (store.features.stats)
        stats_t = stats_t.append_column(DECODER_NORMS, norms)
    top_t = pa.table({"feature": np.concatenate([s.top_feature for s in stats]), "rank": np.concatenate([s.top_rank for s in stats]),
                      "row": np.concatenate([s.top_row for s in stats]), "value": np.concatenate([s.top_value for s in stats])})
    sample_t = pa.table({"feature": np.concatenate([s.sample_feature for s in stats]),
                         "quantile": np.concatenate([s.sample_quantile for s in stats]),
                         "row": np.concatenate([s.sample_row for s in stats]), "value": np.concatenate([s.sample_value for s in stats])})
    index_t = pa.table({"feature": np.arange(d_sae, dtype=np.int32), "row_group": index[:, 0].astype(np.int32),
                        "start": index[:, 1], "count": index[:, 2]}, schema=INDEX_SCHEMA)
    return [_put(storage, f"{prefix}/{name}", parquet.to_bytes(t)) for name, t in
            (("stats.parquet", stats_t), ("top.parquet", top_t), ("sample.parquet", sample_t), ("index.parquet", index_t))]
