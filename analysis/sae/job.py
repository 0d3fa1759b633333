"""The SAE training job: plan, take every SAE's write lease, train (on the executor: in this
process or as Ray tasks, :mod:`pipeline.executor`), evaluate, commit. The core of ``strata sae train`` and ``python -m jobs.sae_train``.

Order of work:

1. :func:`analysis.sae.plan.plan` reads the store and refuses bad input before anything is
   written (unknown dataset or hook, no committed unit, ``sae.d_in`` not the hook's width, a
   name committed or checkpointed with another config). SAEs committed with the same config are
   left alone: a rerun of a finished job is a no-op.
2. The driver takes the write lease of every SAE name it will produce, up front, and refuses at
   once (one line) when any is held by a live job. A killed job's leases are taken over.
3. Each task (one sweep combination: the SAEs of every hook, one pass over the data) runs
   :func:`run_task`: it opens the store itself, resumes from the pass's last checkpoint when
   there is one, trains, evaluates on the held-out units, commits each SAE, then deletes its
   checkpoints. It commits with the leases' picklable fences, so a job whose lease was taken
   over (it was paused past the stale time) commits nothing more. Tasks return small dicts;
   weights never pass through Ray.
4. Ray is used when there are several tasks, an ``address``, or this is a Ray job
   (``compute.ray: auto``): one task per combination, one GPU each on a cluster with GPUs, CPU
   tasks of ``compute.cpus_per_task`` CPUs otherwise. A single pass runs in this process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from strata import store
from strata.analysis.sae import checkpoint
from strata.analysis.sae.config import SAETrainSpec
from strata.analysis.sae.crosscoder_run import evaluate_crosscoder, plan_crosscoders, train_crosscoder
from strata.analysis.sae.evaluate import evaluate, load_causal_lm
from strata.analysis.sae.plan import Plan, PlannedRun, Task, plan
from strata.analysis.sae.save import commit_sae
from strata.analysis.sae.train import Checkpointing, resolve_device, train_pass
from strata.analysis.sae.transcoder_eval import evaluate_transcoder
from strata.pipeline.cluster import in_ray_job
from strata.pipeline.errors import ClusterError, WorkerError
from strata.pipeline.executor import Tasks, open_executor
from strata.pipeline.extract import check_store_path
from strata.store.errors import LeaseHeldError, StrataError
from strata.store.saes.handles import SAES
from strata.store.storage import open_storage

if TYPE_CHECKING:
    from strata.store.commit.lease import Fence, Lease
    from strata.store.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class SAEOutcome:
    """What the job did for one SAE."""

    name: str
    hook: str
    status: str
    """``trained``, ``resumed`` (from ``resumed_from``) or ``unchanged`` (committed already)."""
    resumed_from: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class JobResult:
    store: str
    dataset: str
    outcomes: list[SAEOutcome]
    used_ray: bool = False
    seconds: float = 0.0

    @property
    def noop(self) -> bool:
        return all(o.status == "unchanged" for o in self.outcomes)


@dataclass(frozen=True)
class TaskInput:
    """What one task needs; small and picklable (a Ray task's argument)."""

    dataset: str
    fingerprint: str
    task: Task
    fences: dict[str, Fence | Lease]
    """SAE name -> its lease's fence (a Ray task), or the lease itself (in-process)."""
    device: str
    threads: int | None = None


# -- the task ------------------------------------------------------------------------------------


def _evaluate(results: list[Any], ds: store.ActivationDataset, device: str) -> dict[str, dict[str, Any]]:
    """Held-out metrics of each trained SAE; the dataset's model (for the spliced loss) is
    loaded once, when it is on this machine."""

    model, why, loaded = None, None, False
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        holdout = r.lineage["holdout_units"]
        if not holdout:
            out[r.name] = {"skipped": "no held-out units (`data.holdout_units` is 0)"}
            continue
        ev = r.spec.eval
        if ev.ce and not loaded:
            model, why = load_causal_lm(ds.info.meta, device=device)
            loaded = True
            if why:
                log.info("spliced loss skipped: %s", why)
        if ev.ce and model is None:
            ev = ev.updated(ce=False)
        if getattr(r, "hook_out", None) is not None:  # a transcoder: its out hook predicted from its in hook
            m = evaluate_transcoder(r.sae, ds, r.hook, r.hook_out, holdout, spec=ev, skip_special=r.spec.data.skip_special, device=device,
                                    model=model)
        else:
            m = evaluate(r.sae, ds, r.hook, holdout, spec=ev, skip_special=r.spec.data.skip_special, device=device, model=model)
        if r.spec.eval.ce and model is None:
            m["ce_skipped"] = why
        out[r.name] = m
    return out


def run_task(inp: TaskInput) -> list[dict[str, Any]]:
    """Train, evaluate and commit the SAEs of one task still to train (see the module
    docstring); returns one small status dict per SAE. Runs in a Ray worker or in-process."""

    threads = torch.get_num_threads()
    if inp.threads:
        torch.set_num_threads(inp.threads)
    try:
        return _run_task(inp)
    finally:
        torch.set_num_threads(threads)


def _run_task(inp: TaskInput) -> list[dict[str, Any]]:

    t0 = time.perf_counter()
    todo: list[PlannedRun] = inp.task.todo
    storage = next(iter(inp.fences.values())).storage
    ds = store.Store(storage).dataset(inp.dataset)
    if ds.info.fingerprint != inp.fingerprint:
        raise store.DatasetExistsError(f"dataset {inp.dataset!r} changed identity since the job was planned; run the job again")
    step = todo[0].resume_step
    for r in todo:  # steps other than the one resumed from (or all, starting over) would collide with new ones
        checkpoint.prune(storage, r.name, keep=step, lease=inp.fences[r.name])
    first = todo[0].run.spec
    ck = Checkpointing(
        storage, inp.fences, {r.name: {"config_hash": r.config_hash, "config": r.config} for r in todo},
        every=first.train.checkpoint_every, resume_step=step,
    )
    extra = {r.name: {"config_hash": r.config_hash, "checkpoint_every": first.train.checkpoint_every} for r in todo}
    if first.sources:  # a crosscoder: aligned sources of one or more datasets (analysis.sae.crosscoder_run)
        s = store.Store(storage)
        results = [train_crosscoder(s, r, device=inp.device, checkpointing=ck, lineage_extra=extra[r.name]) for r in todo]
        metrics = {res.name: evaluate_crosscoder(res, s, device=inp.device) for res in results}
    else:
        results = train_pass(ds, [r.run for r in todo], device=inp.device, units=inp.task.units, holdout=inp.task.holdout_units,
                             checkpointing=ck, lineage_extra=extra)
        metrics = _evaluate(results, ds, inp.device)
    out = []
    for r, res in zip(todo, results):
        commit_sae(storage, res, metrics=metrics[r.name], meta={"config_hash": r.config_hash, "config": r.config}, lease=inp.fences[r.name])
        checkpoint.prune(storage, r.name, keep=None, lease=inp.fences[r.name])
        out.append({"name": r.name, "hook": r.run.hook, "status": "resumed" if step else "trained", "resumed_from": step,
                    "metrics": metrics[r.name], "seconds": time.perf_counter() - t0})
    return out


# -- the driver ----------------------------------------------------------------------------------


def _use_ray(spec: SAETrainSpec, n_tasks: int) -> bool:
    mode = spec.compute.ray
    return mode == "always" or (mode == "auto" and (n_tasks > 1 or spec.compute.address is not None or in_ray_job()))


def task_device(spec: SAETrainSpec, gpus: int) -> str:
    """The task device on a cluster with ``gpus`` GPUs (never CUDA on a cluster without)."""
    dev = spec.compute.device
    if dev == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if dev.startswith("cuda") and gpus == 0:
        raise ClusterError(f"`compute.device` is {dev!r} but the Ray cluster has no GPU; use `auto` or `cpu`")
    return dev


def _leases(s: store.Store, names: list[str], spec: SAETrainSpec, stack: ExitStack) -> dict[str, Lease]:
    owner = f"strata sae train {spec.name}"
    leases = {n: s.artifact_lease(SAES, n, owner=owner, stale_after_s=spec.compute.lease_stale_s) for n in names}
    for lease in leases.values():  # read-only first: a second job is refused before anything is written
        holder = lease.holder()
        if holder is not None:
            raise LeaseHeldError(lease.held_message(holder))
    for lease in leases.values():
        stack.enter_context(lease)
    return leases


def _outcome(d: dict[str, Any]) -> SAEOutcome:
    return SAEOutcome(d["name"], d["hook"], d["status"], d.get("resumed_from"), d.get("metrics", {}), d.get("seconds", 0.0))


def _run_tasks(spec: SAETrainSpec, p: Plan, tasks: list[Task], leases: dict[str, Lease], storage: Storage) -> tuple[list[SAEOutcome], bool]:
    """Run every task on the job's executor (Ray tasks, or here: :func:`_use_ray`); returns the
    outcomes and whether Ray ran them."""

    use_ray = _use_ray(spec, len(tasks))
    with open_executor("ray" if use_ray else "local", spec.compute.address if use_ray else None) as ex:
        fences: dict[str, Fence | Lease]
        if ex.ray:
            gpus = ex.shape.gpus
            device = task_device(spec, gpus)
            use_gpu = gpus > 0 and device.startswith("cuda")
            # A cluster this job did not start gets no credentials: its workers use their own.
            task_storage = storage if ex.private else open_storage(storage.uri, ex.storage_options(spec.storage_options))
            fences = {n: dataclasses.replace(lease.fence(), storage=task_storage) for n, lease in leases.items()}
            threads = spec.compute.threads or (None if use_gpu else spec.compute.cpus_per_task)
            ex = ex.using(Tasks(num_cpus=spec.compute.cpus_per_task, num_gpus=1 if use_gpu else 0, max_retries=0))
            log.info("%d Ray task(s) (%s each) on %s", len(tasks), "1 GPU" if use_gpu else f"{spec.compute.cpus_per_task} CPU", ex.address)
        else:
            device, fences, threads = resolve_device(spec.compute.device), dict(leases), spec.compute.threads

        def check() -> None:
            for lease in leases.values():
                lease.check()

        inputs = [(TaskInput(p.dataset, p.fingerprint, t, {r.name: fences[r.name] for r in t.todo}, device, threads),) for t in tasks]
        # On Ray every task's failure is collected (one failed sweep combination does not hide
        # the others); here the first error propagates as it is.
        got = ex.map(run_task, inputs, check=check, return_exceptions=ex.ray)
    outcomes: list[SAEOutcome] = []
    failed: list[str] = []
    for t, res in zip(tasks, got):
        if isinstance(res, BaseException):
            msg = str(res) if isinstance(res, StrataError) else f"{type(res).__name__}: {res}"
            failed.append(f"{t.label}: {msg.splitlines()[0] if msg else type(res).__name__}")
        else:
            outcomes.extend(_outcome(d) for d in res)
    if failed:
        raise WorkerError(f"{len(failed)} of {len(tasks)} SAE task(s) failed: " + "; ".join(failed))
    return outcomes, use_ray


def _plan(spec: SAETrainSpec, s: store.Store, *, fresh: bool) -> Plan:
    """SAEs and transcoders: :func:`plan`; crosscoders (sources of several datasets): :func:`plan_crosscoders`."""
    return plan_crosscoders(spec, s, fresh=fresh) if spec.sources else plan(spec, s, fresh=fresh)


def run_job(spec: SAETrainSpec, *, fresh: bool = False) -> JobResult:
    """Run an SAE training job end to end (see the module docstring). ``fresh``: delete
    checkpoints instead of resuming from them (also those of another config)."""

    t0 = time.perf_counter()
    check_store_path(spec)  # reads only `spec.store`
    s = store.open(spec.store, storage_options=spec.storage_options, create=False)
    p = _plan(spec, s, fresh=fresh)
    # Checkpoints of a committed SAE are left only by a crash between its commit and their deletion.
    leftover = [r.name for r in p.runs if r.status == "done" and checkpoint.committed(s.storage, r.name)]
    todo = [r.name for t in p.tasks for r in t.todo]
    outcomes: dict[str, SAEOutcome] = {}
    used_ray = False
    if todo or leftover:
        with ExitStack() as stack:
            leases = _leases(s, todo + leftover, spec, stack)
            for name in leftover:
                checkpoint.prune(s.storage, name, keep=None, lease=leases[name])
            # Planned again under the leases: a job that finished meanwhile left its SAEs committed.
            p = _plan(spec, s, fresh=fresh)
            tasks = [t for t in p.tasks if t.todo]
            new = [r.name for t in tasks for r in t.todo if r.name not in leases]
            if new:  # the dataset gained a hook matching `hooks` meanwhile
                raise StrataError(f"dataset {p.dataset!r} changed while this job planned ({', '.join(new)} appeared); run it again")
            if tasks:
                got, used_ray = _run_tasks(spec, p, tasks, leases, s.storage)
                outcomes.update((o.name, o) for o in got)
    for r in p.runs:
        outcomes.setdefault(r.name, SAEOutcome(r.name, r.run.hook, "unchanged"))
    return JobResult(s.uri, p.dataset, [outcomes[r.name] for r in p.runs], used_ray, time.perf_counter() - t0)
