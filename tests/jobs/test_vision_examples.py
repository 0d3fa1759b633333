"""examples/vision.yaml, captions.yaml and paired.yaml: valid specs that fit together (the
paired comparison reads the two datasets the other two extract, by documents)."""

from __future__ import annotations

from pathlib import Path

from strata.jobs.kinds import detect

REPO = Path(__file__).resolve().parents[2]


def test_vision_examples_fit_together():
    from strata.analysis.similarity.spec import AnalyzeSpec, CompareSpec

    kind, vision, _ = detect(REPO / "examples" / "vision.yaml")
    assert kind.name == "extract" and vision.corpus.is_images and vision.corpus.caption_field == "caption"
    _, captions, _ = detect(REPO / "examples" / "captions.yaml")
    assert not captions.corpus.is_images and captions.corpus.text_field == "caption" and captions.corpus.id_field == "file_name"
    assert captions.corpus.path.rstrip("/").endswith("shapes/metadata.jsonl") and vision.corpus.path.rstrip("/").endswith("shapes")
    kind, paired, _ = detect(REPO / "examples" / "paired.yaml")
    assert kind.name == "analysis" and isinstance(paired, AnalyzeSpec)
    (cmp,) = paired.analyses
    assert isinstance(cmp, CompareSpec) and cmp.align == "docs" and "mutual_knn" in cmp.metrics
    assert (cmp.a.dataset, cmp.b.dataset) == (vision.name, captions.name)
    assert vision.store == captions.store == paired.store
    script = (REPO / "examples" / "vision_quickstart.sh").read_text()
    for spec in ("examples/vision.yaml", "examples/captions.yaml", "examples/paired.yaml", "--family vit", "--images 48"):
        assert spec in script, spec
