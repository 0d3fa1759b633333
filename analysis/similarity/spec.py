"""The analysis spec: the one config type of ``strata analyze``, validated once when loaded.

    store: ./acts
    compute: {address: null, tasks: null, memory_budget_mb: 4096}
    analyses:
      - {kind: compare, name: cka-0-3, a: {dataset: D, hook: blocks.0.hook_resid_post},
         b: {dataset: D, hook: blocks.3.hook_resid_post}, metrics: [linear_cka, svcca, rbf_cka]}
      - {kind: heatmap, name: layer-cka, a: {dataset: D, hooks: ["blocks.*.hook_resid_post"]}}
      - {kind: timestep_heatmap, name: repa, a: {dataset: DiT, hooks: ["blocks.*.hook_resid_post"]},
         b: {dataset: DINO, hook: blocks.3.hook_resid_post}, metrics: [cknna]}
      - {kind: layers, name: geometry, dataset: D, metrics: [norm, anisotropy, logit_lens]}
      - {kind: probe, name: lang-probe, dataset: D, label: lang}
      - {kind: sae_match, name: universal, a: {sae: saeA}, b: {sae: saeB}}

Each analysis is committed to the store as ``analyses/NAME``.

The settings of each kind of analysis are a section of their own (:class:`CompareSettings`,
:class:`HeatmapSettings`, :class:`ProbeSettings`, :class:`MatchSettings`), which the analysis's spec
extends with its name and inputs. The functions that compute them (``compare``,
``layer_heatmap``, ``probe``, ``match_saes``) take that section, the spec's own analysis entry, or
its fields as keywords with the section's defaults (:func:`sections`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_serializer, model_validator

from strata.pipeline.spec import ComputeSpec, JobSpec, Section
from strata.store.layout import check_name

from .errors import AnalysisError

STREAM: tuple[str, ...] = ("linear_cka", "debiased_cka", "cca", "svcca", "pwcca", "procrustes", "r2", "cosine")
SAMPLED: tuple[str, ...] = ("rbf_cka", "minibatch_cka", "mutual_knn", "rsa", "cknna")
METRICS: tuple[str, ...] = STREAM + SAMPLED
DEFAULT_METRICS: tuple[str, ...] = ("linear_cka", "debiased_cka", "svcca", "procrustes")
HEATMAP_METRICS: tuple[str, ...] = ("linear_cka", "debiased_cka", "cca", "svcca", "pwcca", "procrustes", "cosine", *SAMPLED)
Pool = Literal["mean", "cls", "last"]
POOLS: tuple[str, ...] = get_args(Pool)

Metric = Literal[METRICS]  # type: ignore[valid-type]
HeatmapMetric = Literal[HEATMAP_METRICS]  # type: ignore[valid-type]
LayerMetric = Literal["norm", "write_ratio", "anisotropy", "cos_next", "linearity_next", "intrinsic_dim",
                      "prompt_entropy", "curvature", "logit_lens"]


def _name(v: str) -> str:
    check_name(v, what="analysis")
    return v


class SideSpec(Section):
    dataset: str = Field(min_length=1)
    """A dataset of the store."""
    hook: str = Field(min_length=1)
    """One of its hooks."""
    timestep: int | None = Field(default=None, ge=0)
    """A diffusion dataset: only its rows at this timestep (one of its ``timesteps``)."""

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Results committed before `timestep` existed have none in their identity.
        out = handler(self)
        if self.timestep is None:
            out.pop("timestep", None)
        return out


class HooksSpec(Section):
    dataset: str = Field(min_length=1)
    """A dataset of the store."""
    hooks: list[str] = Field(default=["*"], min_length=1)
    """Hook names or globs (``blocks.*.hook_resid_post``); default every hook, in model order."""


class SAERefSpec(Section):
    sae: str = Field(min_length=1)
    """A committed SAE of the store (its lineage names its dataset and hook)."""


class Analysis(Section):
    name: str
    """The result's name in the store (``analyses/NAME``)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)


class CompareSettings(Section):
    """How ``compare`` measures two sides (the keys of a ``kind: compare`` analysis but its name
    and sides)."""

    metrics: list[Metric] = Field(default=["linear_cka", "debiased_cka", "svcca", "procrustes"], min_length=1)  # type: ignore[valid-type]
    """Streaming: linear_cka, debiased_cka, cca, svcca, pwcca, procrustes, r2, cosine; sampled:
    rbf_cka, minibatch_cka, mutual_knn, rsa, cknna."""
    align: Literal["tokens", "docs", "patches"] = "tokens"
    """``tokens``: pair token rows (same dataset, same tokenizer by document position, or by
    character span ends across tokenizers); ``docs``: one row per document, pooled as ``pool`` says;
    ``patches``: image datasets' rows by (image, patch position), where their grids match."""
    pool: Pool | tuple[Pool, Pool] = "mean"
    """``align: docs`` only: how a document becomes one row, for both sides or as ``[a, b]``:
    ``mean`` of its non-special tokens, its ``cls`` token (ViT, CLIP, DINOv2), or its ``last``
    non-special token (a causal LM's caption embedding); e.g. ``[cls, last]`` for images against
    their captions."""
    max_rows: int | None = Field(default=None, gt=0)
    """Use only the first aligned rows (in side-A order)."""
    keep: float = Field(default=0.99, gt=0, le=1)
    """SVCCA: fraction of variance (squared singular values) kept per side."""
    ridge: float = Field(default=1e-3, ge=0)
    """r2: relative ridge, in units of the mean feature variance."""
    holdout: float = Field(default=0.2, gt=0, lt=1)
    """r2: fraction of side A's units (documents, with ``align: docs``) held out for scoring."""
    sample_rows: int = Field(default=2048, gt=0)
    """Rows in the seeded sample of the sampled metrics."""
    seed: int = Field(default=0, ge=0)
    """Seeds the sample, r2's held-out units and minibatch shuffles."""
    sigma_frac: float = Field(default=0.8, gt=0)
    """rbf_cka: kernel bandwidth as a fraction of the median pairwise distance."""
    knn_k: int = Field(default=10, gt=0)
    """mutual_knn and cknna: neighbours per row (cknna needs >= 2; Huh et al. and REPA use 10)."""
    minibatch_size: int = Field(default=256, ge=4)
    """minibatch_cka: rows per batch."""
    rsa_metric: Literal["correlation", "cosine", "euclidean"] = "correlation"
    """rsa: dissimilarity between two rows."""
    precision: Literal["auto", "float32", "float64"] = "auto"
    """Streaming metrics: how each chunk's co-moment products are formed (sums and merges are
    always float64). ``auto``: float32 products for float16 stores (their values are exact in
    float32; about half the cost), float64 otherwise (bfloat16 reads arrive as float32); ``float64`` for CCA/PWCCA on nearly
    rank-deficient data, which float32 products can move by ~1e-4 relative."""

    @field_validator("pool", mode="before")
    @classmethod
    def _check_pool(cls, v: Any) -> Any:
        # One message for both forms (a name, or a pair), rather than one per branch of the union.
        ok = v in POOLS if isinstance(v, str) else (isinstance(v, (list, tuple)) and len(v) == 2
                                                     and all(isinstance(p, str) and p in POOLS for p in v))
        if not ok:
            raise ValueError(f"`pool` must be one of {', '.join(POOLS)} or a pair [a, b] of them, got {v!r}")
        return v

    @model_validator(mode="after")
    def _pool_needs_docs(self) -> CompareSettings:
        if self.align != "docs" and self.pool not in ("mean", ("mean", "mean")):
            raise ValueError(f"`pool` {self.pool!r} pools documents; it needs `align: docs`")
        return self

    @field_validator("knn_k")
    @classmethod
    def _cknna_k(cls, v: int, info: ValidationInfo) -> int:
        if "cknna" in (info.data.get("metrics") or ()) and v < 2:
            raise ValueError(f"cknna needs >= 2 neighbours per row, got {v}")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # A committed result's identity holds its dumped spec; results committed before `pool`
        # existed have none, so the default is left out and rerunning their spec stays a no-op.
        out = handler(self)
        if self.pool in ("mean", ("mean", "mean")):
            out.pop("pool", None)
        if self.precision == "auto":  # likewise for results committed before `precision` existed
            out.pop("precision", None)
        return out


class CompareSpec(CompareSettings, Analysis):
    kind: Literal["compare"]
    a: SideSpec
    b: SideSpec


class TimestepHeatmapSettings(CompareSettings):
    """How ``timestep_heatmap`` measures each (denoiser hook, timestep) against a fixed layer:
    compare's keys, with CKNNA over pooled images by default."""

    metrics: list[Metric] = Field(default=["cknna"], min_length=1)  # type: ignore[valid-type]
    """As compare's: one heatmap per metric."""
    align: Literal["tokens", "docs", "patches"] = "docs"
    """As compare's; ``docs`` (each image pooled) by default, ``patches`` where the grids match."""


class TimestepHooksSpec(HooksSpec):
    timesteps: list[int] | None = Field(default=None, min_length=1)
    """Some of the diffusion dataset's timesteps (default: all of them, in its order)."""


class TimestepHeatmapSpec(TimestepHeatmapSettings, Analysis):
    kind: Literal["timestep_heatmap"]
    a: TimestepHooksSpec
    """The denoiser's dataset, hooks and timesteps (the heatmap's rows and columns)."""
    b: SideSpec
    """The fixed layer (a vision encoder's dataset and hook)."""


class HeatmapSettings(Section):
    """How ``layer_heatmap`` measures every pair of hooks (the keys of a ``kind: heatmap``
    analysis but its name and hooks)."""

    metric: HeatmapMetric = "linear_cka"  # type: ignore[valid-type]
    """One metric (cosine needs equal widths; others are blank)."""
    method: Literal["auto", "exact", "sample"] = "auto"
    """``exact``: streamed co-moments (in several passes when the budget requires); ``sample``:
    in memory on ``sample_rows`` rows; ``auto``: exact when one pair of hooks fits the budget."""
    sample_rows: int = Field(default=4096, gt=0)
    """Rows of the sample method."""
    max_rows: int | None = Field(default=None, gt=0)
    """Use only the first aligned rows."""
    seed: int = Field(default=0, ge=0)
    """Seeds the sample method."""
    keep: float = Field(default=0.99, gt=0, le=1)
    """SVCCA's variance fraction."""
    knn_k: int = Field(default=10, gt=0)
    """mutual_knn and cknna: neighbours per row (cknna needs >= 2)."""

    @field_validator("knn_k")
    @classmethod
    def _cknna_k(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("metric") == "cknna" and v < 2:
            raise ValueError(f"cknna needs >= 2 neighbours per row, got {v}")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Results committed before `knn_k` existed have none in their identity: the default is left out.
        out = handler(self)
        if self.knn_k == 10:
            out.pop("knn_k", None)
        return out


class HeatmapSpec(HeatmapSettings, Analysis):
    kind: Literal["heatmap"]
    a: HooksSpec
    b: HooksSpec | None = None
    """Another dataset's hooks: the heatmap is then every (hook of a, hook of b) pair."""


class LayersSpec(Analysis):
    kind: Literal["layers"]
    dataset: str = Field(min_length=1)
    """The dataset."""
    hooks: list[str] = Field(default=["*"], min_length=1)
    """Hook names or globs, in model order (consecutive-layer metrics pair neighbours in it)."""
    metrics: list[LayerMetric] = Field(default=["norm", "write_ratio", "anisotropy", "cos_next", "linearity_next",
                                                "intrinsic_dim", "prompt_entropy", "curvature"], min_length=1)
    """Geometry metrics, and ``logit_lens`` (needs the dataset's causal LM on this machine)."""
    sample_rows: int = Field(default=2048, gt=2)
    """intrinsic_dim: rows in the seeded sample."""
    sample_contexts: int = Field(default=64, gt=0)
    """prompt_entropy, curvature: contexts in the seeded sample."""
    lens_contexts: int = Field(default=32, gt=0)
    """logit_lens: contexts in the seeded sample."""
    seed: int = Field(default=0, ge=0)
    """Seeds the samples."""


class ProbeSettings(Section):
    """How ``probe`` fits each hook's probe (the keys of a ``kind: probe`` analysis but its name,
    dataset and hooks)."""

    label: str = Field(min_length=1)
    """A document field of ``ds.docs()`` (``corpus.keep_fields``), or at token level a token column
    (token_id, position, doc_position)."""
    level: Literal["document", "token"] = "document"
    """``document``: one example per document (its mean token); ``token``: one per token."""
    test_fraction: float = Field(default=0.3, gt=0, lt=1)
    """Fraction of documents held out."""
    l2: float = Field(default=1e-3, ge=0)
    """L2 penalty of the probe."""
    max_examples: int = Field(default=20000, gt=0)
    """Token level: at most this many tokens per split (a seeded sample)."""
    seed: int = Field(default=0, ge=0)
    """Seeds the document split, the control's shuffle and the samples."""


class ProbeSpec(ProbeSettings, Analysis):
    kind: Literal["probe"]
    dataset: str = Field(min_length=1)
    """The dataset."""
    hooks: list[str] = Field(default=["*"], min_length=1)
    """Hook names or globs: one probe per hook."""


class MatchSettings(Section):
    """How ``match_saes`` matches two SAEs' latents (the keys of a ``kind: sae_match`` analysis but
    its name and SAEs)."""

    max_rows: int | None = Field(default=None, gt=0)
    """Use only the first aligned rows."""
    min_corr: float = Field(default=0.0, ge=-1, le=1)
    """Pairs below this correlation are left out of the decoder SVCCA."""
    one_to_one: bool = False
    """Keep only the best A latent of each B latent for the decoder SVCCA."""
    keep: float = Field(default=0.99, gt=0, le=1)
    """SVCCA's variance fraction."""
    random_pairings: int = Field(default=100, ge=0)
    """Random pairings of the baseline."""
    seed: int = Field(default=0, ge=0)
    """Seeds the random pairings."""


class MatchSpec(MatchSettings, Analysis):
    kind: Literal["sae_match"]
    a: SAERefSpec
    b: SAERefSpec


AnalysisSpec = Annotated[CompareSpec | HeatmapSpec | TimestepHeatmapSpec | LayersSpec | ProbeSpec | MatchSpec, Field(discriminator="kind")]


class AnalyzeCompute(ComputeSpec):
    """The analyses' keys of the compute section."""

    keys = ("address", "executor", "tasks", "chunk_rows", "memory_budget_mb")


class AnalyzeSpec(JobSpec):
    """``strata analyze``: analyses of a store's datasets and SAEs, each committed as a result."""

    analyses: list[AnalysisSpec] = Field(min_length=1)  # type: ignore[valid-type]
    """The analyses to run, in order; each becomes ``analyses/NAME`` in the store."""
    compute: AnalyzeCompute = AnalyzeCompute()
    """Where the analyses run."""

    @model_validator(mode="after")
    def _unique(self) -> AnalyzeSpec:
        names = [a.name for a in self.analyses]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"analysis name(s) {dup} are used twice; every analysis needs its own `name`")
        return self


S = TypeVar("S", bound=Section)


def sections(what: str, settings_type: type[S], settings: S | None, compute: AnalyzeCompute | None, fields: dict[str, Any], *,
             compute_keys: Sequence[str] = (), explicit: Sequence[str] = ()) -> tuple[S, AnalyzeCompute]:
    """The settings and compute sections of a call from a notebook: ``settings`` (a section of
    ``settings_type``, e.g. the spec's analysis entry) and ``compute`` as given, or built from the
    keyword ``fields`` (keys of ``settings_type``, and the compute keys ``compute_keys``) with the
    sections' defaults. ``explicit``: keys the function takes as its own arguments (left out of
    the list of options an unknown one is told). A bad option raises one-line AnalysisError."""
    own = {k: v for k, v in fields.items() if k in settings_type.model_fields}
    comp = {k: v for k, v in fields.items() if k in compute_keys}
    unknown = [k for k in fields if k not in own and k not in comp]
    if unknown:
        options = [k for k in settings_type.model_fields if k not in explicit] + [k for k in compute_keys]
        raise AnalysisError(f"{what}: unknown option {unknown[0]!r}; options are: {', '.join(options)}")
    for given, keys, kind in ((settings, own, "settings"), (compute, comp, "compute")):
        if given is not None and keys:
            raise AnalysisError(f"{what}: {', '.join(keys)} given both in the {kind} section and as keywords; give one")
    try:
        return (settings if settings is not None else settings_type.model_validate(own),
                compute if compute is not None else AnalyzeCompute.model_validate(comp))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise AnalysisError(f"{what}: `{key}`: {msg}" + (f" (got {err['input']!r})" if err["type"] != "value_error" else "")) from None
