"""examples/analyze.yaml: detected as an analysis spec and valid; run end to end on a tiny
extraction of the quickstart spec (same dataset name, hooks and layer count, a narrower model), it commits a
layer heatmap with one cell per hook pair and a unit diagonal, a compare and a layers analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strata.jobs.kinds import detect

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "analyze.yaml"


def test_example_is_an_analysis_spec_and_valid(tmp_path):
    from strata.analysis.similarity.spec import AnalyzeSpec, CompareSpec, HeatmapSpec, LayersSpec

    kind, spec, raw = detect(EXAMPLE)
    assert kind.name == "analysis" and kind.entry == "strata.jobs.analyze_run"
    assert isinstance(spec, AnalyzeSpec) and spec.store == "./acts" and raw["store"] == "./acts"
    by_kind = {a.kind: a for a in spec.analyses}
    assert set(by_kind) == {"heatmap", "compare", "layers"}
    heat, cmp, layers = by_kind["heatmap"], by_kind["compare"], by_kind["layers"]
    assert isinstance(heat, HeatmapSpec) and heat.metric == "linear_cka" and heat.a.hooks == ["blocks.*.hook_resid_post"]
    assert isinstance(cmp, CompareSpec) and len(cmp.metrics) >= 3 and cmp.a.hook != cmp.b.hook
    assert isinstance(layers, LayersSpec) and "logit_lens" in layers.metrics
    # Every analysis reads the dataset the quickstart extracts.
    quick = detect(REPO / "examples" / "quickstart.yaml")[1]
    assert {heat.a.dataset, cmp.a.dataset, cmp.b.dataset, layers.dataset} == {quick.name}
    assert quick.store == spec.store
    # --set overrides apply, as `strata analyze examples/analyze.yaml --set store=...` does.
    assert detect(EXAMPLE, [f"store={tmp_path}"])[1].store == str(tmp_path)


@pytest.mark.ray
@pytest.mark.slow
def test_example_runs_on_a_tiny_quickstart_dataset(tmp_path, ray_session, monkeypatch):
    from strata import store
    from strata.jobs.analyze_run import run_analyze
    from strata.jobs.spec import load_extract_spec
    from strata.pipeline.extract import run_extract
    from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl

    # The logit lens loads the model in this process; transformers' parallel weight loader shuts
    # its thread pool down without waiting, which the suite's leaked-thread check can catch.
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    # 4 layers, as the quickstart model: the example compares blocks.0 with blocks.3.
    model = build_tiny(tmp_path / "model", family="gpt2", layers=4, d_model=32, heads=4, max_positions=128, vocab_size=400, seed=0)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", synthetic_docs(40, seed=3))
    acts = tmp_path / "acts"
    run_extract(load_extract_spec(REPO / "examples" / "quickstart.yaml", [
        f"store={acts}", f"model.id={model}", f"corpus.path={corpus}", "tokenize.context_size=32",
        "compute.unit_contexts=8", "compute.batch_tokens=256", "compute.executor=local",
    ]), progress=False)

    kind, spec, _ = detect(EXAMPLE, [f"store={acts}", "compute.executor=local"])
    assert kind.name == "analysis"
    outcomes = run_analyze(spec)
    assert [o.status for o in outcomes] == ["written"] * len(spec.analyses)

    s = store.open(acts, create=False)
    assert s.analyses() == sorted(a.name for a in spec.analyses)
    heat = next(a for a in spec.analyses if a.kind == "heatmap")
    ds = s.dataset(heat.a.dataset)
    hooks = [h for h in ds.hooks if h.endswith("hook_resid_post")]
    assert len(hooks) == 4
    h = s.analysis(heat.name)
    assert h.read("heatmap.png")[:8] == b"\x89PNG\r\n\x1a\n"
    cells = h.table().to_pylist()
    assert len(cells) == len(hooks) ** 2  # one row per (hook_a, hook_b) cell
    assert {(c["hook_a"], c["hook_b"]) for c in cells} == {(a, b) for a in hooks for b in hooks}
    value = {(c["hook_a"], c["hook_b"]): c["value"] for c in cells}
    for a in hooks:
        assert value[(a, a)] == pytest.approx(1.0, abs=1e-9)
        for b in hooks:
            assert value[(a, b)] == pytest.approx(value[(b, a)], abs=1e-12) and 0.0 <= value[(a, b)] <= 1.0 + 1e-9
    cmp = next(a for a in spec.analyses if a.kind == "compare")
    got = {r["metric"] for r in s.analysis(cmp.name).table().to_pylist()}
    assert {"linear_cka", "svcca", "r2_a_to_b", "r2_b_to_a", "rbf_cka"} <= got
    layers = next(a for a in spec.analyses if a.kind == "layers")
    t = s.analysis(layers.name).table()
    assert t.column("hook").to_pylist() == ["hook_embed", *hooks] and "lens_kl_to_final" in t.column_names
    assert np.isfinite(t.column("norm").to_numpy()).all()
    # A rerun is a no-op.
    assert [o.status for o in run_analyze(spec)] == ["unchanged"] * len(spec.analyses)
