"""The executor: one API in this process and on Ray (order, laziness, stopping, errors), the
worker-class form, and the credentials rule. Restarts of killed actors are covered by
test_extract.py / test_encode.py / test_faults_ops.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import ray.cloudpickle

from strata.pipeline.cluster import ClusterShape
from strata.pipeline.errors import ClusterError, SpecError, WorkerError
from strata.pipeline.executor import (
    ActorPool,
    Executor,
    Local,
    PoolStats,
    Task,
    Tasks,
    open_executor,
    pool_shape,
    storage_options_for,
)
from strata.store.errors import LeaseLostError

OPTIONS = {"key": "AKIA-x", "secret": "s3cr3t", "token": "t0k", "endpoint_url": "http://127.0.0.1:9",
           "client_kwargs": {"region_name": "us-east-1"}}


def _sleepy(i: int, delay: float) -> tuple[int, int]:
    time.sleep(delay)
    return i, os.getpid()


def _fails_on(i: int, bad: int) -> int:
    if i == bad:
        raise ValueError(f"task {i} is bad")
    return i * 10


class _Stop(Exception):
    pass


# Ray's workers cannot import the test folder: this module's functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the credentials rule ----------------------------------------------------------------------


def test_private_workers_get_the_options_and_a_joined_cluster_only_public_ones():
    assert storage_options_for(OPTIONS, private=True) == OPTIONS
    joined = storage_options_for(OPTIONS, private=False)
    assert joined == {"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "us-east-1"}}
    assert storage_options_for(None, private=False) is None
    assert Executor().storage_options(OPTIONS) == OPTIONS  # this process: its own credentials
    on_stranger = Executor(Tasks(), private=False, shape=ClusterShape(4, 0, 4), address="10.0.0.1:6379")
    assert on_stranger.storage_options(OPTIONS) == joined
    assert on_stranger.using(ActorPool(replicas=2)).storage_options(OPTIONS) == joined  # the rule follows the runtime


def test_a_store_ref_carries_what_the_rule_allows(tmp_path):
    from strata import store

    s = store.open(tmp_path / "acts")
    ref = Executor(Tasks(), private=False, shape=ClusterShape(2, 0, 2)).store_ref(s)
    assert ref.uri == s.uri and ref.open().uri == s.uri


# -- topology and sizing -------------------------------------------------------------------------


def test_without_ray_every_topology_runs_here():
    ex = Executor()
    assert not ex.ray and isinstance(ex.topology, Local) and ex.private and ex.default_tasks() == 1
    assert isinstance(ex.using(Tasks(max_in_flight=2)).topology, Local)
    assert isinstance(ex.using(pool_shape(ClusterShape(8, 0, 8), num_workers=2)).topology, Local)
    assert Executor(Tasks(), private=True, shape=ClusterShape(6, 0, 6)).default_tasks() == 6


def test_open_executor_local_starts_no_ray_and_refuses_an_address():
    with open_executor("local") as ex:
        assert (ex.ray, ex.private, ex.address) == (False, True, "local")
    with pytest.raises(SpecError, match=r"`compute.executor` is local but `compute.address` is '10.0.0.1:6379'"):
        with open_executor("local", "10.0.0.1:6379"):
            pass
    with pytest.raises(SpecError, match="valid values are: auto, local, ray"):
        with open_executor("cloud"):  # type: ignore[arg-type]
            pass


def test_ray_work_without_a_running_ray_is_refused_not_started():
    """A Ray task submitted without a runtime would start a default Ray on fixed ports. In a
    fresh process: this one may have the session's Ray already."""
    script = textwrap.dedent("""
        import ray
        from strata.pipeline.cluster import ClusterShape
        from strata.pipeline.errors import ClusterError
        from strata.pipeline.executor import ActorPool, Executor, Task, Tasks
        for ex, call in ((Executor(Tasks(), shape=ClusterShape(2, 0, 2)), lambda ex: ex.map(print, [(0,)])),
                         (Executor(ActorPool(replicas=1), shape=ClusterShape(2, 0, 2)),
                          lambda ex: ex.run(dict, {}, [Task(0, (0,))], progress=False))):
            assert not ex.private  # no Ray of this process's own to hand credentials to
            try:
                call(ex)
            except ClusterError as e:
                print("REFUSED", e)
        print("STARTED" if ray.is_initialized() else "NOT STARTED")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert [ln.startswith("REFUSED Ray is not running in this process") for ln in lines] == [True, True, False], (r.stdout, r.stderr[-2000:])
    assert lines[-1] == "NOT STARTED"


def test_pool_shape_carries_the_restarts():
    assert pool_shape(ClusterShape(4, 0, 4), max_restarts=5).max_restarts == 5
    assert pool_shape(ClusterShape(4, 2, 4)).resources == {"num_cpus": 1, "num_gpus": 1}


# -- stateless functions -------------------------------------------------------------------------


def test_local_map_is_lazy_ordered_and_stops_when_check_raises():
    pulled: list[int] = []

    def args():
        for i in range(5):
            pulled.append(i)
            yield i, 0.0

    it = Executor().imap(_sleepy, args())
    assert pulled == []  # nothing runs before the caller asks
    assert next(it)[0] == 0 and pulled == [0]
    assert [r[0] for r in it] == [1, 2, 3, 4]
    calls = iter(range(100))

    def check() -> None:
        if next(calls) == 2:
            raise _Stop("lease lost")

    with pytest.raises(_Stop):
        Executor().map(_sleepy, [(i, 0.0) for i in range(5)], check=check)


def test_local_map_errors_propagate_or_take_the_tasks_place():
    with pytest.raises(ValueError, match="task 1 is bad"):
        Executor().map(_fails_on, [(0, 1), (1, 1), (2, 1)])
    got = Executor().map(_fails_on, [(0, 1), (1, 1), (2, 1)], return_exceptions=True)
    assert got[0] == 0 and got[2] == 20 and isinstance(got[1], ValueError)


@pytest.mark.ray
def test_ray_tasks_keep_submission_order_or_hand_back_as_completed(ray_session):
    ex = Executor(Tasks(max_in_flight=2))
    assert ex.ray and ex.private  # the session's Ray was started by this process
    delays = [0.6, 0.0, 0.0]
    got = ex.map(_sleepy, [(i, d) for i, d in enumerate(delays)])
    assert [i for i, _ in got] == [0, 1, 2] and os.getpid() not in {p for _, p in got}
    done = Executor(Tasks()).map(_sleepy, [(i, d) for i, d in enumerate(delays)], ordered=False)
    assert sorted(i for i, _ in done) == [0, 1, 2] and done[-1][0] == 0  # the slow one came back last


@pytest.mark.ray
def test_ray_tasks_pull_arguments_at_most_max_in_flight_ahead(ray_session):
    pulled: list[int] = []

    def args():
        for i in range(6):
            pulled.append(i)
            yield i, 0.05

    it = Executor(Tasks(max_in_flight=2)).imap(_sleepy, args())
    first = next(it)
    assert first[0] == 0 and len(pulled) <= 3  # two in flight, refilled once the first came back
    assert [r[0] for r in it] == [1, 2, 3, 4, 5]


@pytest.mark.ray
def test_ray_task_errors_and_a_raising_check(ray_session):
    ex = Executor(Tasks(max_retries=0))
    got = ex.map(_fails_on, [(0, 1), (1, 1), (2, 1)], return_exceptions=True)
    assert got[0] == 0 and got[2] == 20 and isinstance(got[1], ValueError) and "task 1 is bad" in str(got[1])
    with pytest.raises(ValueError, match="task 1 is bad"):
        ex.map(_fails_on, [(0, 1), (1, 1)])
    t0 = time.monotonic()

    def check() -> None:
        if time.monotonic() - t0 > 0.5:
            raise _Stop("lease lost")

    with pytest.raises(_Stop):
        ex.map(_sleepy, [(0, 30.0)], check=check)
    assert time.monotonic() - t0 < 10  # stopped at once, the task cancelled


# -- worker classes ------------------------------------------------------------------------------


class _Counter:
    """A worker built once per replica; counts its builds in a file (a Ray actor is another process)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        with open(cfg["builds"], "a") as f:
            f.write("built\n")

    def process(self, unit: int) -> dict[str, Any]:
        if unit == self.cfg.get("bad"):
            raise RuntimeError(f"unit {unit} broke\nsecond line")
        if unit == self.cfg.get("lost"):
            raise LeaseLostError("another job took over this job's write lease")
        return {"unit": unit, "rows": 10 + unit, "bytes": 100, "pid": os.getpid()}


def test_a_local_pool_builds_the_worker_once_and_keeps_stats(tmp_path):
    builds = tmp_path / "builds"
    seen: list[int] = []
    stats = Executor().run(_Counter, {"builds": str(builds)}, [Task(f"unit {u}", (u,), weight=10) for u in range(4)],
                           on_result=lambda t, r: seen.append(r["unit"]), progress=False)
    assert isinstance(stats, PoolStats) and builds.read_text().count("built") == 1
    assert seen == [0, 1, 2, 3] and stats.tasks_done == 4 and stats.bytes_written == 400
    assert stats.weight_done == 10 + 11 + 12 + 13 and stats.steady_weight == 11 + 12 + 13  # rows, after the first
    assert {r["pid"] for r in stats.results} == {os.getpid()}
    assert Executor().run(_Counter, {"builds": str(builds)}, [], progress=False).tasks_done == 0
    assert builds.read_text().count("built") == 1  # no work: no worker (no model load)


def test_a_local_pool_names_the_failed_task_and_passes_our_errors(tmp_path):
    cfg = {"builds": str(tmp_path / "b"), "bad": 2, "lost": 5}
    with pytest.raises(WorkerError, match=r"^unit 2 failed: RuntimeError: unit 2 broke$"):
        Executor().run(_Counter, cfg, [Task(f"unit {u}", (u,)) for u in range(4)], progress=False)
    with pytest.raises(LeaseLostError, match="took over"):
        Executor().run(_Counter, cfg, [Task(f"unit {u}", (u,)) for u in (4, 5, 6)], progress=False)
    n = iter(range(100))

    def check() -> None:
        if next(n) == 1:
            raise _Stop("lease lost")

    seen: list[int] = []
    with pytest.raises(_Stop):
        Executor().run(_Counter, {"builds": str(tmp_path / "c")}, [Task(u, (u,)) for u in range(4)],
                       on_result=lambda t, r: seen.append(r["unit"]), check=check, progress=False)
    assert seen == [0]


@pytest.mark.ray
def test_an_actor_pool_builds_one_worker_per_replica(ray_session, tmp_path):
    builds = tmp_path / "builds"
    ex = Executor(ActorPool(replicas=2, num_cpus=1))
    stats = ex.run(_Counter, {"builds": str(builds)}, [Task(f"unit {u}", (u,)) for u in range(6)], progress=False)
    assert stats.tasks_done == 6 and sorted(r["unit"] for r in stats.results) == list(range(6))
    assert builds.read_text().count("built") == 2 and os.getpid() not in {r["pid"] for r in stats.results}
    with pytest.raises(WorkerError, match=r"^unit 3 failed in a worker: RuntimeError: unit 3 broke$"):
        ex.run(_Counter, {"builds": str(builds), "bad": 3}, [Task(f"unit {u}", (u,)) for u in range(5)], progress=False)
    with pytest.raises(TypeError, match="use Executor.run"):
        ex.map(_sleepy, [(0, 0.0)])
    with pytest.raises(TypeError, match="use Executor.run"):
        ex.imap(_sleepy, [(0, 0.0)])  # at the call, not at the first result


@pytest.mark.ray
def test_a_gpu_request_on_a_cluster_without_gpus_is_refused_not_left_waiting(ray_session, tmp_path):
    cpu_only = Executor(Tasks(), private=True, shape=ClusterShape(2, 0, 2))
    with pytest.raises(ClusterError, match=r"asks for 1 GPU\(s\) per task but the Ray cluster .* has none"):
        cpu_only.using(Tasks(num_gpus=1)).map(_sleepy, [(0, 0.0)])
    with pytest.raises(ClusterError, match="would wait forever"):
        cpu_only.using(ActorPool(replicas=1, num_gpus=1)).run(_Counter, {"builds": str(tmp_path / "b")}, [Task(0, (0,))], progress=False)
