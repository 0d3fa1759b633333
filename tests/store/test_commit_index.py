"""The compacted commit index: a finished dataset opens without listing a single record folder;
records committed after the index are still found; a repair rewrites it; a damaged index
falls back to the records."""

from __future__ import annotations

import numpy as np
from _data import UNIT_CONTEXTS, make_dataset, token_table

from strata import store
from strata.store import layout
from strata.store.storage import LocalStorage

H = "blocks.0.hook_resid_post"


class CountingStorage(LocalStorage):
    """The local backend, counting listings of commit-record folders (a test seam)."""

    def __init__(self, root) -> None:
        super().__init__(root, create=False)
        self.listed: list[str] = []

    def list(self, prefix: str) -> list[str]:
        if "/commits/" in prefix:
            self.listed.append(prefix)
        return super().list(prefix)


def _open(root) -> tuple[store.Store, CountingStorage]:
    storage = CountingStorage(root)
    return store.Store(storage), storage


def test_index_replaces_listing_and_new_records_are_still_found(tmp_path):
    s, data = make_dataset(tmp_path, num_units=6, write=False)
    w = s.writer("ds")
    for u in range(4):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=data[u])
    before = s.dataset("ds")
    w.compact_commits()
    s2, counted = _open(tmp_path)
    ds = s2.dataset("ds")
    # Units 4 and 5 are not committed yet: their folder (group 0) is listed once per part.
    assert ds.committed_units(H) == [0, 1, 2, 3] and len(counted.listed) == 3
    np.testing.assert_array_equal(ds.read(H, rows=slice(0, 32)), before.read(H, rows=slice(0, 32)))
    for u in (4, 5):  # committed after the index: found by the fallback listing
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=data[u])
    assert ds.refresh().committed_units(H) == list(range(6)) and ds.verify().ok
    w.compact_commits()
    s3, counted = _open(tmp_path)
    full = s3.dataset("ds")
    assert full.committed_units(H) == list(range(6)) and counted.listed == []  # not one listing
    assert full.num_rows(H) == before.num_rows(H) + 2 * 32
    assert full.verify().ok


def test_repair_rewrites_the_index_and_a_damaged_index_falls_back(tmp_path):
    s, _ = make_dataset(tmp_path, num_units=3)
    s.writer("ds").compact_commits()
    p = tmp_path / layout.shard_key("ds", H, 1)
    raw = bytearray(p.read_bytes())
    raw[3] ^= 1
    p.write_bytes(bytes(raw))
    ds = s.dataset("ds")
    ds.repair()
    assert store.open(tmp_path).dataset("ds").committed_units(H) == [0, 2]  # not resurrected by a stale index
    key = s.manifest("ds").aux["commit_index"]["key"]
    (tmp_path / key).write_bytes(b"garbage")
    again = s.dataset("ds")  # opens, from the records themselves
    assert again.committed_units(H) == [0, 2]
    assert any("commit_index" in q.file for q in again.verify().problems)
