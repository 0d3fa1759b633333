"""Checkpoints and resume, in this process: a pass that dies after a checkpoint resumes to the
very weights, sparsity and curves of an uninterrupted run (bit for bit on the CPU); a crash
between two SAEs' commits of one step resumes from the step before; checkpoints of another
config are refused, or deleted with ``fresh``; checkpoints hold no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from _sae_data import HOOKS, planted_dataset

from strata import store
from strata.analysis.sae import SAETrainSpec, checkpoint, run_job
from strata.analysis.sae.plan import plan

STEPS, BATCH, EVERY = 70, 64, 20


class Killed(Exception):
    """Stands for a SIGKILL at a chosen point."""


def make_spec(root, name: str, **train) -> SAETrainSpec:
    return SAETrainSpec.model_validate({
        "store": str(root), "dataset": "planted", "hooks": ["blocks.*.hook_resid_post"], "name": name,
        # Normalisation, warm-up and a cosine schedule: every piece of trainer state matters.
        "sae": {"d_sae": 32, "k": 4, "normalize_activations": "expected_average_only_in"},
        "train": {"total_training_samples": STEPS * BATCH, "batch_size": BATCH, "lr": 3e-3, "n_batches_for_norm_estimate": 3,
                  "dead_feature_window": 30, "feature_sampling_window": 30, "lr_scheduler_name": "cosineannealing",
                  "lr_warm_up_steps": 5, "checkpoint_every": EVERY, "log_every": 7, **train},
        "eval": {"ce": False},
        "compute": {"device": "cpu"},
    })


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    planted_dataset(root)
    run_job(make_spec(root, "ref"))  # the uninterrupted reference
    return root


def assert_same_sae(s: store.Store, a: str, b: str) -> None:
    from safetensors.torch import load as load_tensors

    ha, hb = s.sae(a), s.sae(b)
    for f in ("sae_weights.safetensors", "sparsity.safetensors"):
        ta, tb = load_tensors(ha.artifact.read(f)), load_tensors(hb.artifact.read(f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert ha.curves().equals(hb.curves())
    assert ha.metrics == hb.metrics


def kill_at(monkeypatch, *, step: int, in_commit_of: str | None = None) -> None:
    """Die after every SAE committed ``step`` (or, with ``in_commit_of``, instead of that SAE's commit)."""
    commit, prune = checkpoint.commit, checkpoint.prune

    def dying_commit(storage, name, at, *args, **kw):
        if at == step and name == in_commit_of:
            raise Killed(f"killed while committing {name} step {at}")
        return commit(storage, name, at, *args, **kw)

    def dying_prune(storage, name, *, keep, lease):
        if keep == step and in_commit_of is None:
            raise Killed(f"killed after step {step}")
        return prune(storage, name, keep=keep, lease=lease)

    monkeypatch.setattr(checkpoint, "commit", dying_commit)
    monkeypatch.setattr(checkpoint, "prune", dying_prune)


def names(stem: str) -> list[str]:
    return [f"{stem}.{h}" for h in HOOKS]


def test_a_killed_pass_resumes_to_the_uninterrupted_result(root, monkeypatch):
    s = store.open(root)
    with monkeypatch.context() as m:
        kill_at(m, step=2 * EVERY)
        with pytest.raises(Killed):
            run_job(make_spec(root, "killed"))
    assert not set(names("killed")) & set(s.saes())
    for n in names("killed"):
        assert [st for st, _ in checkpoint.committed(s.storage, n)] == [EVERY, 2 * EVERY]  # the prune of step 20 never ran
        art = checkpoint.load(s.storage, n, 2 * EVERY)
        assert sorted(art.files) == ["activation_scaler.json", "cfg.json", "sae_weights.safetensors", "trainer_state.json",
                                     "trainer_state.safetensors"]
        for f in art.files:  # no pickle (b"\x80...") and no torch.save zip (b"PK...")
            assert not art.read(f).startswith((b"\x80", b"PK")), f
        state = art.read_json("trainer_state.json")
        assert state["n_training_steps"] == 2 * EVERY and state["extra"]["data"]["batch"] == 2 * EVERY + 3  # + the norm-estimate batches
    p = plan(make_spec(root, "killed"), s)
    assert [(r.status, r.resume_step) for r in p.runs] == [("resume", 2 * EVERY)] * 2
    result = run_job(make_spec(root, "killed"))
    assert [(o.status, o.resumed_from) for o in result.outcomes] == [("resumed", 2 * EVERY)] * 2
    for n, ref in zip(names("killed"), names("ref")):
        assert_same_sae(s, n, ref)
        lin = s.sae(n).lineage
        assert [r["step"] for r in lin["resumed"]] == [2 * EVERY] and lin["started_at"] < lin["resumed"][0]["at"]
        assert s.storage.list(f"saes/{n}/checkpoints") == []  # gone once committed


def test_a_crash_between_two_saes_commits_resumes_from_the_step_before(root, monkeypatch):
    s = store.open(root)
    first, second = names("split")
    with monkeypatch.context() as m:
        kill_at(m, step=3 * EVERY, in_commit_of=second)
        with pytest.raises(Killed):
            run_job(make_spec(root, "split"))
    assert [st for st, _ in checkpoint.committed(s.storage, first)] == [2 * EVERY, 3 * EVERY]
    assert [st for st, _ in checkpoint.committed(s.storage, second)] == [2 * EVERY]
    result = run_job(make_spec(root, "split"))
    assert [o.resumed_from for o in result.outcomes] == [2 * EVERY] * 2
    for n, ref in zip((first, second), names("ref")):
        assert_same_sae(s, n, ref)


def test_checkpoints_of_another_config_are_refused_or_deleted_with_fresh(root, monkeypatch):
    s = store.open(root)
    with monkeypatch.context() as m:
        kill_at(m, step=EVERY)
        with pytest.raises(Killed):
            run_job(make_spec(root, "changed"))
    other = make_spec(root, "changed", lr=1e-3)
    with pytest.raises(store.ArtifactExistsError, match=r"has a checkpoint \(step 20\) of another config \(train.lr: 0.003 -> 0.001\).*--fresh"):
        run_job(other)
    result = run_job(other, fresh=True)
    assert [o.status for o in result.outcomes] == ["trained"] * 2
    run_job(make_spec(root, "ref-lr", lr=1e-3))
    for n, ref in zip(names("changed"), names("ref-lr")):
        assert_same_sae(s, n, ref)
        assert s.sae(n).lineage["resumed"] == []
    # The committed SAEs' records say which config they are.
    cfg = s.sae(names("changed")[0]).meta["config"]
    assert cfg["train"]["lr"] == 1e-3 and "checkpoint_every" not in cfg["train"] and json.dumps(cfg)
