"""Store I/O benchmark: every figure is a ratio against a baseline measured in the same run.

    python benchmarks/store_io.py [--d 768] [--units 8] [--unit-contexts 256] [--repeats 3]

1. committed write throughput of `write_unit` vs plain file writes of the same bytes;
2. sequential `read` into torch float32 vs `numpy.memmap` over the same raw bytes;
3. checked partial reads (`rows=` slices and scattered index arrays, `docs=`) vs the same
   reads of the same chunks without the block checksums (what the store did before every read
   was checked);
4. `iter_batches` shuffled float32 batches of 4096 rows vs sae-lens's `ActivationsStore`
   reading the same activations from its own cached-activations format;
5. bytes per token on disk per stored dtype;
6. ``docindex``: `read(docs=[d])` and `ds.docs()` of a dataset whose document index is stored in
   parts (a sharded corpus: one part per tokenized shard, ``--index-parts`` of them) vs the same
   dataset with the index in one file (the corpus planned as one stream).

Reads run from the page cache (the data was just written): they measure the software path,
which is what the store adds on top of the disk. Timings are medians of `--repeats` runs, the
baseline and the store alternating so that both see the same machine state.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from strata import store

CTX = 128


def token_table(unit: int, unit_contexts: int) -> pa.Table:
    r = np.arange(unit_contexts * CTX, dtype=np.int64)
    return pa.table(
        {
            "context_id": unit * unit_contexts + r // CTX,
            "position": (r % CTX).astype(np.int32),
            "doc_id": (unit * unit_contexts * CTX + r) // 1000,
            "doc_position": ((unit * unit_contexts * CTX + r) % 1000).astype(np.int32),
            "token_id": (r % 50000).astype(np.int32),
            "special": np.zeros(r.size, dtype=bool),  # no special rows: both readers see every row
        }
    )


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        os.sync()  # start every timed run with no dirty pages left by the previous one
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_write(root: Path, d: int, units: int, unit_contexts: int, dtype: str, repeats: int) -> tuple[float, float]:
    rows = unit_contexts * CTX
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    data = [np.random.default_rng(u).standard_normal((rows, d), dtype=np.float32).astype(np_dtype) for u in range(units)]
    toks = [token_table(u, unit_contexts) for u in range(units)]
    raw_dir = root / "raw"
    run = [0]

    def plain():
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir(parents=True)
        for u, x in enumerate(data):
            with open(raw_dir / f"unit-{u}.bin", "wb") as f:
                f.write(memoryview(x).cast("B"))

    def strata(w):
        # Only the unit writes are timed: creating the dataset (Zarr metadata) is a one-off.
        for u, x in enumerate(data):
            w.write_unit(u, tokens=toks[u], acts={"blocks.0.hook_resid_post": x})

    t_plain, t_strata = [], []
    for rep in range(repeats):
        run[0] += 1
        s = store.open(root / f"s{run[0]}")
        w = s.create_dataset("w", hooks={"blocks.0.hook_resid_post": d}, context_size=CTX, dtype=dtype, num_units=units, unit_contexts=unit_contexts)
        # Page-cache writeback slows whichever side writes second: alternate who goes first.
        if rep % 2 == 0:
            t_plain.append(median_time(plain, 1))
            t_strata.append(median_time(lambda w=w: strata(w), 1))
        else:
            t_strata.append(median_time(lambda w=w: strata(w), 1))
            t_plain.append(median_time(plain, 1))
        shutil.rmtree(root / f"s{run[0]}")
    nbytes = sum(x.nbytes for x in data)
    return nbytes / statistics.median(t_plain), nbytes / statistics.median(t_strata)


def build(root: Path, d: int, units: int, unit_contexts: int, dtype: str, doc_rows: int = 1000) -> tuple[store.ActivationDataset, np.ndarray]:
    rows = unit_contexts * CTX
    s = store.open(root)
    w = s.create_dataset(f"r-{dtype}", hooks={"blocks.0.hook_resid_post": d}, context_size=CTX, dtype=dtype, num_units=units,
                         unit_contexts=unit_contexts)
    parts = []
    for u in range(units):
        x = np.random.default_rng(100 + u).standard_normal((rows, d), dtype=np.float32)
        w.write_unit(u, tokens=token_table(u, unit_contexts), acts={"blocks.0.hook_resid_post": x})
        parts.append(x)
    n = units * rows  # documents of 1000 rows (see token_table), so `docs=` finds them in the index
    ids = np.arange(-(-n // doc_rows))
    w.write_documents(pa.table({"doc_id": ids, "row_start": ids * doc_rows, "row_end": np.minimum(ids * doc_rows + doc_rows, n),
                                "dropped_tokens": np.zeros(ids.size, np.int64)}))
    return s.dataset(f"r-{dtype}"), np.concatenate(parts)


def parted_index(ds: store.ActivationDataset, parts: int) -> store.ActivationDataset:
    """``ds`` with its document index moved into ``parts`` tokenized-shard parts (by id range,
    rows as they are) and a shards table naming them, as a sharded extraction stores it."""
    from strata.store.datasets.tokenized import write_shard
    from strata.store.datasets.writer import dataset_lease

    docs = ds.docs()
    n = docs.num_rows
    cuts = np.linspace(0, n, parts + 1).astype(int)
    rows = []
    with dataset_lease(ds.storage, ds.name, owner="bench") as lease:
        for i in range(parts):
            part = docs.slice(int(cuts[i]), int(cuts[i + 1] - cuts[i]))
            part = part.add_column(1, "n_tokens", pa.array(np.zeros(part.num_rows, np.int64)))
            key = f"bench-{i:04d}"
            z = np.zeros(0, np.int32)
            write_shard(ds.storage, ds.name, key, ids=z, start=z, end=z, docs=part, meta={"shard": key}, lease=lease)
            ids = part.column("doc_id").to_numpy()
            rows.append({"key": key, "name": key, "fingerprint": key, "listing": "{}", "records": part.num_rows, "docs": part.num_rows,
                         "tokens": 0, "contexts": 0, "first_unit": 0, "units": 0, "id_offset": 0, "id_min": int(ids.min()),
                         "id_max": int(ids.max()), "skipped_empty": 0, "chars": 0, "dropped_tokens": 0, "dropped_docs": 0,
                         "partial_docs": 0, "doc_set": "0:0"})
        w = ds.store.writer(ds.name, fence=lease.token)
        w.write_shards_table(pa.Table.from_pylist(rows))
        info = w.refresh()
        w._publish(info.with_changes(aux={k: v for k, v in info.aux.items() if k != "documents"}))  # the parts only
    return ds.store.dataset(ds.name)


def bench_docindex(root: Path, d: int, units: int, unit_contexts: int, repeats: int, parts: int,
                   queries: int = 400) -> dict[str, tuple[float, float]]:
    """Queries/s with the document index in one file (baseline) vs in ``parts`` parts."""
    hook = "blocks.0.hook_resid_post"
    # Short documents, so the index has many rows (what the parts are about); d is small, the
    # activations are not what is timed.
    one, _ = build(root / "one", 8, units, unit_contexts, "float32", doc_rows=4)
    many, _ = build(root / "many", 8, units, unit_contexts, "float32", doc_rows=4)
    many = parted_index(many, parts)
    assert many.docs().equals(one.docs()), "the parted index must read back as the one-file index"
    n_docs = one.docs().num_rows
    rng = np.random.default_rng(0)
    docs = [int(x) for x in rng.integers(0, n_docs, queries)]
    out = {}
    warm_one, warm_many = store.open(root / "one").dataset(one.name), store.open(root / "many").dataset(many.name)
    for label, fn, count in (
        ("read(docs=[d]), 4 rows each, 400 queries, the dataset open (its index read)",
         lambda ds: [(warm_many if ds.store.uri.endswith("many") else warm_one).read(hook, docs=[x]) for x in docs], queries),
        ("read(docs=[d]), 4 rows each, 400 queries on a fresh dataset object", lambda ds: [ds.read(hook, docs=[x]) for x in docs], queries),
        ("ds.docs(), fresh dataset object", lambda ds: ds.docs(), 1),
    ):
        def base(fn=fn) -> None:
            fn(store.open(root / "one").dataset(one.name))

        def ours(fn=fn) -> None:
            fn(store.open(root / "many").dataset(many.name))

        base(), ours()
        t_b, t_o = [], []
        for _ in range(repeats):
            t_b.append(median_time(base, 1))
            t_o.append(median_time(ours, 1))
        out[label] = (count / statistics.median(t_b), count / statistics.median(t_o))
    return out


def bench_read(root: Path, ds: store.ActivationDataset, full: np.ndarray, repeats: int) -> tuple[float, float]:
    hook = "blocks.0.hook_resid_post"
    rows, d = full.shape
    unit_rows = ds.info.unit_rows
    raw = root / "raw-read.bin"
    sdt = np.float16 if ds.info.dtype == "float16" else np.float32
    full.astype(sdt).tofile(raw)
    mm = np.memmap(raw, dtype=sdt, mode="r", shape=(rows, d))
    step = unit_rows

    def memmap_read():
        for a in range(0, rows, step):
            t = torch.from_numpy(np.array(mm[a : a + step], dtype=np.float32))  # a real copy out of the map
            assert t.shape[0] == step

    def strata_read():
        for a in range(0, rows, step):
            t = ds.read(hook, rows=slice(a, a + step), as_="torch", dtype=torch.float32)
            assert t.shape[0] == step

    memmap_read(), strata_read()  # warm the page cache for both
    t_m, t_s = [], []
    for _ in range(repeats):
        t_m.append(median_time(memmap_read, 1))
        t_s.append(median_time(strata_read, 1))
    nrows = rows
    return nrows / statistics.median(t_m), nrows / statistics.median(t_s)


def bench_partial(ds: store.ActivationDataset, repeats: int, queries: int = 400) -> dict[str, tuple[float, float]]:
    """Rows/s of partial reads with every block checked vs the very same reads with the block
    checks switched off (``store.commit.protocol.CHECK_READS``): what checking costs, nothing else."""
    from strata.store.commit import protocol

    hook = "blocks.0.hook_resid_post"
    n = ds.num_rows(hook)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, n - 512, queries)
    index_sets = [np.sort(rng.choice(n, 64, replace=False)) for _ in range(queries)]
    docs = [int(a) // 1000 for a in starts]
    shapes = {
        "slice of 512 rows": (lambda: [ds.read(hook, rows=slice(int(a), int(a) + 512)) for a in starts], 512 * queries),
        "64 scattered rows": (lambda: [ds.read(hook, rows=q) for q in index_sets], 64 * queries),
        "one document (docs=, 1000 rows)": (lambda: [ds.read(hook, docs=[d]) for d in docs], 1000 * queries),
    }
    out = {}
    for label, (run, rows) in shapes.items():

        def unchecked(run: Callable[[], object] = run) -> None:
            protocol.CHECK_READS = False
            try:
                run()
            finally:
                protocol.CHECK_READS = True

        run(), unchecked()  # warm the page cache for both
        t_u, t_c = [], []
        for _ in range(repeats):
            t_u.append(median_time(unchecked, 1))
            t_c.append(median_time(run, 1))
        out[label] = (rows / statistics.median(t_u), rows / statistics.median(t_c))
    return out


def bench_batches(root: Path, ds: store.ActivationDataset, full: np.ndarray, repeats: int, batch: int = 4096, epochs: int = 4) -> tuple[float, float]:
    """Both sides stream `epochs` passes over the data through one iterator, as training does
    (a fresh iterator's one-off setup, buffers and metadata, is then amortised as in real use)."""
    import datasets
    from datasets import Array2D, Dataset, Features, Sequence, Value
    from sae_lens.training.activations_store import ActivationsStore

    hook = "blocks.0.hook_resid_post"
    rows, d = full.shape
    n_ctx = rows // CTX
    cache = root / "sae-lens-cache"
    # sae-lens's cached-activations format, with the features its CacheActivationsRunner uses.
    features = Features({hook: Array2D(shape=(CTX, d), dtype="float32"), "token_ids": Sequence(Value(dtype="int32"), length=CTX)})
    datasets.disable_progress_bars()
    Dataset.from_dict(
        {hook: full.reshape(n_ctx, CTX, d), "token_ids": np.zeros((n_ctx, CTX), dtype=np.int32)}, features=features
    ).save_to_disk(str(cache))
    n_batches = epochs * (rows // batch)

    def sae_lens_read():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            act_store = ActivationsStore(
                model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None, context_size=CTX, d_in=d,
                n_batches_in_buffer=32, total_training_tokens=epochs * rows, store_batch_size_prompts=32, train_batch_size_tokens=batch,
                prepend_bos=True, normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                cached_activations_path=str(cache),
            )
            for _ in range(n_batches):
                b = next(act_store)
                assert b.shape == (batch, d)

    def strata_batches():
        it = ds.iter_batches(hook, batch_size=batch, shuffle=True, seed=0, epochs=epochs, buffer_rows=1 << 17)
        k = 0
        for _ in it:
            k += 1
            if k == n_batches:
                break
        it.close()
        assert k == n_batches

    sae_lens_read(), strata_batches()
    t_l, t_s = [], []
    for _ in range(repeats):
        t_l.append(median_time(sae_lens_read, 1))
        t_s.append(median_time(strata_batches, 1))
    nrows = n_batches * batch
    return nrows / statistics.median(t_l), nrows / statistics.median(t_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--unit-contexts", type=int, default=256)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    p.add_argument("--parts", default="write,read,partial,batches,bytes,docindex",
                   help="comma-separated subset of write,read,partial,batches,bytes,docindex")
    p.add_argument("--index-parts", type=int, default=16, help="docindex: parts of the sharded document index")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="strata-bench-", dir=args.dir))
    torch.set_num_threads(os.cpu_count() or 1)
    rows = args.units * args.unit_contexts * CTX
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}")
    print(f"data: {args.units} units x {args.unit_contexts * CTX} rows x d={args.d} ({rows:,} tokens), repeats={args.repeats}")
    try:
        parts = set(args.parts.split(","))
        for dtype in ("float32", "float16") if "write" in parts else ():
            base, ours = bench_write(root / f"w-{dtype}", args.d, args.units, args.unit_contexts, dtype, args.repeats)
            print(f"write {dtype}: write_unit {ours / 1e9:.2f} GB/s vs plain files {base / 1e9:.2f} GB/s  "
                  f"ratio {ours / base:.2f}  (target >= 0.6)")
        for dtype in ("float32", "float16") if "read" in parts else ():
            ds, full = build(root / "r", args.d, args.units, args.unit_contexts, dtype)
            base, ours = bench_read(root, ds, full, args.repeats)
            print(f"read {dtype}->torch float32: {ours / 1e6:.2f} M rows/s vs memmap {base / 1e6:.2f} M rows/s  "
                  f"ratio {ours / base:.2f}  (target >= 0.6)")
        if "partial" in parts:
            ds, _ = build(root / "p", args.d, args.units, args.unit_contexts, "float32")
            for label, (base, ours) in bench_partial(ds, args.repeats).items():
                print(f"partial read, {label}: checked {ours / 1e6:.2f} M rows/s vs unchecked {base / 1e6:.2f} M rows/s  "
                      f"ratio {ours / base:.2f}  (target >= 0.9)")
        if "docindex" in parts:
            docs = args.units * args.unit_contexts * CTX  # 4x the units, 4 rows a document
            for label, (base, ours) in bench_docindex(root / "docindex", args.d, 4 * args.units, args.unit_contexts, args.repeats,
                                                      args.index_parts).items():
                print(f"document index of {docs:,} documents in {args.index_parts} parts, {label}: {ours:,.0f}/s vs one file {base:,.0f}/s  "
                      f"ratio {ours / base:.2f}  (target >= 0.9)")
        if "batches" in parts:
            ds, full = build(root / "b", args.d, args.units, args.unit_contexts, "float32")
            base, ours = bench_batches(root, ds, full, args.repeats)
            print(f"iter_batches shuffled float32 x4096, 4 epochs: {ours / 1e6:.2f} M rows/s vs sae-lens ActivationsStore (cached) "
                  f"{base / 1e6:.2f} M rows/s  ratio {ours / base:.2f}  (target >= 2)")
        for dtype in ("float32", "float16", "bfloat16") if "bytes" in parts else ():
            d_root = root / f"bytes-{dtype}"
            s = store.open(d_root)
            w = s.create_dataset("x", hooks={"blocks.0.hook_resid_post": args.d}, context_size=CTX, dtype=dtype, num_units=2,
                                 unit_contexts=args.unit_contexts)
            for u in range(2):
                x = np.random.default_rng(u).standard_normal((args.unit_contexts * CTX, args.d), dtype=np.float32)
                w.write_unit(u, tokens=token_table(u, args.unit_contexts), acts={"blocks.0.hook_resid_post": x})
            n = 2 * args.unit_contexts * CTX
            total = du(d_root / "datasets" / "x")
            acts = du(d_root / "datasets" / "x" / "acts")
            print(f"bytes/token {dtype}: {total / n:.1f} on disk for one hook of d={args.d} "
                  f"(activations {acts / n:.1f}, raw values {args.d * np.dtype(store.dtypes.storage_dtype(dtype)).itemsize}; "
                  f"tokens+commits {(total - acts) / n:.2f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
