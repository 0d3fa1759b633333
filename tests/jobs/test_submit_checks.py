"""`strata submit` checks the spec against the store before anything is shipped (issue 15,
finding 13), with each job kind's own check (:mod:`jobs.checks`): an SAE name committed with
another config, a feature table, dataset or analysis result of that name with another identity
is one line, exit 2, and no cluster is asked. The address given is one where nothing listens:
a check that let the spec through would fail on reaching it instead, with another message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _small_store import FEATURES, SAE, feature_manifest, small_store

from strata.jobs.cli import main
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts

NOWHERE = "http://127.0.0.1:1"
NORMS = {"store": "acts", "compute": {"tasks": 1},
         "analyses": [{"kind": "layers", "name": "norms", "dataset": "tiny", "hooks": ["blocks.*.hook_resid_post"], "metrics": ["norm"]}]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Dataset `tiny`, SAE `tsae`, feature table `ft` (its manifest) and analysis `norms`
    committed with the identity its job gives it; the specs that made them."""
    from strata.analysis.similarity.runner import prepare
    from strata.analysis.similarity.spec import AnalyzeSpec

    root = tmp_path_factory.mktemp("submit-checks")
    s = small_store(root / "acts")
    feature_manifest(s, FEATURES)
    p = prepare(AnalyzeSpec.model_validate({**NORMS, "store": str(root / "acts")}), s)[0]
    with s.artifact_lease(ANALYSES, "norms", owner="test") as lease:
        # The identity its job records, in the commit and in the result's provenance.json.
        artifacts.put(s.storage, ANALYSES, "norms", {"provenance.json": json.dumps(p.identity).encode()}, meta=p.identity, lease=lease)
    for name, spec in (("sae", SAE), ("features", FEATURES), ("norms", NORMS)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return root


def submit(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["submit", *argv, "--address", NOWHERE])
    cap = capsys.readouterr()
    assert "submitted" not in cap.out
    return rc, cap.err


@pytest.mark.parametrize(("spec", "sets", "message"), [
    ("sae.yaml", ["train.lr=1e-3"], "SAE 'tsae' is committed already with another config (train.lr: 0.003 -> 0.001); choose a new `name`"),
    ("features.yaml", ["top_k=16"], "feature table 'ft' already exists with another identity (top_k: 8 -> 16); choose a new `name`"),
    ("norms.yaml", ["analyses.0.metrics=[anisotropy]"], "analysis 'norms' is committed already with another spec; choose a new `name`"),
])
def test_a_conflict_with_the_store_is_refused_before_submitting(project, capsys, monkeypatch, spec, sets, message):
    monkeypatch.chdir(project)
    rc, err = submit(capsys, spec, *[x for s in sets for x in ("--set", s)])
    assert rc == 2 and err.startswith("strata: error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize("spec", ["sae.yaml", "features.yaml", "norms.yaml"])
def test_a_spec_the_store_agrees_with_goes_on_to_the_cluster(project, capsys, monkeypatch, spec):
    """No false refusal: the same specs unchanged pass the check and fail only on the address."""
    monkeypatch.chdir(project)
    rc, err = submit(capsys, spec)
    assert rc == 2 and "Ray job server" in err and "already" not in err, err


def test_a_dataset_of_that_name_with_another_identity_is_refused_before_submitting(project, capsys, monkeypatch, tmp_path):
    from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl

    monkeypatch.chdir(project)
    model = build_tiny(tmp_path / "gpt2", family="gpt2", layers=2, d_model=16, max_positions=64, vocab_size=300)
    write_jsonl(tmp_path / "corpus.jsonl", synthetic_docs(6, seed=1))
    spec = {"store": "acts", "name": "tiny", "model": {"id": str(model)}, "corpus": {"path": str(tmp_path / "corpus.jsonl")},
            "tokenize": {"context_size": 16}, "hooks": ["blocks.1.hook_resid_post"], "dtype": "float32",
            "compute": {"unit_contexts": 8}}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()  # the model builder's own output
    rc, err = submit(capsys, str(tmp_path / "extract.yaml"))
    assert rc == 2 and err.count("\n") == 1, err
    assert "dataset 'tiny' already exists" in err and "with a different identity" in err and "choose a new `name`" in err, err
