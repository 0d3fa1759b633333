"""`strata reprocess` after a model change (issue 15, findings 4 and 5): the new dataset version
records what it is a version of (``s.versions``, ``s.dataset(name, version="latest")``), and an
analysis with ``on_change: recompute`` computes its result on the new version under a versioned
name, leaving the old version's result as it was (only ``rm`` removes it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from strata import store
from strata.pipeline.models import folder_revision
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl
from tests.jobs.test_reprocess import EXTRACT, append_docs, cli, listing, row

HOOKS = ["blocks.*.hook_resid_post"]
HEATMAP = {"store": "acts", "compute": {"tasks": 1},
           "analyses": [{"kind": "heatmap", "name": "layer-cka", "a": {"dataset": "tiny", "hooks": HOOKS}, "metric": "linear_cka"}]}
NORMS_KEEP = {"store": "acts", "compute": {"tasks": 1},
              "analyses": [{"kind": "layers", "name": "norms-keep", "dataset": "tiny", "hooks": HOOKS, "metrics": ["norm"]}]}
PIPELINE = {"store": "./acts", "jobs": ["extract.yaml", {"spec": "heatmap.yaml", "on_change": "recompute"},
                                        {"spec": "norms-keep.yaml", "on_change": "keep"}]}


def _change_model(folder: Path) -> str:
    """Give the project's model other weights (a new revision); the revision's 8 hex digits."""
    from safetensors.torch import load_file, save_file

    model = folder / "model"
    target = model.resolve()
    model.unlink()
    shutil.copytree(target, model)
    weights = load_file(model / "model.safetensors")
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    return folder_revision(str(model)).split(":", 1)[1][:8]


@pytest.mark.ray
@pytest.mark.slow
def test_a_model_change_keeps_the_old_versions_results_and_names_the_new_ones(ray_session, tmp_path, monkeypatch):
    root = tmp_path / "p"
    root.mkdir()
    model = build_tiny(tmp_path / "model" / "gpt2", family="gpt2", layers=2, d_model=32, max_positions=128, vocab_size=400)
    (root / "model").symlink_to(model)
    write_jsonl(root / "corpus.jsonl", synthetic_docs(24, seed=7))
    for name, spec in (("extract", EXTRACT), ("heatmap", HEATMAP), ("norms-keep", NORMS_KEEP), ("pipeline", PIPELINE)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(root)
    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    s = store.open(root / "acts", create=False)
    assert s.analyses() == ["layer-cka", "norms-keep"]
    old_cka = s.analysis("layer-cka")
    old_table, old_at = old_cka.table(), old_cka.artifact.record.committed_at
    old_files = {k: v for k, v in listing(root / "acts").items() if k.startswith(("analyses/layer-cka/", "datasets/tiny/"))}

    rev = _change_model(root)
    version = f"tiny@{rev}"
    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    assert f"dataset {version}" in row(out, "extract.yaml")
    assert f"layer-cka@{rev}: new, on {version}; layer-cka is left as it is" in row(out, "heatmap.yaml")
    assert "kept (policy)" in row(out, "norms-keep.yaml")
    s = store.open(root / "acts", create=False)
    # 15.4: the old model's heatmap is still there, byte for byte; the new one has its own name.
    assert s.analyses() == ["layer-cka", f"layer-cka@{rev}", "norms-keep"]
    after = listing(root / "acts")
    assert {k: after.get(k) for k in old_files} == old_files
    assert s.analysis("layer-cka").artifact.record.committed_at == old_at and s.analysis("layer-cka").table().equals(old_table)
    assert {i["dataset"] for i in s.analysis("layer-cka").meta["inputs"]} == {"tiny"}
    new_cka = s.analysis(f"layer-cka@{rev}")
    assert {i["dataset"] for i in new_cka.meta["inputs"]} == {version}
    assert new_cka.table().num_rows == old_table.num_rows and not new_cka.table().equals(old_table)  # other weights, other CKA

    # 15.5: the new dataset records its base; a bare name stays the old one; latest is the new one.
    assert s.dataset(version).info.meta["version_of"] == "tiny"
    assert [v.name for v in s.versions("tiny")] == ["tiny", version] and s.versions("tiny")[-1].short == rev
    assert s.dataset("tiny").name == "tiny" and s.dataset("tiny", version="latest").name == version
    assert s.dataset("tiny", version=rev).name == version
    rc, out, _ = cli("ls", "acts")
    assert rc == 0 and "  versions of tiny, oldest first: tiny (revision " in out and f"{version} (revision {rev}" in out

    # A rerun does nothing; the versioned result is up to date, not recomputed.
    before = listing(root / "acts", skip_leases=True)
    rc, out, _ = cli("reprocess", "pipeline.yaml")
    assert rc == 0 and "nothing to do" in out, out
    assert listing(root / "acts", skip_leases=True) == before

    # The new version grows: its own result is recomputed in place; the old version's is untouched.
    append_docs(root, 14, seed=99)
    rc, out, err = cli("reprocess", "pipeline.yaml")
    assert rc == 0, err
    assert f"recompute layer-cka@{rev}" in row(out, "heatmap.yaml")
    s = store.open(root / "acts", create=False)
    assert s.analyses() == ["layer-cka", f"layer-cka@{rev}", "norms-keep"]
    assert s.analysis("layer-cka").artifact.record.committed_at == old_at
    units = s.dataset(version).committed_units()
    assert s.analysis(f"layer-cka@{rev}").meta["inputs"][0]["units"] == units != s.dataset("tiny").committed_units()

    # Only `rm` removes the old result.
    rc, out, err = cli("rm", "acts", "layer-cka", "--kind", "analysis", "--yes")
    assert rc == 0, err
    assert store.open(root / "acts", create=False).analyses() == [f"layer-cka@{rev}", "norms-keep"]
