"""The write lease: one live job per dataset, atomic takeover, fencing, losing it."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest
from _data import UNIT_CONTEXTS, make_dataset, token_table

from strata import store
from strata.store import layout
from strata.store.commit.lease import current_generation, generations

PREFIX = layout.dataset_dir("ds")


def _gen_file(root, gen: int):
    return root / layout.lease_dir(PREFIX) / f"{gen:012d}.json"


def _hold_lease(root: str, name: str, ready, release) -> None:
    with store.open(root).lease(name, owner="child") as lease:
        ready.put(lease.token)
        release.wait(60)


def _lease_holder(root):
    """A child process holding the write lease of dataset 'ds' until `release` is set."""
    make_dataset(root, num_units=1)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_hold_lease, args=(str(root), "ds", ready, release))
    child.start()
    return child, release, ready.get(timeout=60)


def test_a_second_live_job_is_refused_and_the_next_one_takes_over(tmp_path):
    child, release, token = _lease_holder(tmp_path)
    s = store.open(tmp_path)
    try:
        with pytest.raises(store.LeaseHeldError) as info:
            s.lease("ds").acquire()
        msg = str(info.value)
        # Names the holder once: its owner, pid and host (no repeated host).
        assert f"(child, pid {child.pid} on host " in msg and msg.count(" on ") == 1 and "\n" not in msg
        assert s.lease("ds").holder()["pid"] == child.pid
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0
    # Released on exit: a new job takes it at once, with the next fencing token.
    with s.lease("ds", owner="next") as lease:
        assert lease.token == token + 1
        assert json.loads(_gen_file(tmp_path, lease.token).read_text())["owner"] == "next"
    assert json.loads(_gen_file(tmp_path, token + 1).read_text())["released"] is True
    assert s.lease("ds").holder() is None


def test_lease_of_a_killed_driver_is_taken_over(tmp_path):
    child, _, token = _lease_holder(tmp_path)
    child.kill()
    child.join(30)
    rec = json.loads(_gen_file(tmp_path, token).read_text())
    assert rec["released"] is False  # left behind by the killed holder
    with store.open(tmp_path).lease("ds", owner="rerun") as lease:  # its pid is gone on this machine
        assert lease.token == token + 1


def _write_gen(root, gen: int, **fields) -> None:
    p = _gen_file(root, gen)
    p.parent.mkdir(parents=True, exist_ok=True)
    rec = {"generation": gen, "owner": "gone", "host": "other-host", "boot_id": "x", "pid": 1, "heartbeat": time.time(), "released": False}
    rec.update(fields)
    p.write_text(json.dumps(rec))


def test_stale_heartbeat_is_taken_over_and_a_fresh_one_on_another_host_is_not(tmp_path):
    make_dataset(tmp_path, num_units=1)
    _write_gen(tmp_path, 4, heartbeat=time.time() - 120)
    with store.open(tmp_path).lease("ds", stale_after_s=60) as lease:
        assert lease.token == 5
    _write_gen(tmp_path, 9, owner="alive")  # pid 1 on another machine: can't tell it is dead
    with pytest.raises(store.LeaseHeldError, match=r"\(alive, pid 1 on host other-host, heartbeat 0s ago\)"):
        store.open(tmp_path).lease("ds").acquire()


def _take_over(root: str, barrier, out) -> None:
    s = store.open(root)
    lease = s.lease("ds", owner=f"taker {os.getpid()}", stale_after_s=60)
    barrier.wait(60)
    try:
        lease.acquire()
        out.put(("won", lease.token))
        time.sleep(3)  # keep holding while the others try
        lease.release()
    except store.LeaseHeldError:
        out.put(("refused", None))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_six_processes_taking_over_a_stale_lease_at_once_one_wins(tmp_path, trial):
    make_dataset(tmp_path, num_units=1)
    _write_gen(tmp_path, 1, heartbeat=time.time() - 600)  # a stale holder
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_take_over, args=(str(tmp_path), barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    winners = [tok for what, tok in results if what == "won"]
    assert len(winners) == 1, results
    assert winners == [2]


def test_heartbeat_finds_a_takeover_and_the_holder_stops(tmp_path):
    """A holder paused past the stale time (simulated: its heartbeat stops) is taken over;
    when it resumes, it finds a newer generation, reports the loss, and its writer (fenced
    with its token) refuses to commit."""
    s, data = make_dataset(tmp_path, num_units=3, write=False)
    old = s.lease("ds", owner="paused", stale_after_s=1.0)
    old.heartbeat_s = 3600  # never beats again: as good as paused
    old.acquire()
    lost = []
    old.on_lost(lambda: lost.append(True))
    w_old = s.writer("ds", fence=old.token)
    w_old.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    time.sleep(1.5)
    old._last_check = 0.0  # force a live check (normally at most once a second)
    new = store.open(tmp_path).lease("ds", owner="new", stale_after_s=60).acquire()
    try:
        assert new.token == old.token + 1 and current_generation(s.storage, PREFIX) == new.token
        with pytest.raises(store.LeaseLostError, match="another job took over this job's write lease"):
            old.check()
        assert lost == [True] and old.lost
        with pytest.raises(store.LeaseLostError, match=r"generation 1, but the lease is now at generation 2"):
            w_old.write_unit(1, tokens=token_table(1, UNIT_CONTEXTS), acts=data[1])
        assert s.dataset("ds").committed_units() == [0]
        # The new holder's writer commits as usual.
        s.writer("ds", fence=new.token).write_unit(1, tokens=token_table(1, UNIT_CONTEXTS), acts=data[1])
        assert s.dataset("ds").committed_units("blocks.0.hook_resid_post") == [0, 1]
        rec = s.writer("ds").read_commit(1, "blocks.0.hook_resid_post")
        assert rec.fence == new.token
    finally:
        new.release()
        old.release()  # a lost lease is never written again
    assert json.loads(_gen_file(tmp_path, new.token).read_text())["released"] is True
    assert generations(s.storage, PREFIX) == [new.token]


def test_the_heartbeat_thread_notices_a_takeover_by_itself(tmp_path):
    make_dataset(tmp_path, num_units=1)
    s = store.open(tmp_path)
    lease = s.lease("ds", stale_after_s=0.4)
    lease.heartbeat_s = 0.1
    lease.acquire()
    try:
        # Another job's generation appears (as after a takeover of a paused holder).
        _write_gen(tmp_path, lease.token + 1, owner="other", host="h2")
        deadline = time.time() + 10
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost
    finally:
        lease.release()
    # The lost holder did not mark the newer generation released.
    assert json.loads(_gen_file(tmp_path, lease.token + 1).read_text())["released"] is False
