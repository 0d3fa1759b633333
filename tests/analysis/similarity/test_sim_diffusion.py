"""``compare`` between a denoiser's dataset (one context per (image, timestep), a ``timestep``
column) and a vision encoder's over the same images: a side's timestep selects its rows, images
pooled (``align="docs"``) or patch positions paired (``align="patches"``) equal the numbers computed
here from the written rows; ``timestep_heatmap`` cells equal single compares; ``strata analyze``
commits its Parquet and PNG; bad inputs are one-line errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import simref

from strata import store
from strata.analysis import similarity as sim
from strata.analysis.similarity.errors import AnalysisError
from strata.analysis.similarity.spec import AnalyzeSpec
from strata.jobs.analyze_run import run_analyze
from strata.store.datasets.pairing import set_hash

N_IMAGES, GRID, TIMESTEPS = 14, (4, 4), [10, 500, 900]
CELLS = GRID[0] * GRID[1]
DIT_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
ENC = "blocks.3.hook_resid_post"
IMAGE_META = {"revision": "0", "corpus_fingerprint": "images-1",
              "doc_set_hash": set_hash(np.arange(N_IMAGES), [bytes([i]) * 5 for i in range(N_IMAGES)])}


def _write(s: store.Store, name: str, flat: dict[str, np.ndarray], acts: dict[str, np.ndarray], meta: dict,
           unit_contexts: int = 3) -> store.ActivationDataset:
    n = flat["doc_id"].size
    ur = unit_contexts * CELLS
    units = -(-n // ur)
    w = s.create_dataset(name, hooks={h: a.shape[1] for h, a in acts.items()}, context_size=CELLS, dtype="float32", num_units=units,
                         unit_contexts=unit_contexts, meta=meta)
    for u in range(units):
        r = np.arange(u * ur, min(n, (u + 1) * ur))
        cols = {"context_id": r // CELLS, "position": (r % CELLS).astype(np.int32), **{k: v[r] for k, v in flat.items()}}
        w.write_unit(u, tokens=pa.table(cols), acts={h: a[r] for h, a in acts.items()})
    return s.dataset(name)


def _flat(contexts_of: np.ndarray, timestep: np.ndarray | None) -> dict[str, np.ndarray]:
    pos = np.tile(np.arange(CELLS, dtype=np.int32), contexts_of.size)
    out = {"doc_id": np.repeat(contexts_of, CELLS).astype(np.int64), "doc_position": pos, "token_id": pos,
           "special": np.zeros(pos.size, bool), "char_start": np.full(pos.size, -1, np.int32), "char_end": np.full(pos.size, -1, np.int32)}
    if timestep is not None:
        out["timestep"] = np.repeat(timestep, CELLS).astype(np.int32)
    return out


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """A denoiser (image-major contexts at three timesteps, the image signal fading with the
    timestep), a DINOv2-like encoder on the same 4x4 grid, and one on a 2x8 grid."""
    s = store.open(tmp_path_factory.mktemp("diffusion"))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((N_IMAGES, CELLS, 3))  # each image's content per patch
    enc = np.concatenate([z @ rng.standard_normal((3, 7)) + 0.3 * rng.standard_normal((N_IMAGES, CELLS, 7))], axis=0).reshape(-1, 7)
    imgs = np.repeat(np.arange(N_IMAGES), len(TIMESTEPS))
    ts = np.tile(TIMESTEPS, N_IMAGES)
    acts = {}
    for h, d in zip(DIT_HOOKS, (5, 6)):
        mix = rng.standard_normal((3, d))
        fade = (1.0 - np.array(ts) / 1000.0)[:, None, None]
        acts[h] = (fade * (z[imgs] @ mix) + (1.0 - fade) * rng.standard_normal((imgs.size, CELLS, d))).reshape(-1, d)
    dit = _write(s, "dit", _flat(imgs, ts), acts, {**IMAGE_META, "model": "dit", "timesteps": TIMESTEPS, "diffusion": {"grid": list(GRID)}})
    meta = {**IMAGE_META, "model": "dino", "image": {"layout": {"grid": list(GRID)}}}
    dino = _write(s, "dino", _flat(np.arange(N_IMAGES), None), {ENC: enc}, meta)
    wide = _write(s, "wide", _flat(np.arange(N_IMAGES), None), {ENC: enc}, {**meta, "image": {"layout": {"grid": [2, 8]}}})
    return {"store": s, "dit": dit, "dino": dino, "wide": wide, "acts": acts, "enc": enc.astype(np.float32).astype(np.float64),
            "imgs": imgs, "ts": ts}


def _dit_rows(f, hook: str, t: int) -> np.ndarray:
    """[image, position, d] of the denoiser's rows at timestep t, from the written arrays."""
    x = f["acts"][hook].astype(np.float32).astype(np.float64).reshape(-1, CELLS, f["acts"][hook].shape[1])
    return x[f["ts"] == t][np.argsort(f["imgs"][f["ts"] == t])]


@pytest.mark.parametrize("t", TIMESTEPS)
def test_pooled_images_at_a_timestep(image_store, t):
    f = image_store
    got = sim.compare((f["dit"], DIT_HOOKS[1], t), (f["dino"], ENC), ["linear_cka", "cknna"], align="docs", knn_k=4, use_ray=False, tasks=2)
    px = _dit_rows(f, DIT_HOOKS[1], t).mean(axis=1)
    py = f["enc"].reshape(N_IMAGES, CELLS, -1).mean(axis=1)
    assert got["n"] == N_IMAGES and got["n_sample"] == N_IMAGES
    assert got["linear_cka"] == pytest.approx(simref.linear_cka(px, py), rel=1e-9)
    assert got["cknna"] == pytest.approx(sim.cknna(px, py, k=4), rel=1e-9)


def test_patch_positions_pair_at_a_timestep(image_store):
    f = image_store
    got = sim.compare((f["dino"], ENC), (f["dit"], DIT_HOOKS[0], 500), ["linear_cka", "cknna"], align="patches", knn_k=10, use_ray=False)
    x = f["enc"]  # image-major, position order: the encoder's rows are already in (image, position) order
    y = _dit_rows(f, DIT_HOOKS[0], 500).reshape(N_IMAGES * CELLS, -1)
    assert got["n"] == N_IMAGES * CELLS
    assert got["linear_cka"] == pytest.approx(simref.linear_cka(x, y), rel=1e-9)
    assert got["cknna"] == pytest.approx(sim.cknna(x, y, k=10), rel=1e-9)
    plan = sim.plan_compare((f["dino"], ENC), (f["dit"], DIT_HOOKS[0], 500), ["linear_cka"], align="patches")
    assert plan.provenance()["alignment"]["method"] == "patches" and plan.provenance()["timesteps"] == [None, 500]


def test_timestep_heatmap_cells_are_compares(image_store):
    f = image_store
    res = sim.timestep_heatmap((f["dit"], ["blocks.*.hook_resid_post"]), (f["dino"], ENC), metrics=["cknna", "linear_cka"], knn_k=4,
                               executor=sim.Executor.auto(False))
    assert res.hooks == DIT_HOOKS and res.timesteps == TIMESTEPS
    for i, h in enumerate(DIT_HOOKS):
        for j, t in enumerate(TIMESTEPS):
            want = sim.compare((f["dit"], h, t), (f["dino"], ENC), ["cknna", "linear_cka"], align="docs", knn_k=4, use_ray=False)
            assert res.values["cknna"][i, j] == pytest.approx(want["cknna"], rel=1e-12)
            assert res.values["linear_cka"][i, j] == pytest.approx(want["linear_cka"], rel=1e-12)
    # the planted signal fades with the timestep
    assert (res.values["linear_cka"][:, 0] > res.values["linear_cka"][:, 2] + 0.3).all()
    rows = res.table().to_pylist()
    assert len(rows) == 2 * len(DIT_HOOKS) * len(TIMESTEPS) and {r["n"] for r in rows} == {N_IMAGES}
    sub = sim.timestep_heatmap((f["dit"], [DIT_HOOKS[0]]), (f["dino"], ENC), timesteps=[900, 10], knn_k=4, executor=sim.Executor.auto(False))
    assert sub.timesteps == [900, 10] and list(sub.values) == ["cknna"]
    assert sub.values["cknna"][0, 1] == pytest.approx(res.values["cknna"][0, 0], rel=1e-12)


def test_layer_heatmap_of_cknna_is_not_mirrored(image_store):
    """A heatmap cell of cknna is cknna of the two hooks' rows (k = knn_k); (i, j) and (j, i) differ."""
    f = image_store
    res = sim.layer_heatmap((f["dit"], DIT_HOOKS), metric="cknna", knn_k=5, sample_rows=10_000)
    x0, x1 = (f["acts"][h].astype(np.float32).astype(np.float64) for h in DIT_HOOKS)
    assert res.method == "sample" and res.n == x0.shape[0] and res.provenance["options"]["knn_k"] == 5
    assert res.values[0, 1] == pytest.approx(sim.cknna(x0, x1, k=5), rel=1e-9)
    assert res.values[1, 0] == pytest.approx(sim.cknna(x1, x0, k=5), rel=1e-9)
    assert res.values[0, 0] == pytest.approx(1.0, abs=1e-12) and res.values[0, 1] != pytest.approx(res.values[1, 0], rel=1e-6)


def test_analyze_commits_the_timestep_heatmap(image_store):
    f = image_store
    spec = AnalyzeSpec.model_validate({
        "store": f["store"].uri, "compute": {"executor": "local"},
        "analyses": [{"kind": "timestep_heatmap", "name": "repa", "a": {"dataset": "dit", "hooks": ["blocks.*.hook_resid_post"]},
                      "b": {"dataset": "dino", "hook": ENC}, "knn_k": 4},
                     {"kind": "compare", "name": "one", "a": {"dataset": "dit", "hook": DIT_HOOKS[0], "timestep": 10},
                      "b": {"dataset": "dino", "hook": ENC}, "metrics": ["cknna"], "align": "patches"}]})
    assert [o.status for o in run_analyze(spec)] == ["written", "written"]
    s = store.open(f["store"].uri, create=False)
    h = s.analysis("repa")
    assert h.read("heatmap_cknna.png")[:8] == b"\x89PNG\r\n\x1a\n"
    t = h.table()
    assert t.column_names == ["hook", "timestep", "metric", "value", "n"] and t.num_rows == len(DIT_HOOKS) * len(TIMESTEPS)
    want = sim.timestep_heatmap((f["dit"], DIT_HOOKS), (f["dino"], ENC), knn_k=4, executor=sim.Executor.auto(False))
    assert np.allclose(np.array(t.column("value").to_pylist()).reshape(len(DIT_HOOKS), -1), want.values["cknna"], rtol=1e-12)
    one = s.analysis("one").table().to_pylist()
    assert one[0]["metric"] == "cknna" and one[0]["n"] == N_IMAGES * CELLS
    assert one[0]["value"] == pytest.approx(sim.compare((f["dit"], DIT_HOOKS[0], 10), (f["dino"], ENC), ["cknna"], align="patches",
                                                        use_ray=False)["cknna"], rel=1e-12)
    assert [o.status for o in run_analyze(spec)] == ["unchanged", "unchanged"]


@pytest.mark.parametrize(("call", "msg"), [
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0]), (f["dino"], ENC), align="docs"),
     r"dataset 'dit' holds each image at 3 timesteps \[10, 500, 900\]; align 'docs' needs one: give the side as \(dataset, hook, timestep\)"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], 7), (f["dino"], ENC), align="docs"),
     r"dataset 'dit' has no rows at timestep 7; its timesteps are \[10, 500, 900\]"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], 10), (f["dino"], ENC, 10), align="docs"),
     r"`timestep` 10 selects rows of a diffusion dataset, but dataset 'dino' has no timesteps"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], 10), (f["wide"], ENC), align="patches"),
     r"align 'patches' needs equal patch grids, but dit has 4x4 and wide 2x8"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], 10), (f["dino"], ENC), ["cknna"], align="docs", knn_k=1),
     r"compare: `knn_k`: cknna needs >= 2 neighbours per row, got 1"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], 10), (f["dino"], ENC), ["cknna"], align="docs", knn_k=14),
     r"cknna needs at least 15 documents"),
    (lambda f: sim.timestep_heatmap((f["dino"], [ENC]), (f["dino"], ENC)), r"side a is a diffusion dataset; 'dino' has no timesteps"),
    (lambda f: sim.timestep_heatmap((f["dit"], DIT_HOOKS), (f["dino"], ENC), timesteps=[10, 11]),
     r"dataset 'dit' has no rows at timestep 11"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], "10"), (f["dino"], ENC), align="docs"), r"a side's timestep must be an integer"),
    (lambda f: sim.plan_compare((f["dit"], DIT_HOOKS[0], 10), (f["dino"], ENC), align="tokens"),
     r"align 'tokens' pairs two datasets' rows by document position, which dataset 'dit' repeats .* use align 'patches'"),
])
def test_bad_diffusion_comparisons_are_one_line(image_store, call, msg):
    with pytest.raises(AnalysisError, match=msg) as e:
        call(image_store)
    assert "\n" not in str(e.value)


def test_two_hooks_of_one_diffusion_dataset_pair_row_by_row(image_store):
    f = image_store
    all_rows = sim.compare((f["dit"], DIT_HOOKS[0]), (f["dit"], DIT_HOOKS[1]), ["linear_cka"], use_ray=False)
    at = sim.compare((f["dit"], DIT_HOOKS[0], 900), (f["dit"], DIT_HOOKS[1], 900), ["linear_cka"], use_ray=False)
    x0, x1 = (_dit_rows(f, h, 900).reshape(N_IMAGES * CELLS, -1) for h in DIT_HOOKS)
    assert all_rows["n"] == N_IMAGES * CELLS * len(TIMESTEPS) and at["n"] == N_IMAGES * CELLS
    assert at["linear_cka"] == pytest.approx(simref.linear_cka(x0, x1), rel=1e-9)
