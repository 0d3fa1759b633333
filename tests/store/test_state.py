"""`Store.dataset_state`: a dataset's metadata (identity, hooks, committed units per hook, token rows
per unit, version record) read from a real store, without activations; the state of a planned
dataset and of one extended by planned units; the SAE split reads a state as it reads a dataset."""

from __future__ import annotations

import dataclasses

import pytest

from strata import store
from strata.analysis.sae.plan import split_units
from strata.store.datasets.state import DatasetState
from tests.store.helpers import CONTEXT_SIZE, HOOK, HOOK2, UNIT_CONTEXTS, UNIT_ROWS, D, create_small, token_table, unit_acts


@pytest.fixture()
def s(tmp_path):
    """Dataset `ds` of 5 units: units 0-2 of both hooks, unit 3 of HOOK only and short (one
    context), unit 4 not written."""
    s = store.open(tmp_path / "acts")
    w = create_small(s, "ds", num_units=5, hooks={HOOK: D, HOOK2: 8}, meta={"model": "tiny", "revision": "abc123", "version_of": "base"})
    for u in range(3):
        w.write_unit(u, tokens=token_table(u), acts={HOOK: unit_acts(u), HOOK2: unit_acts(u, d=8)})
    w.write_unit(3, tokens=token_table(3, contexts=1), acts={HOOK: unit_acts(3, rows=CONTEXT_SIZE)})
    return s


def test_the_state_is_what_the_dataset_holds(s):
    st = s.dataset_state("ds")
    ds = s.dataset("ds")
    assert st.name == "ds" and st.exists
    assert st.hooks == ds.hooks == [HOOK, HOOK2]
    assert st.committed_units(None) == [0, 1, 2, 3]
    assert st.committed_units(HOOK) == [0, 1, 2, 3] and st.committed_units(HOOK2) == [0, 1, 2]
    assert st.committed_units("blocks.9.hook_resid_post") == []
    assert {h: st.info.hooks[h].d for h in st.hooks} == {HOOK: D, HOOK2: 8}
    assert st.fingerprint == st.info.fingerprint == ds.info.fingerprint
    assert (st.info.context_size, st.info.unit_contexts, st.info.num_units) == (CONTEXT_SIZE, UNIT_CONTEXTS, 5)
    assert (st.revision, st.version_of) == ("abc123", "base")
    # Committed units count their rows (the short unit 3 too); a unit not committed counts whole.
    assert [st.unit_counts(None, u)[0] for u in range(5)] == [UNIT_ROWS, UNIT_ROWS, UNIT_ROWS, CONTEXT_SIZE, UNIT_ROWS]
    assert [st.unit_counts(None, u)[0] for u in range(4)] == [ds.unit_counts(None, u)[0] for u in range(4)]


def test_the_state_is_a_snapshot(s):
    """Taken once: units committed later show in a new state, not in the old one; nothing in it
    can be changed in place."""
    st = s.dataset_state("ds")
    s.writer("ds").write_unit(4, tokens=token_table(4), acts={HOOK: unit_acts(4)})
    assert st.committed_units(HOOK) == [0, 1, 2, 3]
    assert s.dataset_state("ds").committed_units(HOOK) == [0, 1, 2, 3, 4]
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        st.units[HOOK] = frozenset()  # type: ignore[index]


def test_extended_adds_planned_units_and_hooks_leaving_the_state_alone(s):
    st = s.dataset_state("ds")
    after = st.extended({HOOK2: {3, 4}, "blocks.2.hook_resid_post": {0, 1, 2, 3, 4, 5}, None: {4, 5}},
                        widths={"blocks.2.hook_resid_post": 32})
    assert after.committed_units(HOOK2) == [0, 1, 2, 3, 4] and after.committed_units(None) == [0, 1, 2, 3, 4, 5]
    assert after.hooks == [HOOK, HOOK2, "blocks.2.hook_resid_post"] and after.info.hooks["blocks.2.hook_resid_post"].d == 32
    assert after.info.num_units == 6 and after.fingerprint == st.fingerprint
    assert after.unit_counts(None, 3)[0] == CONTEXT_SIZE and after.unit_counts(None, 5)[0] == UNIT_ROWS
    assert st.committed_units(HOOK2) == [0, 1, 2] and st.hooks == [HOOK, HOOK2] and st.info.num_units == 5


def test_a_planned_dataset_holds_nothing_until_extended():
    st = DatasetState.planned("new", fingerprint="f" * 16, context_size=CONTEXT_SIZE, unit_contexts=UNIT_CONTEXTS,
                              meta={"revision": "r1"})
    assert not st.exists and st.hooks == [] and st.committed_units(None) == [] and st.revision == "r1"
    after = st.extended({HOOK: {0, 1}, None: {0, 1}}, widths={HOOK: D})
    assert not after.exists and after.committed_units(HOOK) == [0, 1] and after.unit_counts(None, 1)[0] == UNIT_ROWS


def test_the_sae_split_reads_a_state_as_it_reads_the_dataset(s):
    """The held-out split (which sees each unit's contexts) gives the same units from the state."""
    ds, st = s.dataset("ds"), s.dataset_state("ds")
    for hooks, holdout, contexts in (([HOOK], 1, 0), ([HOOK], 1, 2), ([HOOK, HOOK2], 1, 3)):
        assert split_units(st, hooks, holdout, min_contexts=contexts) == split_units(ds, hooks, holdout, min_contexts=contexts)
    # Unit 3 holds one context: asking for two holds unit 2 out too.
    assert split_units(st, [HOOK], 1) == ([0, 1, 2], [3]) and split_units(st, [HOOK], 1, min_contexts=2) == ([0, 1], [2, 3])
