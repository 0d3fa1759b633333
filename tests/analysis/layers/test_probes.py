"""Linear probes: a planted label beats its shuffled control, noise does not, and no document is
on both sides of the split (a probe that could memorise documents gains nothing)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_docs_dataset

from strata.analysis import layers
from strata.analysis.similarity import AnalysisError

PLANTED, NOISE, MEMO = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    rng = np.random.default_rng(0)
    n_docs = 400  # 120 held-out documents: a noise probe stays within 0.2 of chance by > 4 standard errors
    label = rng.integers(0, 3, n_docs)
    dirs = 1.5 * rng.standard_normal((3, 12))
    doc_vec = 3.0 * rng.standard_normal((n_docs, 64))  # one random vector per document
    score = rng.standard_normal(n_docs)

    def acts(doc, pos):
        d = np.maximum(doc, 0)
        n = doc.size
        return {PLANTED: dirs[label[d]] + rng.standard_normal((n, 12)),
                NOISE: rng.standard_normal((n, 12)),
                MEMO: doc_vec[d] + 0.1 * rng.standard_normal((n, 64)),
                "blocks.3.hook_resid_post": np.outer(score[d], np.ones(12)) + 0.3 * rng.standard_normal((n, 12))}

    lens = list(rng.integers(4, 12, size=n_docs))
    ds = write_docs_dataset(tmp_path_factory.mktemp("probe"), "probe", lens, acts,
                            fields={"topic": [f"t{v}" for v in label], "score": score})
    return ds


def test_planted_label_beats_its_control_and_noise_does_not(labelled):
    for level in ("document", "token"):
        table, prov = layers.probe(labelled, [PLANTED, NOISE], label="topic", level=level)
        rows = {r["hook"]: r for r in table.to_pylist()}
        assert prov["task"] == "classification" and prov["train_docs"] + prov["test_docs"] == 400
        planted, noise = rows[PLANTED], rows[NOISE]
        assert planted["score"] > 0.85 and planted["selectivity"] > 0.4, level
        assert planted["control"] < planted["chance"] + 0.2, level
        assert noise["score"] < noise["chance"] + 0.2 and abs(noise["selectivity"]) < 0.2, level


def test_no_document_is_on_both_sides(labelled):
    # Each document has its own vector and a random label: a token-level probe could only succeed
    # by recognising documents it was trained on. Held-out documents are new to it.
    table, _ = layers.probe(labelled, [MEMO], label="topic", level="token", l2=1e-6)
    row = table.to_pylist()[0]
    assert row["score"] < row["chance"] + 0.2


def test_numeric_label_is_a_regression(labelled):
    table, prov = layers.probe(labelled, ["blocks.3.hook_resid_post", NOISE], label="score")
    rows = {r["hook"]: r for r in table.to_pylist()}
    assert prov["task"] == "regression" and prov["metric"] == "r2"
    assert rows["blocks.3.hook_resid_post"]["score"] > 0.9 > 0.3 > rows[NOISE]["score"]
    assert rows["blocks.3.hook_resid_post"]["control"] < 0.3


def test_labels_that_do_not_exist_are_listed(labelled):
    with pytest.raises(AnalysisError, match="no document-level label 'lang'; labels it has: topic, score"):
        layers.probe(labelled, [PLANTED], label="lang")
    with pytest.raises(AnalysisError, match="labels it has: topic, score, token_id, position, doc_position"):
        layers.probe(labelled, [PLANTED], label="lang", level="token")
