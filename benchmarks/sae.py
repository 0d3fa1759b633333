"""SAE training throughput, as ratios measured in one run on this machine.

    python benchmarks/sae.py                       # a few minutes on 2 CPU cores
    python benchmarks/sae.py --d 768 --expansion 16 --steps 40 --threads 0   # bigger (0: torch's default threads)

Writes a synthetic float16 dataset (``--hooks`` hooks of width ``--d``) into a temporary store,
then times:

1. **store-fed vs in memory**: sae-lens's trainer (``MultiSAETrainer``, as ``strata sae train``
   runs it, one TopK SAE) fed by ``ds.iter_batches`` (endless, shuffled, float16 -> float32,
   read from the page cache), against the same trainer fed the very same batches already in
   memory (gathered from the same iterator beforehand). Only ``fit()`` is timed; both give
   bit-identical weights (checked), so they did the same work. Target: >= 0.95.
2. **several hooks in one pass vs one job per hook**: ``train_pass`` over every hook at once
   against one ``train_pass`` per hook, same steps: total time ratio (one job per hook / one
   pass), and the time per SAE.
3. **crosscoder fed from the store vs in memory** (``--parts crosscoder``): a TopK crosscoder over
   two sources of width ``--d`` (two datasets over the same documents, aligned by
   ``(doc_id, doc_position)`` as a two-model crosscoder is), sae-lens's trainer fed by
   ``store.iter_aligned`` concatenated ``[x_a | x_b]`` (:class:`ConcatBatches`, as ``strata sae
   train`` feeds it), against the same trainer fed the very same batches from memory. Only
   ``fit()`` is timed; weights are checked bit-identical. Target: >= 0.95.

Shared CPUs drift over minutes, so the contenders of each part run once in each of ``--rounds``
interleaved rounds and the best run of each is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, memory_gib  # noqa: E402

from strata import store  # noqa: E402
from strata.analysis.sae.config import Run, SAETrainSpec  # noqa: E402
from strata.analysis.sae.crosscoder_run import ConcatBatches, build_crosscoder  # noqa: E402
from strata.analysis.sae.curves import RecordingMultiSAETrainer  # noqa: E402
from strata.analysis.sae.plan import split_units  # noqa: E402
from strata.analysis.sae.train import build_sae, train_pass  # noqa: E402
from strata.store.datasets.aligned import align_tokens, iter_aligned  # noqa: E402

CTX = 128


def machine() -> str:
    cpu, mem = cpu_model(), memory_gib()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; load average {load}")


def make_dataset(root: Path, *, hooks: list[str], d: int, units: int, unit_contexts: int) -> store.ActivationDataset:
    """Low-rank-plus-noise float16 activations (SAE-shaped work; values do not change speed)."""
    s = store.open(root)
    w = s.create_dataset("bench", hooks={h: d for h in hooks}, context_size=CTX, dtype="float16", num_units=units,
                         unit_contexts=unit_contexts, meta={"model": "synthetic"})
    rng = np.random.default_rng(0)
    rows = unit_contexts * CTX
    basis = rng.standard_normal((64, d)).astype(np.float32)
    for u in range(units):
        r = np.arange(rows)
        ctx = u * unit_contexts + r // CTX
        tokens = pa.table({"context_id": ctx, "position": (r % CTX).astype(np.int32), "doc_id": ctx,
                           "doc_position": (r % CTX).astype(np.int32), "token_id": (r % 1000).astype(np.int32), "special": r % CTX == 0})
        acts = {h: (rng.standard_normal((rows, 64)).astype(np.float32) @ basis
                    + 0.1 * rng.standard_normal((rows, d)).astype(np.float32)).astype(np.float16)
                for h in hooks}
        w.write_unit(u, tokens=tokens, acts=acts)
    return s.dataset("bench")


def make_model_pair(root: Path, *, d: int, units: int, unit_contexts: int) -> list[tuple[store.ActivationDataset, str]]:
    """Two float16 datasets ("models") over the same documents (one tokenizer and corpus
    fingerprint: they pair by ``(doc_id, doc_position)``), one hook each, sharing half their structure."""
    s = store.open(root)
    rng = np.random.default_rng(1)
    rows = unit_contexts * CTX
    basis = {m: rng.standard_normal((64, d)).astype(np.float32) for m in ("a", "b")}
    meta = {"tokenizer": "synthetic", "corpus_fingerprint": "0" * 64}
    ws = {m: s.create_dataset(f"bench-{m}", hooks={"blocks.0.hook_resid_post": d}, context_size=CTX, dtype="float16", num_units=units,
                              unit_contexts=unit_contexts, meta={**meta, "model": f"synthetic-{m}"}) for m in ("a", "b")}
    for u in range(units):
        r = np.arange(rows)
        ctx = u * unit_contexts + r // CTX
        tokens = pa.table({"context_id": ctx, "position": (r % CTX).astype(np.int32), "doc_id": ctx,
                           "doc_position": (r % CTX).astype(np.int32), "token_id": (r % 1000).astype(np.int32), "special": r % CTX == 0})
        codes = rng.standard_normal((rows, 64)).astype(np.float32)
        for m, w in ws.items():
            acts = (codes @ basis[m] + 0.1 * rng.standard_normal((rows, d)).astype(np.float32)).astype(np.float16)
            w.write_unit(u, tokens=tokens, acts={"blocks.0.hook_resid_post": acts})
    return [(s.dataset(f"bench-{m}"), "blocks.0.hook_resid_post") for m in ("a", "b")]


def spec_for(root: Path, hooks: list[str], args: argparse.Namespace, steps: int) -> SAETrainSpec:
    return SAETrainSpec.model_validate({
        "store": str(root), "dataset": "bench", "hooks": hooks, "name": "bench", "architecture": "topk",
        "sae": {"expansion_factor": args.expansion, "k": args.k},
        "train": {"total_training_samples": steps * args.batch, "batch_size": args.batch, "lr": 1e-3, "log_every": 10,
                  "checkpoint_every": 0},
        "data": {"holdout_units": 1}, "eval": {"ce": False}, "compute": {"device": "cpu"},
    })


def fit_seconds(ds: store.ActivationDataset, spec: SAETrainSpec, hook: str, units: list[int], batches: list | None) -> tuple[float, dict]:
    """Seconds of ``fit()`` of one SAE, fed from the store (``batches`` None) or from memory."""
    run = Run("bench", hook, spec.updated(hooks=[hook]), {})
    sae = build_sae(run.spec, ds.info.hooks[hook].d)
    if batches is None:
        data = ds.iter_batches([hook], batch_size=spec.train.batch_size, shuffle=True, seed=0, epochs=None,
                               drop_last=True, units=units)
    else:
        data = iter(batches)
    trainer = RecordingMultiSAETrainer(cfg=spec.train.trainer_config("cpu"), saes={"bench": sae}, hook_names={"bench": hook},
                                       data_provider=data, log_every=spec.train.log_every)
    t0 = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t0
    if batches is None:
        data.close()
    return dt, {k: v.detach().clone() for k, v in sae.state_dict().items()}


def part_fed(ds: store.ActivationDataset, root: Path, hooks: list[str], args: argparse.Namespace) -> None:
    spec = spec_for(root, hooks[:1], args, args.steps)
    units, _ = split_units(ds, hooks[:1], 1)
    with ds.iter_batches([hooks[0]], batch_size=args.batch, shuffle=True, seed=0, epochs=None, drop_last=True, units=units) as it:
        batches = [next(it) for _ in range(args.steps)]
    best = {"store": float("inf"), "memory": float("inf")}
    for rnd in range(args.rounds):
        order = ("store", "memory") if rnd % 2 == 0 else ("memory", "store")
        weights = {}
        for who in order:
            dt, weights[who] = fit_seconds(ds, spec, hooks[0], units, None if who == "store" else batches)
            best[who] = min(best[who], dt)
            print(f"  round {rnd + 1}: {who:6s} {args.steps / dt:7.2f} steps/s", flush=True)
        same = all(torch.equal(weights["store"][k], weights["memory"][k]) for k in weights["store"])
        assert same, "store-fed and in-memory training differ: not the same batches"
    s_rate, m_rate = args.steps / best["store"], args.steps / best["memory"]
    print(f"| SAE training fed from the store (`iter_batches`) | {s_rate:.2f} steps/s "
          f"({s_rate * args.batch:,.0f} rows/s) | the same trainer fed from memory {m_rate:.2f} steps/s | {s_rate / m_rate:.3f} | >= 0.95 |")


def part_hooks(ds: store.ActivationDataset, root: Path, hooks: list[str], args: argparse.Namespace) -> None:
    spec = spec_for(root, hooks, args, args.hook_steps)
    units, holdout = split_units(ds, hooks, 1)

    def runs(hs: list[str]) -> list[Run]:
        return [Run(f"bench.{h}", h, spec.updated(hooks=[h], name=f"bench.{h}"), {}) for h in hs]

    best = {"one pass": float("inf"), "one job per hook": float("inf")}
    for rnd in range(args.rounds):
        order = list(best) if rnd % 2 == 0 else list(best)[::-1]
        for who in order:
            t0 = time.perf_counter()
            if who == "one pass":
                train_pass(ds, runs(hooks), device="cpu", units=units, holdout=holdout)
            else:
                for h in hooks:
                    train_pass(ds, runs([h]), device="cpu", units=units, holdout=holdout)
            dt = time.perf_counter() - t0
            best[who] = min(best[who], dt)
            print(f"  round {rnd + 1}: {who:16s} {dt:7.1f} s", flush=True)
    one, sep = best["one pass"], best["one job per hook"]
    print(f"| {len(hooks)} hooks: one pass (`MultiSAETrainer` on `iter_batches([h1..h{len(hooks)}])`) | {one:.1f} s "
          f"({one / len(hooks):.1f} s per SAE) | one job per hook {sep:.1f} s ({sep / len(hooks):.1f} s per SAE) | {sep / one:.2f} | |")


def part_crosscoder(root: Path, args: argparse.Namespace) -> None:
    sides = make_model_pair(root, d=args.d, units=args.units, unit_contexts=args.unit_contexts)
    spec = SAETrainSpec.model_validate({
        "store": str(root), "name": "bench-cc", "architecture": "crosscoder", "sources": [{"dataset": ds.name, "hook": h} for ds, h in sides],
        "sae": {"expansion_factor": args.expansion, "k": args.k},
        "train": {"total_training_samples": args.steps * args.batch, "batch_size": args.batch, "lr": 1e-3, "log_every": 10, "checkpoint_every": 0},
        "compute": {"device": args.device},
    })
    al = align_tokens(sides)
    key = "a+b"

    def provider() -> ConcatBatches:
        return ConcatBatches(iter_aligned(sides, batch_size=args.batch, shuffle=True, seed=0, epochs=None, drop_last=True, alignment=al), key)

    data = provider()
    t0 = time.perf_counter()
    batches = [next(data) for _ in range(args.steps)]
    feed_s = (time.perf_counter() - t0) / args.steps  # the store's share of a store-fed step, measured alone
    data.close()

    def fit(batches_or_none: list | None) -> tuple[float, dict]:
        cc = build_crosscoder(spec, args.d, 2, device=args.device)
        feed = provider() if batches_or_none is None else iter(batches_or_none)
        trainer = RecordingMultiSAETrainer(cfg=spec.train.trainer_config(args.device), saes={"cc": cc}, hook_names={"cc": key},
                                           data_provider=feed, log_every=spec.train.log_every)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.fit()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if isinstance(feed, ConcatBatches):
            feed.close()
        return dt, {k: v.detach().cpu().clone() for k, v in cc.state_dict().items()}

    best = {"store": float("inf"), "memory": float("inf")}
    ratios = []
    for rnd in range(args.rounds):
        order = ("store", "memory") if rnd % 2 == 0 else ("memory", "store")
        weights, took = {}, {}
        for who in order:
            took[who], weights[who] = fit(None if who == "store" else batches)
            best[who] = min(best[who], took[who])
            print(f"  round {rnd + 1}: crosscoder {who:6s} {args.steps / took[who]:7.2f} steps/s", flush=True)
        ratios.append(took["memory"] / took["store"])
        if args.device == "cpu":  # CUDA kernels (scatter, atomics) need not be bit-deterministic
            assert all(torch.equal(weights["store"][k], weights["memory"][k]) for k in weights["store"]), "not the same batches"
    s_rate, m_rate = args.steps / best["store"], args.steps / best["memory"]
    print(f"| crosscoder, 2 sources of d={args.d} (d_sae={round(args.expansion * args.d)}, k={args.k}), fed from the store "
          f"(`iter_aligned`, doc_position) | {s_rate:.2f} steps/s ({s_rate * args.batch:,.0f} pairs/s) | the same trainer fed from "
          f"memory {m_rate:.2f} steps/s | {s_rate / m_rate:.3f} | >= 0.95 |")
    print(f"  median of the rounds' ratios {float(np.median(ratios)):.3f}; the aligned feed alone (gather two float16 sources, "
          f"float32, concatenate): {feed_s * 1e3:.1f} ms per batch, {feed_s / best['store'] * args.steps:.1%} of a store-fed step")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256, help="hook width")
    p.add_argument("--hooks", type=int, default=4)
    p.add_argument("--expansion", type=float, default=8.0)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30, help="steps of part 1")
    p.add_argument("--hook-steps", type=int, default=10, help="steps of part 2")
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--unit-contexts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--parts", default="fed,hooks,crosscoder", help="comma-separated: fed, hooks, crosscoder")
    p.add_argument("--device", default="cpu", help="the crosscoder part's device (cpu, cuda)")
    p.add_argument("--root", help="where to write the dataset (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="strata-bench-sae-"))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(args.hooks)]
    try:
        ds = make_dataset(root, hooks=hooks, d=args.d, units=args.units, unit_contexts=args.unit_contexts)
        d_sae = round(args.expansion * args.d)
        print(f"machine: {machine()}")
        print(f"dataset: {args.units} units x {args.unit_contexts * CTX:,} rows, {args.hooks} hooks of d={args.d}, float16; "
              f"TopK SAE d_sae={d_sae}, k={args.k}, batch {args.batch}; best of {args.rounds} interleaved rounds\n")
        print("| what | measured | baseline (same run) | ratio | target |\n| --- | --- | --- | --- | --- |")
        if "fed" in args.parts:
            part_fed(ds, root, hooks, args)
        if "hooks" in args.parts:
            part_hooks(ds, root, hooks, args)
        if "crosscoder" in args.parts:
            part_crosscoder(root, args)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
