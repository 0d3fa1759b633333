"""The extraction job: plan, then run units on the executor's worker pool, exactly once and resumable.

    spec = ExtractSpec(name="tiny", model={"id": "./models/tiny"}, corpus={"path": "corpus.jsonl"},
                       hooks=["blocks.*.hook_resid_post"])
    result = run_extract(spec)

Order of work. Everything that can be wrong with the input fails before any model runs, before
Ray starts and before anything is written:

1. the store path (a relative local path inside a Ray job is refused: it would land in Ray's
   temporary copy of the working directory), the store is writable, and no other job holds the
   dataset's write lease (a read-only check: a second job fails in a second, not after
   starting Ray);
2. the model and its exact revision resolve, the hooks exist, the context fits the model, the
   corpus reads and is not empty, the dataset name is free or holds the same identity;
3. a quick no-op check: the same corpus and every requested hook of every unit committed
   (the message says whether the dataset was ever verified);
4. tokenization as CPU tasks (Ray tasks, or here with ``compute.executor: local``), streamed
   in order to local files (the driver keeps 16 bytes a document, whatever the size of the
   corpus), and the plan: contexts and units (a pure
   function of the corpus and the tokenizer, so unit ``k`` always covers the same contexts),
   and the document index (which rows each document has, and what the concat tail dropped),
   both from per-document token counts (:mod:`pipeline.plan`);
5. under the dataset's write lease, the driver creates or grows the dataset, adds hooks and
   records the document index, then hands each missing (unit, hooks) to the executor
   (:mod:`pipeline.executor`: a Ray actor pool, or one worker in this process). Workers
   write and commit, fenced with the lease's token; the driver commits nothing. When another
   job takes the lease over (this one was paused past its stale time), the pool stops, the
   workers are killed, and the job fails with :class:`store.LeaseLostError`.

Corpus growth. The identity of a dataset includes ``corpus_fingerprint``, a fingerprint of the
first ``corpus_docs`` documents, recorded when the dataset was created. A later run whose
corpus starts with those same documents is the same dataset with documents appended: planning
is a prefix-stable function of the documents (see :mod:`pipeline.packing`), so every full unit
already committed is unchanged, and the new contexts land in new units. A unit that is only
partly filled would change when documents are appended; with ``corpus.growing`` such a last
unit is held back until the corpus fills it, and without it the partial unit is committed and
a later append is refused with an explanation (rather than silently changing a committed unit).
Units committed by earlier appends are compared with the new plan token by token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from strata import store
from strata.pipeline import models
from strata.pipeline.cluster import in_ray_job
from strata.pipeline.config import CorpusSpec, ExtractSpec, ImageSpec, TokenizeSpec
from strata.pipeline.corpus import CorpusScan, iter_corpus, scan_corpus
from strata.pipeline.diffusion import DiffusionPacker, DiffusionPrep, conditioning, is_pipeline, prepare_diffusion
from strata.pipeline.errors import CorpusError, SpecError, WorkerError
from strata.pipeline.executor import Executor, Task, Tasks, open_executor, pool_shape
from strata.pipeline.hooks import HookSite, expand_hooks, family_of, hook_sites
from strata.pipeline.images import ImageScan, ImageSource, iter_images, scan_images
from strata.pipeline.modules import check_bytes_per_token, is_module_hook, module_hook_name, parse_module_hook, probe_modules, resolve_module_path
from strata.pipeline.packing import Contexts, TokenizerInfo, encode_batch, num_units, tokenizer_info
from strata.pipeline.plan import FileSource, Packer, TokenSource
from strata.pipeline.sharded import ShardedExtraction, ShardSettings, known_results, plan_shards, reconcile
from strata.pipeline.sources import ShardRef, list_shards
from strata.pipeline.vision import CLS_TOKEN, ImagePacker, ImagePrep, check_images, prepare_images, vision_config
from strata.pipeline.worker import UnitWorker, WorkerConfig, peak_rss_bytes
from strata.store import layout
from strata.store.commit import artifacts
from strata.store.datasets.manifest import IDENTITY_META_KEYS
from strata.store.datasets.manifest import fingerprint as dataset_fingerprint
from strata.store.datasets.tokenized import shards_kind
from strata.store.datasets.verify import last_outcome
from strata.store.dtypes import storage_dtype
from strata.store.errors import DatasetExistsError, LeaseHeldError, StorageError

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    name: str
    store: str
    num_units: int
    units_run: int = 0
    units_skipped: int = 0
    held_back_contexts: int = 0
    dropped_tokens: int = 0  # corpus tokens no context holds (the concat tail; cut documents)
    dropped_docs: int = 0  # documents with no token in any context
    partial_docs: int = 0  # documents with some tokens dropped
    bad_images: list[dict[str, Any]] = field(default_factory=list)  # images that do not decode: {doc_id, where, error}
    tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    noop: bool = False
    hooks: list[str] = field(default_factory=list)
    hooks_computed: list[str] = field(default_factory=list)  # hooks this run computed for some unit
    hooks_new: list[str] = field(default_factory=list)  # of those, hooks the dataset did not have
    hooks_committed: list[str] = field(default_factory=list)  # hooks of the spec every unit already had
    private_cluster: bool = False
    cluster_address: str = ""
    driver_peak_rss: int = 0
    worker_peak_rss: int = 0
    pool_seconds: float = 0.0  # from starting the actors to the last unit committed
    steady_tokens: int = 0  # tokens of the units committed after the first one ...
    steady_seconds: float = 0.0  # ... and the time they took (leaves out model loading)
    prepare_seconds: float = 0.0  # workers' time decoding and preprocessing images (overlaps compute)
    compute_seconds: float = 0.0  # workers' time in the model (including waits for the model)
    message: str = ""
    units_recomputed: list[int] = field(default_factory=list)  # committed units a changed shard invalidated
    shards: int = 0  # a sharded corpus: its shards
    shards_tokenized: int = 0  # ... of which this run tokenized (the others were tokenized before)
    shard_nodes: dict[str, str] = field(default_factory=dict)  # ... each by name: the Ray node id (or host) its task ran on

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float:
        """Throughput once the workers run: what the hardware sustains on a long job."""
        return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else 0.0


@dataclass
class Prepared:
    """Everything checked and resolved before any model runs."""

    spec: ExtractSpec
    store: store.Store
    model: models.ResolvedModel
    config: Any
    tokenizer: TokenizerInfo | None  # text models
    hooks: list[str]
    scan: CorpusScan  # one pass over the corpus: sizes, ids, fingerprints (no texts kept)
    corpus_fp: str  # identity fingerprint (a prefix of the corpus when it grew)
    corpus_docs: int  # documents covered by corpus_fp
    meta: dict[str, Any]
    existing: store.ActivationDataset | None
    unit_contexts: int
    context_size: int  # tokens per context: the spec's for text, the model's sequence for an image
    image: ImagePrep | None = None  # image models: preprocessing and token layout
    diffusion: DiffusionPrep | None = None  # diffusion models: timesteps, noise, conditioning, hooks' maps
    rehook: list[str] = field(default_factory=list)  # hooks the dataset holds with another meaning: captured again
    module_sites: dict[str, HookSite] = field(default_factory=dict)  # module:PATH hooks, probed by a dry forward
    stop_after: str | None = None  # with module:PATH hooks: the hook the dry forward saw fire last
    shards: list[ShardRef] | None = None  # a sharded corpus: its shards, as listed (see pipeline.sharded)
    settings: ShardSettings | None = None  # ... and what its tokenized shards depend on


@dataclass
class Plan:
    packer: Packer  # builds any unit's contexts from tokens kept out of memory
    units: int
    unit_contexts: int
    held_back_contexts: int
    documents: pa.Table  # the store's document index
    dropped_tokens: int
    dropped_docs: int
    partial_docs: int
    bad_images: list[dict[str, Any]] = field(default_factory=list)  # image corpora: images that do not decode

    @property
    def n_contexts(self) -> int:
        return len(self.packer)

    def unit(self, u: int) -> Contexts:
        """The contexts of unit ``u``."""
        return self.packer.contexts(u * self.unit_contexts, (u + 1) * self.unit_contexts)

    def contexts_in(self, u: int) -> int:
        """Contexts of unit ``u``."""
        uc = self.unit_contexts
        return max(0, min(self.n_contexts, (u + 1) * uc) - u * uc)

    def all_contexts(self) -> Contexts:
        """Every planned context at once (small corpora, tests)."""
        return self.packer.contexts(0, len(self.packer))

    def summary(self) -> dict[str, int]:
        return {
            "contexts": self.n_contexts, "tokens": self.n_contexts * self.packer.context_size, "units": self.units,
            "held_back_contexts": self.held_back_contexts, "dropped_tokens": self.dropped_tokens,
            "dropped_docs": self.dropped_docs, "partial_docs": self.partial_docs,
        }


# -- 1. checks --------------------------------------------------------------------------------


def check_store_path(spec: ExtractSpec) -> None:
    """A relative local store path inside a Ray job resolves in Ray's temporary copy of the
    working directory, which Ray deletes: the job would report success and the data be gone."""
    if "://" in spec.store or os.path.isabs(os.path.expanduser(spec.store)) or not in_ray_job():
        return
    raise SpecError(
        f"`store` {spec.store!r} is a relative local path, and this is a Ray job: it would resolve inside Ray's "
        f"temporary copy of the working directory ({os.getcwd()}), deleted when the job ends. Give an absolute path "
        "on a file system every node sees (e.g. `--set store=$PWD/acts` on a one-machine cluster) or s3://bucket/prefix"
    )


def open_store(spec: ExtractSpec) -> store.Store:
    try:
        s = store.open(spec.store, storage_options=spec.storage_options)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"store {spec.store!r} cannot be opened: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    key = f"tmp/.strata-probe-{uuid.uuid4().hex}"
    try:
        s.storage.write(key, b"")
        s.storage.delete(key)
    except Exception as e:
        raise StorageError(f"store {s.uri} cannot be written: {e}") from None
    return s


def prepare(spec: ExtractSpec, s: store.Store) -> Prepared:
    """Resolve and check everything; raise a one-line error for any bad input. Writes nothing."""
    m = models.resolve(spec.model)
    if spec.diffusion is not None or is_pipeline(m.folder):
        return prepare_diffusion_job(spec, s, m)
    config = models.load_config(m)
    model_type = getattr(config, "model_type", "?")
    fam = family_of(model_type)
    image = fam.modality == "image"
    if image != spec.corpus.is_images:
        raise SpecError(
            f"model {spec.model.id!r} ({model_type}) is an image model and `corpus` is a text corpus: give an image corpus "
            "(`corpus.format: images` for a folder, or `corpus.image_field` for parquet / hf)" if image else
            f"model {spec.model.id!r} ({model_type}) is a text model and `corpus` is an image corpus: give a text corpus, "
            "or an image model (vit, clip, siglip, dinov2)"
        )
    if not image and spec.image != ImageSpec():
        raise SpecError(f"`image` settings are for image models; model {spec.model.id!r} ({model_type}) reads text")
    vc = vision_config(config) if image else config
    n_layers = int(vc.num_hidden_layers)
    sites = hook_sites(fam, n_layers, vc)
    canonical = [h for h in spec.hooks if not is_module_hook(h)]
    hooks = expand_hooks(canonical, sites, model=f"model {spec.model.id!r} ({model_type}, {n_layers} layers)") if canonical else []
    stop_after: str | None = None
    found: dict[str, HookSite] = {}
    if len(canonical) < len(spec.hooks):
        if image:
            raise SpecError(f"`module:PATH` hooks are for text models; model {spec.model.id!r} ({model_type}) reads images")
        found, stop_after = module_sites(m, sites, hooks, [h for h in spec.hooks if is_module_hook(h)])
        sites = {**sites, **found}
        hooks = [*hooks, *(h for h in found if h not in hooks)]
    check_bytes_per_token({h: sites[h].width or int(vc.hidden_size) for h in hooks}, storage_dtype(spec.dtype).itemsize,
                          spec.max_bytes_per_token)
    tok: TokenizerInfo | None = None
    img: ImagePrep | None = None
    if image:
        img = prepare_images(m.fetch(), config, size=spec.image.size, model=spec.model.id, trust_remote_code=m.trust_remote_code)
        ctx_size = img.layout.tokens
    else:
        limit = models.max_context(config)
        ctx_size = spec.tokenize.context_size
        if limit is not None and ctx_size > limit:
            raise SpecError(f"`tokenize.context_size` {ctx_size} is beyond the maximum of model {spec.model.id!r} ({limit})")
        tok = tokenizer_info(models.load_tokenizer(m), spec.model.id)
        if spec.tokenize.prepend_bos and tok.bos_id is None:
            raise SpecError(f"`tokenize.prepend_bos` is true but the tokenizer of {spec.model.id!r} has no BOS or CLS token")

    existing = s.dataset(spec.name) if spec.name in s.datasets() else None
    n_old = int(existing.info.meta.get("corpus_docs", -1)) if existing is not None else -1
    kind, refs = plan_kind(spec.corpus, existing.info.meta if existing is not None else None)
    if kind == "sharded":
        # Listing only: the shards are read by the tokenization tasks, where they run.
        scan: Any = CorpusScan()
        corpus_fp, corpus_docs = source_fingerprint(spec.corpus), 0
    else:
        # One streaming pass (no tokenizer, no Ray): every corpus error surfaces here, and the
        # fingerprints tell whether an existing dataset is this corpus, or a prefix of it.
        scan_fn = scan_images if image else scan_corpus
        scan = scan_fn(spec.corpus, prefix_docs=n_old if n_old > 0 else None)
        corpus_fp, corpus_docs = scan.fingerprint, scan.docs
    unit_contexts = spec.compute.unit_contexts
    if existing is not None:
        old = existing.info.meta
        if kind != "sharded" and 0 < n_old <= scan.docs and scan.prefix_fingerprint == old.get("corpus_fingerprint"):
            corpus_fp, corpus_docs = old["corpus_fingerprint"], n_old
        if existing.info.unit_contexts != unit_contexts:
            log.info("dataset %r keeps its %d contexts per unit (spec asks %d)", spec.name, existing.info.unit_contexts, unit_contexts)
            unit_contexts = existing.info.unit_contexts

    t = spec.tokenize
    c = spec.corpus
    corpus_meta: dict[str, Any] = {"path": c.path, "format": c.format, **scan.stats}
    if refs is not None:
        corpus_meta = {"path": c.path, "format": c.format, "shards": len(refs)}
    corpus_meta.update({"image_field": c.image_field, "caption_field": c.caption_field} if image else {"text_field": c.text_field})
    meta = {
        "model": m.identity,
        "revision": m.revision,
        # For an image model, the fingerprint of its preprocessing: what the tokenizer is to text.
        "tokenizer": img.fingerprint if img is not None else tok.fingerprint,  # type: ignore[union-attr]
        "corpus_fingerprint": corpus_fp,
        "packing": "image" if image else t.packing + ("" if t.packing == "concat" or t.split_long else "-nosplit"),
        "prepend_bos": False if image else t.prepend_bos,
        "corpus_docs": corpus_docs,
        # The whole corpus as last planned (after appends, more than the identity covers): a
        # rerun over the same corpus is a quick no-op.
        "corpus_scan": {"docs": scan.docs, "fingerprint": scan.fingerprint},
        "model_path": m.folder if m.local else None,
        "corpus": corpus_meta,
        "modality": fam.modality,
        "model_type": model_type,
        "family": fam.name,
        "n_layers": n_layers,
        "d_model": int(vc.hidden_size),
        "torch_dtype": spec.model.torch_dtype,
        "hook_modules": {h: site.describe() for h, site in sites.items()},
        "hook_meanings": {h: site.meaning for h, site in sites.items()},
        "hook_widths": {h: site.width for h, site in sites.items()},
        "tokenizer_name": None if image else tok.name,  # type: ignore[union-attr]
        "special_tokens": ({"cls": CLS_TOKEN if img.layout.cls else None, "registers": img.layout.registers} if img is not None  # type: ignore[union-attr]
                           else {"bos": tok.bos_id, "sep": tok.sep_id, "pad": tok.pad_id}),  # type: ignore[union-attr]
        "growing": spec.corpus.growing,
        "keep_fields": list(spec.corpus.keep_fields),
        "doc_set_hash": scan.doc_set_hash,
        "plan_kind": kind,
        "spec": spec.recorded(),
        "version_of": spec.version_of,  # the base name of a new version (Store.versions)
    }
    if img is not None:
        meta["image"] = img.to_dict()
        meta["caption_set_hash"] = scan.caption_set_hash  # type: ignore[attr-defined]
    check_identity(spec, s, existing, meta, ctx_size)
    rehook: list[str] = []
    if existing is not None:  # a hook stored with another meaning (ln_final.hook_normalized before it took TransformerLens's)
        recorded = existing.info.meta.get("hook_modules") or {}
        rehook = [h for h in hooks if h in existing.info.hooks and recorded.get(h) not in (None, sites[h].describe())]
        if rehook:
            log.warning("dataset %r holds %s captured as %s; this Strata captures them as %s: they are captured again",
                        spec.name, rehook, [recorded[h] for h in rehook], [sites[h].describe() for h in rehook])
    if refs is not None:
        meta["corpus_scan"] = None
        assert tok is not None
        settings = ShardSettings.of(spec.corpus, spec.tokenize, tok)
        return Prepared(spec, s, m, config, tok, hooks, scan, corpus_fp, corpus_docs, meta, existing, unit_contexts, ctx_size, img,
                        rehook=rehook, module_sites=found, stop_after=stop_after, shards=refs, settings=settings)
    return Prepared(spec, s, m, config, tok, hooks, scan, corpus_fp, corpus_docs, meta, existing, unit_contexts, ctx_size, img,
                    rehook=rehook, module_sites=found, stop_after=stop_after)


def check_identity(spec: ExtractSpec, s: store.Store, existing: store.ActivationDataset | None, meta: dict[str, Any], ctx_size: int) -> None:
    """An existing dataset of this name must have this job's identity."""
    if existing is None:
        return
    fp = dataset_fingerprint(context_size=ctx_size, dtype=spec.dtype, meta=meta)
    if fp != existing.info.fingerprint:
        old = existing.info
        diff = [f"{k}: {old.meta.get(k)!r} -> {meta[k]!r}" for k in IDENTITY_META_KEYS if old.meta.get(k) != meta[k]]
        diff += [f"{k}: {a!r} -> {b!r}" for k, a, b in (("context_size", old.context_size, ctx_size), ("dtype", old.dtype, spec.dtype)) if a != b]
        raise DatasetExistsError(
            f"dataset {spec.name!r} already exists in {s.uri} with a different identity ({'; '.join(diff)}); "
            "a changed model, tokenizer, corpus, context, packing or dtype makes a new dataset: choose a new `name`"
        )


def prepare_diffusion_job(spec: ExtractSpec, s: store.Store, m: models.ResolvedModel) -> Prepared:
    """:func:`prepare` for a diffusion model (see :mod:`pipeline.diffusion`): one context per
    (image, timestep); the identity's ``tokenizer`` is the fingerprint of the preprocessing, noise
    and conditioning."""
    if spec.tokenize != TokenizeSpec():
        raise SpecError(f"`tokenize` settings are for text models; model {spec.model.id!r} is a diffusion model")
    d = prepare_diffusion(spec, m.folder, model=spec.model.id)
    check_bytes_per_token(d.widths, storage_dtype(spec.dtype).itemsize, spec.max_bytes_per_token)
    existing = s.dataset(spec.name) if spec.name in s.datasets() else None
    n_old = int(existing.info.meta.get("corpus_docs", -1)) if existing is not None else -1
    plan_kind(spec.corpus, existing.info.meta if existing is not None else None)
    scan = scan_images(spec.corpus, prefix_docs=n_old if n_old > 0 else None)
    corpus_fp, corpus_docs = scan.fingerprint, scan.docs
    unit_contexts = spec.compute.unit_contexts
    if existing is not None:
        old = existing.info.meta
        if 0 < n_old <= scan.docs and scan.prefix_fingerprint == old.get("corpus_fingerprint"):
            corpus_fp, corpus_docs = old["corpus_fingerprint"], n_old
        unit_contexts = existing.info.unit_contexts
    c = spec.corpus
    meta = {
        "model": m.identity, "revision": m.revision, "tokenizer": d.fingerprint, "corpus_fingerprint": corpus_fp,
        "packing": "diffusion", "prepend_bos": False, "corpus_docs": corpus_docs,
        "corpus_scan": {"docs": scan.docs, "fingerprint": scan.fingerprint}, "model_path": m.folder if m.local else None,
        "corpus": {"path": c.path, "format": c.format, **scan.stats, "image_field": c.image_field, "caption_field": c.caption_field},
        "modality": "diffusion", "model_type": d.denoiser_class, "family": d.kind, "n_layers": d.n_layers, "d_model": d.d_model,
        "torch_dtype": spec.model.torch_dtype,
        "hook_modules": {h: d.module_of(h) for h in d.hooks},
        "hook_meanings": {h: d.meaning_of(h) for h in d.hooks},
        "hook_widths": dict(d.widths), "tokenizer_name": None, "special_tokens": {}, "growing": c.growing,
        "keep_fields": list(c.keep_fields), "doc_set_hash": scan.doc_set_hash, "plan_kind": "documents", "spec": spec.recorded(),
        "version_of": spec.version_of, "diffusion": d.to_dict(), "timesteps": list(d.timesteps), "caption_set_hash": scan.caption_set_hash,
    }
    check_identity(spec, s, existing, meta, d.tokens)
    return Prepared(spec, s, m, None, None, list(d.hooks), scan, corpus_fp, corpus_docs, meta, existing, unit_contexts, d.tokens,
                    diffusion=d)


def module_sites(m: models.ResolvedModel, sites: dict[str, HookSite], hooks: list[str],
                 names: list[str]) -> tuple[dict[str, HookSite], str]:
    """Sites of ``module:PATH`` hooks: paths resolved in the base model Strata loads (``AutoModel``,
    no task head), widths and firing order from one dry forward on this machine's CPU, together with
    the canonical hooks asked for. Returns the sites (named by their resolved path) and the hook
    that fires last (where the forward may stop)."""
    import torch  # lazy: only module:PATH hooks load the model in the driver

    model = models.load_model(m, device="cpu")
    wanted: dict[str, tuple[str, str]] = {}
    for name in names:
        path, io = parse_module_hook(name)
        resolved = resolve_module_path(model, path)
        wanted[module_hook_name(resolved, io)] = (resolved, io)
    plain = [(h, sites[h].module, sites[h].io) for h in hooks if sites[h].transform is None or sites[h].transform.kind != "tokens"]  # type: ignore[union-attr]
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.arange(8, dtype=torch.long).reshape(1, 8) % vocab
    probed = probe_modules(model, [*((h, p, io) for h, (p, io) in wanted.items()), *plain], {"input_ids": ids})
    last = max(probed, key=lambda h: probed[h][1])
    out = {h: HookSite(h, p, io, (10**9, probed[h][1]), probed[h][0], meaning=f"the {io} of module {p} (module:PATH)")
           for h, (p, io) in wanted.items()}
    del model
    return out, last


def plan_kind(src: CorpusSpec, old: dict[str, Any] | None) -> tuple[str, list[ShardRef] | None]:
    """How the corpus is planned (``corpus.plan``; see :class:`~strata.pipeline.config.CorpusSpec`), and its
    shards when sharded. A dataset keeps the plan it was made with (datasets made before sharded
    plans existed are ``documents``)."""
    want = src.plan
    if src.is_images or src.format == "hf":
        if want == "sharded":
            raise SpecError(f"`corpus.plan: sharded` is for jsonl, parquet and text corpora; corpus {src.path!r} is "
                            f"{'an image corpus' if src.is_images else 'a Hugging Face dataset'}: leave `corpus.plan` at auto")
        return "documents", None
    had = None if old is None else str(old.get("plan_kind") or "documents")
    if had is not None and want not in ("auto", had):
        raise SpecError(f"`corpus.plan: {want}`: the dataset was planned as {had!r}; another plan is another dataset: "
                        "choose a new `name`, or leave `corpus.plan` at auto")
    kind = had or (want if want != "auto" else None)
    if kind == "documents":
        return kind, None
    refs = list_shards(src, storage_options=src.storage_options)
    if kind is None:
        kind = "sharded" if "://" in src.path and not src.path.startswith("file://") or len({r.url for r in refs}) > 1 else "documents"
        if kind == "documents":
            return kind, None
    if src.max_docs is not None:
        raise SpecError(f"`corpus.max_docs` reads a corpus as one stream of documents; corpus {src.path!r} is planned by shards "
                        f"({len(refs)}): name fewer shards (a glob), or set `corpus.plan: documents`")
    return "sharded", refs


def source_fingerprint(src: CorpusSpec) -> str:
    """The identity of a sharded corpus: where it is and how it is read. Its contents are the
    shards table's fingerprints, which may change (a changed shard is recomputed in place)."""
    d = {"path": src.path.rstrip("/"), "format": src.format, "text_field": src.text_field, "id_field": src.id_field,
         "text_unit": src.text_unit, "keep_fields": list(src.keep_fields)}
    return f"sharded:xxh3_128:{xxhash.xxh3_128_hexdigest(json.dumps(d, sort_keys=True).encode())}"


def _complete(ds: store.ActivationDataset, hooks: list[str]) -> bool:
    n = ds.info.num_units
    return all(h in ds.info.hooks and len(ds.committed_units(h)) == n for h in hooks) and len(ds.committed_units()) == n


def _verify_hint(ds: store.ActivationDataset, uri: str) -> str:
    """What the last verify said, for a job that finds nothing to do."""
    last = last_outcome(ds)
    cmd = f"strata verify {uri} {ds.name}"
    if last is None:
        return f"; it has never been verified: `{cmd}` checks every byte"
    if not last.get("ok"):
        return f"; the last verify ({last.get('at', '?')}) found problems: run `{cmd} --repair`, then extract again"
    return f" (verified OK at {last.get('at', '?')})"


# -- 2. planning ------------------------------------------------------------------------------


def _tasks(ex: Executor | None, window: int) -> Executor:
    """CPU tasks of a streaming pass: ``window`` batches in flight (here when ``ex`` is None)."""
    return (ex or Executor()).using(Tasks(num_cpus=1, max_in_flight=window, max_retries=3))


def tokenize_into(spec: ExtractSpec, tok: TokenizerInfo, sink: Any, executor: Executor | None = None, *, window: int = 4,
                  keep_ids: bool = True) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """Tokenize the corpus in order, batch by batch (CPU tasks of ``executor``, ``window`` in
    flight; here without one), into ``sink.append(EncodedBatch)``; returns the document ids and
    the kept fields. Memory: a few batches of texts, whatever the size of the corpus."""
    ids: list[np.ndarray] = []
    fields: dict[str, list[pa.Array]] = {f: [] for f in spec.corpus.keep_fields}
    ex = _tasks(executor, window)
    tj = ex.put(tok.backend_json)  # once, not with every batch

    def batches() -> Any:
        for batch in iter_corpus(spec.corpus, batch_docs=spec.tokenize.chunk_docs):
            if keep_ids:  # else the caller has them from the corpus scan
                ids.append(batch.doc_ids)
            for f, values in batch.fields.items():
                try:
                    fields[f].append(pa.array(values))
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise CorpusError(f"`corpus.keep_fields` {f!r}: its values do not form one column type ({e})") from None
            yield tj, batch.texts

    for encoded in ex.imap(encode_batch, batches()):
        sink.append(encoded)
    kept = {}
    for f, chunks in fields.items():
        try:
            kept[f] = pa.chunked_array(chunks).combine_chunks() if chunks else pa.array([])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise CorpusError(f"`corpus.keep_fields` {f!r}: its values do not form one column type ({e})") from None
    return np.concatenate(ids) if ids else np.zeros(0, np.int64), kept


def plan(p: Prepared, executor: Executor | None = None, *, source: TokenSource | None = None,
         use_ray: bool | None = None) -> Plan:
    """Tokenize (streaming the tokens to local files unless ``source`` is given; as tasks of
    ``executor``, or here without one) and plan: the contexts, units and document index, from
    per-document token counts. ``use_ray=False`` is the old spelling of no executor (kept while
    ``jobs.reprocess`` moves to the job kinds)."""
    if use_ray:
        raise TypeError("plan(use_ray=True) is gone: pass the job's Executor")
    if p.image is not None or p.diffusion is not None:
        return plan_images(p, executor)
    assert p.tokenizer is not None
    t = p.spec.tokenize
    if source is None:
        source = FileSource()
        # The scan already holds the document ids, in this order: not a second copy (memory).
        _, fields = tokenize_into(p.spec, p.tokenizer, source, executor, keep_ids=False)
        source.close()
        doc_ids = p.scan.doc_ids
        if len(source.lens) != len(doc_ids):
            raise CorpusError(f"corpus {p.spec.corpus.path!r} changed while it was read: {len(doc_ids)} documents "
                              f"when scanned, {len(source.lens)} when tokenized")
    else:
        doc_ids, fields = p.scan.doc_ids, {}
    packer = Packer(source, doc_ids, p.tokenizer, t.context_size, t.packing, t.prepend_bos, t.split_long)
    units = num_units(len(packer), p.unit_contexts, full_only=p.spec.corpus.growing)
    docs, dropped, dropped_docs, partial = packer.document_index(fields)
    return Plan(packer, units, p.unit_contexts, len(packer) - min(len(packer), units * p.unit_contexts), docs, dropped, dropped_docs, partial)


def plan_images(p: Prepared, executor: Executor | None = None, *, window: int = 4) -> Plan:
    """Decode every image once (CPU tasks of ``executor``, ``window`` batches in flight) to find those that
    do not decode, and plan one context per image that does. The document table gets each
    image's ``width``, ``height``, ``source`` (file, or file#row), ``error`` (why it was left out),
    its ``caption`` and the kept fields."""
    assert p.image is not None or p.diffusion is not None
    src = p.spec.corpus
    scan = ImageScan()
    checked: list[tuple[int, int, str | None]] = []
    cols: dict[str, list[Any]] = {"source": [], **({"caption": []} if src.caption_field else {}), **{f: [] for f in src.keep_fields}}

    def batches() -> Any:
        for b in iter_images(src, scan=scan):
            cols["source"].extend(b.where)
            if src.caption_field:
                cols["caption"].extend(b.captions)
            for f, v in b.fields.items():
                cols[f].extend(v)
            yield b.payloads, b.errors

    for got in _tasks(executor, window).imap(check_images, batches()):
        checked.extend(got)
    if scan.fingerprint != p.scan.fingerprint:
        raise CorpusError(f"corpus {src.path!r} changed while it was read (its images differ between two passes)")
    ok = np.array([err is None for _, _, err in checked], dtype=bool)
    kept = np.flatnonzero(ok)
    bad = [{"doc_id": int(scan.doc_ids[i]), "where": cols["source"][i], "error": checked[i][2]} for i in np.flatnonzero(~ok)]
    if bad:
        log.warning("corpus %s: %d of %d images could not be read and are left out, e.g. %s", src.path, len(bad), len(ok),
                    "; ".join(f"id {b['doc_id']} ({b['where']}): {b['error']}" for b in bad[:3]))
    fields: dict[str, pa.Array] = {
        "width": pa.array([w if w >= 0 else None for w, _, _ in checked], pa.int32()),
        "height": pa.array([h if h >= 0 else None for _, h, _ in checked], pa.int32()),
        "error": pa.array([e for _, _, e in checked], pa.string()),
    }
    for f, values in cols.items():
        try:
            fields[f] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise CorpusError(f"`corpus` field {f!r}: its values do not form one column type ({e})") from None
    if p.diffusion is not None:
        prompts, classes = conditioning(p.diffusion, fields, corpus=src.path)
        packer: ImagePacker = DiffusionPacker(ImageSource(src, scan.files, scan.locators), scan.doc_ids, kept, p.diffusion, prompts, classes)
    else:
        assert p.image is not None
        packer = ImagePacker(ImageSource(src, scan.files, scan.locators), scan.doc_ids, kept, p.image.layout)
    units = num_units(len(packer), p.unit_contexts, full_only=src.growing)
    docs, dropped, dropped_docs, partial = packer.document_index(fields)
    held = len(packer) - min(len(packer), units * p.unit_contexts)
    return Plan(packer, units, p.unit_contexts, held, docs, dropped, dropped_docs, partial, bad)  # type: ignore[arg-type]


def _first_context_of_doc(packer: Packer | ImagePacker, n: int) -> int:
    """The context holding document ``n``'s first token."""
    if isinstance(packer, ImagePacker):
        return packer.first_context_of_doc(n)
    return int(packer.seg[n] // packer.body) if packer.packing == "concat" else int(packer.first[n])


def check_committed(p: Prepared, pl: Plan) -> None:
    """Committed units must be exactly what the current plan puts there."""
    ds = p.existing
    if ds is None:
        return
    uc, n_ctx = p.unit_contexts, pl.n_contexts
    committed = ds.committed_units()
    for u in committed:
        have = ds.unit_counts(None, u)[0]
        want = max(0, min(n_ctx, (u + 1) * uc) - u * uc) * p.context_size
        if have != want:
            raise CorpusError(
                f"dataset {p.spec.name!r}: unit {u} was committed with {have} token rows but the corpus now puts {want} there; "
                "it was the partial last unit of a smaller corpus, which appended documents would change. "
                "Extract the grown corpus under a new `name`, and set `corpus.growing: true` for corpora that grow"
            )
    if p.scan.docs == p.corpus_docs:
        return  # the identity fingerprint covers every document
    # Documents after the fingerprinted prefix were extracted by earlier appends: compare tokens.
    first = _first_context_of_doc(pl.packer, p.corpus_docs) // uc
    for u in [u for u in committed if u >= first]:
        t = ds.unit_tokens(u)
        lo, hi = u * uc, u * uc + t.num_rows // p.context_size
        part = pl.packer.contexts(lo, hi, images=False) if isinstance(pl.packer, ImagePacker) else pl.packer.contexts(lo, hi)
        if not (np.array_equal(t.column("token_id").to_numpy(), part.token_id.reshape(-1))
                and np.array_equal(t.column("doc_id").to_numpy(), part.doc_id.reshape(-1))):
            raise CorpusError(
                f"dataset {p.spec.name!r}: documents in unit {u} changed since it was extracted (the corpus must only grow at its end); "
                "extract the changed corpus under a new `name`"
            )


def _dropped_note(pl: Plan | ShardedExtraction, spec: ExtractSpec) -> str:
    if not pl.dropped_tokens:
        return ""
    if pl.bad_images:
        ids = ", ".join(str(b["doc_id"]) for b in pl.bad_images[:5]) + (", ..." if len(pl.bad_images) > 5 else "")
        return (f"; {len(pl.bad_images)} image(s) could not be read and were left out (ids {ids}; `ds.docs()` says why, "
                "column `error`)")
    why = ("each shard's concat tail shorter than one context (contexts never span two shards)"
           if isinstance(pl, ShardedExtraction) and spec.tokenize.packing == "concat" else
           "the corpus tail shorter than one context (it joins a context once more documents are appended)"
           if spec.corpus.growing and spec.tokenize.packing == "concat" else
           "the concat tail shorter than one context" if spec.tokenize.packing == "concat" else
           "documents cut at one context (`tokenize.split_long: false`)")
    return (f"; {pl.dropped_tokens:,} corpus tokens are in no context ({pl.dropped_docs} document(s) wholly, "
            f"{pl.partial_docs} in part): {why}")


# -- 3. running -------------------------------------------------------------------------------


def start(spec: ExtractSpec, *, owner: str) -> tuple[store.Store, store.Lease, Prepared]:
    """The checks every extraction (and its dry run) makes first: the store path and that it is
    writable, that no job holds the dataset's lease (read-only: a second job fails in a second),
    then everything :func:`prepare` resolves. Returns the store, the (not yet taken) lease and the
    prepared job."""
    check_store_path(spec)
    s = open_store(spec)
    lease = s.lease(spec.name, owner=owner, stale_after_s=spec.compute.lease_stale_s)
    holder = lease.holder()
    if holder is not None:
        raise LeaseHeldError(lease.held_message(holder))
    return s, lease, prepare(spec, s)


def run_extract(
    spec: ExtractSpec,
    *,
    progress: bool = True,
    worker_cls: type[UnitWorker] = UnitWorker,
    on_unit: Callable[[dict[str, Any]], None] | None = None,
) -> ExtractResult:
    """Run an extraction job end to end (see the module docstring). ``worker_cls`` (a subclass
    of :class:`UnitWorker`) and ``on_unit`` (called with each finished unit's status) are
    seams for tests and tools."""
    t_start = time.perf_counter()
    s, lease, p = start(spec, owner="strata extract")
    result = ExtractResult(spec.name, s.uri, num_units=0, hooks=p.hooks)
    if p.shards is not None:
        _extract_sharded(p, lease, result, t_start, worker_cls=worker_cls, on_unit=on_unit, progress=progress)
        result.seconds = time.perf_counter() - t_start
        result.driver_peak_rss = peak_rss_bytes()
        return result

    ds = p.existing
    same_docs = ds is not None and ds.info.meta.get("keep_fields", []) == list(spec.corpus.keep_fields) and (
        p.image is not None or p.diffusion is not None or "tokenizer" in ds.info.aux)
    same_corpus = p.scan.docs == p.corpus_docs or (
        ds is not None and ds.info.meta.get("corpus_scan") == {"docs": p.scan.docs, "fingerprint": p.scan.fingerprint})
    if ds is not None and same_docs and same_corpus and not p.rehook and _complete(ds, p.hooks):
        result.num_units = ds.info.num_units
        result.noop = True
        result.units_skipped = ds.info.num_units
        result.message = (
            f"nothing to do: dataset {spec.name!r} in {s.uri} already has all {ds.info.num_units} units "
            f"of {len(p.hooks)} hook(s) committed" + _verify_hint(ds, spec.store)
        )
        result.seconds = time.perf_counter() - t_start
        return result

    with open_executor(spec.compute.executor, spec.compute.address) as ex:
        result.private_cluster, result.cluster_address = ex.ray and ex.private, ex.address
        pl = plan(p, ex)
        try:
            _execute(p, pl, lease, ex, result, t_start, worker_cls=worker_cls, on_unit=on_unit, progress=progress)
        finally:
            pl.packer.source.remove()  # type: ignore[attr-defined]
    result.seconds = time.perf_counter() - t_start
    result.driver_peak_rss = peak_rss_bytes()
    return result


def shards_known(p: Prepared) -> tuple[dict[str, dict[str, Any]], pa.Table | None]:
    """Counts of the shards an existing dataset planned before (no task reads them again), and its
    shards table. A shard whose tokenized folder is gone (removed by a repair, or by hand) is not
    known: its task tokenizes it again (one listing of the shards folder tells)."""
    old = p.existing.shards() if p.existing is not None else None
    known = known_results(old)
    if known:
        present = set(p.store.storage.list_dirs(shards_kind(p.spec.name)))
        known = {k: v for k, v in known.items() if k in present}
    return known, old


def plan_sharded(p: Prepared, ex: Executor | None, *, fence: Any = None, write: bool = True) -> ShardedExtraction:
    """Tokenize the shards (tasks of ``ex``, committing each tokenized shard unless ``write`` is
    false) and plan the units from their counts; with an existing dataset, what changed."""
    assert p.shards is not None and p.settings is not None
    spec, ex_ = p.spec, ex or Executor()
    known, old = shards_known(p)
    store_opts = getattr(p.store.storage, "storage_options", None) or None
    plan = plan_shards(p.shards, p.settings, src=spec.corpus, store_uri=p.store.uri, store_options=ex_.storage_options(store_opts),
                       corpus_options=ex_.storage_options(spec.corpus.storage_options), dataset=spec.name,
                       unit_contexts=p.unit_contexts, executor=ex, fence=fence, write=write, known=known)
    forget, changed = reconcile(old, plan, on_change=spec.corpus.on_change, dataset=spec.name, path=spec.corpus.path)
    return ShardedExtraction(plan, p.settings, spec.name, forget, changed)


def _extract_sharded(p: Prepared, lease: store.Lease, result: ExtractResult, t_start: float, *, worker_cls: type[UnitWorker],
                     on_unit: Callable[[dict[str, Any]], None] | None, progress: bool) -> None:
    """A sharded corpus: a quick no-op when its listing is the one planned before; else, under the
    dataset's lease, tokenize the shards as tasks, plan, recompute what changed, and run."""
    spec, s, ds = p.spec, p.store, p.existing
    assert p.shards is not None and p.settings is not None
    if ds is not None and not p.rehook and _complete(ds, p.hooks):
        old = ds.shards()
        if old is not None and old.column("key").to_pylist() == [p.settings.key_for(r) for r in p.shards]:
            result.num_units = result.units_skipped = ds.info.num_units
            result.noop = True
            result.message = (f"nothing to do: dataset {spec.name!r} in {s.uri} already has all {ds.info.num_units} units of "
                              f"{len(p.hooks)} hook(s) committed, and its {len(p.shards)} shard(s) are as listed before"
                              + _verify_hint(ds, spec.store))
            return
    kind = shards_kind(spec.name)
    fresh = not s.storage.list(layout.dataset_dir(spec.name))
    before = set(s.storage.list_dirs(kind))
    try:
        with open_executor(spec.compute.executor, spec.compute.address) as ex:
            result.private_cluster, result.cluster_address = ex.ray and ex.private, ex.address
            with lease:
                try:
                    pl = plan_sharded(p, ex, fence=lease.fence())
                except Exception:
                    _drop_new_shards(s, spec.name, before, lease)
                    raise
                result.shards = len(pl.plan.keys)
                result.shards_tokenized = sum(1 for r in pl.plan.results if not r.get("reused"))
                result.shard_nodes = {n: str(r["node"]) for n, r in zip(pl.plan.names, pl.plan.results) if not r.get("reused")}
                _execute(p, pl, lease, ex, result, t_start, worker_cls=worker_cls, on_unit=on_unit, progress=progress, held=True)
    finally:
        if fresh and not s.storage.exists(layout.manifest_key(spec.name)) and not any(s.storage.list(kind)):
            for key in s.storage.list(layout.dataset_dir(spec.name)):  # only the lease's own records: nothing was planned
                s.storage.delete(key)


def _drop_new_shards(s: store.Store, name: str, before: set[str], lease: store.Lease) -> None:
    """Remove the tokenized shards a failed planning committed (bad input writes nothing)."""
    kind = shards_kind(name)
    for key in set(s.storage.list_dirs(kind)) - before:
        try:
            artifacts.delete(s.storage, kind, key, lease=lease)
        except Exception as e:  # pragma: no cover - best effort; gc collects what is left
            log.warning("could not remove tokenized shard %s of %r: %s", key, name, e)


def _execute(p: Prepared, pl: Plan | ShardedExtraction, lease: store.Lease, ex: Executor, result: ExtractResult, t_start: float, *,
             worker_cls: type[UnitWorker], on_unit: Callable[[dict[str, Any]], None] | None, progress: bool,
             held: bool = False) -> None:
    spec = p.spec
    result.num_units, result.held_back_contexts = pl.units, pl.held_back_contexts
    result.dropped_tokens, result.dropped_docs, result.partial_docs = pl.dropped_tokens, pl.dropped_docs, pl.partial_docs
    result.bad_images = list(pl.bad_images)
    if pl.units == 0:
        result.message = (
            f"nothing to extract yet: the corpus packs into {pl.n_contexts} contexts, fewer than one unit of {p.unit_contexts}"
            + (" (`corpus.growing` holds back partial units)" if spec.corpus.growing else "")
        )
        log.warning(result.message)
        return
    if isinstance(pl, Plan):
        check_committed(p, pl)
    with contextlib.nullcontext() if held else lease:  # taken for real now (refused if a job started since the check above)
        _run(p, pl, lease, ex, result, worker_cls=worker_cls, on_unit=on_unit, progress=progress)
    if not result.noop:
        seconds = time.perf_counter() - t_start
        result.message = (
            f"dataset {spec.name!r}: computed {result.units_run} unit(s) of {_hooks_phrase(result)} ({result.tokens:,} tokens, "
            f"{result.bytes_written / 2**20:.1f} MiB) in {seconds:.1f}s; {_committed_phrase(result)}" + _dropped_note(pl, spec)
        )


def _hooks_phrase(result: ExtractResult) -> str:
    """What a run computes, by hook: ``4 new hook(s)``, ``2 hook(s)``, ``3 hook(s) (1 new)``."""
    n, new = len(result.hooks_computed), len(result.hooks_new)
    return f"{new} new hook(s)" if new and new == n else f"{n} hook(s)" + (f" ({new} new)" if new else "")


def _committed_phrase(result: ExtractResult) -> str:
    """What a run found committed: whole hooks, else whole units (a unit missing any hook is
    computed, and counts as computed)."""
    if result.hooks_committed:
        return f"{len(result.hooks_committed)} hook(s) were already committed for every unit"
    return f"{result.units_skipped} unit(s) were already committed"


def _run(p: Prepared, pl: Plan | ShardedExtraction, lease: store.Lease, ex: Executor, result: ExtractResult, *,
         worker_cls: type[UnitWorker], on_unit: Callable[[dict[str, Any]], None] | None, progress: bool) -> None:
    spec, s = p.spec, p.store
    d_model = int(p.meta["d_model"])
    meta = {**p.meta, "plan": pl.summary()}
    if pl.bad_images:
        meta["unreadable_images"] = {"count": len(pl.bad_images), "first": pl.bad_images[:100]}
    sharded = isinstance(pl, ShardedExtraction)
    if p.rehook and p.existing is not None:
        s.writer(spec.name, fence=lease.token).forget_units(list(range(p.existing.info.num_units)), hooks=p.rehook)
    if sharded:
        if pl.forget and p.existing is not None:
            gone = s.writer(spec.name, fence=lease.token).forget_units(pl.forget)
            log.warning("dataset %r: shard(s) %s changed: %d committed unit(s) will be recomputed", spec.name,
                        ", ".join(pl.changed[:3]) + ("..." if len(pl.changed) > 3 else ""), len(gone))
            result.units_recomputed = gone
        c = meta["corpus"]
        meta["corpus"] = {**c, "docs": pl.plan.total("docs"), "skipped_empty": pl.plan.total("skipped_empty"),
                          "chars": pl.plan.total("chars"), "tokens": pl.plan.total("tokens")}
        meta["doc_set_hash"] = pl.plan.doc_set_hash()
        meta["corpus_state"] = pl.plan.state_fingerprint()
    w = s.create_dataset(
        spec.name, hooks={h: int(p.meta["hook_widths"].get(h) or d_model) for h in p.hooks}, context_size=p.context_size, dtype=spec.dtype,
        num_units=max(1, pl.units), unit_contexts=p.unit_contexts, meta=meta, exist_ok=True, fence=lease.token,
    )
    if sharded:
        if w.info.num_units > pl.units:  # a changed shard packs into fewer units: its old tail is gone
            w.shrink(pl.units)
        w.write_shards_table(pl.plan.table())
    else:
        w.write_documents(pl.documents)
    if p.tokenizer is not None:
        w.write_tokenizer(p.tokenizer.backend_json)
    w.update_meta(**{k: v for k, v in meta.items() if k not in IDENTITY_META_KEYS})
    ds = s.dataset(spec.name)
    done = {h: set(ds.committed_units(h)) for h in p.hooks}
    todo = [(u, [h for h in p.hooks if u not in done[h]]) for u in range(pl.units)]
    todo = [(u, hooks) for u, hooks in todo if hooks]
    result.units_skipped = pl.units - len(todo)
    if not todo:
        result.noop = True
        result.message = f"nothing to do: dataset {spec.name!r} already has all {pl.units} units of {len(p.hooks)} hook(s) committed"
        s.update_catalog(spec.name)
        return
    # Say what is computed: adding hooks to a dataset computes every unit, but only for them.
    old_hooks = set(p.existing.hooks) if p.existing is not None else set()
    result.hooks_computed = [h for h in p.hooks if any(h in hs for _, hs in todo)]
    result.hooks_new = [h for h in result.hooks_computed if h not in old_hooks]
    result.hooks_committed = [h for h in p.hooks if h not in result.hooks_computed]
    log.info(
        "dataset %r: %d of %d units to compute for %s (%s)%s%s", spec.name, len(todo), pl.units, _hooks_phrase(result),
        ", ".join(result.hooks_computed[:4]) + ("..." if len(result.hooks_computed) > 4 else ""),
        f"; {_committed_phrase(result)}" if result.hooks_committed else "",
        f"; {pl.held_back_contexts} contexts held back until the corpus fills a unit" if pl.held_back_contexts else "",
    )
    shape = pool_shape(ex.shape, num_workers=spec.compute.num_workers, cpus_per_worker=spec.compute.cpus_per_worker,
                       max_restarts=spec.compute.max_restarts)
    cfg = WorkerConfig(
        store_uri=s.uri, dataset=spec.name, model=p.model, model_type=p.meta["model_type"], n_layers=p.meta["n_layers"],
        d_model=d_model, dtype=spec.dtype, batch_tokens=spec.compute.batch_tokens, threads=shape.threads,
        storage_options=ex.storage_options(spec.storage_options),
        fence=lease.token, image=p.image, module_sites=p.module_sites, stop_after=p.stop_after, diffusion=p.diffusion,
    )
    cs = p.context_size
    # Built lazily, as workers free up: only units in flight have their contexts in memory (a
    # sharded unit is built by its worker, from its shard's tokens in the store).
    tasks = (Task(f"unit {u}", (u, pl.unit(u), hooks), pl.contexts_in(u) * cs) for u, hooks in todo)
    total = sum(pl.contexts_in(u) * cs for u, _ in todo)

    def finished(task: Task, st: dict[str, Any]) -> None:
        result.prepare_seconds += float(st.get("prepare_s", 0.0))
        result.compute_seconds += float(st.get("compute_s", 0.0))
        if on_unit is not None:
            on_unit(st)

    try:
        stats = ex.using(shape).run(worker_cls, cfg, tasks, count=len(todo), total_weight=total, on_result=finished,
                                    check=lease.check, desc=f"extract {spec.name}", progress=progress)
    finally:
        if not lease.lost:  # a job that lost its lease writes nothing more, not even the catalog
            try:
                w.compact_commits()  # the next open reads one index instead of every record
                s.update_catalog(spec.name)
            except Exception as e:  # pragma: no cover - derived data: readers fall back to the records
                log.warning("could not update the commit index or catalog of %r: %s", spec.name, e)
    result.units_run, result.tokens, result.bytes_written = stats.tasks_done, stats.weight_done, stats.bytes_written
    result.pool_seconds, result.steady_tokens, result.steady_seconds = stats.seconds, stats.steady_weight, stats.steady_seconds
    result.worker_peak_rss = stats.worker_peak_rss
    ds.refresh()
    missing = [h for h in p.hooks if len(ds.committed_units(h)) < pl.units]
    if missing:  # pragma: no cover - the pool raises first
        raise WorkerError(f"dataset {spec.name!r}: units of {missing} are still missing after the run")
