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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from strata import store  # noqa: E402
from strata.store import layout  # noqa: E402

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
    tmpl = {part: json.loads(s.storage.read(layout.commit_key(name, part, 0))) for part in (None, HOOK)}
    for part, rec in tmpl.items():
        for u in range(1, units):
            rec["unit"] = u
            key0 = layout.shard_key(name, HOOK, 0) if part else layout.tokens_key(name, 0, rec["writer"]["attempt"])
            rec["files"][0]["key"] = layout.shard_key(name, HOOK, u) if part else layout.tokens_key(name, u, rec["writer"]["attempt"])
            s.storage.write(layout.commit_key(name, part, u), json.dumps(rec).encode())
            rec["files"][0]["key"] = key0


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="open,s3open")
    p.add_argument("--units", type=int, default=100_000)
    p.add_argument("--s3-units", type=int, default=3_000)
    p.add_argument("--plan-tokens", type=int, default=200_000_000)
    p.add_argument("--batch-units", type=int, default=8, help="units of 8,192 rows (d=768) for s3batches")
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    root = Path(tempfile.mkdtemp(prefix="strata-scale-", dir=a.dir))
    try:
        parts = set(a.parts.split(","))
        if "open" in parts:
            bench_open(root, a.units)
        if "s3open" in parts:
            bench_open_s3(root, a.s3_units)
        if "plan" in parts:
            bench_plan(root, a.plan_tokens)
        if "s3batches" in parts:
            bench_s3_batches(root, a.batch_units)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
