"""Layer metrics of one dataset: the logit lens, residual geometry (norms, write ratios, anisotropy,
consecutive-layer cosine and linearity, intrinsic dimension, prompt entropy, curvature) and
linear probes with shuffled-label controls. Each returns a table with one row per hook and its
provenance; ``strata analyze`` commits them with a line plot per metric.

    from strata.analysis import layers
    table, prov = layers.geometry(ds, ds.hooks)
    table, prov = layers.logit_lens(ds, ["hook_embed", "blocks.0.hook_resid_post", ...])
    table, prov = layers.probe(ds, hooks, label="lang")   # or a ProbeSettings section
"""

from strata.analysis.layers.geometry import GEOMETRY_METRICS, curvature, geometry, prompt_entropy, twonn
from strata.analysis.layers.lens import LENS_METRICS, lens_hooks, logit_lens
from strata.analysis.layers.probes import ProbeSettings, label_fields, probe

__all__ = [
    "GEOMETRY_METRICS",
    "LENS_METRICS",
    "ProbeSettings",
    "curvature",
    "geometry",
    "label_fields",
    "lens_hooks",
    "logit_lens",
    "probe",
    "prompt_entropy",
    "twonn",
]
