"""Extraction throughput, as ratios measured in one run on this machine.

    python benchmarks/extract.py                  # a few minutes on 2 CPU cores
    python benchmarks/extract.py --layers 6 --d-model 512 --tokens 400000   # bigger
    python benchmarks/extract.py --case vision    # a ViT over generated images instead
    python benchmarks/extract.py --case diffusion # a DiT over generated images at several timesteps
    python benchmarks/extract.py --case capture   # every mlp.hook_post + attn.hook_z vs TransformerLens run_with_cache
    python benchmarks/extract.py --rounds 1 --tokens 8000 --skip-sae-lens --warmup-s 0   # a smoke run

Builds a seeded GPT-2-shaped model locally (no download) and a synthetic corpus, plans the
contexts once, then times over exactly the same token batches:

* the bound: a bare ``torch.inference_mode()`` forward loop over the same batches on the same
  model (what the workers compute under);
* the pipeline (``run_extract`` on a private Ray) saving one hook (the last block's resid_post,
  so the whole model runs), and saving every block's resid_post, with bytes/s;
* sae-lens's ``CacheActivationsRunner`` on the same local model folder and the same tokens
  (one hook; it writes a Hugging Face ``datasets`` cache);
* peak RSS of the driver, of a worker and of a bare-loop process.

Every baseline (the bare loop, sae-lens) runs in a fresh process of its own, started with the
settings a pipeline CPU worker computes with: the torch thread count the pool gives a worker
(``pipeline.executor.pool_shape``), ``OMP_NUM_THREADS`` as Ray sets it for an actor holding that
many CPUs, and ``TOKENIZERS_PARALLELISM=false`` as the private Ray's runtime environment sets it.
A loop run in the driver instead shares the process with whatever the driver did before
(tokenization tasks, the pool, another library's threads) and once ran at 4.7k tokens/s while
the pipeline ran at 11.1k: its ratio meant nothing.

Shared CPUs drift by up to 2x over minutes, so baselines and contenders alternate: a bare loop,
then each round runs the pipeline (1 hook, then every resid_post), sae-lens, and another bare
loop. Each round's ratios are taken against the mean of the two bare loops bracketing it, and
every figure and every ratio is printed as its median and its spread (min..max) over
``--rounds`` rounds, never the best alone. Pipeline throughput is the steady rate (units after
the first, once the worker has loaded the model; a bare-loop process warms up over at least
one unit for the same reason); the end-to-end job time, which adds Ray tasks for tokenization
and the model load, is printed beside it. The load average is printed at the start and the end:
a run taken while other work ran is noise.

The vision case (``--case vision``) builds a seeded ViT (``--vision-layers``, ``--vision-d``,
224 x 224 images in 16 x 16 patches: 197 tokens an image) and ``--images`` generated PNG images
(256 x 256, resized by the model's processor), then times images/s of the pipeline (1 hook: the
last block's resid_post; steady rate, as for text) against a bare forward loop over the very
same preprocessed pixel batches (preprocessed before the clock starts), run twice: in a fresh
process with the worker's settings while no Ray runs (bracketing each pipeline run, which gets
a fresh Ray), and in a Ray actor holding the worker's CPUs right after the pipeline (the same
kind of process the pipeline computes in, Ray's processes beside it); it reports both ratios
(median and spread) and the share of the workers' time spent decoding and preprocessing
images. Workers do that for a unit before taking the model, while the actor's other call
computes the previous unit, so it is off the model's critical path as long as it takes less
time than a forward pass of a unit.

The diffusion case (``--case diffusion``) builds a seeded latent DiT pipeline
(``pipeline.tiny.build_tiny_diffusion``: a small VAE, ``--diffusion-layers`` blocks of width
``--diffusion-d``, 2 x 2 latent patches of ``--diffusion-size`` images) and ``--images``
generated images, and times images x timesteps per second (``--timesteps``; one context per
(image, timestep); 1 hook: the last block's resid_post) of the pipeline against a bare loop of
the same denoiser forwards (``DiTTransformer2DModel`` called on the noised latents, timesteps and
null classes) over the very same batches, prepared before the clock starts (VAE-encoded and
noised by the pipeline's own code, so the inputs are identical); the pipeline's rate includes
what the bare loop leaves out: decoding and preprocessing, the VAE encoding (once per image
and unit), the noise, the hooks' copies and the writes. As in the vision case the bare loop
runs in a fresh process with the worker's settings bracketing each pipeline run, and in a Ray
actor holding the worker's CPUs right after it; both ratios are reported.

The capture case (``--case capture``) uses the text case's model, tokens and batches and
stores every layer's ``mlp.hook_post`` and ``attn.hook_z`` (``[tokens, heads * d_head]``). Each
round runs the canonical case (the pipeline, 1 hook: the last block's resid_post), the capture,
and TransformerLens in a fresh process with the worker's settings: a ``HookedTransformer``
built from a ``HookedTransformerConfig`` with the model folder's GPT-2 weights converted by
``transformer_lens.pretrained.weight_conversions`` (no folding; its logits checked against the
Hugging Face model's), timed over the same batches with its plain forward pass and then with
``run_with_cache(names_filter=...)`` keeping the same hooks in memory, both with
``return_type=None`` (no unembedding, as the bare loop's ``AutoModel``). Bare loops bracket each
round, as in the text case.

The ``round N: bare ..., pipeline 1 hook ..., all resid_post ...`` lines keep the format of
earlier versions of this script: ``benchmarks/compare_revisions.py`` reads them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import load_average  # noqa: E402

from strata import store  # noqa: E402
from strata.pipeline.cluster import ClusterShape, connect  # noqa: E402
from strata.pipeline.config import ExtractSpec  # noqa: E402
from strata.pipeline.executor import ActorPool, pool_shape  # noqa: E402
from strata.pipeline.extract import plan, prepare, run_extract  # noqa: E402
from strata.pipeline.images import ImageSource  # noqa: E402
from strata.pipeline.tiny import build_tiny, build_tiny_diffusion, build_tiny_vision, synthetic_docs, synthetic_images, write_jsonl  # noqa: E402
from strata.pipeline.vision import load_processor, preprocess  # noqa: E402

CHILD_FLAG = "--baseline-job"  # internal: run one baseline described by a job file, in this fresh process
VIT_TOKENS = 197  # 224 x 224 in 16 x 16 patches, plus CLS


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device() -> torch.device:
    """Where a worker computes: the first GPU when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def spread(xs: Sequence[float], fmt: str = ",.0f") -> str:
    """``median (min..max)``: how a figure measured once per round is reported."""
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}..{max(xs):{fmt}})"


# -- the worker's settings, and baselines in fresh processes ---------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What a pipeline worker computes with, so a baseline process can compute with the same."""

    threads: int | None
    """torch threads, set in the computing thread (``ActorPool.threads``; None: a GPU worker
    keeps torch's default)."""
    num_cpus: int
    """CPUs the worker's actor holds: Ray sets ``OMP_NUM_THREADS`` to this in an actor's process
    unless the job's environment sets it (``ray._private.utils.set_omp_num_threads_if_unset``)."""

    @classmethod
    def of(cls, shape: ActorPool) -> WorkerSettings:
        return cls(threads=shape.threads, num_cpus=shape.num_cpus)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, self.num_cpus)))
        env["TOKENIZERS_PARALLELISM"] = "false"  # the private Ray's runtime env (pipeline/cluster.py)
        return env

    def describe(self) -> str:
        threads = "torch's default" if self.threads is None else str(self.threads)
        return f"torch threads {threads}, OMP_NUM_THREADS={self.env()['OMP_NUM_THREADS']}, TOKENIZERS_PARALLELISM=false"


@dataclass(frozen=True)
class Baseline:
    """What a baseline process reports."""

    rate: float  # tokens/s (text) or images/s (vision)
    peak_rss_mib: float
    threads: int  # torch's thread count in that process, read back
    forward_rate: float | None = None  # transformer-lens: its own forward pass without the cache, same process


def run_baseline(kind: str, settings: WorkerSettings, work: Path, **args: Any) -> Baseline:
    """Run one baseline (``kind`` in :func:`child_main`) in a fresh Python process started with
    the worker's settings; its figures come back through a JSON file (libraries print to stdout)."""
    tag = uuid.uuid4().hex[:8]
    job, result = work / f"baseline-{tag}.json", work / f"baseline-{tag}.result.json"
    job.write_text(json.dumps({"kind": kind, "threads": settings.threads, "result": str(result), **args}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, str(job)], env=settings.env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job.unlink(missing_ok=True)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the {kind} baseline process failed (exit {proc.returncode}): {tail}")
    out = json.loads(result.read_text())
    result.unlink()
    return Baseline(rate=out["rate"], peak_rss_mib=out["peak_rss_mib"], threads=out["threads"], forward_rate=out.get("forward_rate"))


def child_main(job_path: str) -> int:
    """Entry point of a baseline process: set the worker's torch threads, run the job, write its figures."""
    job = json.loads(Path(job_path).read_text())
    if job["threads"]:
        torch.set_num_threads(job["threads"])  # as the worker does, before its first forward pass
    quiet_libraries()
    kind = job["kind"]
    forward_rate = None
    if kind == "bare":
        rate = bare_loop(Path(job["folder"]), np.load(job["tokens"]), job["unit_contexts"], job["per_batch"], job["warmup_s"])
    elif kind == "bare-vision":
        rate = bare_vision_loop(Path(job["folder"]), torch.from_numpy(np.load(job["pixels"])), job["unit_contexts"],
                                job["per_batch"], job["warmup_s"])
    elif kind == "bare-diffusion":
        z = np.load(job["inputs"])
        rate = bare_diffusion_loop(Path(job["folder"]), torch.from_numpy(z["x_t"]), z["timesteps"], z["classes"], job["unit_contexts"],
                                   job["per_batch"], job["warmup_s"])
    elif kind == "sae-lens":
        rate = sae_lens_rate(Path(job["folder"]), np.load(job["tokens"]), job["hook_layer"], job["per_batch"], job["d"], Path(job["out"]))
    elif kind == "transformer-lens":
        rate, forward_rate = transformer_lens_rates(Path(job["folder"]), np.load(job["tokens"]), job["unit_contexts"], job["per_batch"],
                                                    job["warmup_s"])
    else:
        raise SystemExit(f"unknown baseline kind {kind!r}: expected bare, bare-vision, sae-lens or transformer-lens")
    Path(job["result"]).write_text(json.dumps({"rate": rate, "peak_rss_mib": rss_mb(), "threads": torch.get_num_threads(),
                                               "forward_rate": forward_rate}))
    return 0


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def unit_batches(n: int, unit_contexts: int, per_batch: int) -> list[slice]:
    """The pipeline's batches: units cut into batches of ``per_batch`` contexts (a unit's last
    batch may be shorter; a batch never crosses a unit)."""
    return [slice(c0, min(u0 + unit_contexts, c0 + per_batch, n)) for u0 in range(0, n, unit_contexts)
            for c0 in range(u0, min(u0 + unit_contexts, n), per_batch)]


def timed_loop(forward: Any, batches: list[Any], first_unit: int, warmup_s: float) -> float:
    """Seconds of one pass of ``forward`` over ``batches``, after a warm-up over the first
    unit's ``first_unit`` batches (the pipeline's steady rate leaves its first unit out) that
    goes on for at least ``warmup_s`` (on shared CPUs the first seconds run slower)."""
    dev = device()
    with torch.inference_mode():  # what the workers use (no_grad is a little slower)
        t_warm = time.perf_counter()
        for b in batches[:first_unit]:
            forward(b)
        while time.perf_counter() - t_warm < warmup_s:
            for b in batches[:first_unit]:
                forward(b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for b in batches:
            forward(b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0


def bare_loop(folder: Path, token_id: np.ndarray, unit_contexts: int, per_batch: int, warmup_s: float) -> float:
    """tokens/s of a plain forward loop over the pipeline's batches."""
    from transformers import AutoModel

    dev = device()
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    ids = torch.from_numpy(token_id.astype(np.int64))
    cuts = unit_batches(len(ids), unit_contexts, per_batch)
    batches = [ids[c].to(dev) for c in cuts]
    dt = timed_loop(lambda b: model(input_ids=b, use_cache=False), batches, -(-unit_contexts // per_batch), warmup_s)
    return ids.numel() / dt


def bare_vision_loop(folder: Path, pixels: torch.Tensor, unit_contexts: int, per_batch: int, warmup_s: float) -> float:
    """images/s of a plain forward loop over already preprocessed pixel batches."""
    from transformers import ViTModel

    dev = device()
    model = ViTModel.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    batches = [pixels[c].to(dev) for c in unit_batches(len(pixels), unit_contexts, per_batch)]
    dt = timed_loop(lambda b: model(pixel_values=b), batches, -(-unit_contexts // per_batch), warmup_s)
    return len(pixels) / dt


def bare_diffusion_loop(folder: Path, x_t: torch.Tensor, timesteps: np.ndarray, classes: np.ndarray, unit_contexts: int, per_batch: int,
                        warmup_s: float) -> float:
    """contexts (images x timesteps) per second of a plain loop of the DiT's forwards over already
    noised latents, in the pipeline's batches."""
    import diffusers

    dev = device()
    model = diffusers.DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32).to(dev).eval()
    t_all, c_all = torch.from_numpy(timesteps.astype(np.int64)), torch.from_numpy(classes.astype(np.int64))
    batches = [(x_t[c].to(dev), t_all[c].to(dev), c_all[c].to(dev)) for c in unit_batches(len(x_t), unit_contexts, per_batch)]
    dt = timed_loop(lambda b: model(b[0], timestep=b[1], class_labels=b[2], return_dict=False), batches, -(-unit_contexts // per_batch),
                    warmup_s)
    return len(x_t) / dt


def sae_lens_rate(folder: Path, token_id: np.ndarray, hook_layer: int, per_batch: int, d: int, out: Path) -> float:
    """tokens/s of sae-lens's CacheActivationsRunner on the same model folder and tokens."""
    import datasets
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig  # lazy: only this baseline's process needs it

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
        dtype="float32", device=device().type, prepend_bos=False, streaming=False, buffer_size_gb=(n_tokens * d * 4 + 1) / 1e9,
    )
    if cfg.n_buffers != 1 or cfg.n_batches_in_buffer * cfg.n_tokens_in_batch != n_tokens:
        raise RuntimeError(f"sae-lens sized {cfg.n_buffers} buffers of {cfg.n_batches_in_buffer} batches for {n_tokens} tokens: "
                           "expected one buffer holding exactly the benchmark's tokens")
    warnings.filterwarnings("ignore", module="sae_lens")
    runner = CacheActivationsRunner(cfg, override_dataset=ds)
    t0 = time.perf_counter()
    runner.run()
    return n_tokens / (time.perf_counter() - t0)


CAPTURE_HOOKS = ("blocks.*.mlp.hook_post", "blocks.*.attn.hook_z")  # the capture case's hooks, every layer


def tl_names_filter(name: str) -> bool:
    """TransformerLens's names for the capture case's hooks (module level: a lambda would do the same)."""
    return name.endswith("mlp.hook_post") or name.endswith("attn.hook_z")


def hooked_transformer(folder: Path) -> Any:
    """A TransformerLens ``HookedTransformer`` holding the GPT-2 weights saved in ``folder``,
    unprocessed (no folding or centering), so its hooks hold what the Hugging Face model computes;
    checked against the Hugging Face model's logits before any timing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # lazy: only this baseline's process needs it
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights  # lazy: as above
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    c = hf.config
    if c.model_type != "gpt2":
        raise RuntimeError(f"the transformer-lens baseline converts GPT-2 weights; {folder} holds a {c.model_type} model")
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
        eps=c.layer_norm_epsilon, positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device=device().type,
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.eval()
    probe = torch.arange(min(64, c.vocab_size), dtype=torch.int64).reshape(2, -1) % c.vocab_size
    with torch.inference_mode():
        gap = (model(probe.to(device())).cpu() - hf(input_ids=probe).logits).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"the HookedTransformer built from {folder} differs from the Hugging Face model by {gap:.2e} in its logits")
    return model


def transformer_lens_rates(folder: Path, token_id: np.ndarray, unit_contexts: int, per_batch: int, warmup_s: float) -> tuple[float, float]:
    """tokens/s of TransformerLens's ``run_with_cache`` keeping every layer's ``mlp.hook_post``
    and ``attn.hook_z`` over the pipeline's batches, and of its plain forward pass in the same
    process right before it. ``return_type=None`` stops after the final norm, as the bare loop's
    ``AutoModel`` does (no unembedding); the cache stays in memory (nothing is written)."""
    model = hooked_transformer(folder)
    dev = device()
    ids = torch.from_numpy(token_id.astype(np.int64))
    batches = [ids[c].to(dev) for c in unit_batches(len(ids), unit_contexts, per_batch)]
    first = -(-unit_contexts // per_batch)
    dt_forward = timed_loop(lambda b: model(b, return_type=None), batches, first, warmup_s)
    dt_cache = timed_loop(lambda b: model.run_with_cache(b, names_filter=tl_names_filter, return_type=None), batches, first, 0.0)
    return ids.numel() / dt_cache, ids.numel() / dt_forward


class BareVisionActor:
    """The bare loop in a Ray actor holding the pipeline worker's CPUs: the same kind of process
    the pipeline computes in, with Ray's own processes running beside it."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def rate(self, pixels: torch.Tensor, unit_contexts: int, per_batch: int, threads: int | None) -> float:
        if threads:
            torch.set_num_threads(threads)  # in this thread, as the worker does: OpenMP's count is per thread
        return bare_vision_loop(self.folder, pixels, unit_contexts, per_batch, 3.0)


class BareDiffusionActor:
    """The bare diffusion loop in a Ray actor holding the pipeline worker's CPUs."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def rate(self, x_t: torch.Tensor, timesteps: np.ndarray, classes: np.ndarray, unit_contexts: int, per_batch: int,
             threads: int | None) -> float:
        if threads:
            torch.set_num_threads(threads)
        return bare_diffusion_loop(self.folder, x_t, timesteps, classes, unit_contexts, per_batch, 3.0)


# -- the two cases -----------------------------------------------------------------------------


def machine_line(cpus: int) -> str:
    gpu = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"machine: {cpus} CPU cores, torch {torch.__version__}, {gpu}; {load_average()} at the start"


def vision_case(a: argparse.Namespace, work: Path, cpus: int) -> None:
    import ray  # lazy: only this case starts actors of its own

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
                           compute={"unit_contexts": a.vision_unit, "batch_tokens": a.vision_batch * VIT_TOKENS})

    if a.images <= a.vision_unit:
        raise SystemExit(f"--images {a.images} fill at most one unit of --vision-unit {a.vision_unit}: "
                         "the pipeline's steady rate needs units after the first; raise --images or lower --vision-unit")
    spec = job("plan")
    p = prepare(spec, store.open(spec.store))
    if p.image is None:
        raise RuntimeError(f"the generated ViT in {folder} was not recognised as an image model")
    src = ImageSource(spec.corpus, p.scan.files, p.scan.locators)
    proc = load_processor(str(folder), p.image.processor_overrides)
    t0 = time.perf_counter()
    pixels = preprocess(proc, src.read(np.arange(len(src))))
    pre_s = time.perf_counter() - t0
    np.save(work / "pixels.npy", pixels)  # for the bare-loop processes: the very same pixel batches
    n = len(pixels)
    print(machine_line(cpus))
    print(f"model: ViT, {a.vision_layers} layers, d_model {a.vision_d}, 224x224 images in 16x16 patches ({VIT_TOKENS} tokens); {n} images, "
          f"{a.vision_batch} images per batch, {a.vision_unit} per unit; decoding + preprocessing all of them in one thread: "
          f"{pre_s:.2f}s ({n / pre_s:,.0f} images/s)")
    # The worker's settings, from the pool's own sizing of the private Ray each round starts
    # (this machine's GPUs, `cpus` CPUs), without starting one more Ray for it.
    settings = WorkerSettings.of(pool_shape(ClusterShape(cpus=cpus, gpus=torch.cuda.device_count(), max_node_cpus=cpus)))
    print(f"each bare loop runs in a fresh process with the worker's settings: {settings.describe()}")

    def bare() -> Baseline:
        return run_baseline("bare-vision", settings, work, folder=str(folder), pixels=str(work / "pixels.npy"),
                            unit_contexts=a.vision_unit, per_batch=a.vision_batch, warmup_s=a.warmup_s)

    bares = [bare()]
    runs: list = []
    ratios: list[float] = []
    in_ray: list[float] = []
    actor_ratios: list[float] = []
    for rnd in range(a.rounds):
        # The bare loop runs while no Ray runs (no Ray processes share the cores with it), right
        # before and right after each pipeline run, which gets a fresh Ray: the pipeline's rate
        # is compared with the mean of the two (the machine's speed drifts over minutes).
        with connect(None, num_cpus=cpus, log_to_driver=False):  # a private Ray on free ports
            runs.append(run_extract(job(f"vit-{rnd}"), progress=False))
            # The same loop in a Ray actor holding the worker's CPUs, right after the pipeline.
            actor = ray.remote(num_cpus=settings.num_cpus)(BareVisionActor).remote(str(folder))
            in_ray.append(ray.get(actor.rate.remote(ray.put(torch.from_numpy(pixels)), a.vision_unit, a.vision_batch, settings.threads)))
        bares.append(bare())
        before, after = bares[-2].rate, bares[-1].rate
        r = runs[-1]
        rate = r.steady_tokens_per_s / VIT_TOKENS
        ratios.append(rate / ((before + after) / 2))
        actor_ratios.append(rate / in_ray[-1])
        print(f"round {rnd}: pipeline {rate:,.1f} images/s steady ({r.steady_tokens / VIT_TOKENS:.0f} images after the first unit) | bare "
              f"{before:,.1f} before, {after:,.1f} after | ratio {ratios[-1]:.2f} | bare loop in a Ray actor right after the pipeline "
              f"{in_ray[-1]:,.1f}: ratio {actor_ratios[-1]:.2f} | load average {os.getloadavg()[0]:.1f}", flush=True)
    rates = [r.steady_tokens_per_s / VIT_TOKENS for r in runs]
    r = runs[len(runs) // 2]
    share = r.prepare_seconds / (r.prepare_seconds + r.compute_seconds)
    print(f"\n{a.rounds} rounds, same model, same {n} images, same batches; figures are median (min..max) over rounds; "
          f"the bare loop ran at {spread([b.rate for b in bares], ',.1f')} images/s over the run (the machine's drift):")
    print(f"pipeline (decode + preprocess + forward + write): {spread(rates, ',.1f')} images/s steady "
          f"(job end to end incl. decode checks + model load: {spread([x.seconds for x in runs], '.1f')} s)")
    print(f"pipeline vs the bare forward loop over preprocessed pixels in a fresh process bracketing it: ratio {spread(ratios, '.2f')}")
    print(f"pipeline vs the same bare loop in a Ray actor holding the worker's CPUs (run right after it, Ray still up): "
          f"ratio {spread(actor_ratios, '.2f')}; that loop ran at {spread(in_ray, ',.1f')} images/s")
    print(f"workers' time decoding + preprocessing (round {len(runs) // 2}): {r.prepare_seconds:.2f}s of "
          f"{r.prepare_seconds + r.compute_seconds:.2f}s ({100 * share:.1f}%), done before each unit takes the model, "
          f"overlapping the other unit's forward pass")
    print(f"peak RSS: bare-loop process {max(b.peak_rss_mib for b in bares):,.0f} MiB, worker "
          f"{max(x.worker_peak_rss for x in runs) / 2**20:,.0f} MiB; {load_average()} at the end")


def diffusion_case(a: argparse.Namespace, work: Path, cpus: int) -> None:
    import ray  # lazy: only this case starts actors of its own

    from strata.pipeline.diffusion import DiffusionRunner

    folder = work / "dit"
    if not (folder / "model_index.json").exists():
        build_tiny_diffusion(folder, kind="dit", image_size=a.diffusion_size, layers=a.diffusion_layers, width=a.diffusion_d, seed=0)
    imgs = work / "images"
    if not (imgs / "metadata.jsonl").exists():
        synthetic_images(imgs, a.images, seed=0, size=a.diffusion_size + a.diffusion_size // 4)
    timesteps = [int(t) for t in a.timesteps.split(",")]
    T = len(timesteps)

    def job(name: str) -> ExtractSpec:
        return ExtractSpec(store=str(work / "acts"), name=name, model={"id": str(folder)}, corpus={"path": str(imgs), "format": "images"},
                           hooks=[f"blocks.{a.diffusion_layers - 1}.hook_resid_post"], dtype=a.dtype,
                           diffusion={"timesteps": timesteps, "noise_seed": 0},
                           compute={"unit_contexts": a.diffusion_unit, "batch_tokens": a.diffusion_batch * 10**6})

    spec = job("plan")
    p = prepare(spec, store.open(spec.store))
    d = p.diffusion
    if d is None:
        raise RuntimeError(f"the generated DiT in {folder} was not recognised as a diffusion model")
    tokens = d.tokens
    spec = spec.updated(compute={"unit_contexts": a.diffusion_unit, "batch_tokens": a.diffusion_batch * tokens})
    pl = plan(p)
    n = pl.n_contexts
    if n <= a.diffusion_unit:
        raise SystemExit(f"--images x timesteps ({n}) fill at most one unit of --diffusion-unit {a.diffusion_unit}: raise --images")
    # The bare loop's inputs: the pipeline's own noised latents, per context (before any clock starts).
    runner = DiffusionRunner(str(folder), d, torch.device("cpu"))
    ctx = runner.prepare(pl.all_contexts())
    with torch.inference_mode():
        x0 = runner.encode(torch.from_numpy(ctx.pixels))
        x_t = runner.noised(x0[torch.from_numpy(ctx.image_index)], ctx.image_ids[ctx.image_index], ctx.timestep)
    classes = np.full(n, d.null_class, np.int64)
    ts_all = np.asarray(ctx.timestep, np.int64)
    np.savez(work / "inputs.npz", x_t=x_t.numpy(), timesteps=ts_all, classes=classes)
    del runner, ctx
    pl.packer.source.remove()
    print(machine_line(cpus))
    print(f"model: DiT, {a.diffusion_layers} layers, width {a.diffusion_d}, {a.diffusion_size}x{a.diffusion_size} images -> "
          f"{a.diffusion_size // 2}x{a.diffusion_size // 2} latents in 2x2 patches ({tokens} tokens); {n // T} images x {T} timesteps "
          f"= {n} contexts, {a.diffusion_batch} per batch, {a.diffusion_unit} per unit")
    settings = WorkerSettings.of(pool_shape(ClusterShape(cpus=cpus, gpus=torch.cuda.device_count(), max_node_cpus=cpus)))
    print(f"each bare loop runs in a fresh process with the worker's settings: {settings.describe()}")

    def bare() -> Baseline:
        return run_baseline("bare-diffusion", settings, work, folder=str(folder), inputs=str(work / "inputs.npz"),
                            unit_contexts=a.diffusion_unit, per_batch=a.diffusion_batch, warmup_s=a.warmup_s)

    bares = [bare()]
    runs: list = []
    ratios: list[float] = []
    in_ray: list[float] = []
    actor_ratios: list[float] = []
    for rnd in range(a.rounds):
        with connect(None, num_cpus=cpus, log_to_driver=False):
            runs.append(run_extract(spec.updated(name=f"dit-{rnd}"), progress=False))
            actor = ray.remote(num_cpus=settings.num_cpus)(BareDiffusionActor).remote(str(folder))
            in_ray.append(ray.get(actor.rate.remote(ray.put(x_t), ray.put(ts_all), ray.put(classes), a.diffusion_unit, a.diffusion_batch,
                                                    settings.threads)))
        bares.append(bare())
        before, after = bares[-2].rate, bares[-1].rate
        r = runs[-1]
        rate = r.steady_tokens_per_s / tokens
        ratios.append(rate / ((before + after) / 2))
        actor_ratios.append(rate / in_ray[-1])
        print(f"round {rnd}: pipeline {rate:,.1f} contexts/s steady ({r.steady_tokens / tokens:.0f} contexts after the first unit) | bare "
              f"{before:,.1f} before, {after:,.1f} after | ratio {ratios[-1]:.2f} | bare loop in a Ray actor right after the pipeline "
              f"{in_ray[-1]:,.1f}: ratio {actor_ratios[-1]:.2f} | load average {os.getloadavg()[0]:.1f}", flush=True)
    rates = [r.steady_tokens_per_s / tokens for r in runs]
    print(f"\n{a.rounds} rounds, same pipeline, same {n} (image, timestep) contexts, same batches; median (min..max) over rounds; "
          f"the bare loop ran at {spread([b.rate for b in bares], ',.1f')} contexts/s over the run:")
    print(f"pipeline (decode + preprocess + VAE + noise + forward + write): {spread(rates, ',.1f')} images x timesteps / s steady "
          f"(job end to end: {spread([x.seconds for x in runs], '.1f')} s)")
    print(f"pipeline vs the bare denoiser loop in a fresh process bracketing it: ratio {spread(ratios, '.2f')}")
    print(f"pipeline vs the same bare loop in a Ray actor holding the worker's CPUs: ratio {spread(actor_ratios, '.2f')}; "
          f"that loop ran at {spread(in_ray, ',.1f')} contexts/s")
    print(f"peak RSS: bare-loop process {max(b.peak_rss_mib for b in bares):,.0f} MiB, worker "
          f"{max(x.worker_peak_rss for x in runs) / 2**20:,.0f} MiB; {load_average()} at the end")


@dataclass(frozen=True)
class TextSetup:
    """What both text cases share: the model folder, the planned contexts (saved for the
    baseline processes) and a spec maker for the pipeline's jobs."""

    folder: Path
    corpus: Path
    token_id: np.ndarray
    per_batch: int
    last: str  # the last block's resid_post: one hook that makes the whole model run

    @property
    def n_tok(self) -> int:
        return int(self.token_id.size)


def text_setup(a: argparse.Namespace, work: Path, cpus: int) -> TextSetup:
    """Build the seeded GPT-2-shaped model and the synthetic corpus, plan the contexts once,
    save their tokens for the baseline processes and print the machine and model lines."""
    folder = work / "model"
    if not (folder / "config.json").exists():
        build_tiny(folder, family="gpt2", layers=a.layers, d_model=a.d_model, heads=a.heads, max_positions=max(512, a.context_size),
                   vocab_size=2048, seed=0)
    n_docs = max(50, a.tokens // 40)
    corpus = write_jsonl(work / "corpus.jsonl", synthetic_docs(n_docs, seed=1))
    last = f"blocks.{a.layers - 1}.hook_resid_post"
    spec = text_job(a, work, folder, corpus, "plan", (last,))
    p = prepare(spec, store.open(spec.store))
    token_id = plan(p, use_ray=False).all_contexts().token_id
    if len(token_id) <= a.unit_contexts:
        raise SystemExit(f"--tokens {a.tokens} packs into {len(token_id)} contexts, at most one unit of --unit-contexts {a.unit_contexts}: "
                         "the pipeline's steady rate needs units after the first; raise --tokens or lower --unit-contexts")
    np.save(work / "tokens.npy", token_id)  # for the baseline processes: the very same contexts
    t = TextSetup(folder=folder, corpus=corpus, token_id=token_id, per_batch=max(1, a.batch_tokens // a.context_size), last=last)
    d = a.d_model
    params = sum(np.prod(s) for s in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]) * a.layers
    print(machine_line(cpus))
    print(f"model: GPT-2 shape, {a.layers} layers, d_model {a.d_model}, ~{params / 1e6:.1f}M block parameters; "
          f"{t.n_tok:,} tokens = {len(token_id)} contexts x {a.context_size}, {a.batch_tokens} tokens per batch, {a.unit_contexts} contexts per unit")
    return t


def text_job(a: argparse.Namespace, work: Path, folder: Path, corpus: Path, name: str, hooks: tuple[str, ...]) -> ExtractSpec:
    return ExtractSpec(
        store=str(work / "acts"), name=name, model={"id": str(folder)}, corpus={"path": str(corpus)}, hooks=list(hooks),
        tokenize={"context_size": a.context_size}, dtype=a.dtype,
        compute={"unit_contexts": a.unit_contexts, "batch_tokens": a.batch_tokens},
    )


def text_case(a: argparse.Namespace, work: Path, cpus: int) -> None:
    t = text_setup(a, work, cpus)
    folder, per_batch, n_tok, last = t.folder, t.per_batch, t.n_tok, t.last

    def job(name: str, hooks: tuple[str, ...]) -> ExtractSpec:
        return text_job(a, work, folder, t.corpus, name, hooks)

    one: list = []
    every: list = []
    sl: list[float] = []
    sl_error = None
    r_one: list[float] = []
    r_every: list[float] = []
    r_sl: list[float] = []
    with connect(None, num_cpus=cpus, log_to_driver=False) as cluster:  # a private Ray on free ports
        # The settings run_extract gives its workers on this cluster (pipeline/extract.py sizes
        # the pool with pool_shape from the spec's compute section, left at its defaults here).
        settings = WorkerSettings.of(pool_shape(cluster.shape))
        print(f"each baseline runs in a fresh process with the worker's settings: {settings.describe()}", flush=True)
        base_args = {"folder": str(folder), "tokens": str(work / "tokens.npy"), "per_batch": per_batch}

        def bare() -> Baseline:
            return run_baseline("bare", settings, work, unit_contexts=a.unit_contexts, warmup_s=a.warmup_s, **base_args)

        bares = [bare()]
        for rnd in range(a.rounds):
            one.append(run_extract(job(f"one-hook-{rnd}", (last,)), progress=False))
            if rnd == 0:
                driver_rss = rss_mb()  # the driver's own peak: planning, tokenization tasks, the pool
            every.append(run_extract(job(f"all-resid-post-{rnd}", ("blocks.*.hook_resid_post",)), progress=False))
            if not a.skip_sae_lens and sl_error is None:
                try:
                    sl.append(run_baseline("sae-lens", settings, work, hook_layer=a.layers - 1, d=a.d_model,
                                           out=str(work / f"sl-{rnd}"), **base_args).rate)
                except RuntimeError as e:  # report, do not hide the other figures
                    sl_error = str(e)
            bares.append(bare())
            # Against the mean of the bare loops right before and right after this round.
            ref = (bares[-2].rate + bares[-1].rate) / 2
            r_one.append(one[-1].steady_tokens_per_s / ref)
            r_every.append(every[-1].steady_tokens_per_s / ref)
            if len(sl) > rnd:
                r_sl.append(one[-1].steady_tokens_per_s / sl[-1])
            print(f"round {rnd}: bare {ref:,.0f}, pipeline 1 hook {one[-1].steady_tokens_per_s:,.0f}, "
                  f"all resid_post {every[-1].steady_tokens_per_s:,.0f}" + (f", sae-lens {sl[-1]:,.0f}" if len(sl) > rnd else "")
                  + f" tokens/s | bare {bares[-2].rate:,.0f} before, {bares[-1].rate:,.0f} after | ratios 1 hook {r_one[-1]:.2f}, "
                  f"all {r_every[-1]:.2f}" + (f", pipeline/sae-lens {r_sl[-1]:.2f}" if len(sl) > rnd else "")
                  + f" | load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{a.rounds} interleaved rounds, same model, same {n_tok:,} tokens, same batches; figures are median (min..max) over "
          f"rounds, ratios per round against the mean of the two bare loops bracketing it:")
    print(f"{'bare torch.inference_mode() forward loop:':45s}{spread([b.rate for b in bares]):>28s} tokens/s   (the bound; "
          f"{len(bares)} fresh processes, torch threads {bares[0].threads})")
    for label, runs, ratios in (("pipeline, 1 hook (" + last + ")", one, r_one), (f"pipeline, all {a.layers} resid_post", every, r_every)):
        for r in runs:
            if r.tokens != n_tok:
                raise RuntimeError(f"{label}: the pipeline computed {r.tokens:,} tokens, the baselines {n_tok:,}: the figures would not compare")
        bps = [r.bytes_written * (r.steady_tokens / r.tokens) / r.steady_seconds for r in runs]
        print(
            f"{label + ':':45s}{spread([r.steady_tokens_per_s for r in runs]):>28s} tokens/s   ratio {spread(ratios, '.2f')}   "
            f"{statistics.median(bps) / 2**20:7.1f} MiB/s written ({a.dtype})   "
            f"[job end to end incl. Ray tokenization + model load: {spread([r.seconds for r in runs], '.1f')} s]"
        )
    if sl:
        print(f"{'sae-lens CacheActivationsRunner, 1 hook:':45s}{spread(sl):>28s} tokens/s   pipeline/sae-lens {spread(r_sl, '.2f')}")
    if sl_error:
        print(f"sae-lens CacheActivationsRunner: failed: {sl_error}")
    print(f"peak RSS: driver {driver_rss:,.0f} MiB (after its first job), worker {max(r.worker_peak_rss for r in one + every) / 2**20:,.0f} MiB, "
          f"bare-loop process {max(b.peak_rss_mib for b in bares):,.0f} MiB")
    print(f"{load_average()} at the end")


def capture_case(a: argparse.Namespace, work: Path, cpus: int) -> None:
    """Every layer's ``mlp.hook_post`` and ``attn.hook_z`` stored by the pipeline, against the
    bare forward loop and TransformerLens's ``run_with_cache`` with a names filter over the same
    batches; the canonical one-hook case runs in every round too, against the same bare loops."""
    t = text_setup(a, work, cpus)
    n_tok = t.n_tok
    acts = store.open(str(work / "acts"))
    one: list = []
    cap: list = []
    tl: list[Baseline] = []
    r_one: list[float] = []
    r_cap: list[float] = []
    r_tl: list[float] = []
    r_cap_tl: list[float] = []
    cap_hooks: list[str] = []
    with connect(None, num_cpus=cpus, log_to_driver=False) as cluster:  # a private Ray on free ports
        settings = WorkerSettings.of(pool_shape(cluster.shape))
        print(f"each baseline runs in a fresh process with the worker's settings: {settings.describe()}", flush=True)
        base_args = {"folder": str(t.folder), "tokens": str(work / "tokens.npy"), "per_batch": t.per_batch,
                     "unit_contexts": a.unit_contexts, "warmup_s": a.warmup_s}

        bares = [run_baseline("bare", settings, work, **base_args)]
        for rnd in range(a.rounds):
            one.append(run_extract(text_job(a, work, t.folder, t.corpus, f"one-hook-{rnd}", (t.last,)), progress=False))
            name = f"capture-{rnd}"
            cap.append(run_extract(text_job(a, work, t.folder, t.corpus, name, CAPTURE_HOOKS), progress=False))
            cap_hooks = acts.dataset(name).hooks
            acts.delete_dataset(name)  # hundreds of MiB a run: keep the page cache and the disk for the next ones
            tl.append(run_baseline("transformer-lens", settings, work, **base_args))
            bares.append(run_baseline("bare", settings, work, **base_args))
            ref = (bares[-2].rate + bares[-1].rate) / 2
            r_one.append(one[-1].steady_tokens_per_s / ref)
            r_cap.append(cap[-1].steady_tokens_per_s / ref)
            r_tl.append(tl[-1].rate / ref)
            r_cap_tl.append(cap[-1].steady_tokens_per_s / tl[-1].rate)
            print(f"round {rnd}: bare {ref:,.0f}, pipeline 1 hook {one[-1].steady_tokens_per_s:,.0f}, mlp.hook_post + attn.hook_z "
                  f"{cap[-1].steady_tokens_per_s:,.0f}, transformer-lens run_with_cache {tl[-1].rate:,.0f} (its forward alone "
                  f"{tl[-1].forward_rate:,.0f}) tokens/s | bare {bares[-2].rate:,.0f} before, {bares[-1].rate:,.0f} after | ratios 1 hook "
                  f"{r_one[-1]:.2f}, capture {r_cap[-1]:.2f}, transformer-lens {r_tl[-1]:.2f}, capture/transformer-lens {r_cap_tl[-1]:.2f} "
                  f"| load average {os.getloadavg()[0]:.1f}", flush=True)
    for label, runs in (("1 hook", one), ("capture", cap)):
        for r in runs:
            if r.tokens != n_tok:
                raise RuntimeError(f"{label}: the pipeline computed {r.tokens:,} tokens, the baselines {n_tok:,}: the figures would not compare")
    per_token = cap[-1].bytes_written / n_tok
    print(f"\n{a.rounds} interleaved rounds, same model, same {n_tok:,} tokens, same batches; figures are median (min..max) over "
          f"rounds, ratios per round against the mean of the two bare loops bracketing it; the capture stores {len(cap_hooks)} hooks "
          f"({', '.join(CAPTURE_HOOKS)}), {per_token:,.0f} bytes a token written ({a.dtype}):")
    print(f"{'bare torch.inference_mode() forward loop:':58s}{spread([b.rate for b in bares]):>28s} tokens/s   (the bound; "
          f"{len(bares)} fresh processes, torch threads {bares[0].threads})")
    for label, runs, ratios in ((f"pipeline, 1 hook ({t.last}):", one, r_one), ("pipeline, every mlp.hook_post + attn.hook_z:", cap, r_cap)):
        bps = [r.bytes_written * (r.steady_tokens / r.tokens) / r.steady_seconds for r in runs]
        print(f"{label:58s}{spread([r.steady_tokens_per_s for r in runs]):>28s} tokens/s   ratio {spread(ratios, '.2f')}   "
              f"{statistics.median(bps) / 2**20:7.1f} MiB/s written   [job end to end: {spread([r.seconds for r in runs], '.1f')} s]")
    print(f"{'capture / 1 hook, pipeline runs of the same round:':58s}{'':>28s}            "
          f"{spread([c.steady_tokens_per_s / o.steady_tokens_per_s for c, o in zip(cap, one, strict=True)], '.2f')}")
    print(f"{'transformer-lens run_with_cache, names filter:':58s}{spread([b.rate for b in tl]):>28s} tokens/s   ratio {spread(r_tl, '.2f')}   "
          f"pipeline capture / transformer-lens {spread(r_cap_tl, '.2f')}")
    fwd = [b.forward_rate for b in tl if b.forward_rate]
    print(f"{'transformer-lens forward alone (same process, no cache):':58s}{spread(fwd):>28s} tokens/s   "
          f"run_with_cache / its forward {spread([b.rate / b.forward_rate for b in tl if b.forward_rate], '.2f')}")
    print(f"peak RSS: worker {max(r.worker_peak_rss for r in one + cap) / 2**20:,.0f} MiB, bare-loop process "
          f"{max(b.peak_rss_mib for b in bares):,.0f} MiB, transformer-lens process {max(b.peak_rss_mib for b in tl):,.0f} MiB")
    print(f"{load_average()} at the end")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return child_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("text", "vision", "capture", "diffusion"), default="text")
    ap.add_argument("--timesteps", default="100,500,900", help="diffusion: timesteps, comma-separated")
    ap.add_argument("--diffusion-layers", type=int, default=6)
    ap.add_argument("--diffusion-d", type=int, default=256)
    ap.add_argument("--diffusion-size", type=int, default=64, help="diffusion: image side (the latents are half of it)")
    ap.add_argument("--diffusion-batch", type=int, default=16, help="diffusion: contexts per forward pass")
    ap.add_argument("--diffusion-unit", type=int, default=48, help="diffusion: contexts per unit")
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
    ap.add_argument("--warmup-s", type=float, default=5.0,
                    help="seconds of warm-up in every bare-loop process before its clock starts (at least one unit either way)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds, each bracketed by bare loops; every figure and ratio is reported as median (min..max)")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    work = Path(a.work or tempfile.mkdtemp(prefix="strata-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    try:
        {"text": text_case, "vision": vision_case, "capture": capture_case, "diffusion": diffusion_case}[a.case](a, work, cpus)
    finally:
        gc.collect()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
