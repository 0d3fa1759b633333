"""Several writer processes at once, racing writers of one unit, and the dataset lease."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

import store
from store import layout

from _data import CTX, HOOKS, UNIT_CONTEXTS, make_dataset, token_table, unit_values, write_units_in_process

NUM_UNITS = 8


def test_processes_writing_different_units_at_once(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=NUM_UNITS, write=False)
    plan = [[0, 4], [1, 5], [2, 6], [3, 7]]
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(write_units_in_process, [(str(tmp_path), "ds", units) for units in plan])
    assert all(st[h] == "committed" for r in results for st in r.values() for h in ["tokens", *HOOKS])
    ds = s.dataset("ds")
    assert ds.is_complete and ds.verify().ok
    for u in range(NUM_UNITS):
        np.testing.assert_array_equal(ds.read("blocks.1.hook_mlp_out", rows=slice(u * 32, (u + 1) * 32)), unit_values(u, 32, 8))
    writers = {json.loads((tmp_path / layout.commit_key("ds", None, u)).read_text())["writer"]["pid"] for u in range(NUM_UNITS)}
    assert len(writers) > 1 and os.getpid() not in writers


def test_processes_racing_on_the_same_units(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=NUM_UNITS, write=False)
    units = list(range(NUM_UNITS))
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(write_units_in_process, [(str(tmp_path), "ds", units)] * 3)
    for u in units:
        statuses = [r[u]["blocks.0.hook_resid_post"] for r in results]
        assert statuses.count("committed") >= 1  # whoever committed first; the rest see it
        assert set(statuses) <= {"committed", "already committed"}
        tok = [r[u]["tokens"] for r in results]
        assert tok.count("committed") == 1, tok  # the token record is put-if-absent
    ds = s.dataset("ds")
    assert ds.verify().ok and ds.num_rows() == NUM_UNITS * UNIT_CONTEXTS * CTX
    # Exactly one token table per unit survives: losers remove theirs.
    tables = [f for f in os.listdir(tmp_path / "datasets/ds/tokens") if f.endswith(".parquet")]
    assert len(tables) == NUM_UNITS


def _hold_lease(root: str, name: str, ready, release) -> None:
    with store.open(root).lease(name, owner="child"):
        ready.set()
        release.wait(30)


def _lease_holder(root):
    """A child process holding the write lease of dataset 'ds' until `release` is set."""
    make_dataset(root, num_units=1)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lease, args=(str(root), "ds", ready, release))
    child.start()
    assert ready.wait(60)
    return child, release


def test_lease_refuses_a_second_live_job_and_takes_over_a_dead_one(tmp_path):
    child, release = _lease_holder(tmp_path)
    try:
        s = store.open(tmp_path)
        with pytest.raises(store.LeaseHeldError, match=r"being written by another job \(child on .* pid \d+"):
            s.lease("ds").acquire()
    finally:
        release.set()
        child.join(30)
    # The child released its lease on exit: a new job takes it at once.
    with s.lease("ds", owner="next"):
        assert json.loads((tmp_path / layout.lease_key("ds")).read_text())["owner"] == "next"
    assert not (tmp_path / layout.lease_key("ds")).exists()


def test_lease_of_a_killed_driver_is_taken_over(tmp_path):
    child, _ = _lease_holder(tmp_path)
    child.kill()
    child.join(30)
    assert (tmp_path / layout.lease_key("ds")).exists()  # left behind by the killed holder
    with store.open(tmp_path).lease("ds", owner="rerun"):
        pass


def test_stale_heartbeat_is_taken_over(tmp_path):
    make_dataset(tmp_path, num_units=1)
    (tmp_path / layout.lease_key("ds")).write_text(
        json.dumps({"token": "t", "owner": "gone", "host": "other-host", "pid": 1, "heartbeat": time.time() - 120})
    )
    with store.open(tmp_path).lease("ds", stale_after_s=60):
        pass
    (tmp_path / layout.lease_key("ds")).write_text(
        json.dumps({"token": "t", "owner": "alive", "host": "other-host", "pid": 1, "heartbeat": time.time()})
    )
    with pytest.raises(store.LeaseHeldError, match="alive on other-host"):
        store.open(tmp_path).lease("ds").acquire()


def _leave_orphan_shard(root, s, values, unit=0):
    """What a writer killed between its shard and its commit leaves: a whole shard, no commit."""
    w = s.writer("ds")
    from store.writer import shard_layout

    sl = shard_layout(w.info, "blocks.0.hook_resid_post")
    arr = store.dtypes.to_storage(values, w.info.dtype, what="t")
    assert s.storage.put_if_absent(layout.shard_key("ds", "blocks.0.hook_resid_post", unit), sl.encode(arr))


def test_orphan_shard_with_the_same_values_is_committed_at_once(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, write=False)
    _leave_orphan_shard(tmp_path, s, data[0]["blocks.0.hook_resid_post"])
    w = s.writer("ds")
    w.orphan_after_s = 3600.0  # would block for an hour if it waited
    t = time.time()
    status = w.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    assert status["blocks.0.hook_resid_post"] == "committed" and time.time() - t < 30
    assert s.dataset("ds").verify().ok


def test_orphan_shard_with_other_values_is_replaced_once_stale(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, write=False)
    _leave_orphan_shard(tmp_path, s, data[0]["blocks.0.hook_resid_post"] + 1.0)
    w = s.writer("ds")
    w.orphan_after_s = 1.0
    status = w.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    assert status["blocks.0.hook_resid_post"] == "committed"
    ds = s.dataset("ds")
    assert ds.verify().ok
    np.testing.assert_array_equal(ds.read("blocks.0.hook_resid_post", rows=slice(0, 32)), data[0]["blocks.0.hook_resid_post"])
