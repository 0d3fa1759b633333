"""The Ray unit pool: a set of worker actors (one per GPU, CPU workers when the cluster has
none) that each run units of work and write their output to the store themselves.

It serves every unit-aligned job (activation extraction now; SAE encoding into feature tables
next): give it a worker class, the worker's config and the cluster's shape, then a list of
tasks. It keeps two tasks in flight per actor (one computes while the other writes), restarts a
dead actor and retries its tasks (a unit is visible only once committed, so a retry cannot
duplicate it), shows progress, and stops at once when ``check`` raises (a lost write lease).
Large results never pass through Ray: a task returns a small status dict.

Sizing is a pure function of a :class:`ClusterShape` (:func:`pool_shape`), so it is tested
without Ray, and it never depends on how many tasks are left: a unit computed with other
thread counts could differ in its last bits.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from strata.pipeline.cluster import ClusterShape
from strata.pipeline.errors import WorkerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolShape:
    workers: int
    num_cpus: int
    num_gpus: int
    threads: int | None  # torch threads of a CPU worker (None: a GPU worker keeps torch's default)

    @property
    def resources(self) -> dict[str, int]:
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}


def pool_shape(cluster: ClusterShape, *, num_workers: int | None = None, cpus_per_worker: int | None = None) -> PoolShape:
    """One worker per GPU when the cluster has GPUs (never more than it has: a GPU request that
    cannot be met waits forever); else ``num_workers`` CPU workers (default one) sharing the
    CPUs, each fitting on one node."""
    if cluster.gpus > 0:
        n = min(num_workers or cluster.gpus, cluster.gpus)
        return PoolShape(workers=n, num_cpus=cpus_per_worker or 1, num_gpus=1, threads=None)
    n = num_workers or 1
    per = cpus_per_worker or max(1, min(cluster.cpus // n, cluster.max_node_cpus))
    return PoolShape(workers=n, num_cpus=per, num_gpus=0, threads=per)


@dataclass(frozen=True)
class Task:
    key: Any  # what the task is for (a unit index), named in errors
    args: tuple[Any, ...]  # passed to the worker's ``process``
    weight: int = 1  # progress units (tokens)


@dataclass
class PoolStats:
    tasks_done: int = 0
    weight_done: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # from starting the actors to the last result
    steady_weight: int = 0  # weight of the results after the first one ...
    steady_seconds: float = 0.0  # ... and the time they took (leaves out model loading)
    worker_peak_rss: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steady_rate(self) -> float:
        return self.steady_weight / self.steady_seconds if self.steady_seconds > 0 else 0.0


class UnitPool:
    """``UnitPool(worker_cls, config, shape).run(tasks)``: ``worker_cls(config)`` is built once
    per actor; ``worker.process(*task.args)`` returns a small dict (``rows``, ``bytes`` and
    ``peak_rss`` feed the progress bar and the stats)."""

    def __init__(
        self,
        worker_cls: type,
        config: Any,
        shape: PoolShape,
        *,
        max_restarts: int = 3,
        desc: str = "",
        progress: bool = True,
        unit: str = "tok",
    ) -> None:
        self.worker_cls = worker_cls
        self.config = config
        self.shape = shape
        self.max_restarts = max_restarts
        self.desc = desc
        self.progress = progress
        self.unit = unit

    def run(
        self,
        tasks: Iterable[Task],
        *,
        count: int | None = None,
        total_weight: int | None = None,
        on_result: Callable[[Task, dict[str, Any]], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> PoolStats:
        """Run every task once (retrying those of dead workers). ``tasks`` is consumed lazily,
        as actors free up (so a task's arguments, a unit's contexts, exist only while it is in
        flight); give its ``count`` and ``total_weight`` when it is not a sequence. ``check()``
        is called at least once a second; whatever it raises stops the pool (in-flight tasks
        cancelled, actors killed) and propagates."""
        import ray
        from tqdm.auto import tqdm

        stats = PoolStats()
        if isinstance(tasks, Sequence):
            count = len(tasks) if count is None else count
            total_weight = sum(t.weight for t in tasks) if total_weight is None else total_weight
        if count == 0:
            return stats
        n = min(self.shape.workers, count) if count is not None else self.shape.workers
        actor_cls = ray.remote(self.worker_cls).options(
            **self.shape.resources, max_restarts=self.max_restarts, max_task_retries=self.max_restarts, max_concurrency=2,
        )
        actors = [actor_cls.remote(self.config) for _ in range(n)]
        pending = iter(tasks)
        inflight: dict[Any, tuple[Task, int]] = {}
        unavailable: dict[str, int] = {}  # task key -> times its worker was unavailable
        tty = sys.stderr.isatty()
        # In a Ray job's log (no terminal) the bar refreshes every 30 s rather than filling the log.
        bar = tqdm(total=total_weight, unit=self.unit, unit_scale=True, desc=self.desc, disable=not self.progress,
                   smoothing=0.1, mininterval=0.5 if tty else 30.0, file=sys.stderr)
        t0 = time.perf_counter()
        t_first = t0

        def submit(i: int) -> bool:
            task = next(pending, None)
            if task is None:
                return False
            inflight[actors[i].process.remote(*task.args)] = (task, i)
            return True

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
                        if tries > self.max_restarts + 1:
                            raise WorkerError(
                                f"{task.key}: its worker was unavailable {tries} times; last: {str(e).splitlines()[0]}"
                            ) from None
                        unavailable[task.key] = tries
                        log.warning("%s: its worker is unavailable (%s); running it again (%d)", task.key, str(e).splitlines()[0], tries)
                        time.sleep(min(float(tries), 5.0))
                        inflight[actors[i].process.remote(*task.args)] = (task, i)
                        continue
                    except ray.exceptions.RayActorError as e:
                        raise WorkerError(
                            f"{task.key}: its worker died {self.max_restarts + 1} times; last: {str(e).splitlines()[0]}"
                        ) from None
                    except ray.exceptions.RayTaskError as e:
                        cause = e.cause if getattr(e, "cause", None) is not None else e
                        from strata.store.errors import StrataError

                        if isinstance(cause, StrataError):
                            raise cause from None  # a one-line error of ours, e.g. a lost lease
                        first = str(cause).splitlines()[0] if str(cause) else ""
                        raise WorkerError(f"{task.key} failed in a worker: {type(cause).__name__}: {first}") from None
                    now = time.perf_counter()
                    if stats.tasks_done == 0:
                        t_first = now
                    else:
                        stats.steady_weight += int(res.get("rows", task.weight))
                        stats.steady_seconds = now - t_first
                    stats.seconds = now - t0
                    stats.tasks_done += 1
                    stats.weight_done += int(res.get("rows", task.weight))
                    stats.bytes_written += int(res.get("bytes", 0))
                    stats.worker_peak_rss = max(stats.worker_peak_rss, int(res.get("peak_rss", 0)))
                    stats.results.append(res)
                    bar.update(int(res.get("rows", task.weight)))
                    bar.set_postfix_str(f"units {stats.tasks_done}/{count if count is not None else '?'}, "
                                        f"{stats.bytes_written / max(now - t0, 1e-9) / 2**20:.0f} MiB/s")
                    if on_result is not None:
                        on_result(task, res)
                    submit(i)
        finally:
            bar.close()
            for ref in inflight:
                ray.cancel(ref, force=False)
            for a in actors:
                ray.kill(a, no_restart=True)
        return stats
