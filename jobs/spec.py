"""Job specs: YAML files validated when loaded, with errors that name the bad key.

An extraction spec (``strata extract SPEC.yaml``)::

    store: ./acts
    name: gpt2-small-docs
    model: {id: gpt2, revision: main, torch_dtype: float32}
    corpus: {path: examples/corpus.jsonl, format: jsonl, text_field: text}
    tokenize: {context_size: 128, packing: concat, prepend_bos: true}
    hooks: ["blocks.*.hook_resid_post"]
    dtype: float16
    compute: {address: null, batch_tokens: 8192, unit_contexts: 256}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import SpecError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(_Section):
    id: str
    """A Hugging Face hub id (``gpt2``, ``EleutherAI/pythia-70m``) or a local model folder."""
    revision: str | None = None
    """Hub branch, tag or commit (default: the default branch). It is resolved to the exact
    commit hash, which is recorded; for a local folder, a hash of its weight files."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """The dtype the model computes in."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the model's authors."""


class CorpusSpec(_Section):
    path: str
    """A file, a glob or a folder; for ``format: hf`` a hub dataset name or a folder saved by
    ``datasets.save_to_disk``."""
    format: Literal["jsonl", "parquet", "text", "hf"] = "jsonl"
    """How to read ``path``."""
    text_field: str = "text"
    """The field (column) holding each document's text."""
    id_field: str | None = None
    """A field holding stable document ids (integers, or strings hashed to integers); default:
    the record's ordinal in the corpus."""
    max_docs: int | None = Field(default=None, gt=0)
    """Read at most this many (non-empty) documents."""
    growing: bool = False
    """The corpus will get more documents at its end: hold back a last, partial unit until
    later documents fill it (without this, the partial unit is committed, and later growth of
    the corpus is refused rather than changing it)."""
    text_unit: Literal["file", "line"] = "file"
    """For ``format: text``: one document per file, or per line."""
    config: str | None = None
    """For ``format: hf``: the dataset configuration name."""
    split: str = "train"
    """For ``format: hf``: the split to read."""


class TokenizeSpec(_Section):
    context_size: int = Field(default=128, gt=1)
    """Tokens per context (one row of the model's input)."""
    packing: Literal["concat", "truncate"] = "concat"
    """``concat``: documents joined by the tokenizer's separator (EOS) into full contexts;
    ``truncate``: one document per context, padded and masked."""
    prepend_bos: bool = True
    """Start every context with the BOS (or CLS) token."""
    split_long: bool = True
    """With ``truncate``: continue a long document in further contexts instead of cutting it."""
    chunk_docs: int = Field(default=4096, gt=0)
    """Documents per tokenization task."""


class ComputeSpec(_Section):
    address: str | None = None
    """An existing Ray cluster (``auto``, ``ray://host:10001``); null starts Ray in-process (or
    joins the cluster of a Ray job)."""
    batch_tokens: int = Field(default=8192, gt=0)
    """Tokens per forward pass (rounded down to whole contexts, at least one)."""
    unit_contexts: int = Field(default=256, gt=0)
    """Contexts per unit: the unit of work, write, commit and retry. Fixed when a dataset is
    created."""
    num_workers: int | None = Field(default=None, gt=0)
    """Model replicas: default one per GPU of the cluster, or one CPU worker without GPUs."""
    cpus_per_worker: int | None = Field(default=None, gt=0)
    """CPUs per worker (and torch threads of a CPU worker); default all CPUs shared evenly."""
    max_restarts: int = Field(default=3, ge=0)
    """How often a dead worker is restarted (its in-flight units retried) before the job fails."""


class ExtractSpec(_Section):
    store: str = "./acts"
    """The store: a local folder or ``s3://bucket/prefix``."""
    name: str
    """The dataset's name in the store."""
    model: ModelSpec
    corpus: CorpusSpec
    tokenize: TokenizeSpec = TokenizeSpec()
    hooks: list[str] = Field(min_length=1)
    """Hook points, TransformerLens style, globs allowed: ``blocks.*.hook_resid_post``."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """The dtype activations are stored in."""
    compute: ComputeSpec = ComputeSpec()
    storage_options: dict[str, Any] | None = None
    """fsspec options for an S3 store (endpoint, credentials profile, ...)."""

    @field_validator("hooks", mode="before")
    @classmethod
    def _one_hook(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from store.layout import check_name

        check_name(v)
        return v


def _fmt_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        section: Any = model
        for part in err["loc"][:-1]:
            section = section.model_fields[str(part)].annotation if isinstance(section, type) else None
            if section is None:
                break
        valid = ", ".join(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else ""
        return f"`{loc}` is not a spec key" + (f" (valid keys here: {valid})" if valid else "")
    if err["type"] == "missing":
        return f"`{loc}` is required"
    msg = err["msg"]
    if err.get("input") is not None and err["type"] != "value_error":
        msg += f" (got {err['input']!r})"
    return f"`{loc}`: {msg}"


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {dotted}: `{part}` is not a section")
        d = nxt
    d[parts[-1]] = value


def load_extract_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExtractSpec:
    """Load and validate an extraction spec; ``overrides`` are ``key.sub=value`` strings
    (values parsed as YAML: numbers, booleans, lists)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of keys, not a {type(raw).__name__}")
    for kv in overrides:
        if "=" not in kv:
            raise SpecError(f"--set {kv!r}: expected key=value, e.g. compute.batch_tokens=4096")
        k, v = kv.split("=", 1)
        _set(raw, k.strip(), yaml.safe_load(v))
    try:
        return ExtractSpec.model_validate(raw)
    except ValidationError as e:
        errs = [_fmt_error(x, ExtractSpec) for x in e.errors()]
        raise SpecError(f"{path}: " + "; ".join(errs)) from None
