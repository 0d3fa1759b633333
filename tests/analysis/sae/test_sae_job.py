"""The SAE training job against the store: SAEs committed as artifacts and read back through
``s.sae(name)``, several hooks in one pass, a sweep as Ray tasks on the session Ray, leases,
no-op reruns, refused config changes, and a dataset that grew."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sae_data import CTX, HOOKS, UNIT_CONTEXTS, D, planted_dataset, token_table

from strata import store
from strata.analysis.sae import SAETrainSpec, run_job, train
from strata.analysis.sae.job import task_device
from strata.analysis.sae.plan import config_hash, plan
from strata.pipeline.errors import ClusterError

STEPS, BATCH = 60, 64


def make_spec(root, **changes) -> SAETrainSpec:
    raw = {
        "store": str(root), "dataset": "planted", "hooks": ["blocks.*.hook_resid_post"], "name": "job",
        "sae": {"d_sae": 32, "k": 4},
        "train": {"total_training_samples": STEPS * BATCH, "batch_size": BATCH, "lr": 3e-3, "n_batches_for_norm_estimate": 5,
                  "dead_feature_window": 50, "checkpoint_every": 25},
        "eval": {"ce": False},
        "compute": {"device": "cpu"},
    }
    raw.update(changes)
    return SAETrainSpec.model_validate(raw)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    planted_dataset(root)
    return root


@pytest.fixture(scope="module")
def two_hooks(planted):
    """Both hooks in one pass, committed."""
    return run_job(make_spec(planted))


def weights(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_several_hooks_train_in_one_pass_and_commit(planted, two_hooks):
    s = store.open(planted)
    names = [f"job.{h}" for h in HOOKS]
    assert [o.name for o in two_hooks.outcomes] == names and [o.status for o in two_hooks.outcomes] == ["trained"] * 2
    assert not two_hooks.used_ray  # one pass: in this process
    assert s.saes() == names
    for o, hook in zip(two_hooks.outcomes, HOOKS):
        h = s.sae(o.name)
        assert sorted(h.files) == ["cfg.json", "curves.parquet", "curves.png", "lineage.json", "metrics.json",
                                   "sae_weights.safetensors", "sparsity.safetensors"]
        lin = h.lineage
        assert lin["hook"] == hook and lin["trained_with"] == [n for n in names if n != o.name]
        assert lin["samples_seen"] == STEPS * BATCH and lin["resumed"] == []
        assert h.meta["config_hash"] == lin["config_hash"] == config_hash(h.meta["config"])
        assert h.metrics == o.metrics and h.metrics["l0"] == 4
        assert h.curves().column("step").to_pylist()[-1] == STEPS
        # Checkpoints were taken (every 25 steps) and are gone once the SAE is committed.
        assert s.storage.list(f"saes/{o.name}/checkpoints") == []
    # The same SAEs as training in memory, and as training each hook alone.
    mem = train(make_spec(planted))
    alone = train(make_spec(planted, hooks=[HOOKS[1]], name="alone"))
    for r in mem:
        assert same(weights(s.sae(r.name).load()), weights(r.sae))
    assert same(weights(alone[0].sae), weights(mem[1].sae))


def test_lineage_names_the_dataset_fingerprint_and_units(planted, two_hooks):
    s = store.open(planted)
    ds = s.dataset("planted")
    lin = s.sae(f"job.{HOOKS[0]}").lineage
    assert (lin["dataset"], lin["fingerprint"], lin["hook"], lin["d_in"]) == ("planted", ds.info.fingerprint, HOOKS[0], D)
    assert lin["units"] == [0, 1, 2, 3, 4] and lin["holdout_units"] == [5]
    assert lin["shuffle_seed"] == 0 and lin["architecture"] == "topk" and lin["sae_config"]["d_sae"] == 32
    assert lin["trainer_config"]["train_batch_size_samples"] == BATCH
    assert set(lin["versions"]) == {"strata", "sae-lens", "torch"} and lin["started_at"] <= lin["ended_at"]
    assert "storage_options" not in lin["spec"]
    assert s.sae(f"job.{HOOKS[0]}").unseen_units() == []


def test_a_rerun_is_a_noop_and_another_config_is_refused(planted, two_hooks):
    s = store.open(planted)
    before = {n: s.sae(n).artifact.record for n in s.saes()}
    again = run_job(make_spec(planted))
    assert again.noop and [o.status for o in again.outcomes] == ["unchanged"] * 2
    assert {n: s.sae(n).artifact.record for n in s.saes()} == before
    # Where it runs and how often it checkpoints are not part of the config.
    assert run_job(make_spec(planted, train={**make_spec(planted).train.model_dump(), "checkpoint_every": 7})).noop
    with pytest.raises(store.ArtifactExistsError, match=r"job.blocks.0.hook_resid_post' is committed already with another config \(sae.k: 4 -> 2\)"):
        run_job(make_spec(planted, sae={"d_sae": 32, "k": 2}))
    assert {n: s.sae(n).artifact.record for n in s.saes()} == before


def test_a_held_lease_is_refused_at_once(planted):
    s = store.open(planted)
    spec = make_spec(planted, hooks=[HOOKS[0]], name="leased")
    with s.artifact_lease("saes", "leased", owner="another job"):
        with pytest.raises(store.LeaseHeldError, match="another job"):
            run_job(spec)
    assert "leased" not in s.saes() and s.storage.list("saes/leased/checkpoints") == []


def test_a_grown_dataset_shows_unseen_units_and_is_another_config(tmp_path):
    s, _ = planted_dataset(tmp_path, units=6, only=4)
    spec = make_spec(tmp_path, hooks=[HOOKS[0]], name="grow")
    run_job(spec)
    h = s.sae("grow")
    assert h.lineage["units"] == [0, 1, 2] and h.lineage["holdout_units"] == [3]
    w = s.writer("planted")
    rng = np.random.default_rng(9)
    for u in (4, 5):
        w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS),
                     acts={hk: rng.standard_normal((UNIT_CONTEXTS * CTX, D)).astype(np.float32) for hk in HOOKS})
    assert s.sae("grow").unseen_units() == [4, 5]
    with pytest.raises(store.ArtifactExistsError, match=r"holdout_units: \[3\] -> \[5\], units: \[0, 1, 2\] -> 5 units 0..4"):
        run_job(spec)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    s, _ = planted_dataset(tmp_path, units=2, only=0)
    listing = sorted(s.storage.list(""))
    with pytest.raises(store.NotCommittedError, match="no unit committed"):
        run_job(make_spec(tmp_path))
    with pytest.raises(store.HookNotFoundError, match="its hooks: blocks.0.hook_resid_post, blocks.1.hook_resid_post"):
        run_job(make_spec(tmp_path, hooks=["blocks.9.hook_resid_post"]))
    with pytest.raises(store.DatasetNotFoundError, match="holds: planted"):
        run_job(make_spec(tmp_path, dataset="other"))
    with pytest.raises(ValueError, match=r"`sae.d_in` is 8 but hook 'blocks.0.hook_resid_post' .* is 16 wide"):
        run_job(make_spec(tmp_path, sae={"d_sae": 32, "k": 4, "d_in": 8}))
    assert sorted(s.storage.list("")) == listing


def test_the_task_device_never_asks_a_gpu_less_cluster_for_cuda():
    spec = make_spec("/x", compute={"device": "auto"})
    assert task_device(spec, 0) == "cpu" and task_device(spec, 2) == "cuda"
    with pytest.raises(ClusterError, match="no GPU"):
        task_device(make_spec("/x", compute={"device": "cuda"}), 0)


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_runs_one_ray_task_per_combination(ray_session, planted):
    spec = make_spec(planted, hooks=[HOOKS[1]], name="sweep", sweep={"sae.k": [2, 4]})
    p = plan(spec, store.open(planted))
    assert [[r.name for r in t.runs] for t in p.tasks] == [["sweep.k=2"], ["sweep.k=4"]]
    result = run_job(spec)
    assert result.used_ray and [o.name for o in result.outcomes] == ["sweep.k=2", "sweep.k=4"]
    s = store.open(planted)
    mem = train(spec)  # the same combinations in this process, one thread, as the tasks ran
    for k, r in zip((2, 4), mem):
        h = s.sae(r.name)
        assert h.cfg["k"] == k and h.metrics["l0"] == k and h.lineage["trained_with"] == []
        assert same(weights(h.load()), weights(r.sae))
