"""`strata reprocess`'s plan sees conflicts with what the store holds (issue 15, finding 3): a
feature table whose SAE was removed and is trained again would get another identity, so the dry
run fails, and the real run fails the same way before training anything; an SAE with a
checkpoint of another config, which its job would refuse to resume, fails the plan too. No Ray: the store is
made through the public writer, the SAE trained in this process, the table's manifest written by
the feature writer the encode job uses, then the SAE deleted."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from _small_store import FEATURES, SAE, feature_manifest, small_store

from strata import store
from strata.jobs.cli import main
from strata.jobs.reprocess import load_pipeline, plan_pipeline
from strata.store.commit import artifacts
from strata.store.features.format import FeatureTableExistsError, load_info
from strata.store.saes.handles import SAES

PIPELINE = {"store": "./acts", "jobs": ["sae.yaml", "features.yaml"]}


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A store holding dataset `tiny`, SAE `tsae` trained on it and feature table `ft` made with
    that SAE (its manifest: the table's identity), then the SAE deleted."""
    monkeypatch.chdir(tmp_path)
    s = small_store(tmp_path / "acts")
    feature_manifest(s, FEATURES)
    for name, spec in (("sae", SAE), ("features", FEATURES), ("pipeline", PIPELINE)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    # As the issue's `rm` did (today's `strata rm` refuses an SAE a table was built from): the
    # SAE's commit deleted under its lease, through the store's artifact API.
    with s.artifact_lease(SAES, "tsae", owner="test") as lease:
        artifacts.delete(s.storage, SAES, "tsae", lease=lease)
    return tmp_path


def test_a_table_of_a_removed_sae_fails_the_dry_run_and_the_real_run_before_training(project):
    s = store.open(project / "acts", create=False)
    assert s.saes() == [] and load_info(s.storage, "ft") is not None
    before = listing(project / "acts")
    with pytest.raises(FeatureTableExistsError, match="feature table 'ft' already exists"):
        plan_pipeline(load_pipeline("pipeline.yaml"))
    for argv in (["reprocess", "pipeline.yaml", "--dry-run"], ["reprocess", "pipeline.yaml"]):
        rc, out, err = cli(*argv)
        assert rc == 2, (argv, out, err)
        assert err.startswith("strata: error: features.yaml: feature table 'ft' already exists") and err.count("\n") == 1, err
        assert "SAE tsae is trained in this run" in err and "choose a new `name`" in err
        assert "encode units" not in out  # no plan was promised
    # The real run stopped at its plan: no SAE trained, not a byte written (no lease taken either).
    assert store.open(project / "acts", create=False).saes() == []
    assert listing(project / "acts") == before


def test_a_new_table_name_plans_the_training_and_the_encoding(project):
    """The same pipeline with a table name that is free: no conflict, the plan trains and encodes."""
    (project / "features.yaml").write_text(yaml.safe_dump({**FEATURES, "name": "ft2"}))
    plan = {st.job.entry: st for st in plan_pipeline(load_pipeline("pipeline.yaml")).steps}
    assert plan["sae.yaml"].run and plan["sae.yaml"].names == ["tsae"]
    assert plan["features.yaml"].run and plan["features.yaml"].units == [0, 1, 2, 3, 4]


class Killed(Exception):
    """Stands for a SIGKILL after a checkpoint."""


def test_an_sae_with_a_checkpoint_of_another_config_fails_the_plan(tmp_path, monkeypatch):
    from strata.analysis.sae import SAETrainSpec, checkpoint, run_job
    from strata.store.commit.artifacts import ArtifactExistsError

    monkeypatch.chdir(tmp_path)
    small_store(tmp_path / "acts", sae=None)
    ckpt = {**SAE, "train": {**SAE["train"], "checkpoint_every": 2}}
    prune = checkpoint.prune

    def dying_prune(storage, name, *, keep, lease):
        if keep == 2:
            raise Killed("killed after step 2")
        return prune(storage, name, keep=keep, lease=lease)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "prune", dying_prune)
        with pytest.raises(Killed):
            run_job(SAETrainSpec.model_validate({**ckpt, "store": str(tmp_path / "acts")}))
    s = store.open(tmp_path / "acts", create=False)
    assert s.saes() == [] and [at for at, _ in checkpoint.committed(s.storage, "tsae")] == [2]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"store": "./acts", "jobs": ["sae.yaml"]}))
    (tmp_path / "sae.yaml").write_text(yaml.safe_dump({**ckpt, "train": {**ckpt["train"], "lr": 1e-3}}))
    with pytest.raises(ArtifactExistsError, match=r"SAE 'tsae' has a checkpoint \(step 2\) of another config \(train.lr: 0.003 -> 0.001\)"):
        plan_pipeline(load_pipeline("pipeline.yaml"))
    rc, out, err = cli("reprocess", "pipeline.yaml", "--dry-run")
    assert rc == 2 and err.startswith("strata: error: sae.yaml: SAE 'tsae' has a checkpoint") and err.count("\n") == 1, err
    # The config it was checkpointed with plans a resume: no conflict.
    (tmp_path / "sae.yaml").write_text(yaml.safe_dump(ckpt))
    plan = plan_pipeline(load_pipeline("pipeline.yaml"))
    assert plan.steps[0].run and plan.steps[0].names == ["tsae"]
