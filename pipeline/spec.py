"""The one spec vocabulary of every job kind: the :class:`Section` base (frozen, unknown keys are
errors, field docstrings are descriptions), the :class:`ComputeSpec` section and the
:class:`JobSpec` base that every job spec derives from (extraction, feature encoding, SAE
training, analyses).

A job spec holds ``store``, ``storage_options`` (fsspec options for a remote store: used, never
recorded nor printed) and ``compute``. ``compute`` is one section type for all kinds, the union of
what they need (lease settings included: ``compute.lease_stale_s``); each kind narrows it to the
keys it uses with a subclass that names them in ``keys``, so a key another kind uses is refused
exactly as an unknown key is, and dumps (manifests, lineages, identities) hold only the kind's
keys::

    class ExtractCompute(ComputeSpec):
        keys = ("address", "batch_tokens", "unit_contexts", ...)

    class ExtractSpec(JobSpec):
        compute: ExtractCompute = ExtractCompute()

A validated copy with some fields changed is ``spec.updated(name="x")`` (``model_copy(update=...)``
skips validation and is not used for specs).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from strata.store.storage import public_options

__all__ = ["UNUSED_KEY", "ComputeSpec", "JobSpec", "Section"]

# The pydantic error type of a compute key that this kind of job does not use (``ctx["key"]``):
# reported like an unknown key (``jobs.spec.format_error``).
UNUSED_KEY = "unused_key"


class Section(BaseModel):
    """A frozen spec section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @classmethod
    def spec_keys(cls) -> tuple[str, ...]:
        """The keys this section accepts, in the order an error message lists them."""
        return tuple(cls.model_fields)

    def updated(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated like a loaded spec (unknown keys and bad
        values raise ``ValidationError``). Fields not set stay unset, so they keep their defaults."""
        raw = {k: getattr(self, k) for k in self.model_fields_set}
        return type(self).model_validate({**raw, **changes})


class ComputeSpec(Section):
    """Where and how a job runs. Every kind of job uses some of these keys (its subclass lists them
    in ``keys``); the others are refused for that kind."""

    keys: ClassVar[tuple[str, ...] | None] = None
    """The keys of this kind of job, in the order error messages list them (None: every key)."""
    devices: ClassVar[tuple[str, ...] | None] = None
    """The ``device`` values this kind of job accepts (None: any that ``device``'s pattern does)."""

    address: str | None = None
    """An existing Ray cluster to join (``auto``, ``HOST:6379``, ``ray://HOST:10001``), which gets
    no credentials from this job. ``null`` starts a private Ray for this job when it needs one
    (the entrypoint of a Ray job joins its own cluster instead)."""
    executor: Literal["auto", "local", "ray"] = "auto"
    """Where the work runs: ``local`` in this process, without Ray (one worker; tests, a quick
    look); ``ray`` or ``auto`` on the Ray cluster that ``address`` names (see there)."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    """``auto`` (a GPU when the cluster or machine has one, else CPU), ``cpu``, ``cuda``,
    ``cuda:N`` (SAE training) or ``mps`` (SAE training)."""
    num_workers: int | None = Field(default=None, gt=0)
    """Workers (model or SAE replicas): default one per GPU of the cluster, or one CPU worker
    without GPUs."""
    cpus_per_worker: int | None = Field(default=None, gt=0)
    """CPUs per worker (and torch threads of a CPU worker); default all CPUs shared evenly."""
    max_restarts: int = Field(default=3, ge=0)
    """How often a dead worker is restarted (its in-flight units retried) before the job fails."""
    lease_stale_s: float = Field(default=60.0, gt=0)
    """How long after its driver's last heartbeat a job's write lease may be taken over by
    another job (the driver is then presumed dead; if it was only paused, it stops; on the same
    machine a dead pid is known dead at once)."""
    batch_tokens: int = Field(default=8192, gt=0)
    """Extraction: tokens per forward pass (rounded down to whole contexts, at least one)."""
    unit_contexts: int = Field(default=256, gt=0)
    """Extraction: contexts per unit, the unit of work, write, commit and retry. Fixed when a
    dataset is created."""
    batch_rows: int = Field(default=4096, gt=0)
    """Feature encoding: rows per ``sae.encode`` call."""
    merge_memory_gb: float = Field(default=4.0, gt=0)
    """Feature encoding: memory the driver's merge may use; more entries than fit are merged in
    several passes."""
    ray: Literal["auto", "always", "never"] = "auto"
    """SAE training: ``auto``: one Ray task per sweep combination when there are several, or when
    ``address`` is set or this is a Ray job; a single pass otherwise runs in this process (no Ray
    start-up). ``always``: Ray tasks even for one. ``never``: every pass in this process, one
    after the other."""
    cpus_per_task: int = Field(default=1, gt=0)
    """SAE training: CPUs of each Ray task (its torch threads on a cluster without GPUs; a GPU task
    gets one GPU)."""
    threads: int | None = Field(default=None, gt=0)
    """SAE training: torch threads of a pass run in this process (null: torch's default, one per
    core). Small SAEs on a few cores train several times faster with 1: torch's spinning worker
    threads then do not compete with the batch loader's two threads."""
    tasks: int | None = Field(default=None, gt=0)
    """Analyses: partial-moment tasks per pass (ranges of units); default: the cluster's CPUs."""
    chunk_rows: int = Field(default=16384, gt=0)
    """Analyses: rows per read and co-moment update inside a task."""
    memory_budget_mb: float = Field(default=4096.0, gt=0)
    """Analyses: memory one heatmap task may use for its co-moments; larger heatmaps take several
    passes."""

    @classmethod
    def spec_keys(cls) -> tuple[str, ...]:
        return cls.keys if cls.keys is not None else tuple(cls.model_fields)

    @model_validator(mode="before")
    @classmethod
    def _only_this_kinds_keys(cls, data: Any) -> Any:
        # A key of the union that this kind does not use would be silently ignored: refuse it as
        # the unknown key it is for this kind (keys nobody knows are left to extra="forbid").
        if cls.keys is not None and isinstance(data, dict):
            for key in data:
                if key in cls.model_fields and key not in cls.keys:
                    raise PydanticCustomError(
                        UNUSED_KEY, "`{key}` is not a key of this job's compute section; valid keys: {valid}",
                        {"key": key, "valid": ", ".join(cls.keys)},
                    )
        return data

    @field_validator("device", mode="before")
    @classmethod
    def _this_kinds_device(cls, v: Any) -> Any:
        if cls.devices is not None and v not in cls.devices:
            *head, last = (repr(d) for d in cls.devices)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": f"{', '.join(head)} or {last}"})
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Only this kind's keys: what manifests, lineages and identities recorded before the
        # sections were one type.
        out = handler(self)
        keys = type(self).keys
        return out if keys is None else {k: out[k] for k in keys if k in out}

    def __repr_args__(self) -> Any:
        keys = type(self).keys
        return [(k, v) for k, v in super().__repr_args__() if keys is None or k in keys]


class JobSpec(Section):
    """The base of every job spec: the store, its storage options and the compute section."""

    store: str = Field(default="./acts", min_length=1)
    """The store: a local folder or ``s3://bucket/prefix``."""
    compute: ComputeSpec = ComputeSpec()
    """Where and how the job runs (each kind narrows it to the keys it uses)."""
    storage_options: dict[str, Any] | None = Field(default=None, repr=False)
    """fsspec options for an S3 store (endpoint, region, credentials, ...). Credentials are used,
    never recorded nor printed: records keep only the non-secret options (:meth:`recorded`)."""

    @classmethod
    def spec_keys(cls) -> tuple[str, ...]:
        # `store` first, then the kind's own keys, then the rest of the base: the order the
        # specs and their error messages had before the base existed.
        base = [k for k in JobSpec.model_fields if k != "store"]
        own = [k for k in cls.model_fields if k not in JobSpec.model_fields]
        return ("store", *own, *base)

    def recorded(self) -> dict[str, Any]:
        """The spec as a record keeps it: every key, but only non-secret storage options."""
        d = self.model_dump(mode="json")
        d["storage_options"] = public_options(self.storage_options)
        corpus = d.get("corpus")
        if isinstance(corpus, dict) and "storage_options" in corpus:  # a corpus's credentials, likewise
            corpus["storage_options"] = public_options(corpus["storage_options"])
        return d
