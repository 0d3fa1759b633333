"""Several writer processes at once, racing writers of one unit, orphan shards."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
from _data import CTX, HOOKS, UNIT_CONTEXTS, make_dataset, token_table, unit_values, write_units_in_process

from strata import store
from strata.store import layout

NUM_UNITS = 8


@pytest.mark.slow
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


def _leave_orphan_shard(root, s, values, unit=0):
    """What a writer killed between its shard and its commit leaves: a whole shard, no commit."""
    w = s.writer("ds")
    from strata.store.datasets.shards import shard_layout

    sl = shard_layout(w.info, "blocks.0.hook_resid_post")
    arr = store.dtypes.to_storage(values, w.info.dtype, what="t")
    key = layout.shard_key("ds", "blocks.0.hook_resid_post", unit)
    assert s.storage.put_if_absent(key, sl.encode(arr, key)[1])  # the parts; the table is computed inline


def test_orphan_shard_with_the_same_values_is_committed_at_once(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, write=False)
    _leave_orphan_shard(tmp_path, s, data[0]["blocks.0.hook_resid_post"])
    w = s.writer("ds")
    w.orphan_after_s = 3600.0  # would block for an hour if it waited
    t = time.time()
    status = w.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    assert status["blocks.0.hook_resid_post"] == "committed" and time.time() - t < 30
    assert s.dataset("ds").verify(committed_only=True).ok


def test_orphan_shard_with_other_values_is_replaced_once_stale(tmp_path):
    s, data = make_dataset(tmp_path, num_units=2, write=False)
    _leave_orphan_shard(tmp_path, s, data[0]["blocks.0.hook_resid_post"] + 1.0)
    w = s.writer("ds")
    w.orphan_after_s = 1.0
    status = w.write_unit(0, tokens=token_table(0, UNIT_CONTEXTS), acts=data[0])
    assert status["blocks.0.hook_resid_post"] == "committed"
    ds = s.dataset("ds")
    assert ds.verify(committed_only=True).ok
    np.testing.assert_array_equal(ds.read("blocks.0.hook_resid_post", rows=slice(0, 32)), data[0]["blocks.0.hook_resid_post"])
