"""Similarity benchmark: every figure is a ratio against a baseline measured in the same run.

    python benchmarks/similarity.py            # full: n = 100k and 1M rows at d = 768, ~15 min on 2 CPU cores
    python benchmarks/similarity.py --quick    # n = 100k and 200k, smaller Gram and heatmap: < 3 min

Writes synthetic datasets into a temporary store with the store's own writer
(``create_dataset`` / ``write_unit``, float16 by default, 128-token contexts, 256 contexts per
unit), then measures:

1. **Streaming compare** (``linear_cka, debiased_cka, svcca, procrustes`` on one pair of stored
   hooks of width ``--d``): what ``similarity.compare`` does (row alignment, checked reads,
   co-moments (float32 products of the float16 rows into float64 sums: ``Moments``'
   ``precision="auto"``), the metrics from them: its steps are called one by one to time each; the
   metrics step is timed again with torch on one thread, outside the total), each run in a
   **fresh child process**: its peak RSS
   (``VmHWM``) and its peak private (anonymous) memory must not grow with ``n``. RSS also counts
   the touched pages of the store's memory-mapped shards (page cache, reclaimable), which is
   why both are printed. Throughput (rows/s) is compared with the issue's bound, a bare float32
   ``acc += X^T Y`` over the same rows held in memory as float32 arrays, in the same chunks of
   16,384 rows; and, as references at the smallest ``n``, with the least work the linear
   metrics need, in float32 and in float64 (centred ``X^T X``, ``Y^T Y``, ``X^T Y`` per chunk,
   plain NumPy, summed in float64: the float32 one is the ceiling of the ratio, about 0.45,
   since the three products cost 2.2 times the bound's one) and with Strata's own
   ``Moments.update`` on the in-memory arrays (float32 arrays: float64 products under
   ``precision="auto"``).
2. **Against an in-memory Gram-matrix CKA** (two ``n x n`` float64 Gram matrices, centred in
   place, linear CKA by the HSIC formula ``tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))``), both
   in fresh child processes at the same ``n`` (the largest that fits comfortably): time and
   peak RSS of each, and the two values (they must agree to rounding).
3. **Layer heatmap**: linear CKA of every pair of 12 hooks of one dataset (width
   ``--heatmap-d``) in one ``layer_heatmap`` pass vs 66 separate pairwise ``compare`` runs.
4. **CKNNA** (``similarity.cknna(X, Y, k=10)``, in memory, float64) at ``n`` = 2,048 (compare's
   default sample) and 4,096 rows of width ``--d``, against the least work any metric of the two
   inner-product kernels needs: the two Gram matrices ``X Xᵀ`` and ``Y Yᵀ`` (float64 BLAS), timed
   right before and after each CKNNA run.

Without Ray (``compare`` and ``layer_heatmap`` run their partial-moment tasks in-process when no
Ray is running: ``use_ray`` defaults to ``ray.is_initialized()``), so a child's peak RSS is the
whole computation's memory and both sides use the same BLAS threads (all cores). Reads come from
the page cache (the data was just written). Shared CPUs change speed over minutes, so each
Strata run is bracketed by its baseline (timed right before and right after; the ratio uses
their mean), ``--rounds`` rounds are interleaved, and the best and median ratios are printed
with the range of speeds the baseline saw (the machine's noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, memory_gib  # noqa: E402

CTX = 128
UNIT_CONTEXTS = 256
UNIT_ROWS = CTX * UNIT_CONTEXTS  # 32,768 rows per unit
HA, HB = "blocks.0.hook_resid_post", "blocks.6.hook_resid_post"
PAIR, LAYERS = "pair", "layers"
STREAM_METRICS = ["linear_cka", "debiased_cka", "svcca", "procrustes"]
CHUNK = 16384  # the compute section's chunk_rows default


# -- helpers ------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in kB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
            key, val = line.split(":", 1)
            out[key] = int(val.split()[0])
    return out


class MemoryWatch:
    """Peak memory of this process. ``VmHWM`` (peak RSS) restarts at exec, unlike ``ru_maxrss``,
    which a child inherits from the parent it was forked from. RSS counts the pages of the
    store's memory-mapped shards that the process has touched (file-backed page cache, shared
    and reclaimable); ``RssAnon`` (private memory the process allocated) has no kernel peak, so
    a thread samples it every 10 ms."""

    def __init__(self) -> None:
        import threading

        self.peak_anon = _status().get("RssAnon", 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_anon = max(self.peak_anon, _status().get("RssAnon", 0))

    def result(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        st = _status()
        self.peak_anon = max(self.peak_anon, st.get("RssAnon", 0))
        return {"peak_rss_mib": st["VmHWM"] / 1024, "peak_anon_mib": self.peak_anon / 1024, "file_rss_end_mib": st.get("RssFile", 0) / 1024}


def machine() -> str:
    cpu, mem = cpu_model(), memory_gib()
    blas = ""
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f", BLAS {b.get('name')} {b.get('version')}"
    except Exception:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM; Linux {platform.release()}; python {platform.python_version()}, "
            f"numpy {np.__version__}{blas}")


def token_table(unit: int, rows: int) -> pa.Table:
    """Tokens of one unit: no special rows, so every row pairs (``n`` aligned rows = ``n`` rows)."""
    r = np.arange(rows, dtype=np.int64)
    g = unit * UNIT_ROWS + r
    return pa.table({
        "context_id": g // CTX, "position": (r % CTX).astype(np.int32), "doc_id": g // 1000,
        "doc_position": (g % 1000).astype(np.int32), "token_id": (g % 50000).astype(np.int32), "special": np.zeros(rows, bool),
    })


def write_pair(root: Path, n: int, d: int, dtype: str, seed: int = 0) -> float:
    """Dataset PAIR: two related hooks of width d, >= n rows; returns the seconds it took."""
    from strata import store

    units = -(-n // UNIT_ROWS)
    t0 = time.perf_counter()
    s = store.open(root)
    w = s.create_dataset(PAIR, hooks={HA: d, HB: d}, context_size=CTX, dtype=dtype, num_units=units, unit_contexts=UNIT_CONTEXTS,
                         meta={"model": "synthetic", "revision": "r0"})
    rng0 = np.random.default_rng(seed)
    k = 64  # shared latent factors: both hooks are noisy linear images of them
    wx = rng0.standard_normal((k, d), dtype=np.float32) * np.geomspace(2.0, 0.2, d, dtype=np.float32)
    wy = rng0.standard_normal((k, d), dtype=np.float32) * np.geomspace(1.5, 0.3, d, dtype=np.float32)
    perm = rng0.permutation(d)
    for u in range(units):
        rng = np.random.default_rng([seed, u])
        z = rng.standard_normal((UNIT_ROWS, k), dtype=np.float32)
        x = z @ wx
        x += rng.standard_normal((UNIT_ROWS, d), dtype=np.float32)
        x += 0.5  # an offset, as real activations have
        y = z @ wy
        y += 0.7 * rng.standard_normal((UNIT_ROWS, d), dtype=np.float32)
        y += 0.3 * x[:, perm]
        w.write_unit(u, tokens=token_table(u, UNIT_ROWS), acts={HA: x, HB: y})
    return time.perf_counter() - t0


def write_layers(root: Path, n: int, d: int, hooks: int, dtype: str, seed: int = 1) -> float:
    """Dataset LAYERS: a residual-stream-like walk over ``hooks`` layers of width d."""
    from strata import store

    units = -(-n // UNIT_ROWS)
    t0 = time.perf_counter()
    s = store.open(root)
    names = [f"blocks.{i}.hook_resid_post" for i in range(hooks)]
    w = s.create_dataset(LAYERS, hooks={h: d for h in names}, context_size=CTX, dtype=dtype, num_units=units,
                         unit_contexts=UNIT_CONTEXTS, meta={"model": "synthetic-layers", "revision": "r0"})
    rng0 = np.random.default_rng(seed)
    mix = [np.linalg.qr(rng0.standard_normal((d, d)))[0].astype(np.float32) for _ in range(hooks)]
    for u in range(units):
        rows = min(UNIT_ROWS, n - u * UNIT_ROWS)
        rows -= rows % CTX
        rng = np.random.default_rng([seed, u])
        h = rng.standard_normal((rows, d), dtype=np.float32) * np.geomspace(3.0, 0.3, d, dtype=np.float32)
        acts = {}
        for i, name in enumerate(names):
            upd = np.tanh(h @ mix[i]) + 0.5 * rng.standard_normal((rows, d), dtype=np.float32)
            h = h + 0.6 * upd
            acts[name] = h
        w.write_unit(u, tokens=token_table(u, rows), acts=acts)
    return time.perf_counter() - t0


def child(kind: str, **kw) -> dict:
    """Run ``kind`` in a fresh Python process; returns its JSON result (with its peak RSS)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"kind": kind, **kw})]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child {kind} {kw} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_child(spec: dict) -> None:
    """The child side of :func:`child`: prints one JSON line."""
    kind = spec["kind"]
    watch = MemoryWatch()
    out: dict = {}
    if kind == "imports":  # the floor: interpreter + imports + an open dataset
        from strata import store
        from strata.analysis import similarity  # noqa: F401

        store.open(spec["store"], create=False).dataset(PAIR)
    elif kind == "compare":
        import torch

        from strata import store
        from strata.analysis.similarity import plan_compare
        from strata.pipeline.executor import Executor

        cmp = sys.modules["strata.analysis.similarity.compare"]  # the module (the package exports the function under its name)

        ds = store.open(spec["store"], create=False).dataset(PAIR)
        # compare() = plan_compare + run_compare; for streaming metrics run_compare is
        # _linear_values(plan, _streamed(plan, ex)): called here step by step to time each step.
        t0 = time.perf_counter()
        plan = plan_compare((ds, HA), (ds, HB), spec["metrics"], max_rows=spec["n"], chunk_rows=CHUNK)
        t1 = time.perf_counter()
        parts = cmp._streamed(plan, Executor())
        t2 = time.perf_counter()
        values = {**cmp._linear_values(plan, parts), "n": float(plan.n)}
        t3 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same metrics again, with torch's LAPACK on one thread (not part of the total)
        t4 = time.perf_counter()
        cmp._linear_values(plan, parts)
        t5 = time.perf_counter()
        out = {"seconds": t3 - t0, "plan_seconds": t1 - t0, "stream_seconds": t2 - t1, "metrics_seconds": t3 - t2,
               "metrics_seconds_1thread": t5 - t4, "torch_threads": threads, "values": values}
    elif kind == "gram":
        from strata import store

        ds = store.open(spec["store"], create=False).dataset(PAIR)
        n = spec["n"]
        t0 = time.perf_counter()
        x = ds.read(HA, rows=slice(0, n), dtype=np.float32).astype(np.float64)
        y = ds.read(HB, rows=slice(0, n), dtype=np.float32).astype(np.float64)
        t1 = time.perf_counter()
        out = {"seconds_read": t1 - t0, "value": gram_cka(x, y)}
        out["seconds"] = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    out.update(watch.result())
    print(json.dumps(out))


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA through n x n float64 Gram matrices (Kornblith et al. 2019, HSIC formula):
    ``HSIC(K, L) = tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n``; the ``(n - 1)^2`` cancels.
    ``HKH`` is formed in place (rows and columns centred); ``tr(HKH L) = <HKH, HLH>``."""
    k = x @ x.T  # NumPy runs a syrk: one n x n buffer
    l_ = y @ y.T
    for g in (k, l_):
        g -= g.mean(axis=0, keepdims=True)
        g -= g.mean(axis=1, keepdims=True)
    kl = float(np.vdot(k.ravel(), l_.ravel()))
    kk = float(np.vdot(k.ravel(), k.ravel()))
    ll = float(np.vdot(l_.ravel(), l_.ravel()))
    return kl / np.sqrt(kk * ll)


def bare_xty(x: np.ndarray, y: np.ndarray, n: int) -> float:
    """Seconds of a bare float32 ``acc += X^T Y`` over the first n rows, in chunks of CHUNK."""
    acc = np.zeros((x.shape[1], y.shape[1]), np.float32)
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        acc += x[s : min(n, s + CHUNK)].T @ y[s : min(n, s + CHUNK)]
    return time.perf_counter() - t0


def bare_comoments(x: np.ndarray, y: np.ndarray, n: int, dtype: type = np.float64) -> float:
    """Seconds of the least work the linear metrics need, in plain NumPy: per chunk, centre it
    and add ``X^T X``, ``Y^T Y`` (syrk) and ``X^T Y``, formed in ``dtype``, into float64
    accumulators."""
    d1, d2 = x.shape[1], y.shape[1]
    cxx, cyy, cxy = np.zeros((d1, d1)), np.zeros((d2, d2)), np.zeros((d1, d2))
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        u = x[s : min(n, s + CHUNK)].astype(dtype)
        v = y[s : min(n, s + CHUNK)].astype(dtype)
        u -= u.mean(axis=0)
        v -= v.mean(axis=0)
        cxx += u.T @ u
        cyy += v.T @ v
        cxy += u.T @ v
    return time.perf_counter() - t0


def moments_in_memory(x: np.ndarray, y: np.ndarray, n: int) -> float:
    """Seconds of Strata's co-moment updates (float64) over the same in-memory chunks."""
    from strata.analysis.similarity import Moments

    m = Moments(x.shape[1], y.shape[1])
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        m.update(x[s : min(n, s + CHUNK)], y[s : min(n, s + CHUNK)])
    return time.perf_counter() - t0


def fmt_rate(rows_per_s: float) -> str:
    return f"{rows_per_s / 1e3:8.1f} k rows/s"


# -- the three parts ------------------------------------------------------------------------------


def part_stream(root: Path, ns: list[int], d: int, dtype: str, rounds: int, summary: list, moments_ref: bool = True) -> None:
    from strata import store

    item = np.dtype(dtype).itemsize
    print(f"\n[1] streaming compare ({', '.join(STREAM_METRICS)}), d={d} {dtype}, chunks of {CHUNK:,} rows, "
          f"n = {', '.join(f'{n:,}' for n in ns)}; {rounds} interleaved round(s)", flush=True)
    fl = child("imports", store=str(root))
    ds = store.open(root, create=False).dataset(PAIR)
    t0 = time.perf_counter()
    x = ds.read(HA, rows=slice(0, max(ns)), dtype=np.float32)
    y = ds.read(HB, rows=slice(0, max(ns)), dtype=np.float32)
    print(f"    baseline data: the same rows read once into memory as float32 ({(x.nbytes + y.nbytes) / 2**30:.2f} GiB, "
          f"{time.perf_counter() - t0:.1f}s, untimed)", flush=True)
    print(f"    child floor (python + imports + an open dataset): peak RSS {fl['peak_rss_mib']:,.0f} MiB, private (anonymous) "
          f"{fl['peak_anon_mib']:,.0f} MiB", flush=True)
    keys = ("strata", "plan", "stream", "metrics", "metrics1", "rss", "anon", "bare", "f64", "f32", "mom")
    res: dict[int, dict[str, list]] = {n: {k: [] for k in keys} for n in ns}
    values: dict[int, dict] = {}
    for r in range(rounds):
        for n in ns:
            # The bound is timed right before and right after each Strata run, and each run is
            # compared with the mean of its two: shared CPUs change speed over minutes.
            before = bare_xty(x, y, n)
            c = child("compare", store=str(root), n=n, metrics=STREAM_METRICS)
            after = bare_xty(x, y, n)
            values[n] = c["values"]
            assert int(c["values"]["n"]) == n, c["values"]
            for k, v in (("strata", "seconds"), ("plan", "plan_seconds"), ("stream", "stream_seconds"), ("metrics", "metrics_seconds"),
                         ("metrics1", "metrics_seconds_1thread"), ("rss", "peak_rss_mib"), ("anon", "peak_anon_mib")):
                res[n][k].append(c[v])
            res[n]["bare"].append((before + after) / 2)
            line = (f"    round {r}, n={n:>9,}: Strata compare {c['seconds']:6.1f}s (alignment {c['plan_seconds']:.1f}s + streamed moments "
                    f"{c['stream_seconds']:.1f}s + metrics {c['metrics_seconds']:.1f}s [{c['metrics_seconds_1thread']:.1f}s with torch on 1 thread "
                    f"instead of {c['torch_threads']}]), peak RSS {c['peak_rss_mib']:,.0f} MiB, private {c['peak_anon_mib']:,.0f} MiB | "
                    f"bare f32 X^T Y {before:5.1f}s before, {after:5.1f}s after")
            if n == min(ns):  # per-row costs: the smallest n is enough for the references
                res[n]["f64"].append(bare_comoments(x, y, n))
                res[n]["f32"].append(bare_comoments(x, y, n, np.float32))
                line += f" | bare co-moments f64 {res[n]['f64'][-1]:5.1f}s, f32 {res[n]['f32'][-1]:5.1f}s"
                if moments_ref:
                    res[n]["mom"].append(moments_in_memory(x, y, n))
                    line += f" | Moments.update {res[n]['mom'][-1]:5.1f}s"
            print(line, flush=True)
    del x, y
    for n in ns:
        print(f"    values n={n:,}: " + ", ".join(f"{k} {v:.4f}" for k, v in values[n].items() if k != "n"))
    for n in ns:
        q = res[n]
        ratios = [b / t for b, t in zip(q["bare"], q["strata"])]  # Strata rows/s over the bound's, per round
        i = int(np.argmax(ratios))
        rate_s, rate_b = n / q["strata"][i], n / q["bare"][i]
        mbs = n * 2 * d * item / q["strata"][i] / 2**20
        ok = "met" if max(ratios) >= 0.8 else "NOT met"
        print(f"    n={n:>9,}: Strata {fmt_rate(rate_s)} ({mbs:5.1f} MiB/s of stored {dtype}) | bare float32 X^T Y {fmt_rate(rate_b)} | "
              f"ratio best {max(ratios):.2f}, median {statistics.median(ratios):.2f} (target >= 0.8: {ok})")
        summary.append((f"compare throughput, n={n:,}, d={d} ({len(STREAM_METRICS)} metrics)", f"{rate_s / 1e3:.1f} k rows/s",
                        f"{rate_b / 1e3:.1f} k rows/s (bare f32 XᵀY, in memory)", f"{max(ratios):.2f}", "≥ 0.8"))
        st = [b / t for b, t in zip(q["bare"], q["stream"])]
        print(f"    n={n:>9,}: streamed moments alone (less alignment and the fixed-cost metrics step): ratio best {max(st):.2f}, "
              f"median {statistics.median(st):.2f}; metrics step best {min(q['metrics']):.1f}s ({min(q['metrics1']):.1f}s with torch on 1 thread)")
        if q["f64"]:
            f_b = [b / f for b, f in zip(q["bare"], q["f64"])]
            s_f = [f / t for f, t in zip(q["f64"], q["strata"])]
            mom = ""
            if q["mom"]:
                m_b = [b / m for b, m in zip(q["bare"], q["mom"])]
                mom = f"Strata's Moments.update {fmt_rate(n / min(q['mom']))} = {max(m_b):.2f}; "
            f32_b = [b / f for b, f in zip(q["bare"], q["f32"])]
            s_f32 = [f / t for f, t in zip(q["f32"], q["strata"])]
            print(f"    n={n:>9,}: references on the in-memory rows, best of rounds: bare co-moments (centred X^T X, Y^T Y, X^T Y: "
                  f"the least work these metrics need) in float32 {fmt_rate(n / min(q['f32']))} = {max(f32_b):.2f} of bare f32 X^T Y "
                  f"(the ceiling), in float64 {fmt_rate(n / min(q['f64']))} = {max(f_b):.2f}; "
                  f"{mom}Strata compare / bare f32 co-moments: {max(s_f32):.2f}, / bare f64 co-moments: {max(s_f):.2f}")
            j = int(np.argmax(s_f))
            summary.append((f"compare throughput vs bare float64 co-moments in memory, n={n:,}", f"{n / q['strata'][j] / 1e3:.1f} k rows/s",
                            f"{n / q['f64'][j] / 1e3:.1f} k rows/s (centred XᵀX, YᵀY, XᵀY in f64)", f"{max(s_f):.2f}", "(reference)"))
    # Against the least float32 work the metrics need (three products, centred, per chunk): its
    # per-row rate at the smallest n, where it was measured, for every n.
    n0 = min(ns)
    if res[n0]["f32"]:
        f32_rate = n0 / min(res[n0]["f32"])
        for n in ns:
            q = res[n]
            whole, streamed = n / min(q["strata"]) / f32_rate, n / min(q["stream"]) / f32_rate
            print(f"    n={n:>9,}: against bare float32 co-moments ({fmt_rate(f32_rate)}, measured at n={n0:,}): "
                  f"Strata compare {whole:.2f}, its streamed moments alone {streamed:.2f}")
            summary.append((f"compare throughput vs bare float32 co-moments (the three products), n={n:,}",
                            f"{n / min(q['strata']) / 1e3:.1f} k rows/s",
                            f"{f32_rate / 1e3:.1f} k rows/s (centred XᵀX, YᵀY, XᵀY in f32, in memory)",
                            f"{whole:.2f} (streamed part {streamed:.2f})", "≥ 0.8 (restated)"))
    bare_all = [n / t for n in ns for t in res[n]["bare"]]
    print(f"    machine noise: the bound ran at {min(bare_all) / 1e3:.1f}..{max(bare_all) / 1e3:.1f} k rows/s over this part")
    lo, hi = min(ns), max(ns)
    p_lo, p_hi = max(res[lo]["rss"]), max(res[hi]["rss"])
    a_lo, a_hi = max(res[lo]["anon"]), max(res[hi]["anon"])
    ok = lambda r: "met" if abs(r - 1) <= 0.10 else "NOT met"  # noqa: E731
    print(f"    peak RSS (max over rounds): n={lo:,}: {p_lo:,.0f} MiB, n={hi:,}: {p_hi:,.0f} MiB: "
          f"ratio {p_hi / p_lo:.3f} (within 10%: {ok(p_hi / p_lo)})")
    print(f"    private (anonymous) peak: n={lo:,}: {a_lo:,.0f} MiB, n={hi:,}: {a_hi:,.0f} MiB: "
          f"ratio {a_hi / a_lo:.3f} (within 10%: {ok(a_hi / a_lo)}); "
          f"RSS minus private = touched pages of the store's memory-mapped shards (page cache; LocalStorage keeps at most 256 MiB of maps open)")
    summary.append((f"compare peak RSS, n={hi:,} vs n={lo:,}", f"{p_hi:,.0f} MiB", f"{p_lo:,.0f} MiB", f"{p_hi / p_lo:.2f}", "≤ 1.10"))
    summary.append((f"compare peak private (anonymous) memory, n={hi:,} vs n={lo:,}", f"{a_hi:,.0f} MiB", f"{a_lo:,.0f} MiB",
                    f"{a_hi / a_lo:.2f}", "≤ 1.10"))


def part_gram(root: Path, n: int, d: int, gram_runs: int, summary: list) -> None:
    gb = n * n * 8 / 1e9
    print(f"\n[2] linear CKA vs an in-memory Gram-matrix implementation at n={n:,}, d={d}: {gb:.1f} GB per float64 Gram matrix, "
          f"two of them ({2 * gb:.1f} GB); each run in a fresh child process, Strata before and after each Gram run", flush=True)
    st = [child("compare", store=str(root), n=n, metrics=["linear_cka"])]
    gr = []
    for _ in range(gram_runs):
        gr.append(child("gram", store=str(root), n=n))
        st.append(child("compare", store=str(root), n=n, metrics=["linear_cka"]))
    for c in st:
        print(f"    Strata compare {c['seconds']:6.1f}s, peak RSS {c['peak_rss_mib']:,.0f} MiB (private {c['peak_anon_mib']:,.0f} MiB)")
    for c in gr:
        print(f"    Gram CKA       {c['seconds']:6.1f}s (reading {c['seconds_read']:.1f}s of it), peak RSS {c['peak_rss_mib']:,.0f} MiB "
              f"(private {c['peak_anon_mib']:,.0f} MiB)")
    s_t, g_t = min(c["seconds"] for c in st), min(c["seconds"] for c in gr)
    s_m, g_m = max(c["peak_rss_mib"] for c in st), max(c["peak_rss_mib"] for c in gr)
    v_s, v_g = st[0]["values"]["linear_cka"], gr[0]["value"]
    print(f"    linear CKA: Strata {v_s:.12f}, Gram {v_g:.12f}, |diff| {abs(v_s - v_g):.1e}")
    print(f"    best time: Strata {s_t:.1f}s vs Gram {g_t:.1f}s: Strata {g_t / s_t:.1f}x faster; "
          f"peak RSS: Strata {s_m:,.0f} MiB vs Gram {g_m:,.0f} MiB ({g_m / s_m:.1f}x)")
    summary.append((f"linear CKA time, n={n:,}, d={d}", f"{s_t:.1f} s", f"{g_t:.1f} s (two n×n f64 Grams, HSIC)", f"{g_t / s_t:.1f}x faster", "—"))
    summary.append((f"linear CKA peak RSS, n={n:,}", f"{s_m:,.0f} MiB", f"{g_m:,.0f} MiB", f"{g_m / s_m:.1f}x less", "—"))


def part_heatmap(root: Path, n: int, d: int, hooks: int, pairs_limit: int | None, rounds: int, summary: list) -> None:
    from strata import store
    from strata.analysis.similarity import compare, layer_heatmap
    from strata.pipeline.executor import Executor

    ds = store.open(root, create=False).dataset(LAYERS)
    names = ds.hooks
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    run_pairs = pairs if pairs_limit is None else pairs[:: max(1, len(pairs) // pairs_limit)][:pairs_limit]
    how = "all of them" if len(run_pairs) == len(pairs) else f"{len(run_pairs)} of them, evenly spread, extrapolated to {len(pairs)}"
    print(f"\n[3] layer heatmap: linear CKA of {len(names)} hooks x d={d}, n={ds.num_rows(names[0]):,} rows: one layer_heatmap pass "
          f"vs {len(pairs)} pairwise compare runs ({how}); in-process; each round times the heatmap before and after the compares "
          f"and compares them with the mean of the two", flush=True)

    def heatmap() -> tuple[float, object]:
        t0 = time.perf_counter()
        out = layer_heatmap((ds, ["blocks.*.hook_resid_post"]), metric="linear_cka", executor=Executor())
        return time.perf_counter() - t0, out

    t_heat, t_pairs, maxdiff = [], [], 0.0
    for r in range(rounds):
        before, res = heatmap()
        t0 = time.perf_counter()
        for i, j in run_pairs:
            v = compare((ds, names[i]), (ds, names[j]), ["linear_cka"], use_ray=False)["linear_cka"]
            maxdiff = max(maxdiff, abs(v - res.values[i, j]))
        t_pairs.append((time.perf_counter() - t0) * len(pairs) / len(run_pairs))
        after, _ = heatmap()
        t_heat.append((before + after) / 2)
        print(f"    round {r}: heatmap {before:6.1f}s before, {after:6.1f}s after ({res.passes} pass, {res.method}) | {len(pairs)} compare runs "
              f"{t_pairs[-1]:6.1f}s{'' if len(run_pairs) == len(pairs) else ' (extrapolated)'}", flush=True)
    v = res.values
    print(f"    values: diagonal {np.diag(v).min():.6f}..{np.diag(v).max():.6f}, adjacent layers {np.mean(np.diag(v, 1)):.3f}, "
          f"first vs last {v[0, -1]:.3f}; max |heatmap - compare| {maxdiff:.1e}")
    k = int(np.argmax([p_ / h_ for p_, h_ in zip(t_pairs, t_heat)]))
    h, p = t_heat[k], t_pairs[k]
    print(f"    heatmap {h:.1f}s (mean of before and after) vs {len(pairs)} compares {p:.1f}s: {p / h:.1f}x faster")
    summary.append((f"{len(names)}×{len(names)} linear-CKA heatmap, d={d}, n={n:,}", f"{h:.1f} s",
                    f"{p:.1f} s ({len(pairs)} compare runs{'' if len(run_pairs) == len(pairs) else ', extrapolated'})", f"{p / h:.1f}x faster", "—"))


def _grams(x: np.ndarray, y: np.ndarray) -> float:
    """Seconds to form both inner-product kernels."""
    t0 = time.perf_counter()
    x @ x.T
    y @ y.T
    return time.perf_counter() - t0


def part_cknna(ns: list[int], d: int, rounds: int, summary: list) -> None:
    from strata.analysis.similarity import cknna

    print(f"\n[4] cknna (k=10) at d={d} vs the two Gram matrices X Xᵀ, Y Yᵀ (float64), in memory; best of {rounds} round(s)", flush=True)
    rng = np.random.default_rng(4)
    for n in ns:
        x = rng.standard_normal((n, d))
        y = np.tanh(x @ rng.standard_normal((d, d)) / np.sqrt(d)) + 0.5 * rng.standard_normal((n, d))


        best = None
        for _ in range(rounds):
            before = _grams(x, y)
            t0 = time.perf_counter()
            v = cknna(x, y, k=10)
            t = time.perf_counter() - t0
            base = (before + _grams(x, y)) / 2
            if best is None or t / base < best[0] / best[1]:
                best = (t, base, v)
        t, base, v = best  # type: ignore[misc]
        print(f"    n={n:,}: cknna {t:.2f}s (value {v:.4f}) vs Gram matrices {base:.2f}s: {t / base:.1f}x", flush=True)
        summary.append((f"cknna k=10, n={n:,}, d={d} (in memory)", f"{t:.2f} s", f"{base:.2f} s (X Xᵀ and Y Yᵀ)", f"{t / base:.1f}x the Grams", "—"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small configuration (< 3 minutes)")
    p.add_argument("--n", default=None, help="comma-separated row counts of part 1 (default 100000,1000000; quick 100000,200000)")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of part 1 (default 2; quick 1)")
    p.add_argument("--gram-n", type=int, default=None, help="rows of part 2 (default 20000; quick 8000)")
    p.add_argument("--heatmap-n", type=int, default=None, help="rows of part 3 (default 32768; quick 16384)")
    p.add_argument("--heatmap-d", type=int, default=256)
    p.add_argument("--heatmap-hooks", type=int, default=12)
    p.add_argument("--heatmap-pairs", type=int, default=None, help="pairwise compares actually run (default all; quick 11), extrapolated")
    p.add_argument("--parts", default="stream,gram,heatmap,cknna", help="comma-separated subset of stream,gram,heatmap,cknna")
    p.add_argument("--dir", default=None, help="where to write the temporary store (default: the system temp folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        run_child(json.loads(a.child))
        return 0
    ns = [int(v) for v in (a.n or ("100000,200000" if a.quick else "100000,1000000")).split(",")]
    rounds = a.rounds or (1 if a.quick else 2)
    gram_n = a.gram_n or (8000 if a.quick else 20000)
    heat_n = a.heatmap_n or (16384 if a.quick else 32768)
    heat_pairs = a.heatmap_pairs if a.heatmap_pairs is not None else (11 if a.quick else None)
    parts = set(a.parts.split(","))

    t_start = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"configuration: {'--quick' if a.quick else 'full'}; part 1 n = {', '.join(f'{n:,}' for n in ns)} at d={a.d} {a.dtype}; "
          f"part 2 n = {gram_n:,}; part 3 {a.heatmap_hooks} hooks x d={a.heatmap_d}, n = {heat_n:,}; no Ray (in-process tasks)")
    root = Path(tempfile.mkdtemp(prefix="strata-bench-sim-", dir=a.dir))
    summary: list[tuple[str, str, str, str, str]] = []
    try:
        if parts & {"stream", "gram"}:
            n_pair = max([*ns, gram_n] if "stream" in parts else [gram_n])
            sec = write_pair(root, n_pair, a.d, a.dtype)
            rows = -(-n_pair // UNIT_ROWS) * UNIT_ROWS
            print(f"store: {root}; dataset {PAIR!r}: 2 hooks x d={a.d} {a.dtype}, {rows:,} rows in {rows // UNIT_ROWS} units, "
                  f"written with write_unit in {sec:.1f}s", flush=True)
        if "heatmap" in parts:
            sec = write_layers(root, heat_n, a.heatmap_d, a.heatmap_hooks, a.dtype)
            print(f"dataset {LAYERS!r}: {a.heatmap_hooks} hooks x d={a.heatmap_d} {a.dtype}, {heat_n:,} rows, written in {sec:.1f}s", flush=True)
        if "stream" in parts:
            part_stream(root, ns, a.d, a.dtype, rounds, summary, moments_ref=not a.quick)
        if "gram" in parts:
            part_gram(root, gram_n, a.d, 1, summary)
        if "heatmap" in parts:
            part_heatmap(root, heat_n, a.heatmap_d, a.heatmap_hooks, heat_pairs, 1, summary)
        if "cknna" in parts:
            part_cknna([2048] if a.quick else [2048, 4096], a.d, 2 if a.quick else 3, summary)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nsummary ({'--quick' if a.quick else 'full'} configuration, {time.perf_counter() - t_start:.0f}s in all; "
          f"load average {os.getloadavg()[1]:.1f} over the last 5 minutes):\n")
    print("| what | Strata | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    for row in summary:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
