"""Feature tables, as ratios measured in one run on this machine.

    python benchmarks/features.py                         # ~10 minutes on 2 CPU cores, ~3 GB of disk
    python benchmarks/features.py --tokens 1000000 --skip-encode   # the query part only, smaller

Two parts:

* **Encode throughput.** A real encode: a seeded sae-lens TopK SAE over a synthetic dataset
  (``--encode-rows`` rows of ``--d-in`` float16 values), through ``run_encode`` (an in-process
  Ray, one CPU worker, reading the units from the store, writing and committing sparse tables),
  against a bare ``sae.encode`` loop over the same rows already in memory as float32, with the
  same batch size and torch threads. Pipeline throughput is the steady rate (units after the
  first, once the worker has loaded the SAE); the whole job time, with Ray start-up and the
  merge, is printed beside it. Each contender runs once in each of ``--rounds`` interleaved
  rounds; the best run counts.
* **Query latency.** Encoding ``--tokens`` tokens with a 16k SAE is too slow on two CPU cores, so
  this table is written directly through the store's feature writer from **synthetic sparse
  latents** (``--l0`` features per token drawn from a Zipf-like law over ``--d-sae`` features,
  exponential values), then merged as an encode job merges. ``fs.top(f)`` (with its decoded
  contexts) and ``fs.activations(f)`` are timed warm (table open, its index loaded, files in the
  page cache) against DuckDB answering the same question with a full scan of the row-major unit
  tables (``read_parquet('units/*.parquet')``), on features of several densities; answers are
  checked equal.
* **Dashboards.** On the same table: the derived data (neighbours, logit effects) from a seeded
  16k-latent decoder and a seeded ``W_U`` saved beside it (``sae-16k-seeded.npz``), timed once; the
  served page data (``GET /api/feature/f`` of `strata features serve`'s app) warm, beside ``fs.top``;
  the static export of every feature, its time and total size.
* **Notebook views** (issue 24). On the same table (with the derived data when the dashboard part
  ran): the feature table's HTML summary (``fs._repr_html_()``: identity, merged state, density
  summary; target < 50 ms warm) and ``fs.show(f)``'s HTML (a new view each time: the feature's data
  and the page fragment; target < 200 ms warm), median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, memory_gib  # noqa: E402

from strata import store  # noqa: E402
from strata.analysis.features.external import put_sae  # noqa: E402
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset, token_table, word_tokenizer_json, write_table  # noqa: E402
from strata.store.features.table import FeatureTable  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def machine() -> str:
    cpu, mem = cpu_model(), memory_gib()
    import duckdb
    import pyarrow
    import sae_lens
    import torch

    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, "
            f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, pyarrow {pyarrow.__version__}, duckdb {duckdb.__version__}")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- encode throughput ------------------------------------------------------------------------


def bench_encode(root: Path, args: argparse.Namespace) -> None:
    import torch

    from strata.pipeline.cluster import connect
    from strata.pipeline.encode import EncodeSpec, run_encode

    s = store.open(root / "enc")
    ctx, uc = 128, 128
    units = max(2, args.encode_rows // (ctx * uc))
    synthetic_dataset(s, "enc", hook=HOOK, d=args.d_in, units=units, unit_contexts=uc, context_size=ctx, dtype="float16")
    sae = random_topk_sae(args.d_in, args.encode_d_sae, k=args.encode_k, seed=0)
    put_sae(s, "sae", sae, dataset="enc", hook=HOOK)
    ds = s.dataset("enc")
    x = ds.read(HOOK, as_="torch").float()
    rows = x.shape[0]
    print(f"\nencode: {rows:,} rows of d_in={args.d_in} (float16 stored), TopK SAE d_sae={args.encode_d_sae} k={args.encode_k}, "
          f"batches of {args.batch_rows} rows, {units} units")
    threads = os.cpu_count() or 1
    bare, pipe, whole = [], [], []
    with connect(None, num_cpus=os.cpu_count(), log_to_driver=False):  # a private Ray on free ports (pipeline/cluster.py)
        for rnd in range(args.rounds):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                t_warm = time.perf_counter()  # warm up until the rate settles: shared CPUs start slow
                while time.perf_counter() - t_warm < args.warmup_s:
                    sae.encode(x[: args.batch_rows])
                for _ in range(args.bare_passes):  # the cheap baseline gets several tries per round
                    t0 = time.perf_counter()
                    for b in range(0, rows, args.batch_rows):
                        sae.encode(x[b : b + args.batch_rows])
                    bare.append(rows / (time.perf_counter() - t0))
            spec = EncodeSpec(store=str(root / "enc"), sae="sae", name=f"enc-{rnd}", skip_special=False,
                              compute={"batch_rows": args.batch_rows})
            units_seen: list[dict] = []
            r = run_encode(spec, progress=False, on_unit=units_seen.append)
            pipe.append(r.steady_rows_per_s)
            whole.append(r.seconds)
            enc = sum(u["encode_s"] for u in units_seen)
            wr = sum(u["write_s"] for u in units_seen)
            print(f"  round {rnd + 1}: bare {max(bare[-args.bare_passes:]):,.0f} rows/s, pipeline steady {pipe[-1]:,.0f} rows/s "
                  f"(whole job {r.seconds:.1f}s incl. Ray start and a {r.merge_seconds:.1f}s merge; in the worker "
                  f"{enc:.1f}s reading + encoding, {wr:.1f}s writing + committing, overlapped)")
    b, p = max(bare), max(pipe)
    print(f"| bare `sae.encode` loop over the same rows in memory | {b:,.0f} rows/s | 1.00 | |")
    print(f"| `run_encode` steady (read, encode, write + commit)  | {p:,.0f} rows/s | {p / b:.2f} | >= 0.8 |")
    print(f"  whole job, best of {args.rounds}: {min(whole):.1f}s for {rows:,} rows")


# -- query latency ------------------------------------------------------------------------------


def build_query_table(root: Path, args: argparse.Namespace) -> FeatureTable:
    s = store.open(root / "q")
    ctx, uc = 128, 256
    ur = ctx * uc
    units = -(-args.tokens // ur)
    t0 = time.perf_counter()
    w = s.create_dataset("q", hooks={HOOK: 8}, context_size=ctx, dtype="float16", num_units=units, unit_contexts=uc,
                         meta={"model": "synthetic", "revision": "0"})
    w.write_tokenizer(word_tokenizer_json(1024))
    zeros = np.zeros((ur, 8), np.float16)
    for u in range(units):
        w.write_unit(u, tokens=token_table(u, uc, unit_contexts=uc, context_size=ctx, vocab=1024), acts={HOOK: zeros})
    t1 = time.perf_counter()
    p = 1.0 / np.arange(1, args.d_sae + 1) ** 0.8
    p /= p.sum()
    perm = np.random.default_rng(0).permutation(args.d_sae)  # dense features spread over blocks

    def entries(u: int):
        rng = np.random.default_rng([1, u])
        f = np.sort(perm[rng.choice(args.d_sae, size=(ur, args.l0), p=p)], axis=1)
        keep = np.ones(f.shape, bool)
        keep[:, 1:] = f[:, 1:] != f[:, :-1]
        special = (np.arange(ur) % ctx) == 0
        keep[special] = False
        r, c = np.nonzero(keep)
        v = rng.exponential(2.0, r.size).astype(np.float32)
        return r + u * ur, f[r, c].astype(np.int32), v, int((~special).sum())

    fs = write_table(s, "q", dataset="q", hook=HOOK, d_sae=args.d_sae, units=list(range(units)), entries=entries, top_k=64,
                     block_features=256, sample={"quantiles": 10, "per_quantile": 4, "seed": 0}, memory_bytes=int(args.merge_gb * 2**30))
    t2 = time.perf_counter()
    base = root / "q" / "features" / "q"
    print(f"\nquery table: SYNTHETIC sparse latents written through the store's feature writer (no SAE ran): {units * ur:,} token rows, "
          f"d_sae={args.d_sae}, {fs._generation().entries:,} non-zero latents (~{args.l0} per token, Zipf-like feature law)")
    print(f"  dataset (tokens) written in {t1 - t0:.0f}s; units written + merged in {t2 - t1:.0f}s; "
          f"unit tables {du(base / 'units') / 2**30:.2f} GiB, merged generation {du(base / 'merged') / 2**30:.2f} GiB")
    return fs


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_queries(root: Path, fs: FeatureTable, args: argparse.Namespace) -> None:
    import duckdb

    units = f"{root / 'q' / 'features' / 'q' / 'units'}/*.parquet"
    con = duckdb.connect()
    con.execute(f"SET threads TO {os.cpu_count()}")
    fs = store.open(root / "q").features("q")
    st = fs.stats()
    order = np.argsort(-st.column("count").to_numpy(), kind="stable")
    picks = [int(order[i]) for i in (0, 100, 1000, 10000) if i < len(order)]
    fs.top(picks[0]), fs.activations(picks[0])  # warm: metadata, index, footers
    top_sql = f"SELECT row, value FROM read_parquet('{units}') WHERE feature = ? ORDER BY value DESC, row LIMIT 20"
    act_sql = f"SELECT row, value FROM read_parquet('{units}') WHERE feature = ? ORDER BY row"
    con.execute(top_sql, [picks[0]]).fetchall()  # warm DuckDB and the page cache
    print(f"\nqueries (warm, local), median of {args.repeats} per feature; DuckDB with {os.cpu_count()} threads:")
    print("| feature (count) | fs.top(f) | DuckDB top-20 scan | ratio | fs.activations(f) | DuckDB scan | ratio |")
    ratios_t, ratios_a = [], []
    for f in picks:
        ours_top = fs.top(f, k=20)
        want = con.execute(top_sql, [f]).fetchall()
        assert [(r, v) for r, v in zip(ours_top.column("row").to_pylist(), ours_top.column("activation").to_pylist())] == want
        ours_act = fs.activations(f)
        want = con.execute(act_sql, [f]).fetchall()
        assert list(zip(ours_act.column("row").to_pylist(), ours_act.column("activation").to_pylist())) == want
        t_top = _median_s(lambda f=f: fs.top(f, k=20), args.repeats)
        t_act = _median_s(lambda f=f: fs.activations(f), args.repeats)
        d_top = _median_s(lambda f=f: con.execute(top_sql, [f]).fetchall(), max(3, args.repeats // 10))
        d_act = _median_s(lambda f=f: con.execute(act_sql, [f]).fetchall(), max(3, args.repeats // 10))
        ratios_t.append(d_top / t_top)
        ratios_a.append(d_act / t_act)
        print(f"| {f} ({st.column('count')[f].as_py():,}) | {t_top * 1e3:.2f} ms | {d_top * 1e3:.0f} ms | {d_top / t_top:,.0f}x | "
              f"{t_act * 1e3:.2f} ms | {d_act * 1e3:.0f} ms | {d_act / t_act:,.0f}x |")
    print(f"  smallest ratios: top {min(ratios_t):,.0f}x, activations {min(ratios_a):,.0f}x (target >= 100x)")
    # A feature never asked before: its token tables and block footer are read on first use.
    fresh = int(order[len(order) // 2])
    t0 = time.perf_counter()
    fs.top(fresh)
    t1 = time.perf_counter()
    fs.activations(fresh)
    t2 = time.perf_counter()
    print(f"  first call for a new feature {fresh}: top {1e3 * (t1 - t0):.1f} ms (reads the token tables of its rows' units), "
          f"activations {1e3 * (t2 - t1):.2f} ms")


# -- dashboards -----------------------------------------------------------------------------------


def bench_dashboard(root: Path, fs: FeatureTable, args: argparse.Namespace) -> None:
    """Derived data from a seeded 16k-latent decoder and a W_U stored beside the table, then the served
    page data warm (starlette's test client, the app `strata features serve` runs) and the whole export."""
    from starlette.testclient import TestClient

    from strata.analysis.features.dashboard import derive, export, make_app

    fs = store.open(root / "q").features("q")
    rng = np.random.default_rng(0)
    weights = root / "q" / "sae-16k-seeded.npz"  # beside the table: the table was written without an SAE behind it
    np.savez(weights, W_dec=rng.standard_normal((fs.d_sae, args.dash_d_in)).astype(np.float32),
             W_U=rng.standard_normal((args.dash_d_in, 1024)).astype(np.float32))
    w = np.load(weights)
    t0 = time.perf_counter()
    derive(fs, decoder=w["W_dec"], unembed=w["W_U"], unembed_note="seeded W_U (benchmark)")
    t_derive = time.perf_counter() - t0
    st = fs.stats()
    order = np.argsort(-st.column("count").to_numpy(), kind="stable")
    picks = [int(order[i]) for i in (0, 100, 1000, 10000) if i < len(order)]
    print(f"\ndashboards: derived data (10 neighbours by decoder cosine over {fs.d_sae:,} x {args.dash_d_in} decoder rows, logit effects "
          f"over a 1024-token W_U) in {t_derive:.1f}s, once per SAE")
    print("| feature (count) | fs.top(f) warm | served /api/feature/f warm | JSON size |")
    with TestClient(make_app(fs)) as c:
        for f in picks:
            c.get(f"/api/feature/{f}")
            fs.top(f)
            t_top = _median_s(lambda f=f: fs.top(f, k=20), args.repeats)
            t_page = _median_s(lambda f=f: c.get(f"/api/feature/{f}").raise_for_status(), max(5, args.repeats // 5))
            size = len(c.get(f"/api/feature/{f}").content)
            print(f"| {f} ({st.column('count')[f].as_py():,}) | {t_top * 1e3:.1f} ms | {t_page * 1e3:.1f} ms | {size / 1e3:.1f} KB |")
    out = root / "export"
    t0 = time.perf_counter()
    export(fs, out)
    t_exp = time.perf_counter() - t0
    size = du(out)
    dead = int((st.column("count").to_numpy() == 0).sum())
    files = len(list(out.rglob("*")))
    print(f"  export of every feature: {t_exp:.0f}s ({t_exp / 60:.1f} min; target < 10), {size / 2**20:.1f} MiB in {files} files, "
          f"{size / fs.d_sae / 1e3:.1f} KB a feature on average (target <= 15), {dead} dead feature(s) listed in the index")


def bench_notebook(root: Path, args: argparse.Namespace) -> None:
    """The notebook views' latency, warm: the table opened and each view rendered once first."""
    fs = store.open(root / "q").features("q")
    fs._repr_html_()
    t_sum = _median_s(fs._repr_html_, args.repeats)
    st = fs.stats()
    order = np.argsort(-st.column("count").to_numpy(), kind="stable")
    print(f"\nnotebook views on the {fs.d_sae:,}-feature table ({fs.encoded_rows:,} encoded rows): summary fs._repr_html_() "
          f"{t_sum * 1e3:.1f} ms warm (target < 50 ms)")
    print("| feature (count) | fs.show(f) HTML warm | HTML size |")
    for i in (0, 100, 1000, 10000):
        if i >= len(order):
            continue
        f = int(order[i])
        page = fs.show(f)._repr_html_()
        t_show = _median_s(lambda f=f: fs.show(f)._repr_html_(), max(5, args.repeats // 5))
        print(f"| {f} ({st.column('count')[f].as_py():,}) | {t_show * 1e3:.1f} ms (target < 200) | {len(page) / 1e3:.1f} KB |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="work folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--tokens", type=int, default=5_000_000)
    ap.add_argument("--d-sae", type=int, default=16_384)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--merge-gb", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--encode-rows", type=int, default=131_072)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--encode-d-sae", type=int, default=4096)
    ap.add_argument("--encode-k", type=int, default=32)
    ap.add_argument("--batch-rows", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--bare-passes", type=int, default=3)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--skip-queries", action="store_true")
    ap.add_argument("--skip-dashboard", action="store_true")
    ap.add_argument("--skip-notebook", action="store_true")
    ap.add_argument("--dash-d-in", type=int, default=768, help="d_in of the seeded decoder the dashboard's derived data is computed from")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"machine: {machine()}")
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="strata-bench-features-"))
    try:
        if not args.skip_encode:
            bench_encode(root, args)
        if not args.skip_queries:
            fs = build_query_table(root, args)
            bench_queries(root, fs, args)
            if not args.skip_dashboard:
                bench_dashboard(root, fs, args)
            if not args.skip_notebook:
                bench_notebook(root, args)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
