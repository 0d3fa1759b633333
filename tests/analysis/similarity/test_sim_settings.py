"""The analyses take their spec's own sections: ``compare`` and ``layer_heatmap`` given a settings
section (or a spec's analysis entry) compute what the same fields as keywords compute, record the
same options, and refuse a field given twice or a bad value with one line naming it."""

from __future__ import annotations

import pytest

from strata.analysis import similarity as sim
from strata.analysis.similarity.compare import plan_compare
from strata.analysis.similarity.errors import AnalysisError
from strata.analysis.similarity.heatmap import plan_heatmap
from strata.analysis.similarity.spec import AnalyzeCompute, AnalyzeSpec, CompareSettings, HeatmapSettings

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
METRICS = ["linear_cka", "svcca", "r2", "rbf_cka"]


def test_a_settings_section_or_a_spec_entry_computes_what_the_keywords_do(two_hook):
    kw = sim.compare((two_hook, H0), (two_hook, H1), METRICS, use_ray=False, sample_rows=50, seed=3, keep=0.9, tasks=2, chunk_rows=17)
    section = CompareSettings(metrics=METRICS, sample_rows=50, seed=3, keep=0.9)
    compute = AnalyzeCompute(tasks=2, chunk_rows=17)
    assert sim.compare((two_hook, H0), (two_hook, H1), settings=section, compute=compute, use_ray=False) == kw
    spec = AnalyzeSpec.model_validate({"analyses": [{"kind": "compare", "name": "c", "a": {"dataset": "ds", "hook": H0},
                                                     "b": {"dataset": "ds", "hook": H1}, "metrics": METRICS, "sample_rows": 50,
                                                     "seed": 3, "keep": 0.9}], "compute": {"tasks": 2, "chunk_rows": 17}})
    assert sim.compare((two_hook, H0), (two_hook, H1), settings=spec.analyses[0], compute=spec.compute, use_ray=False) == kw
    other = sim.compare((two_hook, H0), (two_hook, H1), settings=CompareSettings(metrics=METRICS, sample_rows=50, seed=4), use_ray=False)
    assert other["rbf_cka"] != kw["rbf_cka"]  # the section's seed is the one used


def test_the_recorded_options_are_the_settings_and_compute_keys_they_always_were(two_hook):
    plan = plan_compare((two_hook, H0), (two_hook, H1), ["linear_cka"], ridge=0.5, tasks=3)
    assert plan.provenance()["options"] == {"keep": 0.99, "ridge": 0.5, "holdout": 0.2, "sample_rows": 2048, "seed": 0,
                                            "sigma_frac": 0.8, "knn_k": 10, "minibatch_size": 256, "rsa_metric": "correlation",
                                            "chunk_rows": 16384, "tasks": 3, "precision": "auto"}
    hm = plan_heatmap((two_hook, ["*"]), metric="cca", tasks=2)
    assert hm.options() == {"metric": "cca", "method": "auto", "memory_budget_mb": 4096.0, "sample_rows": 4096, "seed": 0,
                            "keep": 0.99, "chunk_rows": None, "tasks": 2, "max_rows": None}
    assert plan_heatmap((two_hook, ["*"]), chunk_rows=64).options()["chunk_rows"] == 64 == plan_heatmap((two_hook, ["*"]), chunk_rows=64).chunk


@pytest.mark.parametrize(("call", "match"), [
    (lambda ds: sim.compare((ds, H0), (ds, H1), settings=CompareSettings(), seed=1, use_ray=False),
     "compare: seed given both in the settings section and as keywords; give one"),
    (lambda ds: sim.compare((ds, H0), (ds, H1), compute=AnalyzeCompute(), tasks=2, use_ray=False),
     "compare: tasks given both in the compute section and as keywords"),
    (lambda ds: sim.compare((ds, H0), (ds, H1), ["svcca"], settings=CompareSettings(), use_ray=False),
     "`metrics` given both in the settings and as an argument"),
    (lambda ds: sim.compare((ds, H0), (ds, H1), use_ray=False, sample_rows=0),
     r"compare: `sample_rows`: Input should be greater than 0 \(got 0\)"),
    (lambda ds: sim.compare((ds, H0), (ds, H1), use_ray=False, memory_budget_mb=5),
     "compare: unknown option 'memory_budget_mb'; options are: keep, ridge, holdout, sample_rows, seed, sigma_frac, knn_k, "
     "minibatch_size, rsa_metric, precision, chunk_rows, tasks"),
    (lambda ds: sim.layer_heatmap((ds, ["*"]), method="fast"),
     r"layer_heatmap: `method`: Input should be 'auto', 'exact' or 'sample' \(got 'fast'\)"),
    (lambda ds: sim.layer_heatmap((ds, ["*"]), settings=HeatmapSettings(), metric="cca"),
     "layer_heatmap: metric given both in the settings section and as keywords"),
])
def test_a_bad_or_doubled_option_is_one_line_naming_it(two_hook, call, match):
    with pytest.raises(AnalysisError, match=match) as err:
        call(two_hook)
    assert "\n" not in str(err.value)
