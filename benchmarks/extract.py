"""Extraction throughput, as ratios measured in one run on this machine.

    python benchmarks/extract.py                  # a few minutes on 2 CPU cores
    python benchmarks/extract.py --layers 6 --d-model 512 --tokens 400000   # bigger
    python benchmarks/extract.py --case vision    # a ViT over generated images instead

Builds a seeded GPT-2-shaped model locally (no download) and a synthetic corpus, plans the
contexts once, then times over exactly the same token batches:

* the bound: a bare ``torch.no_grad()`` forward loop over the same batches on the same model;
* the pipeline (``run_extract`` on an in-process Ray) saving one hook (the last block's
  resid_post, so the whole model runs), and saving every block's resid_post, with bytes/s;
* sae-lens's ``CacheActivationsRunner`` on the same local model folder and the same tokens
  (one hook; it writes a Hugging Face ``datasets`` cache);
* peak RSS of the driver and of a worker.

The vision case (``--case vision``) builds a seeded ViT (``--vision-layers``, ``--vision-d``,
224 x 224 images in 16 x 16 patches: 197 tokens an image) and ``--images`` generated PNG images
(256 x 256, resized by the model's processor), then times images/s of the pipeline (1 hook: the
last block's resid_post; steady rate, as for text) against a bare forward loop over the very
same preprocessed pixel batches (preprocessed before the clock starts), run twice: in the driver
while no Ray runs, and in a Ray actor holding the worker's CPUs right after the pipeline (the
same kind of process the pipeline computes in, Ray's processes beside it); it reports both
ratios and the share of the workers' time
spent decoding and preprocessing images. Workers do that for a unit before taking the model,
while the actor's other call computes the previous unit, so it is off the model's critical path
as long as it takes less time than a forward pass of a unit.

Shared CPUs drift by up to 2x over minutes, so every contender runs once in each of
``--rounds`` interleaved rounds and its best run is reported (text); in the vision case each
pipeline run is bracketed by a bare loop right before and right after it, and the ratio to the
mean of the two is reported per round (best and median). Pipeline throughput is the steady
rate (units after the first, once the worker has loaded the model); the end-to-end job time,
which adds Ray tasks for tokenization and the model load, is printed beside it.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata import store  # noqa: E402
from strata.pipeline.cluster import connect  # noqa: E402
from strata.pipeline.config import ExtractSpec  # noqa: E402
from strata.pipeline.extract import plan, prepare, run_extract  # noqa: E402
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_loop(folder: Path, token_id: np.ndarray, unit_contexts: int, per_batch: int, threads: int, warmup_s: float) -> float:
    """tokens/s of a plain forward loop over the pipeline's batches (units cut into batches)."""
    from transformers import AutoModel

    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.from_numpy(token_id.astype(np.int64))
    batches = [ids[c0 : min(u0 + unit_contexts, c0 + per_batch, len(ids))] for u0 in range(0, len(ids), unit_contexts) for c0 in range(u0, min(u0 + unit_contexts, len(ids)), per_batch)]
    with torch.no_grad():
        # Warm up until the rate settles: on shared CPUs the first seconds run far slower.
        t_warm = time.perf_counter()
        while time.perf_counter() - t_warm < warmup_s:
            for b in batches[:4]:
                model(input_ids=b, use_cache=False)
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b, use_cache=False)
        dt = time.perf_counter() - t0
    del model
    gc.collect()
    return ids.numel() / dt


def sae_lens_rate(folder: Path, token_id: np.ndarray, hook_layer: int, per_batch: int, d: int, out: Path) -> float:
    """tokens/s of sae-lens's CacheActivationsRunner on the same model folder and tokens."""
    import datasets
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    # sae-lens caches whole buffers of `buffer_size_gb`: size one buffer to exactly our tokens
    # (whole batches of contexts) so that both process the same tokens.
    n_ctx = (len(token_id) // per_batch) * per_batch
    token_id = token_id[:n_ctx]
    ds = datasets.Dataset.from_dict({"input_ids": token_id.astype(np.int64).tolist()})
    n_tokens = int(token_id.size)
    cfg = CacheActivationsRunnerConfig(
        dataset_path=str(out / "unused"), model_name=str(folder), model_class_name="AutoModelForCausalLM",
        model_batch_size=per_batch, hook_name=f"transformer.h.{hook_layer}", d_in=d, training_tokens=n_tokens,
        context_size=token_id.shape[1], new_cached_activations_path=str(out / "sae-lens-cache"), shuffle=False,
        dtype="float32", device="cpu", prepend_bos=False, streaming=False, buffer_size_gb=(n_tokens * d * 4 + 1) / 1e9,
    )
    assert cfg.n_buffers == 1 and cfg.n_batches_in_buffer * cfg.n_tokens_in_batch == n_tokens, (cfg.n_buffers, cfg.n_batches_in_buffer)
    import warnings

    warnings.filterwarnings("ignore", module="sae_lens")
    runner = CacheActivationsRunner(cfg, override_dataset=ds)
    t0 = time.perf_counter()
    runner.run()
    return n_tokens / (time.perf_counter() - t0)


def bare_vision_loop(folder: Path, pixels: torch.Tensor, unit_contexts: int, per_batch: int, threads: int, warmup_s: float) -> float:
    """images/s of a plain forward loop over already preprocessed pixel batches (units cut into batches)."""
    from transformers import ViTModel

    torch.set_num_threads(threads)
    model = ViTModel.from_pretrained(folder, dtype=torch.float32).eval()
    n = len(pixels)
    batches = [pixels[c0 : min(u0 + unit_contexts, c0 + per_batch, n)] for u0 in range(0, n, unit_contexts)
               for c0 in range(u0, min(u0 + unit_contexts, n), per_batch)]
    with torch.inference_mode():  # what the workers use (no_grad is a little slower)
        t_warm = time.perf_counter()
        while time.perf_counter() - t_warm < warmup_s:
            model(pixel_values=batches[0])
        t0 = time.perf_counter()
        for b in batches:
            model(pixel_values=b)
        dt = time.perf_counter() - t0
    del model
    gc.collect()
    return n / dt


class BareVisionActor:
    """The bare loop in a Ray actor holding the pipeline worker's CPUs: the same kind of process
    the pipeline computes in, with Ray's own processes running beside it."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def rate(self, pixels: torch.Tensor, unit_contexts: int, per_batch: int, threads: int) -> float:
        return bare_vision_loop(self.folder, pixels, unit_contexts, per_batch, threads, 3.0)


def vision_case(a: argparse.Namespace, work: Path, cpus: int) -> None:
    import ray

    from strata.pipeline.images import ImageSource
    from strata.pipeline.tiny import build_tiny_vision, synthetic_images
    from strata.pipeline.vision import load_processor, preprocess

    folder = work / "vit"
    if not (folder / "config.json").exists():
        build_tiny_vision(folder, family="vit", layers=a.vision_layers, d_model=a.vision_d, heads=max(1, a.vision_d // 64),
                          image_size=224, patch_size=16, seed=0)
    imgs = work / "images"
    if not (imgs / "metadata.jsonl").exists():
        synthetic_images(imgs, a.images, seed=0, size=256)

    def job(name: str) -> ExtractSpec:
        return ExtractSpec(store=str(work / "acts"), name=name, model={"id": str(folder)}, corpus={"path": str(imgs), "format": "images"},
                           hooks=[f"blocks.{a.vision_layers - 1}.hook_resid_post"], dtype=a.dtype,
                           compute={"unit_contexts": a.vision_unit, "batch_tokens": a.vision_batch * 197})

    spec = job("plan")
    p = prepare(spec, store.open(spec.store))
    assert p.image is not None
    src = ImageSource(spec.corpus, p.scan.files, p.scan.locators)
    proc = load_processor(str(folder), p.image.processor_overrides)
    t0 = time.perf_counter()
    pixels = torch.from_numpy(preprocess(proc, src.read(np.arange(len(src)))))
    pre_s = time.perf_counter() - t0
    n = len(pixels)
    print(f"machine: {cpus} CPU cores, torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"model: ViT, {a.vision_layers} layers, d_model {a.vision_d}, 224x224 images in 16x16 patches (197 tokens); {n} images, "
          f"{a.vision_batch} images per batch, {a.vision_unit} per unit; decoding + preprocessing all of them in one thread: "
          f"{pre_s:.2f}s ({n / pre_s:,.0f} images/s)")
    bare_all: list[float] = []
    runs: list = []
    ratios: list[float] = []
    in_ray: list[float] = []
    actor_ratios: list[float] = []
    bare = bare_vision_loop(folder, pixels, a.vision_unit, a.vision_batch, cpus, a.warmup_s)
    for rnd in range(a.rounds):
        # The bare loop runs while no Ray runs (no Ray processes share the cores with it), right
        # before and right after each pipeline run, which gets a fresh Ray: the pipeline's rate
        # is compared with the mean of the two (the machine's speed drifts over minutes).
        # A private Ray on free ports (pipeline/cluster.py), as `compute.address: null` starts.
        with connect(None, num_cpus=cpus, log_to_driver=False):
            runs.append(run_extract(job(f"vit-{rnd}"), progress=False))
            # The same loop in a Ray actor holding the worker's CPUs, right after the pipeline.
            actor = ray.remote(num_cpus=cpus)(BareVisionActor).remote(str(folder))
            in_ray.append(ray.get(actor.rate.remote(ray.put(pixels), a.vision_unit, a.vision_batch, cpus)))
        after = bare_vision_loop(folder, pixels, a.vision_unit, a.vision_batch, cpus, 3.0)
        r = runs[-1]
        rate = r.steady_tokens_per_s / 197
        ratios.append(rate / ((bare + after) / 2))
        actor_ratios.append(rate / in_ray[-1])
        bare_all += [bare, after]
        print(f"round {rnd}: pipeline {rate:,.1f} images/s steady ({r.steady_tokens / 197:.0f} images after the first unit) | bare "
              f"{bare:,.1f} before, {after:,.1f} after | ratio {ratios[-1]:.2f} | bare loop in a Ray actor right after the pipeline "
              f"{in_ray[-1]:,.1f}: ratio {actor_ratios[-1]:.2f} | load average {os.getloadavg()[0]:.1f}", flush=True)
        bare = after
    i = int(np.argmax(ratios))
    r = runs[i]
    rate = r.steady_tokens_per_s / 197
    share = r.prepare_seconds / (r.prepare_seconds + r.compute_seconds)
    print(f"\n{a.rounds} rounds, same model, same {n} images, same batches; the bare loop ran at "
          f"{min(bare_all):,.1f}..{max(bare_all):,.1f} images/s over the run (the machine's drift):")
    print(f"pipeline (decode + preprocess + forward + write) vs the bare forward loop over preprocessed pixels bracketing it: "
          f"ratio best {max(ratios):.2f}, median {statistics.median(ratios):.2f} (best round: {rate:,.1f} images/s; "
          f"job end to end incl. decode checks + model load: {r.seconds:.1f}s)")
    print(f"pipeline vs the same bare loop in a Ray actor holding the worker's CPUs (run right after it, Ray still up): "
          f"ratio best {max(actor_ratios):.2f}, median {statistics.median(actor_ratios):.2f}; that loop ran at "
          f"{min(in_ray):,.1f}..{max(in_ray):,.1f} images/s")
    print(f"workers' time decoding + preprocessing: {r.prepare_seconds:.2f}s of {r.prepare_seconds + r.compute_seconds:.2f}s "
          f"({100 * share:.1f}%), done before each unit takes the model, overlapping the other unit's forward pass")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("text", "vision"), default="text")
    ap.add_argument("--images", type=int, default=512, help="vision: generated images")
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--vision-d", type=int, default=384)
    ap.add_argument("--vision-batch", type=int, default=32, help="vision: images per forward pass")
    ap.add_argument("--vision-unit", type=int, default=32, help="vision: images per unit")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=60_000, help="about this many tokens per measurement")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--unit-contexts", type=int, default=64)
    ap.add_argument("--dtype", default="float16", help="stored dtype")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    ap.add_argument("--skip-sae-lens", action="store_true")
    ap.add_argument("--warmup-s", type=float, default=15.0, help="seconds of warm-up before the first bare loop")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (text: each contender's best run is reported; vision: per-round ratios, best and median)")
    a = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(a.work or tempfile.mkdtemp(prefix="strata-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    import logging

    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if a.case == "vision":
        vision_case(a, work, cpus)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    folder = work / "model"
    if not (folder / "config.json").exists():
        build_tiny(folder, family="gpt2", layers=a.layers, d_model=a.d_model, heads=a.heads, max_positions=max(512, a.context_size), vocab_size=2048, seed=0)
    n_docs = max(50, a.tokens // 40)
    corpus = write_jsonl(work / "corpus.jsonl", synthetic_docs(n_docs, seed=1))

    def job(name: str, hooks: tuple[str, ...]) -> ExtractSpec:
        return ExtractSpec(
            store=str(work / "acts"), name=name, model={"id": str(folder)}, corpus={"path": str(corpus)}, hooks=list(hooks),
            tokenize={"context_size": a.context_size}, dtype=a.dtype,
            compute={"unit_contexts": a.unit_contexts, "batch_tokens": a.batch_tokens},
        )

    last = f"blocks.{a.layers - 1}.hook_resid_post"
    spec = job("plan", (last,))
    p = prepare(spec, store.open(spec.store))
    ctx = plan(p, use_ray=False).all_contexts()
    token_id = ctx.token_id
    per_batch = max(1, a.batch_tokens // a.context_size)
    n_tok = int(token_id.size)
    params = sum(np.prod(s) for s in [(a.d_model, 3 * a.d_model), (a.d_model, a.d_model), (a.d_model, 4 * a.d_model), (4 * a.d_model, a.d_model)]) * a.layers
    print(f"machine: {cpus} CPU cores, torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"model: GPT-2 shape, {a.layers} layers, d_model {a.d_model}, ~{params / 1e6:.1f}M block parameters; "
          f"{n_tok:,} tokens = {len(token_id)} contexts x {a.context_size}, {a.batch_tokens} tokens per batch, {a.unit_contexts} contexts per unit")

    # Shared CPUs drift by 2x over minutes: measure every contender in each of `rounds`
    # interleaved rounds over the same tokens and keep each one's best run.
    bare: list[float] = []
    one: list = []
    every: list = []
    sl: list[float] = []
    sl_error = None
    with connect(None, num_cpus=cpus, log_to_driver=False):  # a private Ray on free ports
        for rnd in range(a.rounds):
            one.append(run_extract(job(f"one-hook-{rnd}", (last,)), progress=False))
            if rnd == 0:
                driver_rss = rss_mb()  # the driver's own peak: planning, tokenization tasks, the pool
            every.append(run_extract(job(f"all-resid-post-{rnd}", ("blocks.*.hook_resid_post",)), progress=False))
            bare.append(bare_loop(folder, token_id, a.unit_contexts, per_batch, cpus, a.warmup_s if rnd == 0 else 3.0))
            if not a.skip_sae_lens and sl_error is None:
                try:
                    sl.append(sae_lens_rate(folder, token_id, a.layers - 1, per_batch, a.d_model, work / f"sl-{rnd}"))
                except Exception as e:  # report, do not hide the other figures
                    sl_error = f"{type(e).__name__}: {e}"
            print(f"round {rnd}: bare {bare[-1]:,.0f}, pipeline 1 hook {one[-1].steady_tokens_per_s:,.0f}, "
                  f"all resid_post {every[-1].steady_tokens_per_s:,.0f}" + (f", sae-lens {sl[-1]:,.0f}" if len(sl) > rnd else "") + " tokens/s", flush=True)
    base = max(bare)
    print(f"\nbest of {a.rounds} interleaved rounds, same model, same {n_tok:,} tokens, same batches:")
    print(f"{'bare torch.no_grad() forward loop:':45s}{base:10,.0f} tokens/s   (the bound)")
    for label, runs in (("pipeline, 1 hook (" + last + ")", one), (f"pipeline, all {a.layers} resid_post", every)):
        r = max(runs, key=lambda x: x.steady_tokens_per_s)
        assert r.tokens == n_tok
        bps = r.bytes_written * (r.steady_tokens / r.tokens) / r.steady_seconds
        print(
            f"{label + ':':45s}{r.steady_tokens_per_s:10,.0f} tokens/s   ratio {r.steady_tokens_per_s / base:.2f}   "
            f"{bps / 2**20:7.1f} MiB/s written ({a.dtype})   [job end to end incl. Ray tokenization + model load: {r.seconds:.1f}s]"
        )
    best_one = max(r.steady_tokens_per_s for r in one)
    if sl:
        print(f"{'sae-lens CacheActivationsRunner, 1 hook:':45s}{max(sl):10,.0f} tokens/s   pipeline/sae-lens {best_one / max(sl):.2f}")
    elif sl_error:
        print(f"sae-lens CacheActivationsRunner: failed: {sl_error}")
    print(f"peak RSS: driver {driver_rss:,.0f} MiB (after its first job, before the bare loop ran in it), "
          f"worker {max(r.worker_peak_rss for r in one + every) / 2**20:,.0f} MiB")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
