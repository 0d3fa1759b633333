"""Representation similarity: exact in-memory metrics, one-pass streaming co-moments, sampled kernels.

Linear metrics (computable from :class:`Moments`, O(d^2) memory whatever ``n``):
:func:`linear_cka`, :func:`debiased_cka`, :func:`cca`, :func:`svcca`, :func:`pwcca`,
:func:`procrustes`, :func:`cosine`, :func:`r2` (streaming: :func:`r2_from_moments`).
Sampled metrics (``n x n`` memory; pass a seeded sample of rows): :func:`rbf_cka`,
:func:`minibatch_cka`, :func:`mutual_knn`, :func:`rsa`, :func:`cknna` (Huh et al.'s kernel
alignment of shared nearest neighbours, as REPA reports it; ``k`` is always given).

Inputs are ``[n, d]`` NumPy arrays or torch tensors with rows aligned between ``X`` and ``Y``;
everything is computed in float64. Streaming use::

    m = Moments(d1, d2)
    for x, y in chunks:
        m.update(x, y)
    from_moments(m, ["linear_cka", "svcca"])          # == the in-memory values, to rounding
    Moments.sum([part.result() for part in parts])    # partials from parallel tasks

Over the store (rows paired by ``store.datasets.aligned``; partial moments as Ray tasks per range of units)::

    similarity.compare((dsA, "blocks.3.hook_resid_post"), (dsB, "blocks.5.hook_resid_post"),
                       metrics=["linear_cka", "svcca", "rbf_cka"], align="tokens")   # dict of floats
    similarity.layer_heatmap((ds, ["blocks.*.hook_resid_post"]))                    # every hook pair
    similarity.match_saes((saeA, dsA, hookA), (saeB, dsB, hookB))                   # SAE feature matching

Diffusion datasets (one context per (image, timestep)) take a side ``(ds, hook, timestep)``;
``align="patches"`` pairs two image datasets by patch position; :func:`timestep_heatmap` is a
metric of every (denoiser hook, timestep) against one encoder layer (REPA's CKNNA picture)::

    similarity.compare((dit, "blocks.1.hook_resid_post", 500), (dino, "blocks.3.hook_resid_post"),
                       metrics=["cknna"], align="docs", knn_k=10)
    similarity.timestep_heatmap((dit, ["blocks.*.hook_resid_post"]), (dino, "blocks.3.hook_resid_post"))
"""

from strata.pipeline.executor import Executor

from ._blocks import BlockMoments
from ._cca import RANK_RTOL, cca, pwcca, svcca
from ._cka import cosine, debiased_cka, linear_cka, procrustes
from ._cknna import cknna
from ._moments import Moments
from ._ridge import r2, r2_from_moments
from ._sampled import minibatch_cka, mutual_knn, rbf_cka, rsa
from ._streaming import STREAMING_METRICS, from_moments
from ._tasks import split_ranges
from .compare import METRICS, compare, plan_compare, run_compare
from .errors import AnalysisError
from .heatmap import HeatmapResult, layer_heatmap
from .matching import match_saes
from .spec import CompareSettings, HeatmapSettings, MatchSettings, TimestepHeatmapSettings
from .timesteps import TimestepHeatmap, timestep_heatmap

__all__ = [
    "AnalysisError",
    "BlockMoments",
    "CompareSettings",
    "Executor",
    "HeatmapSettings",
    "HeatmapResult",
    "METRICS",
    "MatchSettings",
    "Moments",
    "RANK_RTOL",
    "STREAMING_METRICS",
    "cca",
    "cknna",
    "compare",
    "cosine",
    "debiased_cka",
    "from_moments",
    "layer_heatmap",
    "linear_cka",
    "match_saes",
    "minibatch_cka",
    "mutual_knn",
    "plan_compare",
    "pwcca",
    "procrustes",
    "r2",
    "r2_from_moments",
    "rbf_cka",
    "rsa",
    "run_compare",
    "split_ranges",
    "svcca",
    "TimestepHeatmap",
    "TimestepHeatmapSettings",
    "timestep_heatmap",
]
