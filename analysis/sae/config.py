"""The SAE training spec: the only config type of ``strata sae train``.

A spec names a dataset of a store, the hooks to train on (one SAE per hook), a sae-lens
training architecture with its options, the trainer's options and, optionally, a sweep::

    store: ./acts
    dataset: tiny-gpt2-quickstart
    hooks: ["blocks.3.hook_resid_post"]   # globs allowed (fnmatch against ds.hooks)
    name: tiny-topk
    architecture: topk                    # a name of sae-lens's training-class registry
    sae: {d_sae: 4096, k: 32}             # or expansion_factor: d_sae = expansion_factor * d_in
    train: {total_training_samples: 20_000_000, batch_size: 4096, lr: 3.0e-4, seed: 0}
    data: {shuffle_seed: 0, skip_special: true, holdout_units: 1}
    sweep: {"sae.k": [16, 32, 64]}        # one SAE per combination (and per hook)
    compute: {address: null, device: auto}

The options of ``sae`` are checked against the fields of the architecture's sae-lens config
dataclass (``d_in`` comes from the dataset, ``device`` from ``compute.device``), so any
architecture sae-lens registers is usable without a change here.

Naming (:func:`expand_runs`): the SAE of one hook without a sweep is named ``name``. Otherwise
the name is ``name``, then ``.HOOK`` when the spec resolves to several hooks, then one
``.KEY=VALUE`` per sweep key in the spec's order, KEY being the last part of the sweep path
(the whole path where two sweep keys share it): ``tiny-topk.blocks.3.hook_resid_post.k=16``.
Values print as YAML would write them (``3e-05``, ``true``); list values join with ``+``; any
character outside ``[A-Za-z0-9_.@+=-]`` becomes ``_``. Each expanded run's own spec is a
concrete spec (one hook, no sweep, ``name`` set to the run's name) that reproduces that SAE.

Transcoders (``architecture: transcoder | skip_transcoder``, :mod:`analysis.sae.transcoder`) take
``hooks: {in: HOOK, out: HOOK}`` or a list of such pairs (:func:`transcoder_pair`); they are
named as above with the OUT hook in place of ``HOOK``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY  # importing sae_lens registers the built-in architectures
from sae_lens.util import str_to_dtype

from strata.analysis.sae.crosscoder import check_options as check_crosscoder_options  # registers `crosscoder`
from strata.analysis.sae.transcoder import ARCHITECTURES as TRANSCODERS  # registers `transcoder`, `skip_transcoder`
from strata.pipeline.hooks import match_hooks
from strata.pipeline.spec import ComputeSpec, JobSpec, Section
from strata.store.errors import InvalidNameError
from strata.store.layout import check_name

# Fields of sae-lens's config dataclasses that a spec does not set: ``d_in`` is the hook's width
# (``sae.d_in`` may be given, as a check that it is), ``device`` comes from ``compute.device``,
# ``metadata`` is written from the dataset's lineage.
DERIVED_SAE_FIELDS = ("d_in", "device", "metadata", "n_sources", "d_out")
# Bounds that refuse nonsense sizes at load, before anything is allocated (the hook's width, and
# so the exact memory need, is checked against the machine by :func:`check_memory` when planning).
# 2**26 latents is above the largest published SAEs (~34M).
MAX_D_SAE = 1 << 26
MAX_EXPANSION_FACTOR = 4096.0
# Bytes per parameter while training in float32: the weights, their gradients and Adam's two moments.
_TRAIN_BYTES_PER_PARAM = 16


def _available_memory() -> int:
    try:
        import psutil  # lazy: optional (ray[default] brings it); counts reclaimable page cache as the kernel would

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(d_in: int, d_sae: int, *, what: str, available: int | None = None) -> None:
    """Refuse an SAE whose training state (encoder and decoder, gradients, Adam moments) cannot fit
    in the memory this machine has available; raises ValueError naming the sizes."""
    need = 2 * d_in * d_sae * _TRAIN_BYTES_PER_PARAM
    if available is None:
        available = _available_memory()
    if need > available:
        raise ValueError(
            f"{what}: d_sae {d_sae:,} x d_in {d_in:,} needs about {need / 2**30:,.1f} GiB to train "
            f"(weights, gradients, Adam state), more than the {available / 2**30:,.1f} GiB available; lower `sae.d_sae` or `sae.expansion_factor`"
        )


# Sections whose keys a sweep may vary (besides ``architecture`` and ``sae.*``).
_SWEEPABLE_SECTIONS = ("train", "data")


# -- sae-lens introspection ----------------------------------------------------------------------


def training_registry() -> dict[str, tuple[type, type]]:
    """sae-lens's training-class registry: architecture name -> (training SAE, its config class)."""

    return SAE_TRAINING_CLASS_REGISTRY


def architectures() -> list[str]:
    """Names of every sae-lens training architecture, sorted."""
    return sorted(training_registry())


@cache
def _option_types(architecture: str) -> dict[str, Any]:
    cfg_cls = training_registry()[architecture][1]
    hints = typing.get_type_hints(cfg_cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls) if f.name not in DERIVED_SAE_FIELDS}
    out["expansion_factor"] = float
    out["d_in"] = int  # a check only: it must equal the hook's width (copied sae-lens configs carry it)
    return out


def sae_options(architecture: str) -> list[str]:
    """The options ``sae`` takes for an architecture: its sae-lens config fields (less ``device``
    and ``metadata``) plus ``expansion_factor``. ``d_in``, when given, must equal the hook's width."""
    return sorted(_option_types(architecture))


def _check_architecture(name: str) -> str:
    if name not in training_registry():
        raise ValueError(f"`architecture` {name!r} is not a sae-lens training architecture; valid: {', '.join(architectures())}")
    return name


def _check_sae_options(architecture: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options checked against the architecture's config dataclass; values converted to its types."""
    types = _option_types(architecture)
    unknown = [k for k in options if k not in types]
    if unknown:
        derived = [k for k in unknown if k in DERIVED_SAE_FIELDS]
        why = (f" (`{derived[0]}` is set by Strata: `device` from `compute.device`, `metadata` from the dataset, "
               "`n_sources` from `sources`, `d_out` from the out hook)") if derived else ""
        raise ValueError(
            f"`sae.{unknown[0]}` is not an option of architecture {architecture!r}{why}; valid: {', '.join(sorted(types))}"
        )
    if "d_sae" in options and "expansion_factor" in options:
        raise ValueError("`sae.d_sae` and `sae.expansion_factor` are both given: give one (d_sae = expansion_factor * d_in)")
    if "d_sae" not in options and "expansion_factor" not in options:
        raise ValueError("`sae.d_sae` or `sae.expansion_factor` is required (the number of latents, or it over d_in)")
    out: dict[str, Any] = {}
    for key, value in options.items():
        try:
            out[key] = TypeAdapter(types[key]).validate_python(value)
        except ValidationError as e:
            raise ValueError(f"`sae.{key}`: {e.errors()[0]['msg']} (got {value!r})") from None
    if out.get("d_sae") is not None and out["d_sae"] <= 0:
        raise ValueError(f"`sae.d_sae` must be positive, got {out['d_sae']}")
    if out.get("d_sae") is not None and out["d_sae"] > MAX_D_SAE:
        raise ValueError(f"`sae.d_sae` ({out['d_sae']:,}) is more latents than Strata trains (at most {MAX_D_SAE:,})")
    if out.get("d_in") is not None and out["d_in"] <= 0:
        raise ValueError(f"`sae.d_in` must be positive, got {out['d_in']}")
    ef = out.get("expansion_factor")
    if ef is not None and not (0 < ef <= MAX_EXPANSION_FACTOR):  # also refuses nan and inf
        raise ValueError(f"`sae.expansion_factor` must be positive and at most {MAX_EXPANSION_FACTOR:,}, got {ef:g}")
    if out.get("k") is not None and out["k"] < 1:
        raise ValueError(f"`sae.k` (latents kept per token) must be at least 1, got {out['k']}")
    if "dtype" in out:

        try:
            str_to_dtype(out["dtype"])
        except ValueError as e:
            raise ValueError(f"`sae.dtype`: {e}") from None
    k, d_sae = out.get("k"), out.get("d_sae")
    if k is not None and d_sae is not None and k > d_sae:
        raise ValueError(f"`sae.k` ({k}) is larger than `sae.d_sae` ({d_sae})")
    check = getattr(training_registry()[architecture][1], "check_options", None)  # an architecture's own combination checks
    if check is not None and architecture in TRANSCODERS:
        check(out)
    return out


# -- the spec ------------------------------------------------------------------------------------


class TrainSpec(Section):
    """Options of sae-lens's ``SAETrainerConfig`` (same names and defaults, but ``batch_size`` for
    ``train_batch_size_samples``), plus the seed and the cadence of the recorded curves."""

    total_training_samples: int = Field(gt=0)
    """Activation rows to train on (steps = this // batch_size)."""
    batch_size: int = Field(default=4096, gt=0)
    """Rows per training step (sae-lens: ``train_batch_size_samples``)."""
    lr: float = Field(default=3e-4, gt=0)
    """Adam learning rate."""
    lr_end: float | None = Field(default=None, ge=0)
    """Final learning rate of the cosine schedules (default ``lr / 10``, as sae-lens's runner)."""
    lr_scheduler_name: Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"] = "constant"
    """sae-lens's learning-rate schedule."""
    lr_warm_up_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps."""
    lr_decay_steps: int = Field(default=0, ge=0)
    """Linear decay-to-zero steps at the end."""
    n_restart_cycles: int = Field(default=1, ge=1)
    """Cycles of ``cosineannealingwarmrestarts``."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam's beta1."""
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    """Adam's beta2."""
    autocast: bool = False
    """Train under bfloat16 autocast."""
    dead_feature_window: int = Field(default=1000, gt=0)
    """A latent that has not fired for this many steps counts as dead (curves, aux losses)."""
    feature_sampling_window: int = Field(default=2000, gt=0)
    """Steps per window of sae-lens's feature-sparsity statistics."""
    n_batches_for_norm_estimate: int = Field(default=1000, gt=0)
    """Batches used to estimate the activation norm or whitening (``sae.normalize_activations``)."""
    seed: int = 0
    """Torch seed of each SAE's initialisation (every SAE of a spec starts from this seed)."""
    log_every: int = Field(default=10, gt=0)
    """Record training curves every this many steps (and at the last step)."""
    checkpoint_every: int = Field(default=1000, ge=0)
    """Commit a checkpoint (weights, trainer and iterator state) every this many steps, so a
    killed job's rerun resumes from it; 0: never. Only the latest is kept, and none once the
    SAE is committed. Not part of the SAE's config hash (it does not change the result)."""

    @model_validator(mode="after")
    def _steps(self) -> TrainSpec:
        steps = self.total_training_samples // self.batch_size
        if steps == 0:
            raise ValueError(
                f"`train.total_training_samples` ({self.total_training_samples}) is less than one batch (`train.batch_size` {self.batch_size})"
            )
        if self.lr_warm_up_steps + self.lr_decay_steps > steps:
            raise ValueError(
                f"`train.lr_warm_up_steps` + `train.lr_decay_steps` ({self.lr_warm_up_steps + self.lr_decay_steps}) exceed the {steps} training steps"
            )
        return self

    @property
    def steps(self) -> int:
        return self.total_training_samples // self.batch_size

    def trainer_config(self, device: str) -> Any:
        """The sae-lens ``SAETrainerConfig`` of this section: wandb off, no checkpoints (the
        result is saved by :mod:`analysis.sae.save`)."""

        return SAETrainerConfig(
            total_training_samples=self.total_training_samples,
            train_batch_size_samples=self.batch_size,
            lr=self.lr,
            lr_end=self.lr / 10 if self.lr_end is None else self.lr_end,
            lr_scheduler_name=self.lr_scheduler_name,
            lr_warm_up_steps=self.lr_warm_up_steps,
            lr_decay_steps=self.lr_decay_steps,
            n_restart_cycles=self.n_restart_cycles,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            device=device,
            autocast=self.autocast,
            dead_feature_window=self.dead_feature_window,
            feature_sampling_window=self.feature_sampling_window,
            n_checkpoints=0,
            checkpoint_path=None,
            save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=self.n_batches_for_norm_estimate,
        )


class DataSpec(Section):
    shuffle_seed: int = 0
    """Seed of the store's shuffled batch order (``ds.iter_batches(seed=...)``)."""
    skip_special: bool = True
    """Leave BOS, separator and padding rows out of training and evaluation."""
    holdout_units: int = Field(default=1, ge=0)
    """The last this many committed units are held out of training, for evaluation."""
    buffer_rows: int = Field(default=1 << 17, gt=0)
    """Rows per shuffle window of the batch iterator (larger mixes units better)."""


class EvalSpec(Section):
    batch_size: int = Field(default=4096, gt=0)
    """Held-out rows per reconstruction batch."""
    dense_threshold: float = Field(default=0.1, gt=0, le=1)
    """A latent is dense when it fires on more than this fraction of held-out tokens."""
    ce: bool = True
    """Measure the LM's next-token loss with the SAE spliced in (when the model is local)."""
    ce_contexts: int = Field(default=64, gt=0)
    """Held-out contexts (the first ones) for the spliced loss. Set in a spec, it is a
    requirement: the held-out units are extended by whole units (from the end) until they hold
    that many contexts, or the spec is refused before training. Left out: up to 64 contexts of
    the ``data.holdout_units`` units."""
    ce_batch_contexts: int = Field(default=8, gt=0)
    """Contexts per forward pass of the spliced loss."""


class SAECompute(ComputeSpec):
    """SAE training's keys of the compute section (``address``: the Ray cluster of the sweep's
    tasks; ``device`` also takes ``cuda:N`` and ``mps``)."""

    keys = ("address", "device", "ray", "cpus_per_task", "threads", "lease_stale_s")


class Source(Section):
    """One source of a crosscoder: a hook of a dataset (``dataset`` defaults to the spec's)."""

    dataset: str | None = None
    """The activation dataset's name in the store (default: the spec's ``dataset``)."""
    hook: str
    """The hook (an exact name)."""


class SAETrainSpec(JobSpec):
    """``strata sae train``: SAEs of a dataset's hooks, one per hook and sweep combination."""

    dataset: str | None = None
    """The activation dataset's name in the store (required unless every source names its own)."""
    hooks: tuple[str | dict[str, Any], ...] = ()
    """Hooks to train on, globs allowed (matched against the dataset's hooks); one SAE each.
    Transcoders: ``{in: HOOK, out: HOOK}`` pairs (exact names; see :func:`transcoder_pair`)."""
    sources: tuple[Source, ...] | None = None
    """``architecture: crosscoder`` only: its aligned sources, at least two, in place of ``hooks``
    (one crosscoder per sweep combination; see :mod:`analysis.sae.crosscoder_run`)."""
    name: str
    """The SAE's name (of one hook without a sweep); otherwise the stem of the derived names."""
    architecture: str = "topk"
    """A sae-lens training architecture, by its registry name (``standard``, ``topk``, ...)."""
    sae: dict[str, Any] = Field(default_factory=dict)
    """Options of the architecture's sae-lens config (``d_sae`` or ``expansion_factor``, ``k``, ...)."""
    train: TrainSpec
    """Trainer options (sae-lens ``SAETrainerConfig``)."""
    data: DataSpec = DataSpec()
    """How batches are drawn from the store."""
    eval: EvalSpec = EvalSpec()
    """Held-out evaluation."""
    sweep: dict[str, list[Any]] | None = None
    """Spec paths to vary, each with its values (``{"sae.k": [16, 32]}``): one SAE per combination."""
    compute: SAECompute = SAECompute()
    """Where training runs."""

    @field_validator("hooks", mode="before")
    @classmethod
    def _one_hook(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, dict)) else v

    @field_validator("hooks")
    @classmethod
    def _hook_pairs(cls, v: tuple[str | dict[str, Any], ...], info: ValidationInfo) -> tuple[str | dict[str, Any], ...]:
        return tuple(h if isinstance(h, str) else transcoder_pair(h, dataset=info.data.get("dataset"), where=f"`hooks[{i}]`")
                     for i, h in enumerate(v))

    @model_validator(mode="after")
    def _transcoder_hooks(self) -> SAETrainSpec:
        pairs = [h for h in self.hooks if isinstance(h, dict)]
        if self.architecture in TRANSCODERS and len(pairs) < len(self.hooks):
            raise ValueError(f"`architecture: {self.architecture}` takes `hooks: {{in: HOOK, out: HOOK}}` (or a list of such pairs), "
                             f"not {next(h for h in self.hooks if isinstance(h, str))!r}")
        if pairs and self.architecture not in TRANSCODERS:
            raise ValueError(f"`hooks` {{in, out}} pairs are for `architecture: transcoder` or `skip_transcoder`, not {self.architecture!r}")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_name(v, what="SAE")
        except InvalidNameError as e:  # named here too: sweeps re-raise this message on its own
            raise ValueError(f"`name`: {e}") from None

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, v: str) -> str:
        return _check_architecture(v)

    @field_validator("sae")
    @classmethod
    def _sae(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        arch = info.data.get("architecture")
        if arch is None:  # the architecture failed; that error is reported
            return v
        return _check_sae_options(arch, v)

    @field_validator("sweep", mode="before")
    @classmethod
    def _flatten_sweep(cls, v: Any) -> Any:
        # `{"sae": {"k": [...]}}` (as `--set sweep.sae.k=[...]` nests it) means `{"sae.k": [...]}`.
        if not isinstance(v, dict):
            return v
        flat: dict[str, Any] = {}
        for key, value in v.items():
            if isinstance(value, dict):
                for sub, inner in cls._flatten_sweep(value).items():
                    flat[f"{key}.{sub}"] = inner
            else:
                flat[key] = value
        return flat

    @field_validator("sweep")
    @classmethod
    def _sweep_keys(cls, v: dict[str, list[Any]] | None, info: ValidationInfo) -> dict[str, list[Any]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("`sweep` is empty: give at least one path, or null")
        # Options are checked against every architecture in play; unknown ones are reported elsewhere.
        archs = {a for a in (info.data.get("architecture"), *v.get("architecture", [])) if a in training_registry()}
        for key, values in v.items():
            _check_sweep_path(key, archs)
            if not values:
                raise ValueError(f"`sweep.{key}` is an empty list: give at least one value")
        return v

    @model_validator(mode="after")
    def _sources(self) -> SAETrainSpec:
        crosscoder = self.architecture == "crosscoder"
        if self.sources is None:
            if crosscoder:
                raise ValueError("`architecture: crosscoder` needs `sources`: [{dataset: NAME, hook: HOOK}, ...] (at least two)")
            if not self.hooks:
                raise ValueError("`hooks` is required: the hooks to train on (names or globs)")
            if self.dataset is None:
                raise ValueError("`dataset` is required: the activation dataset's name in the store")
            return self
        if not crosscoder:
            raise ValueError(f"`sources` is for `architecture: crosscoder`, not {self.architecture!r}; use `hooks` for one SAE per hook")
        if self.hooks:
            raise ValueError("`hooks` and `sources` are both given: a crosscoder takes `sources` only")
        if len(self.sources) < 2:
            raise ValueError(f"`sources` has {len(self.sources)} source(s): a crosscoder needs at least two")
        missing = [i for i, src in enumerate(self.sources) if src.dataset is None and self.dataset is None]
        if missing:
            raise ValueError(f"`sources[{missing[0]}]` names no `dataset` and the spec has none: give one of them")
        keys = [(src.dataset or self.dataset, src.hook) for src in self.sources]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise ValueError(f"`sources` names {dup[0]}:{dup[1]} twice: each source is another hook or dataset")
        check_crosscoder_options(self.sae)
        return self

    @model_validator(mode="after")
    def _sweep_combinations(self) -> SAETrainSpec:
        # Every combination must be a valid spec: check them all now, not after hours of training.
        for combo in combinations(self):
            if combo:
                try:
                    concrete(self, combo, hook=self.hooks[0] if self.hooks else "", name=self.name)
                except ValidationError as e:
                    what = ", ".join(f"{k}={v!r}" for k, v in combo.items())
                    err = e.errors()[0]
                    msg = err["msg"].removeprefix("Value error, ")
                    loc = ".".join(str(x) for x in err["loc"])
                    raise ValueError(f"`sweep` combination {what}: " + (msg if msg.startswith("`") else f"`{loc}`: {msg}")) from None
        return self


def _check_sweep_path(key: str, archs: set[str]) -> None:
    valid = ["architecture", "sae.<option>", *(f"{s}.{f}" for s in _SWEEPABLE_SECTIONS for f in SAETrainSpec.model_fields[s].annotation.model_fields)]
    section, _, leaf = key.partition(".")
    if key == "architecture":
        return
    if section == "sae" and leaf:
        if not archs or any(leaf in _option_types(a) for a in archs):
            return
        opts = sorted(set().union(*(_option_types(a) for a in archs))) if archs else []
        raise ValueError(f"`sweep.{key}` is not a spec path: `{leaf}` is not an option of {', '.join(sorted(archs))}; valid: {', '.join(opts)}")
    if section in _SWEEPABLE_SECTIONS and leaf in SAETrainSpec.model_fields[section].annotation.model_fields:
        return
    raise ValueError(f"`sweep.{key}` is not a spec path that can be swept; valid: {', '.join(valid)}")


# -- expansion -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One SAE to train: its name, its hook and its concrete spec (one hook, no sweep)."""

    name: str
    hook: str
    """The SAE's hook; a transcoder's in hook."""
    spec: SAETrainSpec
    params: dict[str, Any]
    """The sweep values of this run (``{}`` without a sweep)."""
    hook_out: str | None = None
    """A transcoder's out hook (None for an SAE)."""

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hooks the run reads."""
        return (self.hook,) if self.hook_out is None else (self.hook, self.hook_out)

    @property
    def data_key(self) -> str:
        """The key of its rows in a training batch (a transcoder's: in and out side by side)."""
        return self.hook if self.hook_out is None else joined_key(self.hook, self.hook_out)


def combinations(spec: SAETrainSpec) -> list[dict[str, Any]]:
    """The sweep's combinations in order (the last key varies fastest); ``[{}]`` without a sweep."""
    if not spec.sweep:
        return [{}]
    keys = list(spec.sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(spec.sweep[k] for k in keys))]


def concrete(spec: SAETrainSpec, params: dict[str, Any], *, hook: str | dict[str, str], name: str) -> SAETrainSpec:
    """The spec of one run: ``params`` (sweep path -> value) applied, one hook, no sweep."""
    raw = spec.model_dump()
    raw.update(hooks=[] if spec.sources else [hook], name=name, sweep=None)
    for path, value in params.items():
        section, _, leaf = path.partition(".")
        if leaf:
            raw[section] = {**raw[section], leaf: value}
        else:
            raw[section] = value
    return SAETrainSpec.model_validate(raw)


def resolve_hooks(patterns: Sequence[str], available: Sequence[str], *, dataset: str = "the dataset") -> list[str]:
    """Hooks of ``available`` matching ``patterns`` (names or fnmatch globs), in ``available``'s
    order. A pattern matching nothing is an error listing the available hooks."""
    return match_hooks(patterns, available,
                       error=lambda p: ValueError(f"`hooks`: {p!r} matches no hook of {dataset}; its hooks: {', '.join(available)}"))


_MLP_OUT = re.compile(r"blocks\.(\d+)\.hook_mlp_out")


def transcoder_pair(pair: Any, *, dataset: str | None, where: str = "`hooks`") -> dict[str, str]:
    """A transcoder's ``{in: HOOK, out: HOOK}``, checked, as ``{"in": ..., "out": ...}``. Each
    side is a hook of the spec's ``dataset`` or ``{dataset: NAME, hook: HOOK}`` naming that same
    dataset (both hooks of a transcoder come from one dataset). ``in`` may be left out when
    ``out`` is ``blocks.L.hook_mlp_out``: it is then ``blocks.L.mlp.hook_in``, the MLP's input
    (``blocks.L.ln2.hook_normalized``, the input before the norm's weight and bias, is accepted
    too when named)."""
    if not isinstance(pair, dict) or not set(pair) <= {"in", "out"} or "out" not in pair:
        got = sorted(pair) if isinstance(pair, dict) else pair
        raise ValueError(f"{where}: a transcoder's hooks are {{in: HOOK, out: HOOK}} (`in` optional for blocks.L.hook_mlp_out), got {got!r}")
    out: dict[str, str] = {}
    for side in ("in", "out"):
        h = pair.get(side)
        if h is None:
            continue
        if isinstance(h, dict):
            if set(h) != {"dataset", "hook"} or not all(isinstance(x, str) for x in h.values()):
                raise ValueError(f"{where}.{side}: a hook name or {{dataset: NAME, hook: HOOK}}, got {h!r}")
            if dataset is not None and h["dataset"] != dataset:
                raise ValueError(f"{where}.{side} names dataset {h['dataset']!r}, but a transcoder's in and out hooks come from one "
                                 f"dataset, the spec's `dataset` {dataset!r} (across datasets, align them into one first)")
            h = h["hook"]
        if not isinstance(h, str) or not h or any(c in h for c in "*?["):
            raise ValueError(f"{where}.{side}: an exact hook name, got {h!r}")
        out[side] = h
    if "in" not in out:
        m = _MLP_OUT.fullmatch(out["out"])
        if m is None:
            raise ValueError(f"{where}.in is required: it defaults (to blocks.L.mlp.hook_in) only when `out` is blocks.L.hook_mlp_out, "
                             f"not {out['out']!r}")
        out["in"] = f"blocks.{m.group(1)}.mlp.hook_in"
    if out["in"] == out["out"]:
        raise ValueError(f"{where}: `in` and `out` are both {out['in']!r}; a transcoder maps one hook to another")
    return {"in": out["in"], "out": out["out"]}


def joined_key(hook_in: str, hook_out: str) -> str:
    """A transcoder's key in a training batch: its in and out rows side by side."""
    return f"{hook_in}->{hook_out}"


def resolve_pairs(spec: SAETrainSpec, available: Sequence[str], *, dataset: str = "the dataset") -> list[tuple[str, str]]:
    """A transcoder spec's (in, out) pairs, each hook checked against ``available``."""
    pairs = []
    for i, pair in enumerate(spec.hooks):
        assert isinstance(pair, dict)  # checked when the spec loaded
        for side in ("in", "out"):
            if pair[side] not in available:
                raise ValueError(f"`hooks[{i}].{side}`: {pair[side]!r} is not a hook of {dataset}; its hooks: {', '.join(available)}")
        pairs.append((pair["in"], pair["out"]))
    return pairs


_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+=-]")


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif v is None:
        s = "null"
    elif isinstance(v, (list, tuple)):
        s = "+".join(_fmt_value(x) for x in v)
    else:
        s = repr(v) if isinstance(v, float) else str(v)
    return _UNSAFE.sub("_", s)


def source_label(spec: SAETrainSpec) -> str:
    """A crosscoder's stand-in for a hook (its runs' ``hook``): ``DATASET:HOOK+DATASET:HOOK...``."""
    return "+".join(f"{src.dataset or spec.dataset}:{src.hook}" for src in spec.sources or ())


def run_name(spec: SAETrainSpec, *, hook: str, params: dict[str, Any], several_hooks: bool) -> str:
    """The derived name of one run (see the module docstring)."""
    parts = [spec.name]
    if several_hooks:
        parts.append(hook)
    leaves = [k.rsplit(".", 1)[-1] for k in params]
    for key, leaf in zip(params, leaves):
        label = leaf if leaves.count(leaf) == 1 else key
        parts.append(f"{label}={_fmt_value(params[key])}")
    return ".".join(parts)


def expand_runs(spec: SAETrainSpec, available_hooks: Sequence[str], *, dataset: str = "the dataset") -> list[Run]:
    """One :class:`Run` per (hook, sweep combination), hooks outermost, each with its derived
    name. Names are checked (store-safe, unique)."""
    if any(isinstance(h, dict) for h in spec.hooks):
        pairs = resolve_pairs(spec, available_hooks, dataset=dataset)
        runs = []
        for hin, hout in pairs:
            for params in combinations(spec):
                name = run_name(spec, hook=hout, params=params, several_hooks=len(pairs) > 1)
                check_name(name, what="SAE")
                runs.append(Run(name, hin, concrete(spec, params, hook={"in": hin, "out": hout}, name=name), params, hout))
        return _unique(runs)
    hooks = [source_label(spec)] if spec.sources else resolve_hooks(spec.hooks, available_hooks, dataset=dataset)
    runs = []
    for hook in hooks:
        for params in combinations(spec):
            name = run_name(spec, hook=hook, params=params, several_hooks=len(hooks) > 1)
            check_name(name, what="SAE")
            runs.append(Run(name, hook, concrete(spec, params, hook=hook, name=name), params))
    return _unique(runs)


def _unique(runs: list[Run]) -> list[Run]:
    seen: dict[str, Run] = {}
    for r in runs:
        if r.name in seen:
            raise ValueError(f"`sweep`: runs {seen[r.name].params} and {r.params} both get the name {r.name!r}; make the sweep values distinct")
        seen[r.name] = r
    return runs
