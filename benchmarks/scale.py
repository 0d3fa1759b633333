"""Scale benchmarks (issue: operations): every figure against a baseline measured in the same run.

    python benchmarks/scale.py --parts open,plan,s3batches [--units 100000] [--plan-tokens 200000000]

* ``open``: opening and refreshing a dataset of ``--units`` units (one hook): with the compacted
  commit index vs listing and reading every commit record (the baseline), locally; and the
  number of S3 requests an open and a refresh make on moto's server (with and without the
  index, on ``--s3-units`` units: moto answers a few hundred requests a second, so the S3 part
  is smaller; the request count with the index does not depend on the number of units).
  The records are written straight from a real unit's record (changing only the unit number):
  opening reads records, never activation files, and writing 100k real units would only
  measure the writer.
* ``plan``: planning a synthetic corpus of ``--plan-tokens`` tokens (streamed: tokenization,
  packing, the document index) — peak driver RSS and tokens/s.
* ``s3batches``: ``iter_batches`` from an S3 store (moto on loopback) vs the same data on local
  disk, rows/s.
* ``summary``: the notebook summaries of the ``--units`` dataset of ``open`` (issue 24):
  ``ds._repr_html_()`` (identity, per-hook rows and committed units, bytes on disk, status, from the
  commit index alone; target < 50 ms warm), ``ds.info._repr_html_()`` and the store's, median of 20
  calls after a first one, beside opening the dataset (its baseline: what a notebook pays anyway).

Sharded corpora (issue 23), each measured run in a fresh process (so its peak RSS is its own),
every figure a ratio against a baseline of the same run; ``--json`` writes the figures:

* ``dryrun``: driver peak RSS of ``strata extract --dry-run`` (``compute.executor: ray``: shards
  are tokenized in Ray tasks) for ``--dry-shards`` JSON-lines shards of ``--shard-docs`` short
  documents against 2 such shards (target: ratio <= 1.10); and the documents plan (the old
  planner, ``corpus.plan: documents``) on the same 2 and 16 shards, whose driver grows by bytes
  per document.
* ``planstate``: bytes of the driver's sharded plan a shard (tracemalloc, 20k vs 100k shards; part
  of ``dryrun``), and of a run's list of units a unit.
* ``planrate``: planning throughput (tokens/s, 2 CPUs) of the sharded dry run vs the documents
  plan on the same ``--planrate-tokens`` corpus of 16 shards (target: ratio >= 1.0); and the
  sharded rate on documents of about 1,000 tokens (``--long-tokens``), for the README's scale model.
* ``s3extract``: extraction tokens/s of a sharded corpus on S3 (moto on loopback) vs the same
  shards on local disk, same tiny model (target: ratio >= 0.8); the two datasets' token tables
  and activations must be identical.

    python benchmarks/scale.py --parts dryrun,planrate,s3extract --json scale.json
    python benchmarks/scale.py --model-from scale.json     # the README's scale model from those figures

``--planrate-first sharded`` runs planrate's two plans in the other order (the machine's load
drifts over minutes: run both orders to see how much).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from _machine import cpu_model, load_average, memory_gib  # noqa: E402

from strata import store  # noqa: E402
from strata.store import layout  # noqa: E402
from strata.store.commit import sealed  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def _token_table(unit: int, ctx: int) -> pa.Table:
    r = np.arange(ctx, dtype=np.int64)
    return pa.table({"context_id": np.full(ctx, unit), "position": r.astype(np.int32), "doc_id": np.full(ctx, unit),
                     "doc_position": r.astype(np.int32), "token_id": r.astype(np.int32), "special": r == 0})


def build_many_units(s: store.Store, name: str, units: int) -> None:
    """A dataset of ``units`` units of one context of 4 tokens: unit 0 written for real, every
    other unit's records copied from unit 0's with the unit number changed (and the file key,
    which records must name exactly)."""
    w = s.create_dataset(name, hooks={HOOK: 8}, context_size=4, dtype="float32", num_units=units, unit_contexts=1)
    w.write_unit(0, tokens=_token_table(0, 4), acts={HOOK: np.zeros((4, 8), np.float32)})
    # Records are sealed (a checksum of their body): each copy is sealed again after its changes.
    tmpl = {part: sealed.unseal(json.loads(s.storage.read(layout.commit_key(name, part, 0))), where="unit 0", what="commit record")[0]
            for part in (None, HOOK)}
    for part, rec in tmpl.items():
        for u in range(1, units):
            rec["unit"] = u
            key0 = layout.shard_key(name, HOOK, 0) if part else layout.tokens_key(name, 0, rec["writer"]["attempt"])
            rec["files"][0]["key"] = layout.shard_key(name, HOOK, u) if part else layout.tokens_key(name, u, rec["writer"]["attempt"])
            s.storage.write(layout.commit_key(name, part, u), json.dumps(sealed.seal(rec)).encode())
            rec["files"][0]["key"] = key0


def bench_summary(root: Path, units: int) -> None:
    s = store.open(root / "open")  # the open part's dataset when it ran
    if "many" not in s.datasets():
        build_many_units(s, "many", units)
        s.writer("many").compact_commits()
    t_open = timed(lambda: s.dataset("many"))
    ds = s.dataset("many")
    assert len(ds.committed_units(HOOK)) == units
    html = ds._repr_html_()
    assert f"{units:,}/{units:,}" in html

    def median_ms(fn) -> float:
        fn()
        times = sorted(timed(fn) for _ in range(20))
        return times[len(times) // 2] * 1e3

    t_ds, t_info, t_store = median_ms(ds._repr_html_), median_ms(ds.info._repr_html_), median_ms(s._repr_html_)
    print(f"summary of a {units:,}-unit dataset: ds._repr_html_() {t_ds:.1f} ms warm (target < 50 ms), ds.info {t_info:.2f} ms, "
          f"the store's {t_store:.1f} ms; opening the dataset took {t_open * 1e3:.0f} ms")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_open(root: Path, units: int) -> None:
    s = store.open(root / "open")
    t = timed(lambda: build_many_units(s, "many", units))
    print(f"open: built {units:,} units' records in {t:.1f}s")
    base = timed(lambda: s.dataset("many"))  # no index yet: list and read every record
    t_compact = timed(lambda: s.writer("many").compact_commits())
    ds_holder = {}
    t_open = timed(lambda: ds_holder.setdefault("ds", s.dataset("many")))
    ds = ds_holder["ds"]
    assert len(ds.committed_units(HOOK)) == units
    t_refresh = timed(ds.refresh)
    print(f"open {units:,} units: {t_open:.2f}s with the commit index vs {base:.2f}s reading every record "
          f"(x{base / t_open:.0f} faster); refresh {t_refresh:.2f}s; compacting the index took {t_compact:.1f}s (target open < 2 s)")


class _MotoProcess:
    """moto's S3 server in a process of its own (in this process it would share the GIL with
    the reader it serves), stopped with ``stop()``."""

    def __init__(self) -> None:
        import socket
        import subprocess
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=2)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _moto():  # noqa: ANN202
    """moto's S3 server on loopback (its own process), the AWS environment pointing at it, a
    bucket `bench`."""
    import boto3

    server = _MotoProcess()
    url = f"http://127.0.0.1:{server.port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": url})
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
    return server


def bench_s3_batches(root: Path, units: int, rounds: int = 2) -> None:
    """Shuffled ``iter_batches`` over the same dataset (d=768 float16, ``units`` units of 8,192
    rows) on S3 (moto on loopback) and on local disk, one epoch each, interleaved rounds, best."""
    d, ctx, unit_contexts = 768, 128, 64
    server = _moto()
    try:
        rng = np.random.default_rng(0)
        sides = {"local": store.open(root / "batches"), "s3": store.open("s3://bench/batches")}
        for s in sides.values():
            w = s.create_dataset("b", hooks={HOOK: d}, context_size=ctx, dtype="float16", num_units=units, unit_contexts=unit_contexts)
            for u in range(units):
                rng_u = np.random.default_rng([0, u])
                tok = pa.concat_tables([_token_table(u * unit_contexts + c, ctx) for c in range(unit_contexts)])
                w.write_unit(u, tokens=tok, acts={HOOK: rng_u.standard_normal((unit_contexts * ctx, d), dtype=np.float32).astype(np.float16)})
            w.compact_commits()
        del rng
        best: dict[str, float] = {}
        for r in range(rounds):
            for name, s in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
                ds = store.open(s.uri, create=False).dataset("b")
                t = time.perf_counter()
                n = 0
                with ds.iter_batches(HOOK, batch_size=4096, shuffle=True, seed=r, epochs=1) as it:
                    for b in it:
                        n += b.shape[0]
                rate = n / (time.perf_counter() - t)
                best[name] = max(best.get(name, 0.0), rate)
                print(f"  round {r + 1}: {name:5s} {rate:,.0f} rows/s ({n:,} rows)")
        print(f"iter_batches, shuffled, 4096-row float32 batches from float16 d={d}, {units} units: "
              f"S3 (moto on loopback) {best['s3']:,.0f} rows/s vs local disk {best['local']:,.0f} rows/s: ratio {best['s3'] / best['local']:.2f}")
    finally:
        server.stop()


def bench_open_s3(root: Path, units: int) -> None:
    server = _moto()
    counts = {"n": 0}

    def count(**_kw) -> None:
        counts["n"] += 1

    try:
        uri = "s3://bench/acts"
        s = store.open(uri)
        build_many_units(s, "many", units)

        def requests(fn) -> int:
            s2 = store.open(uri)  # a fresh client, so its counter hooks see every request
            s2.storage.fs.s3.meta.events.register("before-send.s3", count)
            counts["n"] = 0
            fn(s2)
            return counts["n"]

        without = requests(lambda st: st.dataset("many"))
        s.writer("many").compact_commits()
        with_index = requests(lambda st: st.dataset("many"))
        def open_then_refresh(st: store.Store) -> None:
            ds = st.dataset("many")
            counts["n"] = 0  # count the refresh alone
            ds.refresh()

        refresh = requests(open_then_refresh)
        print(f"open on S3 (moto), {units:,} units: {with_index} requests with the commit index (independent of the number of units) "
              f"vs {without} reading every record; a refresh: {refresh} requests")
    finally:
        server.stop()


def _corpus(path: Path, target_tokens: int, model: Path) -> int:
    """A JSON-lines corpus of about ``target_tokens`` tokens (counted with the model's own
    tokenizer): 2,000 synthetic documents written over and over (each line its own document)."""
    from transformers import AutoTokenizer

    from strata.pipeline.tiny import synthetic_docs

    docs = synthetic_docs(2000, seed=3)
    tokens_per_doc = sum(len(x) for x in AutoTokenizer.from_pretrained(model)(docs)["input_ids"]) / len(docs)
    pool = [json.dumps({"text": d}) + "\n" for d in docs]
    n_docs = int(target_tokens / tokens_per_doc)
    with open(path, "w") as f:
        for i in range(0, n_docs, len(pool)):
            f.writelines(pool[: min(len(pool), n_docs - i)])
    return n_docs


def _plan_once(work: Path, model: Path, corpus: Path, tag: str) -> dict[str, float]:
    """Plan in a fresh driver process (its own private Ray), as `strata extract` does up to
    the first unit: the corpus scan, streamed tokenization, the document index."""
    import subprocess

    script = f"""
import json, resource, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from strata import store
from strata.pipeline.cluster import connect
from strata.pipeline.config import ExtractSpec
from strata.pipeline.extract import plan, prepare
spec = ExtractSpec(store={str(work / ('acts-' + tag))!r}, name="plan", model={{"id": {str(model)!r}}}, corpus={{"path": {str(corpus)!r}}},
                   hooks=["blocks.0.hook_resid_post"], tokenize={{"context_size": 1024}}, compute={{"unit_contexts": 256}})
t0 = time.perf_counter()
p = prepare(spec, store.open(spec.store))
t1 = time.perf_counter()
with connect(None):
    pl = plan(p)
    t2 = time.perf_counter()
    tokens = int(pl.packer.source.offsets[-1])
    pl.unit(pl.units // 2)  # a unit's contexts, built from the files on demand
    pl.packer.source.remove()
print("RESULT " + json.dumps({{"tokens": tokens, "docs": p.scan.docs, "units": pl.units, "scan_s": t1 - t0, "tokenize_s": t2 - t1,
      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=7200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))


def bench_plan(root: Path, tokens: int) -> None:
    from strata.pipeline.tiny import build_tiny

    model = build_tiny(root / "model", family="gpt2", layers=2, d_model=64, heads=4, max_positions=1024, vocab_size=1024, seed=0)
    for target in (tokens // 10, tokens):
        corpus = root / f"corpus-{target}.jsonl"
        n_docs = _corpus(corpus, target, model)
        got = _plan_once(root, model, corpus, str(target))
        size = corpus.stat().st_size
        corpus.unlink()
        print(f"plan {got['tokens']:,} tokens ({n_docs:,} documents, {size / 2**30:.2f} GiB of JSON lines, {got['units']:,} units): "
              f"corpus scan {got['tokens'] / got['scan_s'] / 1e6:.2f} M tokens/s, tokenization + plan "
              f"{got['tokens'] / got['tokenize_s'] / 1e6:.2f} M tokens/s; driver peak RSS {got['rss_mib']:,.0f} MiB (target < 1024)")


# -- sharded corpora (issue 23) -------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parent
CTX, UNIT_CONTEXTS = 1024, 256  # the scale model's unit: 256 contexts of 1,024 tokens


def _fresh(fn: str, **kwargs: Any) -> dict[str, Any]:
    """``fn(**kwargs)`` of this module in a fresh Python process (its peak RSS is that run's own);
    its JSON result."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import scale; "
            "print('RESULT ' + json.dumps(getattr(scale, sys.argv[2])(**json.loads(sys.argv[3]))))")
    r = subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), fn, json.dumps(kwargs)], capture_output=True, text=True, timeout=7200)
    if r.returncode != 0:
        raise RuntimeError(f"{fn} failed:\n{r.stderr[-4000:]}")
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))


def _spec(store_uri: str, model: str, corpus: str, plan: str, executor: str, dtype: str = "bfloat16") -> Any:
    from strata.pipeline.config import ExtractSpec

    return ExtractSpec(store=store_uri, name="scale", model={"id": model}, corpus={"path": corpus, "plan": plan}, hooks=[HOOK],
                       dtype=dtype, tokenize={"context_size": CTX}, compute={"executor": executor, "unit_contexts": UNIT_CONTEXTS})


def child_dry_run(store_uri: str, model: str, corpus: str, plan: str, cpus: int) -> dict[str, Any]:
    """A dry run as ``strata extract SPEC --dry-run`` does it, tokenizing in Ray tasks (a private
    Ray of ``cpus`` CPUs, started first so that ``seconds`` is the dry run alone)."""
    from strata.pipeline.cluster import connect
    from strata.pipeline.dryrun import dry_run_extract

    spec = _spec(store_uri, model, corpus, plan, "ray")
    t0 = time.perf_counter()
    with connect(None, num_cpus=cpus):
        ray_s = time.perf_counter() - t0
        dry = dry_run_extract(spec)
    return {"plan": dry.plan_kind, "shards": dry.shards, "docs": dry.docs, "tokens": dry.corpus_tokens, "contexts": dry.contexts,
            "dropped_tokens": dry.dropped_tokens, "units": dry.units, "seconds": dry.seconds, "ray_start_s": ray_s,
            "rss": dry.driver_peak_rss, "rss_end": _rss_now(), "table": dry.table()}


def _rss_now() -> int:
    """This process's resident set now (VmRSS), bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def child_extract(store_uri: str, model: str, corpus: str, executor: str) -> dict[str, Any]:
    """A real extraction of a sharded corpus; its throughput and peak RSS."""
    from strata.pipeline.extract import run_extract

    res = run_extract(_spec(store_uri, model, corpus, "sharded", executor), progress=False)
    return {"tokens": res.tokens, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s, "steady_tokens_per_s": res.steady_tokens_per_s,
            "units": res.num_units, "shards": res.shards, "bytes": res.bytes_written, "rss": res.driver_peak_rss}


def _plan_state(shards: int) -> tuple[int, int]:
    """Bytes held (tracemalloc) by a :class:`ShardPlan` of ``shards`` shards and its shards
    table: one real-looking shard's counts and listing, repeated under distinct names and keys;
    and the table's Arrow bytes."""
    import tracemalloc

    from strata.pipeline.sharded import ShardPlan

    base = {"records": 200_000, "docs": 200_000, "skipped_empty": 0, "chars": 12_000_000, "tokens": 100_000_000, "contexts": 97_000,
            "dropped_tokens": 500, "dropped_docs": 0, "partial_docs": 1, "id_min": 0, "id_max": 199_999, "doc_set": [0, 0],
            "fields_seen": [], "reused": False, "node": "f" * 56, "pid": 12345, "fingerprint": "xxh3_128:" + "0" * 32}
    tracemalloc.start()
    results, names, keys = [], [], []
    for i in range(shards):
        name = f"s3://bucket/corpus/part-{i:06d}.jsonl.zst"
        results.append({**base, "shard": name, "key": f"{i:032x}",
                        "listing": {"url": name, "format": "jsonl", "compression": "zstd", "size": 1 << 30,
                                    "etag": f"{i:032x}", "version": None, "mtime_ns": None, "row_groups": None}})
        names.append(name)
        keys.append(f"{i:032x}")
    plan = ShardPlan(names, keys, results, UNIT_CONTEXTS, CTX, True)
    table = plan.table()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del plan
    return held, table.nbytes


def child_plan_state(shards: int) -> dict[str, Any]:
    """Bytes the driver's sharded plan holds per shard: the slope between plans of ``shards`` // 5
    and ``shards`` shards (tracemalloc: Python objects; plus the shards table's Arrow bytes, which
    tracemalloc does not see); and a run's bytes per unit."""
    import tracemalloc

    b1, t1 = _plan_state(shards // 5)
    b2, t2 = _plan_state(shards)
    n = shards - shards // 5
    # A run's per-unit state besides the plan: the list of (unit, hooks) it has to compute, as
    # pipeline.extract runs it for a fresh dataset of one hook (a resumed one holds a set of
    # committed unit numbers per hook instead, which is smaller).
    tracemalloc.start()
    n_units = 100_000
    todo = [(u, [HOOK]) for u in range(1000, 1000 + n_units)]
    unit_bytes = tracemalloc.get_traced_memory()[0] / n_units
    tracemalloc.stop()
    del todo
    return {"shards": shards, "bytes": b2 + t2, "bytes_per_shard": (b2 - b1 + t2 - t1) / n, "table_bytes_per_shard": (t2 - t1) / n,
            "run_bytes_per_unit": unit_bytes, "table_bytes": t2}


def _short_docs(n: int, seed: int) -> list[str]:
    """Short documents: the single sentences of :func:`synthetic_docs` (about 14 tokens each)."""
    from strata.pipeline.tiny import synthetic_docs

    out: list[str] = []
    for d in synthetic_docs(n, seed=seed):
        out += [s.strip() + "." for s in d.split(".") if s.strip()]
    return out[:n]


def _write_shards(folder: Path, n_shards: int, docs_per_shard: int, pool: list[str]) -> Path:
    """``n_shards`` JSON-lines files of ``docs_per_shard`` documents each, cycling through ``pool``
    (shard ``i`` starts ``i`` documents into it, so no two shards are the same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": d}) + "\n" for d in pool]
    for i in range(n_shards):
        with open(folder / f"part-{i:03d}.jsonl", "w") as f:
            left, j = docs_per_shard, i % len(lines)
            while left:
                take = lines[j: j + left]
                f.writelines(take)
                left -= len(take)
                j = 0
    return folder


def _tokens_per_doc(model: Path, docs: list[str]) -> float:
    from transformers import AutoTokenizer

    return sum(len(x) for x in AutoTokenizer.from_pretrained(model)(docs)["input_ids"]) / len(docs)


def _tiny(root: Path) -> Path:
    from strata.pipeline.tiny import build_tiny

    return build_tiny(root / "model", family="gpt2", layers=2, d_model=64, heads=4, max_positions=CTX, vocab_size=1024, seed=0)


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def bench_dryrun(root: Path, model: Path, n_shards: int, shard_docs: int, cpus: int, out: dict[str, Any]) -> None:
    pool = _short_docs(20_000, seed=5)
    corpora = {n: _write_shards(root / f"dry-{n}", n, shard_docs, pool) for n in (2, n_shards)}
    runs: dict[str, dict[str, Any]] = {}
    for plan in ("sharded", "documents"):
        for n, folder in corpora.items():
            tag = f"{plan}-{n}"
            runs[tag] = got = _fresh("child_dry_run", store_uri=str(root / f"acts-dry-{tag}"), model=str(model), corpus=str(folder),
                                     plan=plan, cpus=cpus)
            print(f"  dry run, {plan:9s} plan, {n:2d} shards: {got['docs']:,} documents, {got['tokens']:,} tokens, {got['units']:,} units "
                  f"in {got['seconds']:.1f} s; driver peak RSS {_mib(got['rss'])} ({_mib(got['rss_end'])} at the end)")
            shutil.rmtree(root / f"acts-dry-{tag}", ignore_errors=True)
    print(runs[f"sharded-{n_shards}"]["table"])
    for folder in corpora.values():
        shutil.rmtree(folder, ignore_errors=True)
    small, big = runs["sharded-2"], runs[f"sharded-{n_shards}"]
    old_small, old_big = runs["documents-2"], runs[f"documents-{n_shards}"]
    ratio, old_ratio = big["rss"] / small["rss"], old_big["rss"] / old_small["rss"]
    per_doc = (old_big["rss"] - old_small["rss"]) / (old_big["docs"] - old_small["docs"])
    per_shard = (big["rss"] - small["rss"]) / (n_shards - 2)
    print(f"dryrun: driver peak RSS of the sharded dry run, {n_shards} shards ({big['docs']:,} documents, {big['tokens']:,} tokens) "
          f"vs 2 shards ({small['docs']:,} documents, {small['tokens']:,} tokens): {_mib(big['rss'])} vs {_mib(small['rss'])}, "
          f"ratio {ratio:.2f} (target <= 1.10); the documents plan (old planner) on the same shards: {_mib(old_big['rss'])} vs "
          f"{_mib(old_small['rss'])}, ratio {old_ratio:.2f}, {per_doc:.0f} bytes a document")
    bench_planstate(out, rss_per_shard=per_shard)
    out["dryrun"] = {"runs": {k: {x: v[x] for x in v if x != "table"} for k, v in runs.items()}, "ratio": ratio, "documents_ratio": old_ratio,
                     "documents_bytes_per_doc": per_doc, "rss_bytes_per_shard": per_shard, "table": big["table"]}


def bench_planstate(out: dict[str, Any], rss_per_shard: float | None = None) -> None:
    state = _fresh("child_plan_state", shards=100_000)
    rss = (f"; the RSS slope of the dry runs: {rss_per_shard / 2**10:,.1f} KiB a shard (noise: a Ray driver's RSS varies by MiBs)"
           if rss_per_shard is not None else "")
    print(f"planstate: the sharded plan's driver state: {state['bytes_per_shard']:,.0f} bytes a shard "
          f"({_mib(state['bytes'])} for {state['shards']:,} shards; of which the shards table {state['table_bytes_per_shard']:,.0f} bytes "
          f"a shard); a run's list of units to compute: {state['run_bytes_per_unit']:.0f} bytes a unit{rss}")
    out["planstate"] = state


def bench_planrate(root: Path, model: Path, tokens: int, long_tokens: int, cpus: int, out: dict[str, Any], first: str = "documents") -> None:
    from strata.pipeline.tiny import synthetic_docs

    pool = synthetic_docs(20_000, seed=3)
    per_doc = _tokens_per_doc(model, pool[:2000])
    n_shards = 16
    folder = _write_shards(root / "rate", n_shards, int(tokens / per_doc / n_shards), pool)
    runs = {}
    for plan in ("documents", "sharded") if first == "documents" else ("sharded", "documents"):
        runs[plan] = got = _fresh("child_dry_run", store_uri=str(root / f"acts-rate-{plan}"), model=str(model), corpus=str(folder),
                                  plan=plan, cpus=cpus)
        got["rate"] = got["tokens"] / got["seconds"]
        print(f"  planning, {plan:9s} plan: {got['tokens']:,} tokens ({got['docs']:,} documents, {got['tokens'] / got['docs']:.0f} tokens "
              f"each) in {got['seconds']:.1f} s: {got['rate'] / 1e6:.2f} M tokens/s; driver peak RSS {_mib(got['rss'])}")
        shutil.rmtree(root / f"acts-rate-{plan}", ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    ratio = runs["sharded"]["rate"] / runs["documents"]["rate"]
    print(f"planrate: {cpus} CPUs, {n_shards} shards, {runs['sharded']['tokens']:,} tokens ({first} plan first): sharded dry run "
          f"{runs['sharded']['rate'] / 1e6:.2f} M tokens/s vs the documents plan {runs['documents']['rate'] / 1e6:.2f} M tokens/s: "
          f"ratio {ratio:.2f} (target >= 1.0); per CPU: {runs['sharded']['rate'] / cpus / 1e6:.2f} M tokens/s at "
          f"{runs['sharded']['tokens'] / runs['sharded']['docs']:.0f} tokens a document")
    out["planrate"] = {"runs": {k: {x: v[x] for x in v if x != "table"} for k, v in runs.items()}, "ratio": ratio, "cpus": cpus, "first": first}
    if long_tokens <= 0:
        return
    long_pool = [" ".join(pool[i: i + 24]) for i in range(0, len(pool) - 24, 24)]
    long_per_doc = _tokens_per_doc(model, long_pool[:200])
    folder = _write_shards(root / "rate-long", n_shards, max(1, int(long_tokens / long_per_doc / n_shards)), long_pool)
    runs["long"] = got = _fresh("child_dry_run", store_uri=str(root / "acts-rate-long"), model=str(model), corpus=str(folder),
                                plan="sharded", cpus=cpus)
    got["rate"] = got["tokens"] / got["seconds"]
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(root / "acts-rate-long", ignore_errors=True)
    print(f"  planning, sharded plan, long documents: {got['tokens']:,} tokens ({got['docs']:,} documents, "
          f"{got['tokens'] / got['docs']:.0f} tokens each) in {got['seconds']:.1f} s: {got['rate'] / 1e6:.2f} M tokens/s")
    print(f"planrate: sharded plan, {cpus} CPUs, {n_shards} shards of documents of {got['tokens'] / got['docs']:.0f} tokens: "
          f"{got['rate'] / cpus / 1e6:.2f} M tokens/s a CPU")
    out["planrate"]["runs"]["long"] = {x: got[x] for x in got if x != "table"}


def _same_datasets(a: str, b: str) -> int:
    """Assert the two stores' datasets hold the same token tables and activations, unit by unit; the rows compared."""
    da, db = store.open(a, create=False).dataset("scale"), store.open(b, create=False).dataset("scale")
    assert da.info.num_units == db.info.num_units, (da.info.num_units, db.info.num_units)
    rows = 0
    for u in range(da.info.num_units):
        ta, tb = da.unit_tokens(u), db.unit_tokens(u)
        assert ta.equals(tb), f"unit {u}: token tables differ"
        xa, xb = da.unit_array(HOOK, u), db.unit_array(HOOK, u)
        assert xa.tobytes() == xb.tobytes(), f"unit {u}: activations differ"
        rows += ta.num_rows
    return rows


def bench_s3extract(root: Path, model: Path, n_shards: int, shard_docs: int, executor: str, out: dict[str, Any]) -> None:
    import boto3

    from strata.pipeline.tiny import synthetic_docs

    folder = _write_shards(root / "ex", n_shards, shard_docs, synthetic_docs(4000, seed=7))
    server = _moto()
    try:
        s3 = boto3.client("s3")
        for f in sorted(folder.iterdir()):
            s3.upload_file(str(f), "bench", f"corpus/{f.name}")
        sides = {"local": (str(folder), str(root / "acts-ex-local")), "s3": ("s3://bench/corpus/", str(root / "acts-ex-s3"))}
        runs = {}
        for name, (corpus, acts) in sides.items():
            runs[name] = got = _fresh("child_extract", store_uri=acts, model=str(model), corpus=corpus, executor=executor)
            print(f"  extract from {name:5s}: {got['tokens']:,} tokens, {got['units']} units, {got['shards']} shards in {got['seconds']:.1f} s: "
                  f"{got['tokens_per_s']:,.0f} tokens/s ({got['steady_tokens_per_s']:,.0f} steady); driver peak RSS {_mib(got['rss'])}")
        rows = _same_datasets(sides["local"][1], sides["s3"][1])
    finally:
        server.stop()
    ratio = runs["s3"]["tokens_per_s"] / runs["local"]["tokens_per_s"]
    print(f"s3extract: extraction ({executor} executor, {n_shards} shards, {runs['s3']['tokens']:,} tokens) from S3 (moto on loopback) "
          f"{runs['s3']['tokens_per_s']:,.0f} tokens/s vs local disk {runs['local']['tokens_per_s']:,.0f} tokens/s: ratio {ratio:.2f} "
          f"(target >= 0.8); token tables and activations identical ({rows:,} rows)")
    out["s3extract"] = {"runs": runs, "ratio": ratio, "rows_compared": rows, "executor": executor}


def scale_model(fig: dict[str, Any], *, shard_tokens: int = 100_000_000, cpus_per_gpu: int = 8, d: int = 4096, itemsize: int = 2,
                hooks: int = 1) -> str:
    """The README's scale model: a markdown table for 1B, 10B and 100B tokens, documents of 40
    and 1,000 tokens, on 8, 64 and 512 GPUs, from the slopes of a run's JSON (``dryrun`` and
    ``planrate`` parts). Formulas in the README, beside the table."""
    runs = fig["planrate"]["runs"]
    cpus = fig["planrate"]["cpus"]
    per_cpu = {40: runs["sharded"]["rate"] / cpus, 1000: runs["long"]["rate"] / cpus}  # tokens/s a CPU, sharded plan
    rho = {40: runs["sharded"]["contexts"] * CTX / runs["sharded"]["tokens"],  # token rows a corpus token (EOS, BOS, dropped tails)
           1000: runs["long"]["contexts"] * CTX / runs["long"]["tokens"]}
    b_shard, b_unit = fig["planstate"]["bytes_per_shard"], fig["planstate"]["run_bytes_per_unit"]
    b_doc = fig["dryrun"]["documents_bytes_per_doc"]
    unit_rows = UNIT_CONTEXTS * CTX

    def size(b: float) -> str:
        for unit, div in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if b >= div:
                return f"{b / div:,.1f} {unit}"
        return f"{b:,.0f} B"

    def hours(sec: float) -> str:
        return f"{sec / 3600:,.1f} h" if sec >= 3600 else f"{sec / 60:,.0f} min" if sec >= 60 else f"{sec:.0f} s"

    head = ("| tokens | tokens a document | shards | units | commit records | driver plan state (documents plan) | planning CPU time "
            "| planning on 8 / 64 / 512 GPUs | bytes per hook |")
    lines = [head, "| " + " | ".join(["---"] * 9) + " |"]
    for total in (10**9, 10**10, 10**11):
        for doc in (40, 1000):
            shards = -(-total // shard_tokens)
            units = shards * -(-int(shard_tokens * rho[doc]) // unit_rows)
            records = units * (1 + hooks) + shards
            state = shards * b_shard + units * b_unit
            old = total / doc * b_doc
            cpu_s = total / per_cpu[doc]
            walls = [-(-shards // min(shards, cpus_per_gpu * g)) * shard_tokens / per_cpu[doc] for g in (8, 64, 512)]
            stored = total * rho[doc] * d * itemsize
            lines.append(f"| {total / 1e9:.0f}B | {doc:,} | {shards:,} | {units:,} | {records:,} | {size(state)} ({size(old)}) | "
                         f"{hours(cpu_s)} | {' / '.join(hours(w) for w in walls)} | {size(stored)} |")
    rates = ", ".join(f"{per_cpu[k] / 1e6:.3f}M tokens/s at {k:,}-token documents" for k in (40, 1000))
    rows = ", ".join(f"{rho[k]:.4f} at {k:,}" for k in (40, 1000))
    lines.append("")
    lines.append(f"slopes: {b_shard:,.0f} B a shard, {b_unit:.0f} B a unit, documents plan {b_doc:.0f} B a document; {rates} a CPU; "
                 f"token rows a corpus token {rows}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="open,s3open")
    p.add_argument("--units", type=int, default=100_000)
    p.add_argument("--s3-units", type=int, default=3_000)
    p.add_argument("--plan-tokens", type=int, default=200_000_000)
    p.add_argument("--batch-units", type=int, default=8, help="units of 8,192 rows (d=768) for s3batches")
    p.add_argument("--dry-shards", type=int, default=16, help="dryrun: shards of the larger corpus (the smaller has 2)")
    p.add_argument("--shard-docs", type=int, default=200_000, help="dryrun: short documents a shard")
    p.add_argument("--planrate-tokens", type=int, default=60_000_000, help="planrate: tokens of the corpus (16 shards)")
    p.add_argument("--long-tokens", type=int, default=20_000_000, help="planrate: tokens of the corpus of ~1,000-token documents (0: none)")
    p.add_argument("--planrate-first", default="documents", choices=["documents", "sharded"], help="planrate: which plan runs first")
    p.add_argument("--cpus", type=int, default=2, help="dryrun, planrate: CPUs of the private Ray")
    p.add_argument("--extract-shards", type=int, default=8, help="s3extract: shards")
    p.add_argument("--extract-docs", type=int, default=5_000, help="s3extract: documents a shard")
    p.add_argument("--extract-executor", default="local", choices=["local", "ray"], help="s3extract: compute.executor")
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    p.add_argument("--model-from", default=None, help="print the README's scale model from these JSON files (comma-separated) of runs of "
                   "dryrun (or planstate) and planrate, and exit")
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    if a.model_from:
        fig: dict[str, Any] = {}
        for f in a.model_from.split(","):
            fig.update(json.loads(Path(f).read_text()))
        print(scale_model(fig))
        return
    machine = f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB, python {platform.python_version()}"
    print(f"machine: {machine}; {load_average()} at the start")
    out: dict[str, Any] = {"machine": machine, "load_start": load_average(), "argv": sys.argv[1:]}
    root = Path(tempfile.mkdtemp(prefix="strata-scale-", dir=a.dir))
    try:
        parts = set(a.parts.split(","))
        if "open" in parts:
            bench_open(root, a.units)
        if "summary" in parts:
            bench_summary(root, a.units)
        if "s3open" in parts:
            bench_open_s3(root, a.s3_units)
        if "plan" in parts:
            bench_plan(root, a.plan_tokens)
        if "s3batches" in parts:
            bench_s3_batches(root, a.batch_units)
        model = _tiny(root) if parts & {"dryrun", "planrate", "s3extract"} else None
        def save() -> None:  # after every part: a later part's failure keeps the figures of those before
            out["load_end"] = load_average()
            if a.json:
                Path(a.json).write_text(json.dumps(out, indent=1))

        if "dryrun" in parts:
            bench_dryrun(root, model, a.dry_shards, a.shard_docs, a.cpus, out)
            save()
        if "planstate" in parts and "dryrun" not in parts:
            bench_planstate(out)
            save()
        if "planrate" in parts:
            bench_planrate(root, model, a.planrate_tokens, a.long_tokens, a.cpus, out, first=a.planrate_first)
            save()
        if "s3extract" in parts:
            bench_s3extract(root, model, a.extract_shards, a.extract_docs, a.extract_executor, out)
            save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {load_average()} at the end")


if __name__ == "__main__":
    main()
