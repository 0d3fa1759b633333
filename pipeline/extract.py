"""The extraction driver: plan, then run units on a Ray actor pool, exactly once and resumable.

    job = ExtractJob(store="./acts", name="tiny", model=ModelRef("./models/tiny"), corpus=CorpusSource("corpus.jsonl"),
                     hooks=["blocks.*.hook_resid_post"])
    result = run_extract(job)

Order of work (everything that can be wrong with the input fails before any model runs and
before anything is written):

1. the store is writable; the model and its exact revision resolve; the hooks exist; the
   context fits the model; the corpus reads and is not empty; the dataset name is free or holds
   the same identity;
2. a quick no-op check: the same corpus and every requested hook of every unit committed;
3. tokenization as CPU Ray tasks, packing into contexts and units (a pure function of the
   corpus and the tokenizer, so unit ``k`` always covers the same contexts);
4. under the dataset's write lease, the driver creates or grows the dataset and adds hooks,
   then hands each missing (unit, hooks) to the actor pool. Workers write and commit; the
   driver commits nothing. A worker that dies is restarted by Ray and its in-flight units are
   retried; a unit is only visible once committed, so a retry cannot duplicate it.

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

import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import store
from pipeline import models
from pipeline.corpus import Corpus, CorpusSource, read_corpus
from pipeline.errors import CorpusError, SpecError, WorkerError
from pipeline.hooks import expand_hooks, family_of, hook_sites
from pipeline.packing import Contexts, Packing, TokenizerInfo, encode_texts, num_units, pack, tokenizer_info
from pipeline.worker import CRASH_ENV, CRASH_MARKER_ENV, UnitWorker, WorkerConfig, peak_rss_bytes
from store.errors import DatasetExistsError, StorageError
from store.layout import check_name
from store.manifest import fingerprint as dataset_fingerprint

log = logging.getLogger(__name__)

# Test hook: the driver exits abruptly (as if killed) once this many units are committed.
DRIVER_EXIT_ENV = "STRATA_TEST_DRIVER_EXIT_AFTER_UNITS"
_FORWARD_ENV = (CRASH_ENV, CRASH_MARKER_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_ENDPOINT")
# Store credentials reach workers of a Ray started on this machine (same user, same trust);
# on a remote cluster the workers use their own (instance roles, the cluster's environment).
_FORWARD_ENV_LOCAL = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)


@dataclass(frozen=True)
class ExtractJob:
    """Everything an extraction needs (jobs/spec.py builds it from a YAML spec)."""

    store: str
    name: str
    model: models.ModelRef
    corpus: CorpusSource
    hooks: tuple[str, ...]
    context_size: int = 128
    packing: Packing = "concat"
    prepend_bos: bool = True
    split_long: bool = True
    growing: bool = False
    dtype: str = "float16"
    batch_tokens: int = 8192
    unit_contexts: int = 256
    address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: int | None = None
    max_restarts: int = 3
    tokenize_chunk_docs: int = 4096
    storage_options: dict[str, Any] | None = None
    progress: bool = True
    spec: dict[str, Any] = field(default_factory=dict)  # the validated spec, recorded in the manifest


@dataclass
class ExtractResult:
    name: str
    store: str
    num_units: int
    units_run: int = 0
    units_skipped: int = 0
    held_back_contexts: int = 0
    tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    noop: bool = False
    hooks: list[str] = field(default_factory=list)
    driver_peak_rss: int = 0
    worker_peak_rss: int = 0
    pool_seconds: float = 0.0  # from starting the actors to the last unit committed
    steady_tokens: int = 0  # tokens of the units committed after the first one ...
    steady_seconds: float = 0.0  # ... and the time they took (leaves out model loading)
    message: str = ""

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

    job: ExtractJob
    store: store.Store
    model: models.ResolvedModel
    config: Any
    tokenizer: TokenizerInfo
    hooks: list[str]
    hook_map: dict[str, str]
    corpus: Corpus
    corpus_fp: str  # identity fingerprint (a prefix of the corpus when it grew)
    corpus_docs: int  # documents covered by corpus_fp
    meta: dict[str, Any]
    existing: store.ActivationDataset | None
    unit_contexts: int


# -- 1. checks --------------------------------------------------------------------------------


def _check_writable(s: store.Store) -> None:
    key = f"tmp/.strata-probe-{uuid.uuid4().hex}"
    try:
        s.storage.write(key, b"")
        s.storage.delete(key)
    except Exception as e:
        raise StorageError(f"store {s.uri} cannot be written: {e}") from None


def prepare(job: ExtractJob) -> Prepared:
    """Resolve and check everything; raise a one-line error for any bad input. Writes nothing
    but a probe file to check the store is writable."""
    try:
        s = store.open(job.store, storage_options=job.storage_options)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"store {job.store!r} cannot be opened: {e}") from None
    _check_writable(s)
    check_name(job.name)

    m = models.resolve(job.model)
    config = models.load_config(m)
    model_type = getattr(config, "model_type", "?")
    fam = family_of(model_type)
    n_layers = int(config.num_hidden_layers)
    sites = hook_sites(fam, n_layers)
    hooks = expand_hooks(list(job.hooks), sites, model=f"model {job.model.id!r} ({model_type}, {n_layers} layers)")
    limit = models.max_context(config)
    if limit is not None and job.context_size > limit:
        raise SpecError(f"`tokenize.context_size` {job.context_size} is beyond the maximum of model {job.model.id!r} ({limit})")
    tok = tokenizer_info(models.load_tokenizer(m), job.model.id)
    if job.prepend_bos and tok.bos_id is None:
        raise SpecError(f"`tokenize.prepend_bos` is true but the tokenizer of {job.model.id!r} has no BOS or CLS token")

    corpus = read_corpus(job.corpus)
    existing = s.dataset(job.name) if job.name in s.datasets() else None
    corpus_fp, corpus_docs = corpus.fingerprint(), len(corpus)
    unit_contexts = job.unit_contexts
    if existing is not None:
        old = existing.info.meta
        n_old = int(old.get("corpus_docs", -1))
        if 0 < n_old <= len(corpus) and corpus.fingerprint(n_old) == old.get("corpus_fingerprint"):
            corpus_fp, corpus_docs = old["corpus_fingerprint"], n_old
        if existing.info.unit_contexts != unit_contexts:
            log.info("dataset %r keeps its %d contexts per unit (spec asks %d)", job.name, existing.info.unit_contexts, unit_contexts)
            unit_contexts = existing.info.unit_contexts

    hook_map = {h: sites[h].describe() for h in sites}
    meta = {
        "model": job.model.id,
        "revision": m.revision,
        "tokenizer": tok.fingerprint,
        "corpus_fingerprint": corpus_fp,
        "packing": job.packing + ("" if job.packing == "concat" or job.split_long else "-nosplit"),
        "prepend_bos": job.prepend_bos,
        "corpus_docs": corpus_docs,
        "corpus": {"path": job.corpus.path, "format": job.corpus.format, "text_field": job.corpus.text_field, **corpus.stats},
        "model_type": model_type,
        "family": fam.name,
        "n_layers": n_layers,
        "d_model": int(config.hidden_size),
        "torch_dtype": job.model.torch_dtype,
        "hook_modules": hook_map,
        "tokenizer_name": tok.name,
        "special_tokens": {"bos": tok.bos_id, "sep": tok.sep_id, "pad": tok.pad_id},
        "growing": job.growing,
        "spec": job.spec,
    }
    if existing is not None:
        fp = dataset_fingerprint(context_size=job.context_size, dtype=job.dtype, meta=meta)
        if fp != existing.info.fingerprint:
            keys = ("model", "revision", "tokenizer", "corpus_fingerprint", "packing", "prepend_bos")
            diff = [f"{k}: {existing.info.meta.get(k)!r} -> {meta[k]!r}" for k in keys if existing.info.meta.get(k) != meta[k]]
            diff += [f"{k}: {a!r} -> {b!r}" for k, a, b in (("context_size", existing.info.context_size, job.context_size), ("dtype", existing.info.dtype, job.dtype)) if a != b]
            raise DatasetExistsError(
                f"dataset {job.name!r} already exists in {s.uri} with a different identity ({'; '.join(diff)}); "
                "a changed model, tokenizer, corpus, context, packing or dtype makes a new dataset: choose a new `name`"
            )
    return Prepared(job, s, m, config, tok, hooks, {h: hook_map[h] for h in hooks}, corpus, corpus_fp, corpus_docs, meta, existing, unit_contexts)


def _complete(ds: store.ActivationDataset, hooks: list[str]) -> bool:
    n = ds.info.num_units
    return all(h in ds.info.hooks and len(ds.committed_units(h)) == n for h in hooks) and len(ds.committed_units()) == n


# -- 2. planning ------------------------------------------------------------------------------


def tokenize(corpus: Corpus, tok: TokenizerInfo, *, chunk_docs: int, use_ray: bool = True) -> list[np.ndarray]:
    """Token ids of every document, as CPU Ray tasks over chunks of documents."""
    chunks = [corpus.texts[i : i + chunk_docs] for i in range(0, len(corpus), chunk_docs)]
    if not use_ray:
        return [ids for c in chunks for ids in encode_texts(tok.backend_json, c)]
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(encode_texts)
    tj = ray.put(tok.backend_json)
    out: list[np.ndarray] = []
    for part in ray.get([task.remote(tj, c) for c in chunks]):
        out.extend(part)
    return out


def plan(p: Prepared, tokens: list[np.ndarray]) -> Contexts:
    j = p.job
    return pack(tokens, p.corpus.doc_ids, tok=p.tokenizer, context_size=j.context_size, packing=j.packing, prepend_bos=j.prepend_bos, split_long=j.split_long)


def _first_context_of_doc(tokens: list[np.ndarray], n: int, job: ExtractJob) -> int:
    body = job.context_size - (1 if job.prepend_bos else 0)
    if job.packing == "concat":
        return sum(len(t) + 1 for t in tokens[:n]) // body
    return sum((max(1, -(-len(t) // body)) if job.split_long else 1) for t in tokens[:n])


def _check_committed(p: Prepared, ctx: Contexts, tokens: list[np.ndarray]) -> None:
    """Committed units must be exactly what the current plan puts there."""
    ds = p.existing
    if ds is None:
        return
    uc = p.unit_contexts
    committed = ds.committed_units()
    for u in committed:
        have = ds.unit_rows(u)
        want = max(0, min(len(ctx), (u + 1) * uc) - u * uc) * p.job.context_size
        if have != want:
            raise CorpusError(
                f"dataset {p.job.name!r}: unit {u} was committed with {have} token rows but the corpus now puts {want} there; "
                "it was the partial last unit of a smaller corpus, which appended documents would change. "
                "Extract the grown corpus under a new `name`, and set `corpus.growing: true` for corpora that grow"
            )
    if len(p.corpus) == p.corpus_docs:
        return  # the identity fingerprint covers every document
    # Documents after the fingerprinted prefix were extracted by earlier appends: compare tokens.
    first = _first_context_of_doc(tokens, p.corpus_docs, p.job) // uc
    for u in [u for u in committed if u >= first]:
        t = ds.tokens(units=[u])
        part = ctx.slice(u * uc, u * uc + t.num_rows // p.job.context_size)
        if not (np.array_equal(t.column("token_id").to_numpy(), part.token_id.reshape(-1)) and np.array_equal(t.column("doc_id").to_numpy(), part.doc_id.reshape(-1))):
            raise CorpusError(
                f"dataset {p.job.name!r}: documents in unit {u} changed since it was extracted (the corpus must only grow at its end); "
                "extract the changed corpus under a new `name`"
            )


# -- 3. running -------------------------------------------------------------------------------


def _ray_init(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kw["runtime_env"] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    ray.init(address=address, **kw)
    return True


def _pool_shape(job: ExtractJob, todo: int) -> tuple[int, dict[str, Any], int | None]:
    """(number of actors, Ray resource options, torch threads). One actor per GPU when the
    cluster has GPUs; CPU actors otherwise (never a GPU request that cannot be met)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = max(1, int(res.get("CPU", 1)))
    if gpus > 0:
        n = min(job.num_workers or gpus, gpus)
        return max(1, min(n, todo)), {"num_gpus": 1, "num_cpus": job.cpus_per_worker or 1}, None
    n = max(1, min(job.num_workers or 1, todo))
    node_cpus = max([int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")] or [1])
    per = job.cpus_per_worker or max(1, min(cpus // n, node_cpus))  # an actor must fit on one node
    return n, {"num_cpus": per}, per


def run_extract(job: ExtractJob) -> ExtractResult:
    """Run an extraction job end to end (see the module docstring)."""
    t_start = time.perf_counter()
    p = prepare(job)
    result = ExtractResult(job.name, p.store.uri, num_units=0, hooks=p.hooks)

    ds = p.existing
    if ds is not None and len(p.corpus) == p.corpus_docs and _complete(ds, p.hooks):
        result.num_units = ds.info.num_units
        result.noop = True
        result.units_skipped = ds.info.num_units
        result.message = (
            f"nothing to do: dataset {job.name!r} in {p.store.uri} already has all {ds.info.num_units} units "
            f"of {len(p.hooks)} hook(s) committed"
        )
        result.seconds = time.perf_counter() - t_start
        log.debug(result.message)
        return result

    started = _ray_init(job.address)
    try:
        return _run(p, result, t_start)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(p: Prepared, result: ExtractResult, t_start: float) -> ExtractResult:
    import ray

    job = p.job
    tokens = tokenize(p.corpus, p.tokenizer, chunk_docs=job.tokenize_chunk_docs)
    ctx = plan(p, tokens)
    uc = p.unit_contexts
    units = num_units(len(ctx), uc, full_only=job.growing)
    result.held_back_contexts = len(ctx) - min(len(ctx), units * uc)
    result.num_units = units
    if units == 0:
        result.message = (
            f"nothing to extract yet: the corpus packs into {len(ctx)} contexts, fewer than one unit of {uc}"
            + (" (`corpus.growing` holds back partial units)" if job.growing else "")
        )
        log.warning(result.message)
        return result
    p.meta["plan"] = {"contexts": len(ctx), "tokens": int(ctx.token_id.size), "units": units}
    _check_committed(p, ctx, tokens)

    d_model = int(p.config.hidden_size)
    with p.store.lease(job.name, owner=f"strata extract pid {os.getpid()} on {socket.gethostname()}"):
        w = p.store.create_dataset(
            job.name, hooks={h: d_model for h in p.hooks}, context_size=job.context_size, dtype=job.dtype,
            num_units=units, unit_contexts=uc, meta=p.meta, exist_ok=True,
        )
        ds = p.store.dataset(job.name)
        done = {h: set(ds.committed_units(h)) for h in p.hooks}
        todo = []
        for u in range(units):
            missing = [h for h in p.hooks if u not in done[h]]
            if missing:
                todo.append((u, missing))
        result.units_skipped = units - len(todo)
        if not todo:
            result.noop = True
            result.message = f"nothing to do: dataset {job.name!r} already has all {units} units of {len(p.hooks)} hook(s) committed"
            log.debug(result.message)
            result.seconds = time.perf_counter() - t_start
            return result
        log.info(
            "dataset %r: %d of %d units to compute for %d hook(s) (%s)%s", job.name, len(todo), units, len(p.hooks),
            ", ".join(p.hooks[:4]) + ("..." if len(p.hooks) > 4 else ""),
            f"; {result.held_back_contexts} contexts held back until the corpus fills a unit" if result.held_back_contexts and job.growing else "",
        )
        _run_pool(p, w, ctx, todo, result)
    ds = p.store.dataset(job.name)
    missing = [h for h in p.hooks if len(ds.committed_units(h)) < units]
    if missing:  # pragma: no cover - the pool raises first
        raise WorkerError(f"dataset {job.name!r}: units of {missing} are still missing after the run")
    result.seconds = time.perf_counter() - t_start
    result.driver_peak_rss = peak_rss_bytes()
    result.message = (
        f"dataset {job.name!r}: computed {result.units_run} unit(s) ({result.tokens:,} tokens, {result.bytes_written / 2**20:.1f} MiB) "
        f"in {result.seconds:.1f}s; {result.units_skipped} unit(s) were already committed"
    )
    log.debug(result.message)
    return result


def _run_pool(p: Prepared, w: store.DatasetWriter, ctx: Contexts, todo: list[tuple[int, list[str]]], result: ExtractResult) -> None:
    import ray
    from tqdm.auto import tqdm

    job = p.job
    uc = p.unit_contexts
    n_actors, resources, threads = _pool_shape(job, len(todo))
    local = not job.address and not os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in (*_FORWARD_ENV, *(_FORWARD_ENV_LOCAL if local else ())) if k in os.environ}
    cfg = WorkerConfig(
        store_uri=p.store.uri, dataset=job.name, model=p.model, model_type=p.meta["model_type"], n_layers=p.meta["n_layers"],
        d_model=p.meta["d_model"], dtype=job.dtype, batch_tokens=job.batch_tokens, threads=threads, storage_options=job.storage_options,
    )
    actor_cls = ray.remote(UnitWorker).options(
        **resources, max_restarts=job.max_restarts, max_task_retries=job.max_restarts, max_concurrency=2,
        runtime_env={"env_vars": env} if env else None,
    )
    actors = [actor_cls.remote(cfg) for _ in range(n_actors)]
    exit_after = int(os.environ.get(DRIVER_EXIT_ENV, "0") or 0)
    total_tokens = sum(min(len(ctx), (u + 1) * uc) - u * uc for u, _ in todo) * job.context_size
    queue = list(reversed(todo))
    inflight: dict[Any, tuple[int, int]] = {}  # ref -> (unit, actor index)
    per_actor = [0] * n_actors
    # In a Ray job's log (no terminal) the bar refreshes every 30 s rather than filling the log.
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=total_tokens, unit="tok", unit_scale=True, desc=f"extract {job.name}", disable=not job.progress,
        smoothing=0.1, mininterval=0.5 if tty else 30.0, file=sys.stderr,
    )
    t0 = t_first = time.perf_counter()

    def submit(i: int) -> None:
        u, hooks = queue.pop()
        part = ctx.slice(u * uc, min(len(ctx), (u + 1) * uc))
        ref = actors[i].process.remote(u, part, hooks)
        inflight[ref] = (u, i)
        per_actor[i] += 1

    try:
        for _ in range(2):  # two calls per actor: one computes while the other writes
            for i in range(n_actors):
                if queue:
                    submit(i)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                u, i = inflight.pop(ref)
                per_actor[i] -= 1
                try:
                    st = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise WorkerError(f"unit {u}: its worker died {job.max_restarts + 1} times; last: {str(e).splitlines()[0]}") from None
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise WorkerError(f"unit {u} failed in a worker: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
                now = time.perf_counter()
                if result.units_run == 0:
                    t_first = now
                else:
                    result.steady_tokens += st["rows"]
                    result.steady_seconds = now - t_first
                result.pool_seconds = now - t0
                result.units_run += 1
                result.tokens += st["rows"]
                result.bytes_written += st["bytes"]
                result.worker_peak_rss = max(result.worker_peak_rss, st["peak_rss"])
                bar.update(st["rows"])
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"units {result.units_run}/{len(todo)}, {result.bytes_written / max(el, 1e-9) / 2**20:.0f} MiB/s")
                if exit_after and result.units_run >= exit_after:
                    os._exit(3)  # test hook: a driver killed mid-job
                if queue:
                    submit(i)
    finally:
        bar.close()
        for ref in inflight:
            ray.cancel(ref, force=False)
        for a in actors:
            ray.kill(a, no_restart=True)
