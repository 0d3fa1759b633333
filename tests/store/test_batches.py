"""Training batches: exactly once per epoch, deterministic, resumable, aligned across hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data import CTX, UNIT_CONTEXTS, token_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata import store

ROWS = UNIT_CONTEXTS * CTX
NUM_UNITS = 6
LAST = 3  # contexts in the last, partial unit


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """Column 0 of every row holds its global row index, so batches can be traced back."""
    root = tmp_path_factory.mktemp("batches")
    s = store.open(root)
    w = s.create_dataset("b", hooks={"a": 3, "b": 2}, context_size=CTX, dtype="float32", num_units=NUM_UNITS, unit_contexts=UNIT_CONTEXTS)
    for u in range(NUM_UNITS):
        n = (LAST if u == NUM_UNITS - 1 else UNIT_CONTEXTS) * CTX
        g = np.arange(u * ROWS, u * ROWS + n, dtype=np.float32)
        w.write_unit(u, tokens=token_table(u, n // CTX), acts={"a": np.stack([g, g + 0.5, -g], 1), "b": np.stack([-g, g * 2], 1)})
    return s.dataset("b")


def all_rows(skip_special=True):
    rows = [u * ROWS + r for u in range(NUM_UNITS) for r in range((LAST if u == NUM_UNITS - 1 else UNIT_CONTEXTS) * CTX)]
    return [r for r in rows if not (skip_special and r % CTX == 0)]


def ids(batches):
    return [b[:, 0].long().tolist() for b in batches]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 70), buffer_rows=st.integers(1, 200), seed=st.integers(0, 2**31), epochs=st.integers(1, 2), shuffle=st.booleans())
def test_each_epoch_is_a_permutation_of_the_committed_rows(ds, batch_size, buffer_rows, seed, epochs, shuffle):
    it = ds.iter_batches("a", batch_size=batch_size, buffer_rows=buffer_rows, seed=seed, epochs=epochs, shuffle=shuffle)
    batches = ids(it)
    per = it.batches_per_epoch
    assert len(batches) == per * epochs == len(it)
    assert all(len(b) == batch_size for i, b in enumerate(batches) if (i + 1) % per)
    for e in range(epochs):
        got = [r for b in batches[e * per : (e + 1) * per] for r in b]
        assert sorted(got) == all_rows()
        if not shuffle:
            assert got == all_rows()


def test_deterministic_per_seed_and_epochs_differ(ds):
    a = ids(ds.iter_batches("a", batch_size=16, seed=1, epochs=2, buffer_rows=64))
    b = ids(ds.iter_batches("a", batch_size=16, seed=1, epochs=2, buffer_rows=64))
    c = ids(ds.iter_batches("a", batch_size=16, seed=2, epochs=2, buffer_rows=64))
    assert a == b and a != c
    per = len(a) // 2
    assert a[:per] != a[per:]
    # Rows of several units mix within a batch.
    assert any(len({r // ROWS for r in batch}) > 1 for batch in a)


def test_several_hooks_yield_aligned_dicts(ds):
    for batch in ds.iter_batches(["a", "b"], batch_size=20, seed=5):
        assert set(batch) == {"a", "b"}
        assert torch.equal(batch["a"][:, 0], -batch["b"][:, 0])
        assert torch.equal(batch["b"][:, 1], 2 * batch["a"][:, 0])


def test_skip_special_false_keeps_bos_rows(ds):
    got = sorted(r for b in ids(ds.iter_batches("a", batch_size=32, skip_special=False)) for r in b)
    assert got == all_rows(skip_special=False)


def test_drop_last_and_dtype(ds):
    it = ds.iter_batches("a", batch_size=50, drop_last=True, dtype=torch.bfloat16)
    batches = list(it)
    assert len(batches) == len(all_rows()) // 50 and all(b.shape == (50, 3) and b.dtype == torch.bfloat16 for b in batches)


@pytest.mark.parametrize("epochs", [2, None])
def test_resume_mid_epoch_equals_uninterrupted(ds, epochs):
    kw = dict(batch_size=24, seed=11, buffer_rows=70, epochs=epochs)
    ref_it = ds.iter_batches(["a", "b"], **kw)
    ref, states = [], []
    for i, batch in enumerate(ref_it):
        ref.append(batch["a"].clone())
        states.append(ref_it.state_dict())
        if i == 2 * ref_it.batches_per_epoch + 2:
            break
    ref_it.close()
    for k in range(len(ref) - 1):
        it = ds.iter_batches(["a", "b"], **kw)
        it.load_state_dict(states[k])
        nxt = next(it)
        assert torch.equal(nxt["a"], ref[k + 1]), f"batch after resuming at {k} differs"
        it.close()
    end_of_first = states[ref_it.batches_per_epoch - 1]
    if epochs is None:  # the endless stream counts batches across epochs
        assert (end_of_first["epoch"], end_of_first["batch"]) == (0, ref_it.batches_per_epoch)
    else:
        assert (end_of_first["epoch"], end_of_first["batch"]) == (1, 0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_endless_batches_are_always_full_and_cover_each_epoch_once(ds, batch_size, seed):
    """Endless (training) mode never yields a short batch: the epochs' streams are joined, so
    a batch may straddle two epochs, and k epochs' worth of rows hold every row k times."""
    n = len(all_rows())
    with ds.iter_batches("a", batch_size=batch_size, seed=seed, epochs=None, buffer_rows=64) as it:
        k = 3
        needed = -(-k * n // batch_size)
        batches = ids(next(it) for _ in range(needed))
    assert all(len(b) == batch_size for b in batches)
    stream = [r for b in batches for r in b]
    for e in range(k):
        assert sorted(stream[e * n : (e + 1) * n]) == all_rows()
    with pytest.raises(TypeError):
        len(ds.iter_batches("a", batch_size=8, epochs=None))


def test_resume_refuses_a_different_configuration(ds):
    state = ds.iter_batches("a", batch_size=16, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"`seed` is 1 in the saved state but 2 here"):
        ds.iter_batches("a", batch_size=16, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"`batch_size`"):
        ds.iter_batches("a", batch_size=8, seed=1).load_state_dict(state)


@pytest.mark.parametrize(
    "kw, exc, pattern",
    [
        (dict(hooks="zz"), store.HookNotFoundError, "no hook 'zz'"),
        (dict(hooks="a", batch_size=0), ValueError, "`batch_size` must be a positive int"),
        (dict(hooks="a", epochs=0), ValueError, "`epochs` must be a positive int, got 0"),
        (dict(hooks="a", dtype=torch.int32), ValueError, "`dtype` must be"),
        (dict(hooks="a", seed=-1), ValueError, "`seed` must be an int >= 0, got -1"),
        (dict(hooks="a", seed="x"), ValueError, "`seed` must be an int >= 0, got 'x'"),
        (dict(hooks="a", seed=1.5), ValueError, "`seed` must be an int >= 0, got 1.5"),
        (dict(hooks=["a", "a"]), ValueError, "names a hook twice"),
        (dict(hooks="a", units=[99]), store.NotCommittedError, r"unit\(s\) \[99\] are not committed"),
        (dict(hooks="a", epochs=None, batch_size=10_000), ValueError, "larger than an epoch"),
    ],
)
def test_bad_arguments(ds, kw, exc, pattern):
    # Refused when the iterator is built, before any batch (and before any thread starts).
    with pytest.raises(exc, match=pattern):
        ds.iter_batches(**kw)


def test_units_restricts_the_rows(ds):
    it = ds.iter_batches("a", batch_size=16, seed=3, units=[1, 4])
    got = sorted(r for b in ids(it) for r in b)
    assert got == [r for r in all_rows() if r // ROWS in (1, 4)]
    assert it.units == [1, 4]


def test_nothing_committed(tmp_path):
    s = store.open(tmp_path)
    s.create_dataset("e", hooks={"a": 2}, context_size=CTX, num_units=2, unit_contexts=UNIT_CONTEXTS)
    with pytest.raises(store.NotCommittedError, match="no unit committed"):
        s.dataset("e").iter_batches("a")
