"""The feature-table job: run a stored SAE over every committed unit of its dataset and hook,
exactly once and resumable, then merge (``strata features encode SPEC``).

    spec = EncodeSpec(store="./acts", sae="tiny-topk")
    result = run_encode(spec)

Order of work. Everything that can be wrong with the input fails before Ray starts, before the
lease is taken and before anything is written: the store exists, the SAE is committed and has a
lineage naming its dataset, hook and the dataset's fingerprint; the dataset still has that
identity, has the hook, and has committed units of it; the SAE's ``d_in`` is the hook's width; no
other job holds the table's lease; an existing table of that name has the same identity (SAE
commit, dataset, options).

Then, holding the table's lease, the driver writes the manifest (once) and hands each unit not
yet encoded to the executor's actor pool (:mod:`pipeline.executor`; one worker per GPU, CPU workers
otherwise). Each :class:`EncodeWorker` reads its unit's activations from the store itself
(memory-mapped, checked), encodes them with the SAE (``sae.encode``) in batches of
``compute.batch_rows`` rows, and writes and commits the unit's sparse table, fenced with the
lease (:class:`store.features.writer.FeatureWriter`). Only a small status dict goes back through
Ray. When the pool is done the driver removes orphaned files, builds the merged generation
(statistics and feature-major copy, :mod:`store.features.merge`) and points the manifest at it.

Growth: a rerun encodes only units committed to the dataset since (the SAE never runs over a
unit twice) and merges them into a new generation; a finished table is a no-op that says so.

Crosscoders (several aligned sources): the table's rows are source 0's rows (its lineage's
``dataset`` and ``hook``); each is encoded with its aligned rows of every source, paired as in
training (:func:`strata.store.datasets.aligned.align_tokens`, :class:`AlignedSources`). A row of
source 0 with no aligned row in every other source (special rows always) is not encoded, as
special rows are not: it has no latents and does not count in ``encoded_rows`` (densities).
The merged stats gain ``decoder_norms`` (one value per source, :mod:`store.features.stats`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import xxhash
from pydantic import Field, field_validator

from strata import store
from strata.pipeline.errors import PipelineError, SpecError, WorkerError
from strata.pipeline.executor import ActorPool, Executor, Task, open_executor, pool_shape
from strata.pipeline.spec import ComputeSpec, JobSpec, Section
from strata.pipeline.worker import peak_rss_bytes
from strata.store.commit.lease import Fence
from strata.store.datasets.aligned import align_tokens, iter_aligned
from strata.store.errors import CorruptionError, LeaseHeldError
from strata.store.features.format import FeatureTableExistsError, FeatureTableInfo, load_info, unit_records
from strata.store.features.merge import build, load_generation
from strata.store.features.stats import HIST_BINS, HIST_HI, HIST_LO
from strata.store.features.writer import FeatureWriter, clean_orphans, create_or_open, identity_diff, publish, table_lease
from strata.store.layout import check_name

log = logging.getLogger(__name__)


class EncodeInputError(PipelineError, ValueError):
    """An SAE, dataset or table that cannot be encoded as asked."""


class SAEMismatchError(EncodeInputError):
    """An SAE whose input width or dataset does not match the hook it names."""


class EmptyDatasetError(EncodeInputError):
    """A dataset with no committed unit of the SAE's hook."""


# -- the spec ---------------------------------------------------------------------------------


class SampleSpec(Section):
    quantiles: int = Field(default=10, ge=1, le=100)
    """Equal-count activation quantiles of each feature to sample from (0 is the top one)."""
    per_quantile: int = Field(default=4, ge=0, le=1000)
    """Rows sampled per quantile."""
    seed: int = Field(default=0, ge=0, lt=2**63)
    """The sample's seed: the same seed picks the same rows, however units were split."""


class EncodeCompute(ComputeSpec):
    """Feature encoding's keys of the compute section."""

    keys = ("address", "executor", "device", "num_workers", "cpus_per_worker", "batch_rows", "max_restarts", "lease_stale_s", "merge_memory_gb")
    devices = ("auto", "cpu", "cuda")  # ``auto``: one worker per GPU when the cluster has GPUs, CPU workers otherwise


class EncodeSpec(JobSpec):
    """``strata features encode``: a stored SAE over its dataset into a feature table (the store
    holds the SAE and its dataset)."""

    sae: str
    """The committed SAE to encode with (``s.saes()`` lists them)."""
    name: str | None = None
    """The feature table's name (default: the SAE's name)."""
    top_k: int = Field(default=64, gt=0, le=10_000)
    """Top activating rows kept per feature (``fs.top(f, k)`` takes ``k`` up to this)."""
    skip_special: bool = True
    """Leave special rows (BOS, separators, padding) out: not encoded, not counted in densities."""
    sample: SampleSpec = SampleSpec()
    block_features: int = Field(default=256, gt=0)
    """Features per file of the feature-major copy."""
    compute: EncodeCompute = EncodeCompute()
    """Where and how encoding runs."""

    @field_validator("sae", "name")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, what="SAE or feature table")

    @property
    def table(self) -> str:
        return self.name or self.sae


# -- the worker -------------------------------------------------------------------------------


def sae_fingerprint(handle: Any) -> str:
    """Identity of an SAE's commit: its files' names, sizes and checksums."""
    files = sorted((f.to_dict() for f in handle.artifact.record.files), key=lambda d: d["key"])
    return xxhash.xxh3_64_hexdigest(json.dumps(files, sort_keys=True).encode())


@dataclass(frozen=True)
class EncodeConfig:
    store_uri: str
    table: FeatureTableInfo
    device: str  # "cuda" or "cpu"
    batch_rows: int
    threads: int | None = None
    storage_options: dict[str, Any] | None = None  # what the driver lets this worker have
    fence: Fence | None = None


class AlignedSources:
    """A crosscoder's inputs unit by unit of source 0: its rows that pair with every other
    source, and their rows of every source ``[n, n_sources, d]`` (float32)."""

    def __init__(self, s: store.Store, sources: list[dict[str, Any]]) -> None:
        self.sides = [(s.dataset(src["dataset"]), src["hook"]) for src in sources]
        self.alignment = align_tokens(self.sides)  # once per worker: every committed unit
        self.unit_rows = self.sides[0][0].info.unit_rows

    def unit(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(source-0 rows of ``unit`` that pair, local to the unit; their inputs)."""
        rows0 = self.alignment.rows[0]
        a, b = (int(x) for x in np.searchsorted(rows0, [unit * self.unit_rows, (unit + 1) * self.unit_rows]))
        d = self.sides[0][0].info.hooks[self.sides[0][1]].d
        if a == b:
            return np.zeros(0, np.int64), np.zeros((0, len(self.sides), d), np.float32)
        batch = next(iter(iter_aligned(self.sides, alignment=self.alignment.subset(slice(a, b)), batch_size=b - a, shuffle=False)))
        return rows0[a:b] - unit * self.unit_rows, np.stack([t.numpy() for t in batch], axis=1)


class EncodeWorker:
    """Encodes units with the SAE and commits their sparse tables. A Ray actor in the job; also
    usable in-process. Two calls run at once under a compute lock: one encodes while the other
    writes."""

    def __init__(self, cfg: EncodeConfig) -> None:
        import torch  # lazy: ~2 s to import; only the encoding replica needs it, not the driver's planning

        self.cfg = cfg
        s = store.open(cfg.store_uri, storage_options=cfg.storage_options, create=False)
        self.ds = s.dataset(cfg.table.dataset)
        handle = s.sae(cfg.table.sae)
        if sae_fingerprint(handle) != cfg.table.sae_fingerprint:
            raise EncodeInputError(f"SAE {cfg.table.sae!r} was replaced since the job started; run the job again")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
        self.sae = handle.load(device=str(self.device)).eval()
        self.aligned = AlignedSources(s, handle.cfg["sources"]) if handle.cfg.get("architecture") == "crosscoder" else None
        self.dtype = next(self.sae.parameters()).dtype
        self.writer = FeatureWriter(s.storage, cfg.table, fence=cfg.fence)
        self._compute = threading.Lock()
        self.units_done = 0

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The non-zero latents of rows ``x`` ``[n, d_in]`` (stored dtype): ``(row in x,
        feature, value)``, sorted by row, then feature."""
        import torch  # lazy: as above

        if self.cfg.threads and torch.get_num_threads() != self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)  # in this thread: OpenMP's count is per thread
        bf16 = self.ds.info.dtype == "bfloat16" and x.dtype != np.float32  # a crosscoder's aligned inputs come as float32
        rows, feats, vals = [], [], []
        with torch.inference_mode():
            for b0 in range(0, len(x), self.cfg.batch_rows):
                t = torch.from_numpy(np.ascontiguousarray(x[b0 : b0 + self.cfg.batch_rows]))
                t = t.view(torch.bfloat16) if bf16 else t
                z = self.sae.encode(t.to(self.device, non_blocking=True).to(self.dtype))
                nz = torch.nonzero(z)
                v = z[nz[:, 0], nz[:, 1]].float()
                if not bool(torch.isfinite(v).all()):
                    raise WorkerError(f"SAE {self.cfg.table.sae!r} produced non-finite latents (rows {b0}.. of the unit)")
                rows.append((nz[:, 0] + b0).cpu().numpy())
                feats.append(nz[:, 1].to(torch.int32).cpu().numpy())
                vals.append(v.cpu().numpy())
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return np.concatenate(rows), np.concatenate(feats), np.concatenate(vals)

    def process(self, unit: int) -> dict[str, Any]:
        """Encode and commit one unit; returns a small status dict."""
        t0 = time.perf_counter()
        info = self.cfg.table
        if self.writer.committed(unit) is not None:
            return {"unit": unit, "rows": 0, "status": "already committed", "pid": os.getpid()}
        with self._compute:
            acts = self.ds.unit_array(info.hook, unit)  # memory-mapped, checked in full
            if self.aligned is not None:  # a crosscoder: source 0's paired rows, with every source's (see the module docstring)
                keep, x = self.aligned.unit(unit)
                local, feature, value = self.encode(x)
            else:
                keep = np.flatnonzero(~self.ds.special_mask(unit)) if info.skip_special else np.arange(acts.shape[0])
                local, feature, value = self.encode(acts[keep] if keep.size < acts.shape[0] else acts)
        t1 = time.perf_counter()
        row = keep[local] + unit * info.unit_rows
        status = self.writer.write_unit(unit, rows=int(acts.shape[0]), encoded_rows=int(keep.size), row=row, feature=feature, value=value)
        self.units_done += 1
        return {"unit": unit, "rows": int(acts.shape[0]), "entries": int(row.size), "status": status, "encode_s": t1 - t0,
                "write_s": time.perf_counter() - t1, "bytes": int(row.size) * 16, "pid": os.getpid(), "peak_rss": peak_rss_bytes()}


# -- the driver -------------------------------------------------------------------------------


@dataclass
class EncodeResult:
    name: str
    store: str
    units: int = 0  # units of the dataset's hook committed when the job planned
    units_run: int = 0
    units_skipped: int = 0
    entries: int = 0  # non-zero latents in the merged generation
    rows: int = 0
    seconds: float = 0.0
    pool_seconds: float = 0.0
    steady_rows: int = 0
    steady_seconds: float = 0.0
    merge_seconds: float = 0.0
    generation: str | None = None
    noop: bool = False
    message: str = ""

    @property
    def steady_rows_per_s(self) -> float:
        return self.steady_rows / self.steady_seconds if self.steady_seconds > 0 else 0.0


def prepare(spec: EncodeSpec, s: store.Store) -> tuple[FeatureTableInfo, list[int]]:
    """Check the SAE, its dataset and hook; the table's identity and the units to cover.
    Raises a one-line error for any bad input; writes nothing."""
    handle = s.sae(spec.sae)
    handle.check()  # every file, the weights too: a damaged SAE fails here, not in each Ray worker on load
    lineage, cfg = handle.lineage, handle.cfg
    missing = [k for k in ("dataset", "hook", "fingerprint") if not lineage.get(k)]
    if missing:
        raise EncodeInputError(f"SAE {spec.sae!r}: its lineage.json lacks {missing}, so its dataset and hook are unknown")
    ds = s.dataset(lineage["dataset"])
    hook = ds.check_hook(lineage["hook"])
    if ds.info.fingerprint != lineage["fingerprint"]:
        raise SAEMismatchError(
            f"SAE {spec.sae!r} was trained on dataset {ds.name!r} with fingerprint {lineage['fingerprint']}, but that dataset "
            f"now has fingerprint {ds.info.fingerprint} (it was replaced by another identity)"
        )
    d = ds.info.hooks[hook].d
    if cfg.get("d_in") != d or not isinstance(cfg.get("d_sae"), int) or cfg["d_sae"] <= 0:
        raise SAEMismatchError(f"SAE {spec.sae!r} takes d_in={cfg.get('d_in')!r}, but hook {hook!r} of dataset {ds.name!r} is {d} wide")
    units = ds.committed_units(hook)
    if not units:
        raise EmptyDatasetError(f"dataset {ds.name!r} has no committed unit of hook {hook!r} to encode; extract it first")
    info = FeatureTableInfo(
        name=spec.table, sae=spec.sae, sae_fingerprint=sae_fingerprint(handle), dataset=ds.name, dataset_fingerprint=ds.info.fingerprint,
        hook=hook, d_in=d, d_sae=int(cfg["d_sae"]), unit_rows=ds.info.unit_rows, top_k=spec.top_k, skip_special=spec.skip_special,
        hist={"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS}, sample=spec.sample.model_dump(), block_features=spec.block_features,
        # A transcoder encodes its in hook's rows (lineage `hook`); the table names both of its hooks.
        sae_lineage={k: lineage.get(k) for k in ("units", "holdout_units", "architecture",
                                                  *(("hook_in", "hook_out") if lineage.get("hook_out") else ()))},
    )
    return info, units


def check_table(spec: EncodeSpec, s: store.Store) -> tuple[FeatureTableInfo, list[int], FeatureTableInfo | None]:
    """:func:`prepare`, and the table of that name already in the store (``None`` when new),
    refused when it has another identity. Reads only. The job, ``strata reprocess``'s plan and
    ``strata submit`` all check through this one function, so they refuse the same things."""
    info, units = prepare(spec, s)
    old = load_info(s.storage, info.name)
    diff = identity_diff(old, info) if old is not None else ""
    if diff:
        raise FeatureTableExistsError(f"feature table {info.name!r} already exists with another identity ({diff}); choose a new `name`")
    return info, units, old


def _shape(spec: EncodeSpec, ex: Executor) -> ActorPool:
    c = spec.compute
    if c.device == "cuda" and ex.shape.gpus == 0:
        raise SpecError(f"`compute.device` is cuda, but {'the Ray cluster' if ex.ray else 'this machine'} has no GPU; use `auto` or `cpu`")
    shape = ex.shape if c.device != "cpu" else replace(ex.shape, gpus=0)
    return pool_shape(shape, num_workers=c.num_workers, cpus_per_worker=c.cpus_per_worker, max_restarts=c.max_restarts)


def run_encode(spec: EncodeSpec, *, progress: bool | None = None, worker_cls: type[EncodeWorker] = EncodeWorker,
               on_unit: Callable[[dict[str, Any]], None] | None = None) -> EncodeResult:
    """Run the job end to end (see the module docstring). ``progress``: ``None`` shows a bar where
    someone watches (a widget in Jupyter, text on a terminal, nothing otherwise), ``True`` always
    (``strata features encode``), ``False`` never. ``worker_cls`` and ``on_unit`` are seams for
    tests and tools."""
    t_start = time.perf_counter()
    s = store.open(spec.store, storage_options=spec.storage_options, create=False)
    info, units, old = check_table(spec, s)
    lease = table_lease(s.storage, info.name, owner="strata features encode", stale_after_s=spec.compute.lease_stale_s)
    holder = lease.holder()
    if holder is not None:
        raise LeaseHeldError(lease.held_message(holder))
    records, damaged = unit_records(s.storage, old) if old is not None else ({}, {})
    if damaged:
        raise CorruptionError(f"feature table {info.name!r}: damaged commit record(s) of unit(s) {sorted(damaged)}: "
                              f"{next(iter(damaged.values()))}; delete those records and run the job again")
    todo = [u for u in units if u not in records]
    result = EncodeResult(info.name, s.uri, units=len(units), units_skipped=len(units) - len(todo))
    if not todo and old is not None and old.merged and set(load_generation(s.storage, old, old.merged).units) == set(records):
        result.noop, result.generation = True, old.merged
        result.message = (f"nothing to do: feature table {info.name!r} already covers all {len(units)} committed unit(s) of "
                          f"dataset {info.dataset!r} hook {info.hook!r}")
        result.seconds = time.perf_counter() - t_start
        return result
    if todo:
        with open_executor(spec.compute.executor, spec.compute.address) as ex:
            shape = _shape(spec, ex)
            with lease:
                info = create_or_open(s.storage, info, lease=lease)
                cfg = EncodeConfig(
                    store_uri=s.uri, table=info, device="cuda" if shape.num_gpus else "cpu", batch_rows=spec.compute.batch_rows,
                    threads=shape.threads, fence=lease.fence(),
                    storage_options=ex.storage_options(spec.storage_options),
                )
                # Each unit weighs its own rows (the last unit of a dataset is often shorter): the
                # bar's total and its increments (each worker's row count) then count one thing.
                ds = s.dataset(info.dataset)
                tasks = [Task(f"unit {u}", (u,), ds.unit_counts(info.hook, u)[0]) for u in todo]
                stats = ex.using(shape).run(worker_cls, cfg, tasks, on_result=(lambda t, st: on_unit(st)) if on_unit else None,
                                            check=lease.check, desc=f"encode {info.name}", progress=progress, unit="row")
                result.units_run, result.pool_seconds = stats.tasks_done, stats.seconds
                result.steady_rows, result.steady_seconds = stats.steady_weight, stats.steady_seconds
                _merge(spec, s, info, lease, result)
    else:
        with lease:
            _merge(spec, s, create_or_open(s.storage, info, lease=lease), lease, result)
    result.seconds = time.perf_counter() - t_start
    result.message = (
        f"feature table {info.name!r}: encoded {result.units_run} unit(s) with SAE {info.sae!r} ({result.units_skipped} already "
        f"encoded); merged {result.rows:,} rows, {result.entries:,} non-zero latents, in {result.seconds:.1f}s"
    )
    return result


def _merge(spec: EncodeSpec, s: store.Store, info: FeatureTableInfo, lease: store.Lease, result: EncodeResult) -> None:
    t0 = time.perf_counter()
    records, damaged = unit_records(s.storage, info)
    if damaged:  # pragma: no cover - checked before the pool, and workers write valid records
        raise CorruptionError(f"feature table {info.name!r}: damaged commit record(s) of unit(s) {sorted(damaged)}")
    clean_orphans(s.storage, info, lease=lease)
    previous = load_generation(s.storage, info, info.merged) if info.merged else None
    gen = build(s.storage, info, records, previous=previous, lease=lease,
                memory_bytes=int(spec.compute.merge_memory_gb * (1 << 30)))
    publish(s.storage, info, gen, lease=lease)
    g = load_generation(s.storage, info, gen)
    result.generation, result.entries, result.rows = gen, g.entries, g.rows
    result.merge_seconds = time.perf_counter() - t0
