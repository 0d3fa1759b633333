"""store.datasets.commits: the commit state of a dataset, apart from the reader, and the
reader's independence from ``Store`` (it takes any object with ``storage`` and ``uri``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from helpers import HOOK, UNIT_ROWS, create_small, unit_acts, write_units

from strata import store
from strata.store import layout
from strata.store.datasets.commits import CommitState, IndexedRecord, decode_commit_index, encode_commit_index
from strata.store.datasets.reader import ActivationDataset, open_dataset
from strata.store.storage import Storage


@dataclass(frozen=True)
class BareRoot:
    """A store root with nothing but what the artifact layers ask for: no ``Store`` methods."""

    storage: Storage
    uri: str


def test_commit_state_sees_commits_and_forgets_removed_ones(tmp_path):
    s = store.open(tmp_path / "acts")
    w = create_small(s, "ds", num_units=4)
    write_units(w, [0, 1])
    state = CommitState(s.storage, "ds")
    assert state.refresh() == []
    assert state.committed_units(None) == [0, 1] and state.committed_units(HOOK) == [0, 1]
    assert state.num_rows(HOOK) == 2 * UNIT_ROWS and not state.is_complete()

    write_units(w, [3])
    assert state.refresh() == [] and state.committed_units(HOOK) == [0, 1, 3]
    assert state.last_rows(HOOK) == UNIT_ROWS  # the last unit, committed full

    s.storage.delete(layout.commit_key("ds", HOOK, 1))  # as a repair removes a record
    assert state.refresh() == [(HOOK, 1)]
    assert state.committed_units(HOOK) == [0, 3] and state.committed_units(None) == [0, 1, 3]
    with pytest.raises(store.NotCommittedError, match=r"hook 'blocks\.0\.hook_resid_post': unit 1 .* is not committed"):
        state.record(HOOK, 1)


def test_commit_index_round_trips_every_valid_record(tmp_path):
    s = store.open(tmp_path / "acts")
    w = create_small(s, "ds", num_units=3)
    write_units(w, [0, 2])
    state = CommitState(s.storage, "ds", use_index=False)
    state.refresh()
    index = decode_commit_index(encode_commit_index(state), where="test")
    assert set(index) == {None, HOOK}
    for part in (None, HOOK):
        assert sorted(index[part]) == [0, 2]
        for unit, entry in index[part].items():
            assert isinstance(entry, IndexedRecord)
            rec = state.record(part, unit)
            assert (entry.rows, entry.special, entry.key) == (rec.rows, rec.special, layout.commit_key("ds", part, unit))


def test_a_damaged_commit_index_is_a_corruption_error_naming_it():
    with pytest.raises(store.CorruptionError, match=r"^ds's index: not a commit index"):
        decode_commit_index(b"not parquet at all", where="ds's index")


def test_the_reader_needs_only_storage_and_uri(tmp_path):
    s = store.open(tmp_path / "acts")
    write_units(create_small(s, "ds", num_units=2, dtype="float32"), [0, 1])
    bare = BareRoot(s.storage, s.uri)
    ds = ActivationDataset(bare, "ds")
    assert ds.store is bare
    np.testing.assert_array_equal(ds.read(HOOK, rows=slice(UNIT_ROWS, 2 * UNIT_ROWS)), unit_acts(1))
    assert ds.verify().ok
    with pytest.raises(store.DatasetNotFoundError, match=rf"no dataset 'nope' in store {s.uri}; it holds: ds$"):
        open_dataset(bare, "nope")
