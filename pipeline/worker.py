"""The model replica: runs units through the model with hooks and writes them to the store.

One :class:`UnitWorker` per GPU (or a CPU worker when there is none), a Ray actor of the
executor's pool (:mod:`pipeline.executor`), or one built in the job's own process with
``compute.executor: local``. Tests also use it directly, to compare it with a plain forward pass.

Each unit is computed in batches sized by tokens into one host buffer per hook (pinned memory
on CUDA, filled by non-blocking copies on a separate stream, so device-to-host copies overlap
the next layers' compute), then written and committed by :meth:`store.DatasetWriter.write_unit`.
The actor runs two calls at once under a compute lock: while one unit is being written, the
next one is already computing. Activations never pass through Ray's object store; a call
returns a small status dict.

Determinism: a unit's batches are a function of the unit alone (never of its neighbours), and
the torch thread count is set in the thread that computes (Ray runs calls on a thread pool,
and OpenMP's thread count is per thread), so a unit recomputed on the same machine and
software is bit-identical.

Tests inject faults by subclassing (``process`` or ``compute``), not through the environment.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from strata import store
from strata.pipeline.diffusion import DiffusionContexts, DiffusionPrep, DiffusionRunner
from strata.pipeline.hooks import Capture, HookSite, family_of, hook_sites
from strata.pipeline.models import ResolvedModel, load_model
from strata.pipeline.packing import Contexts
from strata.pipeline.sharded import ShardUnit
from strata.pipeline.vision import ImageContexts, ImagePrep, load_processor, preprocess

log = logging.getLogger(__name__)

_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WorkerConfig:
    store_uri: str
    dataset: str
    model: ResolvedModel
    model_type: str
    n_layers: int
    d_model: int
    dtype: str  # stored dtype
    batch_tokens: int
    threads: int | None = None
    storage_options: dict[str, Any] | None = None  # what the driver lets this worker have
    fence: int | None = None  # the job's lease generation: commits stop once it is not current
    image: ImagePrep | None = None  # image models: preprocessing (see pipeline.vision)
    module_sites: dict[str, HookSite] | None = None  # module:PATH hooks (their width found by the driver's dry forward)
    stop_after: str | None = None  # with module:PATH hooks: the hook that fires last
    diffusion: DiffusionPrep | None = None  # diffusion models: the denoiser, noise and hooks (see pipeline.diffusion)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class UnitWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        try:
            import transformers  # lazy: seconds to import; only the replica's model needs it, and only here

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except Exception:  # pragma: no cover - cosmetics only
            pass
        self.cfg = cfg
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        img = cfg.image
        self.diffusion = (DiffusionRunner(cfg.model.fetch(), cfg.diffusion, self.device, cfg.model.torch_dtype)
                          if cfg.diffusion is not None else None)
        self.model = None if self.diffusion else load_model(cfg.model, device=str(self.device), model_class=img.model_class if img else None)
        self.processor = (load_processor(cfg.model.fetch(), img.processor_overrides, model=cfg.model.id,
                                         trust_remote_code=cfg.model.trust_remote_code) if img else None)
        self.sites = {} if self.diffusion else {**hook_sites(family_of(cfg.model_type), cfg.n_layers, self.model.config),
                                                **(cfg.module_sites or {})}
        self.writer = store.open(cfg.store_uri, storage_options=cfg.storage_options, create=False).writer(cfg.dataset, fence=cfg.fence)
        self.out_dtype = _STORE_DTYPES[cfg.dtype]
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._compute = threading.Lock()
        self.units_done = 0

    # -- compute --------------------------------------------------------------------------

    def prepare(self, contexts: Contexts | ShardUnit) -> Contexts:
        """Model inputs that need no model: a sharded unit's contexts (built from its shard's
        tokens in the store), an image unit's pixel values (decoded and preprocessed here, outside
        the compute lock, while another unit computes)."""
        if isinstance(contexts, ShardUnit):
            contexts = contexts.load(self.writer.storage)
        if isinstance(contexts, DiffusionContexts):
            assert self.diffusion is not None, "a diffusion unit needs a diffusion model"
            return self.diffusion.prepare(contexts)
        if isinstance(contexts, ImageContexts) and contexts.pixels is None:
            assert self.processor is not None, "an image unit needs an image model"
            contexts.pixels = preprocess(self.processor, contexts.images, ids=contexts.doc_id[:, 0])
            contexts.images = []
        return contexts

    def compute(self, contexts: Contexts, hooks: list[str]) -> dict[str, torch.Tensor]:
        """Activations ``{hook: [rows, d]}`` of ``contexts`` on the host, in the stored dtype."""
        if self.cfg.threads and torch.get_num_threads() != self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)  # in this thread: OpenMP's count is per thread
        contexts = self.prepare(contexts)
        if self.diffusion is not None:
            assert isinstance(contexts, DiffusionContexts)
            return self.diffusion.compute(contexts, hooks, batch_tokens=self.cfg.batch_tokens, out_dtype=self.out_dtype,
                                          pin=self.device.type == "cuda")
        pixels = torch.from_numpy(contexts.pixels) if isinstance(contexts, ImageContexts) else None
        px_dtype = next(self.model.parameters()).dtype
        n, s = contexts.token_id.shape
        rows = n * s
        pin = self.device.type == "cuda"
        bufs = {h: torch.empty((rows, self.sites[h].width or self.cfg.d_model), dtype=self.out_dtype, pin_memory=pin) for h in hooks}
        per_batch = max(1, self.cfg.batch_tokens // s)
        ids_all = torch.from_numpy(contexts.token_id.astype("int64", copy=False))
        mask_all = torch.from_numpy(np.array(contexts.mask)) if contexts.padded else None  # a copy: Ray's arrays are read-only
        state = {"r0": 0, "r1": 0}

        def sink(hook: str, t: torch.Tensor) -> None:
            if hook not in bufs:
                return
            dst = bufs[hook][state["r0"] : state["r1"]]
            src = t.detach().reshape(-1, t.shape[-1])
            if self.copy_stream is None:
                dst.copy_(src)  # one pass: copy and cast to the stored dtype
                return
            # Copy on a side stream once the compute stream has produced `t`; compute goes on.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src.to(self.out_dtype), non_blocking=True)
            src.record_stream(self.copy_stream)

        with torch.inference_mode(), Capture(self.model, self.sites, hooks, sink, stop_after=self.cfg.stop_after) as cap:
            for c0 in range(0, n, per_batch):
                c1 = min(n, c0 + per_batch)
                state["r0"], state["r1"] = c0 * s, c1 * s
                if pixels is not None:
                    inputs: dict[str, Any] = {"pixel_values": pixels[c0:c1].to(self.device, dtype=px_dtype, non_blocking=True),
                                              **self.cfg.image.forward_kwargs()}  # type: ignore[union-attr]
                    cap.forward(**inputs)
                    continue
                inputs = {"input_ids": ids_all[c0:c1].to(self.device, non_blocking=True), "use_cache": False}
                if mask_all is not None:
                    inputs["attention_mask"] = mask_all[c0:c1].to(self.device, dtype=torch.long, non_blocking=True)
                cap.forward(**inputs)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        return bufs

    # -- one unit -------------------------------------------------------------------------

    def process(self, unit: int, contexts: Contexts, hooks: list[str]) -> dict[str, Any]:
        """Compute and commit one unit for ``hooks``; returns a small status dict."""
        tp = time.perf_counter()
        contexts = self.prepare(contexts)
        t0 = time.perf_counter()
        with self._compute:
            acts = self.compute(contexts, hooks)
        t1 = time.perf_counter()
        first = unit * self.writer.info.unit_contexts
        status = self.writer.write_unit(unit, tokens=contexts.token_table(first), acts=acts)
        t2 = time.perf_counter()
        self.units_done += 1
        nbytes = sum(a.numel() * a.element_size() for a in acts.values())
        return {
            "unit": unit,
            "rows": contexts.token_id.size,
            "hooks": hooks,
            "status": status,
            "prepare_s": t0 - tp,  # image decoding and preprocessing (overlaps another unit's compute)
            "compute_s": t1 - t0,
            "write_s": t2 - t1,
            "bytes": nbytes,
            "pid": os.getpid(),
            "peak_rss": peak_rss_bytes(),
        }
