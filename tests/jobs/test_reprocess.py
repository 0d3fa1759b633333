"""`strata reprocess`: a pipeline of an extraction, an SAE, a feature table and two analyses,
kept up to date against a store. The plan lists exactly what the run then does (new units of a
grown corpus, a new hook, a new dataset version when the local model changed); policies keep or
replace what changed inputs; a rerun does nothing and writes nothing; a run that finds another
holding the write lease exits 0; bad pipelines are one line and exit code 2, before any work."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from strata import store
from strata.jobs.cli import main
from strata.jobs.reprocess import load_pipeline, plan_pipeline, ranges, toposort
from strata.pipeline.errors import SpecError
from strata.pipeline.models import folder_revision
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl

REPO = Path(__file__).resolve().parents[2]
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"

EXTRACT = {"store": "acts", "name": "tiny", "model": {"id": "./model"}, "corpus": {"path": "corpus.jsonl", "growing": True},
           "tokenize": {"context_size": 16}, "hooks": ["blocks.*.hook_resid_post"], "dtype": "float32",
           "compute": {"executor": "local", "unit_contexts": 8, "batch_tokens": 256, "num_workers": 1}}
SAE = {"store": "acts", "dataset": "tiny", "hooks": [H1], "name": "tsae", "architecture": "topk", "sae": {"d_sae": 64, "k": 4},
       "train": {"total_training_samples": 512, "batch_size": 128, "lr": 3e-3, "seed": 0, "n_batches_for_norm_estimate": 2,
                 "checkpoint_every": 0},
       "data": {"holdout_units": 1}, "eval": {"ce": False}, "compute": {"device": "cpu", "threads": 1}}
FEATURES = {"store": "acts", "sae": "tsae", "name": "ft", "top_k": 8,
            "compute": {"executor": "local", "batch_rows": 256, "num_workers": 1, "device": "cpu"}}


def _norms(name: str) -> dict:
    return {"store": "acts", "compute": {"executor": "local", "tasks": 1},
            "analyses": [{"kind": "layers", "name": name, "dataset": "tiny", "hooks": ["blocks.*.hook_resid_post"], "metrics": ["norm"]}]}


# Listed against the dependency order on purpose: the order comes from what each job reads.
PIPELINE = {"store": "./acts", "jobs": [{"spec": "norms.yaml", "on_change": "recompute"}, {"spec": "norms-keep.yaml", "on_change": "keep"},
                                        "features.yaml", {"spec": "sae.yaml", "on_change": "keep"}, "extract.yaml"]}


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def listing(root: Path, *, skip_leases: bool = False) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not (skip_leases and "/lease/" in str(p))}


def row(out: str, job: str) -> str:
    """The plan table's row of a job."""
    rows = [ln for ln in out.splitlines() if ln.startswith(job + " ")]
    assert len(rows) == 1, out
    return rows[0]


def append_docs(folder: Path, n: int, seed: int) -> None:
    with open(folder / "corpus.jsonl", "a", encoding="utf-8") as fh:
        for d in synthetic_docs(n, seed=seed):
            fh.write(json.dumps({"text": d}) + "\n")


@pytest.fixture(scope="module")
def base(ray_session, tmp_path_factory):
    """A project folder whose store the pipeline built from scratch (the first run's output too)."""
    root = tmp_path_factory.mktemp("reprocess")
    model = build_tiny(tmp_path_factory.mktemp("model") / "gpt2", family="gpt2", layers=2, d_model=32, max_positions=128, vocab_size=400)
    (root / "model").symlink_to(model)
    write_jsonl(root / "corpus.jsonl", synthetic_docs(24, seed=7))
    for name, spec in (("extract", EXTRACT), ("sae", SAE), ("features", FEATURES), ("norms", _norms("norms")),
                       ("norms-keep", _norms("norms-keep")), ("pipeline", PIPELINE)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    return root, out


@pytest.fixture
def project(base, tmp_path, monkeypatch) -> Path:
    """A copy of the base project (store included), as the working directory."""
    folder = tmp_path / "p"
    shutil.copytree(base[0], folder, symlinks=True)
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.ray
@pytest.mark.slow
def test_first_run_builds_everything_in_dependency_order_and_a_rerun_does_nothing(base, project):
    _, out = base
    ran = [ln.split()[2].rstrip(":") for ln in out.splitlines() if ln.startswith("==> [")]
    assert sorted(ran) == sorted(j if isinstance(j, str) else j["spec"] for j in PIPELINE["jobs"])
    assert ran[0] == "extract.yaml" and ran.index("sae.yaml") < ran.index("features.yaml")  # what each reads comes first
    assert "new dataset" in row(out, "extract.yaml") and "done: 5 job(s)" in out
    s = store.open(project / "acts", create=False)
    ds = s.dataset("tiny")
    units = ds.committed_units()
    assert units and all(ds.committed_units(h) == units for h in (H0, H1)) and ds.info.num_units == len(units)
    assert f"units {ranges(units)} x 2 hook(s)" in row(out, "extract.yaml")
    assert s.saes() == ["tsae"] and s.sae("tsae").lineage["dataset"] == "tiny"
    assert s.features("ft").units == units and s.analyses() == ["norms", "norms-keep"]

    before = listing(project / "acts")
    for argv in (["reprocess", "pipeline.yaml", "--dry-run"], ["reprocess", "pipeline.yaml"]):
        rc, out, err = cli(*argv)
        assert rc == 0 and err == "", err
        assert "nothing to do: every job of pipeline.yaml is up to date" in out
        assert all(re.search(r"\s-\s+up to date$", row(out, j)) for j in ("extract.yaml", "sae.yaml", "features.yaml")), out
    assert listing(project / "acts") == before  # nothing written: no lease taken, no manifest rewritten


@pytest.mark.ray
@pytest.mark.slow
def test_appended_documents_plan_and_compute_exactly_the_new_units(project):
    s = store.open(project / "acts", create=False)
    old_units = s.dataset("tiny").committed_units()
    sae_at = s.sae("tsae").artifact.record.committed_at
    kept_at, norms_at = s.analysis("norms-keep").artifact.record.committed_at, s.analysis("norms").artifact.record.committed_at
    append_docs(project, 14, seed=99)

    before = listing(project / "acts")
    rc, dry, _ = cli("reprocess", "pipeline.yaml", "--dry-run")
    assert rc == 0 and "dry run: nothing was run; 3 job(s) would run" in dry
    assert listing(project / "acts") == before
    plan = {st.job.entry: st for st in plan_pipeline(load_pipeline("pipeline.yaml")).steps}
    planned = plan["extract.yaml"].units
    assert planned and planned[0] == len(old_units) and plan["extract.yaml"].hooks == {H0: planned, H1: planned}
    assert f"units {ranges(planned)} (2 hooks)" in row(dry, "extract.yaml") and "the corpus grew" in row(dry, "extract.yaml")
    assert plan["features.yaml"].units == planned and f"encode units {ranges(planned)}" in row(dry, "features.yaml")
    assert "kept (policy)" in row(dry, "sae.yaml") and "kept (policy)" in row(dry, "norms-keep.yaml")
    assert "recompute norms" in row(dry, "norms.yaml")

    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    s = store.open(project / "acts", create=False)
    ds = s.dataset("tiny")
    new = sorted(set(ds.committed_units()) - set(old_units))
    assert new == planned and ds.committed_units(H0) == ds.committed_units(H1) == old_units + new  # exactly what the plan said
    assert s.features("ft").units == old_units + new and s.features("ft").merged_units == old_units + new
    assert s.sae("tsae").artifact.record.committed_at == sae_at  # kept by policy
    assert s.analysis("norms-keep").artifact.record.committed_at == kept_at  # kept by policy
    assert s.analysis("norms-keep").meta["inputs"][0]["units"] == old_units
    assert s.analysis("norms").artifact.record.committed_at != norms_at  # recomputed over every unit
    assert s.analysis("norms").meta["inputs"][0]["units"] == old_units + new

    before = listing(project / "acts")
    rc, out, _ = cli("reprocess", "pipeline.yaml")
    assert rc == 0 and "nothing to do" in out and "(2 result(s) kept by policy)" in out
    assert "kept (policy)" in row(out, "sae.yaml")
    assert listing(project / "acts") == before


@pytest.mark.ray
@pytest.mark.slow
def test_a_new_hook_is_the_only_work(project):
    spec = yaml.safe_load((project / "extract.yaml").read_text())
    spec["hooks"] = ["blocks.*.hook_resid_post", "blocks.0.hook_mlp_out"]
    (project / "extract.yaml").write_text(yaml.safe_dump(spec))
    units = store.open(project / "acts", create=False).dataset("tiny").committed_units()
    plan = plan_pipeline(load_pipeline("pipeline.yaml"))
    assert [st.job.entry for st in plan.todo] == ["extract.yaml"]  # no downstream job reads that hook
    assert plan.todo[0].hooks == {"blocks.0.hook_mlp_out": units} and plan.todo[0].units == units

    old_hooks = {k: v for k, v in listing(project / "acts").items() if "/acts/blocks." in k and "hook_resid_post" in k}
    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    assert f"units {ranges(units)} of blocks.0.hook_mlp_out" in row(out, "extract.yaml") and "new hook(s) blocks.0.hook_mlp_out" in out
    ds = store.open(project / "acts", create=False).dataset("tiny")
    assert ds.committed_units("blocks.0.hook_mlp_out") == units
    after = listing(project / "acts")
    assert {k: after.get(k) for k in old_hooks} == old_hooks  # the other hooks' data and records untouched


@pytest.mark.ray
@pytest.mark.slow
def test_a_changed_local_model_makes_a_new_dataset_version(project):
    from safetensors.torch import load_file, save_file

    model = project / "model"
    target = model.resolve()
    model.unlink()
    shutil.copytree(target, model)
    weights = load_file(model / "model.safetensors")
    weights = {k: v * 1.01 if v.is_floating_point() else v for k, v in weights.items()}  # other weights: another content identity
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    version = f"tiny@{folder_revision(str(model)).split(':', 1)[1][:8]}"  # the pattern's default: {name}@{revision:.8}
    retrain = {"store": "./acts", "jobs": ["extract.yaml", {"spec": "sae.yaml", "on_change": "retrain"}]}
    (project / "retrain.yaml").write_text(yaml.safe_dump(retrain))
    old = {k: v for k, v in listing(project / "acts").items() if k.startswith(("datasets/tiny/", "saes/tsae/", "features/ft/"))}

    rc, out, err = cli("reprocess", "retrain.yaml")
    assert rc == 0, err
    assert f"dataset {version}" in row(out, "extract.yaml") and "model revision moved" in row(out, "extract.yaml")
    s = store.open(project / "acts", create=False)
    assert sorted(s.datasets()) == ["tiny", version]
    new, tiny = s.dataset(version), s.dataset("tiny")
    assert new.info.fingerprint != tiny.info.fingerprint and new.committed_units() == tiny.committed_units()
    assert new.info.meta["revision"] == folder_revision(str(model)) != tiny.info.meta["revision"]
    after = listing(project / "acts")
    assert {k: after.get(k) for k in old} == old  # the old dataset, SAE and table untouched
    # The SAE's inputs changed: `retrain` trains a new SAE under a new name, on the new version.
    retrained = [n for n in s.saes() if n != "tsae"]
    assert len(retrained) == 1 and retrained[0].startswith("tsae@") and s.sae(retrained[0]).lineage["dataset"] == version
    rc, out, _ = cli("reprocess", "retrain.yaml")
    assert rc == 0 and "nothing to do" in out and f"retrained as {retrained[0]}" in row(out, "sae.yaml")

    # The feature table follows the retrained SAE under a new name; the old one stays as it is.
    retrain["jobs"].append("features.yaml")
    (project / "retrain.yaml").write_text(yaml.safe_dump(retrain))
    plan = {st.job.entry: st for st in plan_pipeline(load_pipeline("retrain.yaml")).steps}
    ft = plan["features.yaml"]
    assert ft.output == f"features ft{retrained[0].removeprefix('tsae')}" and ft.units == new.committed_units(H1)
    assert ft.overrides == {"sae": retrained[0], "name": f"ft{retrained[0].removeprefix('tsae')}"}
    # With `keep`, the SAE (and so its table) stays on the old version: nothing to do but the analyses.
    plan = {st.job.entry: st for st in plan_pipeline(load_pipeline("pipeline.yaml")).steps}
    assert not plan["sae.yaml"].run and plan["sae.yaml"].kept == ["tsae"] and not plan["features.yaml"].run
    assert plan["norms.yaml"].overrides["analyses"][0]["dataset"] == version
    # On the new version, the result gets the version's name; the old version's result stays (15.4).
    assert plan["norms.yaml"].names == [f"norms{version.removeprefix('tiny')}"] and plan["norms.yaml"].delete == []
    assert plan["norms-keep.yaml"].kept == ["norms-keep"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_while_another_process_holds_the_lease_exits_0(project):
    append_docs(project, 14, seed=5)
    holder = subprocess.Popen(
        [sys.executable, "-c", "from strata import store; import time; l = store.open('acts').lease('tiny', owner='the other run'); l.acquire(); "
                               "print('held', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, cwd=project)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = listing(project / "acts", skip_leases=True)
        rc, out, err = cli("reprocess", "pipeline.yaml")
        assert rc == 0 and err == "", err
        assert "another run is at work" in out and "the other run" in out and "exit 0" in out
        assert listing(project / "acts", skip_leases=True) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
@pytest.mark.ray
def test_submit_runs_the_planned_jobs_as_ray_jobs_in_order(project, monkeypatch):
    """`--submit` hands each job with work to `jobs.submit.submit`, waiting for each; the `--set`
    values it passes make the planned spec. (Running them on a real cluster is test_submit.py's.)"""
    from strata.jobs import submit as submit_mod
    from strata.jobs.kinds import detect

    calls = []

    def fake_submit(spec_path, overrides, *, address, wait):
        kind, spec, _ = detect(spec_path, overrides)
        calls.append((Path(spec_path).name, kind.name, spec, address, wait))
        return 0 if len(calls) < 3 else 1

    monkeypatch.setattr(submit_mod, "submit", fake_submit)
    append_docs(project, 14, seed=11)
    rc, out, err = cli("reprocess", "pipeline.yaml", "--submit", "http://head:8265")
    # Dependency order, file order among independent jobs (norms.yaml is listed first).
    assert [(c[0], c[3], c[4]) for c in calls] == [(n, "http://head:8265", True) for n in ("extract.yaml", "norms.yaml", "features.yaml")]
    assert all(c[2].store == "./acts" for c in calls) and [a.name for a in calls[1][2].analyses] == ["norms"]
    assert rc == 1 and "features.yaml: the Ray job failed" in err  # a failed Ray job stops the pipeline


@pytest.mark.parametrize(
    ("pipeline", "pattern"),
    [
        ({"store": "./acts", "bogus": 1, "jobs": ["extract.yaml"]}, r"`bogus` is not a spec key \(valid keys here: store, "),
        ({"store": "./acts", "jobs": ["nope.yaml"]}, r"`jobs.0` \(nope.yaml\): spec file 'nope.yaml' does not exist"),
        ({"store": "./acts", "jobs": []}, r"`jobs`: List should have at least 1 item"),
        ({"store": "./acts", "jobs": ["sae.yaml", "features.yaml"]},
         r"sae.yaml reads dataset 'tiny', which no job of the pipeline writes and store ./acts does not hold"),
        ({"store": "./acts", "jobs": ["extract.yaml", {"spec": "features.yaml", "set": ["sae=other"]}]},
         r"features.yaml reads sae 'other', which no job of the pipeline writes"),
        ({"store": "./acts", "jobs": ["extract.yaml", "extract.yaml"]}, r"jobs extract.yaml and extract.yaml both write dataset 'tiny'"),
        ({"store": "./acts", "jobs": [{"spec": "extract.yaml", "on_change": "keep"}]}, r"`on_change` applies to sae and analysis jobs"),
        ({"store": "./acts", "jobs": [{"spec": "sae.yaml", "on_change": "sometimes"}]},
         r"`jobs.0.on_change`: Input should be 'retrain', 'keep' or 'recompute'"),
        ({"store": "./acts", "version_pattern": "{name}-new", "jobs": ["extract.yaml"]},
         r"`version_pattern`: '\{name\}-new' must use \{revision\}"),
        ({"store": "./acts", "version_pattern": "{name}/{revision}", "jobs": ["extract.yaml"]}, r"`version_pattern`: invalid dataset name"),
        ({"store": "./acts", "jobs": [{"spec": "extract.yaml", "set": ["tokenize.context_size=0"]}]},
         r"`tokenize.context_size`: Input should be greater than 1"),
    ],
)
def test_bad_pipelines_are_one_line_and_exit_2_before_any_work(tmp_path, monkeypatch, pipeline, pattern):
    monkeypatch.chdir(tmp_path)
    for name, spec in (("extract", EXTRACT), ("sae", SAE), ("features", FEATURES)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    before = sorted(tmp_path.rglob("*"))
    rc, out, err = cli("reprocess", "pipeline.yaml", "--dry-run")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("strata: error: ") and re.search(pattern, err), err
    assert sorted(tmp_path.rglob("*")) == before  # no store created, nothing written


def test_a_missing_pipeline_file_is_one_line(tmp_path):
    rc, out, err = cli("reprocess", str(tmp_path / "nope.yaml"))
    assert rc == 2 and out == "" and err.strip() == f"strata: error: pipeline file {str(tmp_path / 'nope.yaml')!r} does not exist"


def test_dependency_order_and_cycles():
    assert toposort({0: {2}, 1: set(), 2: {1}}, ["a", "b", "c"]) == [1, 2, 0]
    assert toposort({0: set(), 1: set(), 2: {0}}, ["a", "b", "c"]) == [0, 1, 2]  # file order among independent jobs
    with pytest.raises(SpecError, match=r"the jobs depend on each other in a cycle: b -> c -> b"):
        toposort({0: {1}, 1: {2}, 2: {1}}, ["a", "b", "c"])
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and ranges([]) == ""
