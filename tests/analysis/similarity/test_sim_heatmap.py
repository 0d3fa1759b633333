"""Layer heatmaps: joint block co-moments equal the pairwise ones; every cell equals the in-memory
metric of its two hooks; several passes under a small memory budget give the one-pass values;
two datasets; the sample method."""

from __future__ import annotations

import _simdata
import numpy as np
import pytest
import simref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.analysis import similarity as sim
from strata.analysis.similarity.heatmap import plan_heatmap
from strata.pipeline.executor import Tasks
from strata.store.errors import StrataError

FIELDS = ["mean_x", "mean_y", "cxx", "cyy", "cxy", "xx_x", "yy_x", "xx_y", "yy_y", "xxxx", "yyyy", "xxyy", "cos_sum", "cos_zero"]
DIMS = [3, 5, 3, 4]
RNG = np.random.default_rng(0)
BLOCKS = [RNG.standard_normal((90, d)) * (h + 1) + 50.0 * h for h, d in enumerate(DIMS)]


def _same_moments(got: sim.Moments, want: sim.Moments) -> None:
    assert got.n == want.n
    for f in FIELDS:
        w = getattr(want, f)
        if w is None:
            assert getattr(got, f) is None, f
        else:
            np.testing.assert_allclose(getattr(got, f), w, rtol=1e-10, atol=1e-7, err_msg=f)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, 90), max_size=6), seed=st.integers(0, 2**16))
def test_block_moments_pairs_equal_two_side_moments_for_any_chunking_and_merge_order(cuts, seed):
    pts = sorted({0, 90, *cuts})
    parts = [sim.BlockMoments(DIMS).update([b[a:c] for b in BLOCKS]) for a, c in zip(pts[:-1], pts[1:])]
    order = np.random.default_rng(seed).permutation(len(parts))
    bm = sim.BlockMoments.sum([parts[i] for i in order])
    for h in range(len(DIMS)):
        for g in range(len(DIMS)):
            _same_moments(bm.pair(h, g), sim.Moments(DIMS[h], DIMS[g]).update(BLOCKS[h], BLOCKS[g]))


def test_block_moments_round_trip_and_checks():
    bm = sim.BlockMoments(DIMS).update(BLOCKS)
    back = sim.BlockMoments.from_dict(bm.to_dict())
    _same_moments(back.pair(1, 3), bm.pair(1, 3))
    with pytest.raises(ValueError, match="expected 4 blocks"):
        bm.update(BLOCKS[:3])
    with pytest.raises(ValueError, match="cannot merge"):
        bm.merge(sim.BlockMoments([3, 5]))


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """Five hooks of mixed widths: noisy linear maps of one another, so the cells differ."""
    from strata import store

    s = store.open(tmp_path_factory.mktemp("layers"))
    flat = _simdata.pack([_simdata.word_spans(t) for t in _simdata.texts(40, seed=4)])
    n = flat["doc_id"].size
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 6)) * np.geomspace(2, 0.5, 6)
    acts = {"hook_embed": x}
    for layer, d in enumerate([6, 8, 6, 5]):
        x = x @ rng.standard_normal((x.shape[1], d)) + 0.7 * rng.standard_normal((n, d)) + 2.0
        acts[f"blocks.{layer}.hook_resid_post"] = x
    ds = _simdata.write_dataset(s, "layers", flat, {k: v.astype(np.float32) for k, v in acts.items()},
                                meta={"model": "synthetic", "revision": "r0", "corpus_fingerprint": "layers-corpus"})
    keep = ~flat["special"]
    return ds, {h: np.asarray(ds.read(h), np.float64)[keep] for h in ds.hooks}


REFS = {"linear_cka": simref.linear_cka, "debiased_cka": simref.debiased_cka, "cca": simref.cca,
        "svcca": lambda a, b: simref.svcca(a, b, 0.99), "procrustes": simref.procrustes,
        "pwcca": lambda a, b: simref.pwcca(a, b, use_x=a.shape[1] <= b.shape[1])}


@pytest.mark.parametrize("metric", list(REFS))
def test_every_cell_equals_the_reference_of_its_pair(layered, metric):
    ds, x = layered
    res = sim.layer_heatmap((ds, ["*"]), metric=metric, tasks=3, chunk_rows=37, executor=sim.Executor())
    assert res.method == "exact" and res.passes == 1 and res.hooks_a == ds.hooks
    want = np.array([[REFS[metric](x[a], x[b]) for b in ds.hooks] for a in ds.hooks])
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)


def test_small_budget_takes_several_exact_passes_with_the_same_values(layered):
    ds, _ = layered
    one = sim.layer_heatmap((ds, ["*"]), metric="debiased_cka", chunk_rows=50, executor=sim.Executor())
    budget = 8 * (3 * 16**2 + 2 * 50 * 16) / 2**20  # room for two hooks of width <= 8, not for all five (31)
    many = sim.layer_heatmap((ds, ["*"]), metric="debiased_cka", memory_budget_mb=budget, chunk_rows=50,
                             executor=sim.Executor())
    assert many.method == "exact" and many.passes > 1
    np.testing.assert_allclose(many.values, one.values, rtol=1e-10, atol=1e-13)
    table = many.table()
    assert table.num_rows == 25 and set(table.column("method").to_pylist()) == {"exact"}


def test_too_small_a_budget_for_one_pair_falls_back_to_a_stated_sample(layered):
    ds, x = layered
    opts = dict(metric="linear_cka", memory_budget_mb=1e-4, sample_rows=10**6)
    res = sim.layer_heatmap((ds, ["*"]), executor=sim.Executor(), **opts)
    assert res.method == "sample" and res.n == len(next(iter(x.values())))
    want = np.array([[simref.linear_cka(x[a], x[b]) for b in ds.hooks] for a in ds.hooks])
    np.testing.assert_allclose(res.values, want, rtol=1e-9)
    with pytest.raises(StrataError, match="too small for the exact co-moments of one pair"):
        plan_heatmap((ds, ["*"]), method="exact", memory_budget_mb=1e-4)


def test_two_datasets_every_hook_of_a_against_every_hook_of_b(layered):
    ds, x = layered
    flat = _simdata.pack([_simdata.word_spans(t) for t in _simdata.texts(40, seed=9)])
    values = np.random.default_rng(2).standard_normal((flat["doc_id"].size, 6)).astype(np.float32)
    other = _simdata.write_dataset(ds.store, "other", flat, {"hook_embed": values},
                                   meta={"model": "synthetic", "revision": "r1", "corpus_fingerprint": "another-corpus"})
    # Different documents: refused, naming why.
    with pytest.raises(StrataError, match="no common rows|different corpora"):
        sim.layer_heatmap((ds, ["*"]), (other, ["*"]), executor=sim.Executor())
    res = sim.layer_heatmap((ds, ["blocks.*"]), (ds, ["hook_embed", "blocks.3.*"]), metric="linear_cka",
                            executor=sim.Executor())
    assert res.values.shape == (4, 2)
    want = np.array([[simref.linear_cka(x[a], x[b]) for b in res.hooks_b] for a in res.hooks_a])
    np.testing.assert_allclose(res.values, want, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_tasks_give_the_in_process_heatmap(layered, ray_session):
    ds, _ = layered
    local = sim.layer_heatmap((ds, ["*"]), metric="svcca", tasks=1, executor=sim.Executor())
    remote = sim.layer_heatmap((ds, ["*"]), metric="svcca", tasks=2, executor=sim.Executor(Tasks()))
    np.testing.assert_allclose(remote.values, local.values, rtol=1e-10)


def test_bad_heatmap_input(layered):
    ds, _ = layered
    with pytest.raises(StrataError, match="no hook matching 'blocks.7.*'; it has: hook_embed"):
        plan_heatmap((ds, ["blocks.7.*"]))
    with pytest.raises(StrataError, match="unknown heatmap metric 'r2'"):
        plan_heatmap((ds, ["*"]), metric="r2")
    with pytest.raises(StrataError, match="debiased_cka needs at least 4 aligned rows"):
        plan_heatmap((ds, ["*"]), metric="debiased_cka", max_rows=3)


def test_block_moments_without_cosines_keep_every_other_field():
    on, off = sim.BlockMoments(DIMS).update(BLOCKS), sim.BlockMoments(DIMS, cosine=False).update(BLOCKS)
    assert np.isnan(off.cos).all() and not np.isnan(on.cos[0, 2])  # blocks 0 and 2 have the same width
    for h, g in [(0, 2), (1, 3), (2, 2)]:
        a, b = on.pair(h, g), off.pair(h, g)
        assert b.cos_sum is None and (a.cos_sum is None) == (DIMS[h] != DIMS[g])
        for f in FIELDS[:-2]:
            np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f)
    assert sim.BlockMoments.sum([on, off]).pair(0, 2).cos_sum is None
    assert sim.BlockMoments.from_dict(off.to_dict()).pair(0, 2).cos_sum is None
