"""The one way work runs: in this process, as Ray tasks, or on a Ray actor pool.

    with open_executor("auto", address=None) as ex:          # Ray (private or joined) or not
        for out in ex.using(Tasks(max_in_flight=4)).imap(encode_batch, args):   # in order
            ...
        pool = pool_shape(ex.shape, num_workers=2)            # a pure function of the cluster
        stats = ex.using(pool).run(UnitWorker, cfg, tasks, check=lease.check)

The topology is a value (:data:`Topology`): :class:`Local` (no Ray at all: a stateless
function runs here, a worker class is built once here), :class:`Tasks` (Ray tasks, results in
submission order or as they complete) or :class:`ActorPool` (``replicas`` actors, each built
once with its config: the model loads once per actor). An executor without Ray runs every
topology as :class:`Local`, so the same job code runs in a test without Ray.

The actor pool keeps two tasks in flight per actor (one computes while the other writes),
restarts a dead actor and retries its tasks (a unit is visible only once committed, so a retry
cannot duplicate it), shows progress, and stops at once when ``check`` raises (a lost write
lease). Large results never pass through Ray: a task returns a small status dict.

Credentials: a private Ray (started by this process) and this process itself may be handed the
job's ``storage_options``; a joined cluster gets only their non-secret part
(:func:`storage_options_for`), and its workers use their own credentials. Every job asks the
executor (:meth:`Executor.storage_options`) rather than deciding itself.

Sizing is a pure function of a :class:`ClusterShape` (:func:`pool_shape`), tested without Ray,
and never depends on how many tasks are left: a unit computed with other thread counts could
differ in its last bits.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm

from strata.pipeline.cluster import ClusterShape, connect, ray_is_private
from strata.pipeline.errors import ClusterError, SpecError, WorkerError
from strata.store import ActivationDataset, Store
from strata.store import open as store_open
from strata.store.errors import StrataError
from strata.store.storage import public_options

log = logging.getLogger(__name__)

Mode = Literal["auto", "local", "ray"]

__all__ = [
    "ActorPool", "Executor", "Local", "Mode", "PoolStats", "StoreRef", "Task", "Tasks", "Topology", "open_executor", "pool_shape",
    "storage_options_for",
]


# -- topology ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """In this process, one task after another; no Ray."""


@dataclass(frozen=True)
class Tasks:
    """Stateless Ray tasks, each with these resources."""

    num_cpus: float = 1
    num_gpus: float = 0
    max_in_flight: int | None = None
    """Tasks submitted and not yet handed back (default: no limit); bounds the driver's memory
    when the arguments are produced lazily (a corpus read batch by batch)."""
    max_retries: int = 2
    """Ray's retries of a task whose worker process died (not of one that raised)."""

    @property
    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}


@dataclass(frozen=True)
class ActorPool:
    """``replicas`` Ray actors of a worker class, each with these resources."""

    replicas: int
    num_cpus: int = 1
    num_gpus: int = 0
    threads: int | None = None
    """Torch threads of a CPU worker (None: a GPU worker keeps torch's default)."""
    max_restarts: int = 3
    """How often a dead actor is restarted (its in-flight tasks retried) before the job fails."""

    @property
    def resources(self) -> dict[str, int]:
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}


Topology = Local | Tasks | ActorPool


def pool_shape(cluster: ClusterShape, *, num_workers: int | None = None, cpus_per_worker: int | None = None,
               max_restarts: int = 3) -> ActorPool:
    """One worker per GPU when the cluster has GPUs (never more than it has: a GPU request that
    cannot be met waits forever); else ``num_workers`` CPU workers (default one) sharing the
    CPUs, each fitting on one node."""
    if cluster.gpus > 0:
        n = min(num_workers or cluster.gpus, cluster.gpus)
        return ActorPool(replicas=n, num_cpus=cpus_per_worker or 1, num_gpus=1, threads=None, max_restarts=max_restarts)
    n = num_workers or 1
    per = cpus_per_worker or max(1, min(cluster.cpus // n, cluster.max_node_cpus))
    return ActorPool(replicas=n, num_cpus=per, num_gpus=0, threads=per, max_restarts=max_restarts)


def storage_options_for(options: dict[str, Any] | None, *, private: bool) -> dict[str, Any] | None:
    """The storage options a job's workers may have: all of them on workers of this job's own
    (this process, or a Ray it started), only the non-secret ones on a cluster it joined."""
    return options if private else public_options(options)


@dataclass(frozen=True)
class StoreRef:
    """How a task opens the store: its URI and the storage options it may use (never a live
    object: each task opens the store itself)."""

    uri: str
    options: dict[str, Any] | None = None

    def open(self) -> Store:
        return store_open(self.uri, storage_options=self.options, create=False)

    def dataset(self, name: str) -> ActivationDataset:
        return self.open().dataset(name)


# -- results of a pool run --------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One call of a pool worker's ``process``."""

    key: Any  # what the task is for (a unit index), named in errors
    args: tuple[Any, ...]  # passed to the worker's ``process``
    weight: int = 1  # progress units (tokens)


@dataclass
class PoolStats:
    tasks_done: int = 0
    weight_done: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # from starting the workers to the last result
    steady_weight: int = 0  # weight of the results after the first one ...
    steady_seconds: float = 0.0  # ... and the time they took (leaves out model loading)
    worker_peak_rss: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steady_rate(self) -> float:
        return self.steady_weight / self.steady_seconds if self.steady_seconds > 0 else 0.0


class _Progress:
    """Stats and the progress bar of one pool run."""

    def __init__(self, *, total: int | None, count: int | None, desc: str, unit: str, progress: bool | None) -> None:
        tty = sys.stderr.isatty()
        # In a Ray job's log (no terminal) the bar refreshes every 30 s rather than filling the log.
        # progress=None (the Python API's default): tqdm.auto's own choice, a widget in Jupyter, text
        # on a terminal, nothing when stderr is neither.
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=None if progress is None else not progress,
                        smoothing=0.1, mininterval=0.5 if tty else 30.0, file=sys.stderr)
        self.count = count
        self.stats = PoolStats()
        self.t0 = self.t_first = time.perf_counter()

    def add(self, task: Task, res: dict[str, Any]) -> None:
        st = self.stats
        now = time.perf_counter()
        weight = int(res.get("rows", task.weight))
        if st.tasks_done == 0:
            self.t_first = now
        else:
            st.steady_weight += weight
            st.steady_seconds = now - self.t_first
        st.seconds = now - self.t0
        st.tasks_done += 1
        st.weight_done += weight
        st.bytes_written += int(res.get("bytes", 0))
        st.worker_peak_rss = max(st.worker_peak_rss, int(res.get("peak_rss", 0)))
        st.results.append(res)
        self.bar.update(weight)
        self.bar.set_postfix_str(f"units {st.tasks_done}/{self.count if self.count is not None else '?'}, "
                                 f"{st.bytes_written / max(now - self.t0, 1e-9) / 2**20:.0f} MiB/s")


def _ray() -> Any:
    """The Ray module, connected: a task submitted without a runtime would start a default Ray
    on Ray's fixed ports (and a second job on the machine could not start its own)."""
    import ray  # lazy: an in-process executor never imports Ray (a cold import costs seconds)

    if not ray.is_initialized():
        raise ClusterError("Ray is not running in this process: run the work under open_executor(...), "
                           "or call ray.init() first, or use a Local() executor")
    return ray


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _cause(e: Exception) -> BaseException:
    """The exception a Ray task raised (Ray wraps it)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


# -- the executor -----------------------------------------------------------------------------


class Executor:
    """Runs work on its topology. ``Executor()`` runs here; ``Executor(Tasks())`` uses the Ray
    runtime already started in this process (:func:`open_executor` connects one first).

    ``private``: whether the workers are this job's own and may get its credentials (default:
    always here; on Ray, whether this process started it). ``shape``: the cluster's resources
    (default: Ray's, or this machine's)."""

    def __init__(self, topology: Topology = Local(), *, private: bool | None = None, shape: ClusterShape | None = None,
                 address: str | None = None, ray: bool | None = None) -> None:
        if not isinstance(topology, (Local, Tasks, ActorPool)):
            raise TypeError(f"Executor takes a topology (Local(), Tasks(...) or ActorPool(...)), not {topology!r}; "
                            "Executor.auto(use_ray) picks one from a flag")
        self.ray = (not isinstance(topology, Local)) if ray is None else ray
        self.topology: Topology = topology if self.ray else Local()
        self.private = (ray_is_private() if self.ray else True) if private is None else private
        self._shape = shape
        self.address = address or ("ray" if self.ray else "local")

    def __repr__(self) -> str:
        return f"Executor({self.topology!r}, private={self.private}, address={self.address!r})"

    @property
    def shape(self) -> ClusterShape:
        if self._shape is None:
            self._shape = ClusterShape.of_ray() if self.ray else ClusterShape.of_machine()
        return self._shape

    @classmethod
    def auto(cls, use_ray: bool | None = None) -> Executor:
        """Ray tasks when ``use_ray`` (default: when Ray is running in this process, as in a
        notebook that called ``ray.init()``), else here."""
        if use_ray is None:
            import ray  # lazy: ray starts slowly; only asked when the caller did not say

            use_ray = ray.is_initialized()
        return cls(Tasks() if use_ray else Local())

    def using(self, topology: Topology) -> Executor:
        """The same runtime with another topology (an executor without Ray stays local)."""
        return Executor(topology, private=self.private, shape=self._shape, address=self.address, ray=self.ray)

    def storage_options(self, options: dict[str, Any] | None) -> dict[str, Any] | None:
        """What this executor's workers may be handed of the job's storage options."""
        return storage_options_for(options, private=self.private)

    def store_ref(self, ds: Any) -> StoreRef:
        """How this executor's tasks open the store of ``ds`` (a dataset or a store)."""
        s = getattr(ds, "store", ds)
        opts = getattr(s.storage, "storage_options", None) or None
        return StoreRef(s.uri, self.storage_options(opts))

    def default_tasks(self) -> int:
        """How many parts to cut work into: the cluster's CPUs on Ray, one here."""
        return max(1, self.shape.cpus) if self.ray else 1

    def put(self, value: Any) -> Any:
        """``value`` stored once for many tasks (Ray's object store), or as it is here."""
        return _ray().put(value) if self.ray else value

    # -- stateless functions --------------------------------------------------------------

    def map(self, fn: Callable[..., Any], args: Iterable[tuple[Any, ...]], *, ordered: bool = True,
            check: Callable[[], None] | None = None, return_exceptions: bool = False) -> list[Any]:
        """``[fn(*a) for a in args]`` on this executor's topology (see :meth:`imap`)."""
        return list(self.imap(fn, args, ordered=ordered, check=check, return_exceptions=return_exceptions))

    def imap(self, fn: Callable[..., Any], args: Iterable[tuple[Any, ...]], *, ordered: bool = True,
             check: Callable[[], None] | None = None, return_exceptions: bool = False) -> Iterator[Any]:
        """``fn(*a)`` for each ``a`` of ``args``, yielded in submission order (``ordered``) or as
        they complete. ``args`` is consumed lazily, ``Tasks.max_in_flight`` ahead of the results.
        ``check()`` is called at least once a second while waiting; what it raises stops the run
        (tasks in flight cancelled) and propagates. An error a task raised propagates (our
        one-line errors as they are), or, with ``return_exceptions``, takes the task's place."""
        if isinstance(self.topology, ActorPool):
            raise TypeError("an actor pool runs a worker class: use Executor.run, or a Tasks topology for a function")
        if isinstance(self.topology, Tasks):
            self._check_gpus(self.topology.num_gpus)
            return self._ray_imap(fn, args, self.topology, ordered=ordered, check=check, return_exceptions=return_exceptions)
        return self._local_imap(fn, args, check=check, return_exceptions=return_exceptions)

    def _check_gpus(self, wanted: float) -> None:
        """A GPU request a cluster without GPUs cannot meet waits forever: refuse it at once."""
        if wanted and self.shape.gpus == 0:
            raise ClusterError(f"the work asks for {wanted:g} GPU(s) per task but the Ray cluster at {self.address!r} has none "
                               "(it would wait forever); run it on CPU workers")

    @staticmethod
    def _local_imap(fn: Callable[..., Any], args: Iterable[tuple[Any, ...]], *, check: Callable[[], None] | None,
                    return_exceptions: bool) -> Iterator[Any]:
        for a in args:
            if check is not None:
                check()
            try:
                out = fn(*a)
            except Exception as e:
                if not return_exceptions:
                    raise
                out = e
            yield out

    @staticmethod
    def _ray_imap(fn: Callable[..., Any], args: Iterable[tuple[Any, ...]], topo: Tasks, *, ordered: bool,
                  check: Callable[[], None] | None, return_exceptions: bool) -> Iterator[Any]:
        ray = _ray()
        remote = ray.remote(fn).options(**topo.resources, max_retries=topo.max_retries)
        window = topo.max_in_flight or sys.maxsize
        pending = iter(args)
        inflight: collections.deque[Any] = collections.deque()  # refs in submission order
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            while not exhausted and len(inflight) < window:
                a = next(pending, None)
                if a is None:
                    exhausted = True
                    return
                inflight.append(remote.remote(*a))

        def get(ref: Any) -> Any:
            try:
                return ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = _cause(e)
                if return_exceptions:
                    return cause if isinstance(cause, Exception) else e
                if isinstance(cause, StrataError):
                    raise cause from None  # a one-line error of ours
                raise

        try:
            fill()
            while inflight:
                if ordered:
                    head = inflight[0]
                    ready, _ = ray.wait([head], num_returns=1, timeout=1.0 if check is not None else None)
                else:
                    ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if check is not None else None)
                if check is not None:
                    check()
                if not ready:
                    continue
                ref = ready[0]
                inflight.remove(ref)
                out = get(ref)
                fill()  # before handing the result back: the next task runs while the caller works
                yield out
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)

    # -- worker classes -------------------------------------------------------------------

    def run(self, worker_cls: type, config: Any, tasks: Iterable[Task], *, count: int | None = None,
            total_weight: int | None = None, on_result: Callable[[Task, dict[str, Any]], None] | None = None,
            check: Callable[[], None] | None = None, desc: str = "", progress: bool | None = True, unit: str = "tok") -> PoolStats:
        """Run every task once on workers ``worker_cls(config)``: one per actor of an
        :class:`ActorPool` (dead actors restarted, their tasks retried), or one built here
        (:class:`Local`). ``worker.process(*task.args)`` returns a small dict (``rows``,
        ``bytes`` and ``peak_rss`` feed the progress bar and the stats). ``tasks`` is consumed
        lazily, as workers free up (a task's arguments, a unit's contexts, exist only while it
        is in flight); give its ``count`` and ``total_weight`` when it is not a sequence.
        ``check()`` is called at least once a second (here: before each task); whatever it
        raises stops the run (tasks cancelled, actors killed) and propagates."""
        if isinstance(tasks, Sequence):
            count = len(tasks) if count is None else count
            total_weight = sum(t.weight for t in tasks) if total_weight is None else total_weight
        if count == 0:
            return PoolStats()
        if isinstance(self.topology, Tasks):
            raise TypeError("a worker class runs on an actor pool or here: use Executor.map for Ray tasks")
        prog = _Progress(total=total_weight, count=count, desc=desc, unit=unit, progress=progress)
        try:
            if isinstance(self.topology, Local):
                self._run_here(worker_cls, config, tasks, prog, on_result=on_result, check=check)
            else:
                self._check_gpus(self.topology.num_gpus)
                self._run_pool(worker_cls, config, tasks, self.topology, prog, count=count, on_result=on_result, check=check)
        finally:
            prog.bar.close()
        return prog.stats

    @staticmethod
    def _run_here(worker_cls: type, config: Any, tasks: Iterable[Task], prog: _Progress, *,
                  on_result: Callable[[Task, dict[str, Any]], None] | None, check: Callable[[], None] | None) -> None:
        worker = None
        threads: int | None = None
        try:
            for task in tasks:
                if check is not None:
                    check()
                if worker is None:  # built once, when there is work: the model loads once
                    worker = worker_cls(config)
                    # A worker sets the torch threads of the thread it computes in (an actor's
                    # own): here that is the caller's, so they are put back afterwards.
                    torch = sys.modules.get("torch")
                    threads = torch.get_num_threads() if torch is not None else None
                try:
                    res = worker.process(*task.args)
                except StrataError:
                    raise  # a one-line error of ours, e.g. a lost lease
                except Exception as e:
                    raise WorkerError(f"{task.key} failed: {type(e).__name__}: {_first_line(e)}") from e
                prog.add(task, res)
                if on_result is not None:
                    on_result(task, res)
        finally:
            torch = sys.modules.get("torch")
            if threads is not None and torch is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    @staticmethod
    def _run_pool(worker_cls: type, config: Any, tasks: Iterable[Task], shape: ActorPool, prog: _Progress, *,
                  count: int | None, on_result: Callable[[Task, dict[str, Any]], None] | None,
                  check: Callable[[], None] | None) -> None:
        ray = _ray()
        n = min(shape.replicas, count) if count is not None else shape.replicas
        actor_cls = ray.remote(worker_cls).options(
            **shape.resources, max_restarts=shape.max_restarts, max_task_retries=shape.max_restarts, max_concurrency=2,
        )
        actors = [actor_cls.remote(config) for _ in range(n)]
        pending = iter(tasks)
        inflight: dict[Any, tuple[Task, int]] = {}
        unavailable: dict[Any, int] = {}  # task key -> times its worker was unavailable

        def submit(i: int) -> None:
            task = next(pending, None)
            if task is not None:
                inflight[actors[i].process.remote(*task.args)] = (task, i)

        try:
            for _ in range(2):  # two calls per actor: one computes while the other writes
                for i in range(n):
                    submit(i)
            while inflight:
                if check is not None:
                    check()
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    task, i = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.ActorUnavailableError as e:
                        # Its node was lost (or the actor is restarting): the call may or may not
                        # have run. Committing is put-if-absent and a recomputed unit is
                        # bit-identical, so run it again, on the restarted actor.
                        tries = unavailable.get(task.key, 0) + 1
                        if tries > shape.max_restarts + 1:
                            raise WorkerError(f"{task.key}: its worker was unavailable {tries} times; last: {_first_line(e)}") from None
                        unavailable[task.key] = tries
                        log.warning("%s: its worker is unavailable (%s); running it again (%d)", task.key, _first_line(e), tries)
                        time.sleep(min(float(tries), 5.0))
                        inflight[actors[i].process.remote(*task.args)] = (task, i)
                        continue
                    except ray.exceptions.RayActorError as e:
                        raise WorkerError(f"{task.key}: its worker died {shape.max_restarts + 1} times; last: {_first_line(e)}") from None
                    except ray.exceptions.RayTaskError as e:
                        cause = _cause(e)
                        if isinstance(cause, StrataError):
                            raise cause from None  # a one-line error of ours, e.g. a lost lease
                        raise WorkerError(f"{task.key} failed in a worker: {type(cause).__name__}: {_first_line(cause)}") from None
                    prog.add(task, res)
                    if on_result is not None:
                        on_result(task, res)
                    submit(i)
        finally:
            for ref in inflight:
                ray.cancel(ref, force=False)
            for a in actors:
                ray.kill(a, no_restart=True)


@contextmanager
def open_executor(mode: Mode = "auto", address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Executor]:
    """Where a job runs: ``local`` in this process (no Ray; ``address`` must be null), ``ray``
    or ``auto`` on the job's Ray cluster (:func:`pipeline.cluster.connect`: a private Ray when
    ``address`` is null, the job's own cluster in a Ray job, else the one joined at ``address``).
    The executor yielded runs Ray tasks; :meth:`Executor.using` picks another topology."""
    if mode == "local":
        if address is not None:
            raise SpecError(f"`compute.executor` is local but `compute.address` is {address!r}: "
                            "set `compute.executor: ray` to use that cluster, or `compute.address: null`")
        yield Executor(Local(), private=True, address="local")
        return
    if mode not in ("auto", "ray"):
        raise SpecError(f"`compute.executor` is {mode!r}; valid values are: auto, local, ray")
    with connect(address, num_cpus=num_cpus) as cluster:
        yield Executor(Tasks(), private=cluster.private, shape=cluster.shape, address=cluster.address, ray=True)

