"""The extraction spec: the one config type of an extraction job, validated once when loaded
(``jobs.spec`` reads YAML into it; tests and notebooks build it directly) and read as is by
the pipeline. It is a :class:`pipeline.spec.JobSpec` (``store``, ``storage_options``,
``compute``), its compute section narrowed to extraction's keys (:class:`ExtractCompute`).

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

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from strata.pipeline.spec import ComputeSpec, JobSpec, Section
from strata.store.datasets.documents import DOC_COLUMNS
from strata.store.layout import check_name


class ModelSpec(Section):
    id: str = Field(min_length=1)
    """A Hugging Face hub id (``gpt2``, ``EleutherAI/pythia-70m``) or a local model folder."""
    revision: str | None = None
    """Hub branch, tag or commit (default: the default branch). It is resolved to the exact
    commit hash, which is recorded; for a local folder, a hash of its weights and config."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """The dtype the model computes in."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the model's authors."""


class CorpusSpec(Section):
    path: str = Field(min_length=1)
    """A file, a glob or a folder (prefix) of shards, on the local disk or at any fsspec URL
    (``s3://bucket/corpus/``, ``gs://...``, ``hf://datasets/OWNER/NAME/...``); for ``format: hf``
    a hub dataset name or a folder saved by ``datasets.save_to_disk``; for ``format: images`` a
    folder (or glob) of image files. ``.gz`` and ``.zst`` files are decompressed."""
    format: Literal["jsonl", "parquet", "text", "hf", "images"] = "jsonl"
    """How to read ``path``. ``images``: a folder of image files, one document per image, in
    sorted path order (an optional ``metadata.jsonl`` beside them, keyed by ``file_name``, gives
    ids, captions and kept fields)."""
    text_field: str = "text"
    """The field (column) holding each document's text."""
    image_field: str | None = None
    """For ``parquet`` and ``hf`` corpora of images: the column holding each image (encoded
    bytes, a ``{bytes, path}`` struct, or a ``datasets.Image`` feature). Setting it makes the
    corpus an image corpus (``text_field`` is then unused)."""
    caption_field: str | None = None
    """For image corpora: a field holding each image's caption, kept in ``ds.docs()`` (and
    hashed so that a text dataset of the same captions pairs with this one, ``align: docs``)."""
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
    keep_fields: list[str] = []
    """Document fields to keep (``label``, ``lang``, ...): recorded per document in the
    dataset's document table, ``ds.docs()`` (jsonl, parquet and hf corpora)."""
    storage_options: dict[str, Any] | None = Field(default=None, repr=False)
    """fsspec options for a remote corpus (endpoint, region, credentials, ...): used, never
    recorded, logged or printed (records keep only the non-secret options, as for the store)."""
    plan: Literal["auto", "sharded", "documents"] = "auto"
    """How the corpus is planned. ``sharded``: every file (or Parquet row-group range) is a
    shard, tokenized by a task where it runs into the store; contexts never span two shards and
    the driver holds O(shards + units). ``documents``: the whole corpus is one stream of
    documents planned on the driver (a one-file corpus that grows by appended documents).
    ``auto``: ``documents`` for one local file, an HF dataset or images, ``sharded`` otherwise."""
    shard_mb: int = Field(default=512, gt=0)
    """A Parquet file larger than this (MiB, on disk) splits into row-group ranges of about
    this size, each a shard."""
    on_change: Literal["recompute", "refuse"] = "recompute"
    """Sharded corpora: when a shard's bytes changed since it was extracted, recompute the
    units it feeds (``recompute``), or stop with an error naming it (``refuse``)."""

    @property
    def is_images(self) -> bool:
        """An image corpus: a folder of images, or a Parquet / HF corpus with an image column."""
        return self.format == "images" or self.image_field is not None

    @model_validator(mode="after")
    def _images(self) -> CorpusSpec:
        if self.image_field is not None and self.format not in ("parquet", "hf"):
            raise ValueError(f"`image_field` is for parquet and hf corpora; a folder of image files is `format: images` (got format {self.format!r})")
        if self.caption_field is not None and not self.is_images:
            raise ValueError("`caption_field` is for image corpora (`format: images`, or `image_field`); a text corpus's text is `text_field`")
        return self

    @field_validator("keep_fields")
    @classmethod
    def _keep(cls, v: list[str]) -> list[str]:
        clash = [f for f in v if f in DOC_COLUMNS]
        if clash:
            raise ValueError(f"{clash} are columns of the document table itself ({', '.join(DOC_COLUMNS)}); keep other fields")
        if len(set(v)) != len(v):
            raise ValueError("a field is listed twice")
        return v


class TokenizeSpec(Section):
    context_size: int = Field(default=128, gt=1)
    """Tokens per context (one row of the model's input)."""
    packing: Literal["concat", "truncate"] = "concat"
    """``concat``: documents joined by the tokenizer's separator (EOS) into full contexts (the
    tail shorter than one context is dropped, and reported); ``truncate``: one document per
    context, padded and masked."""
    prepend_bos: bool = True
    """Start every context with the BOS (or CLS) token."""
    split_long: bool = True
    """With ``truncate``: continue a long document in further contexts instead of cutting it."""
    chunk_docs: int = Field(default=4096, gt=0)
    """Documents per tokenization task."""


class ImageSpec(Section):
    size: int | None = Field(default=None, gt=0)
    """Image side in pixels after preprocessing (a square ``size x size`` input): default, the
    model's image processor settings. Must be a multiple of the model's patch size; a size
    other than the model's training size interpolates its position embeddings."""


class DiffusionSpec(Section):
    timesteps: list[int] = Field(min_length=1)
    """The noise levels: one context per (image, timestep); integers in the scheduler's range
    (``0 .. num_train_timesteps - 1``; for a flow-matching MMDiT, training steps ``1 .. num_train_timesteps``)."""
    noise_seed: int = 0
    """Seed of the noise: each context's noise comes from a hash of (noise_seed, image id,
    timestep), so a unit recomputed on any worker is identical."""
    prompt_field: str | None = None
    """Text-conditioned models (``UNet2DConditionModel``, ``SD3Transformer2DModel``): the corpus field (its
    ``caption_field`` or one of its ``keep_fields``) holding each image's prompt."""
    prompt: str | None = None
    """Text-conditioned models without ``prompt_field``: the one prompt of every image (``""``:
    the empty prompt; it must be given explicitly)."""
    class_field: str | None = None
    """Class-conditional DiTs: the corpus field holding each image's class (default, and where
    it is null: the null class)."""
    grid: int | None = Field(default=None, gt=0)
    """UNets: resample every hook's map to ``grid x grid`` (bilinear, ``align_corners=False``),
    so that hooks of different resolutions share rows. Default: the hooks must share one size."""

    @field_validator("timesteps")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("a timestep is listed twice")
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self) -> DiffusionSpec:
        if self.prompt is not None and self.prompt_field is not None:
            raise ValueError("give `prompt_field` (a prompt per image) or `prompt` (one for all), not both")
        return self


class ExtractCompute(ComputeSpec):
    """Extraction's keys of the compute section."""

    keys = ("address", "executor", "batch_tokens", "unit_contexts", "num_workers", "cpus_per_worker", "max_restarts", "lease_stale_s")


class ExtractSpec(JobSpec):
    name: str
    """The dataset's name in the store."""
    model: ModelSpec
    corpus: CorpusSpec
    tokenize: TokenizeSpec = TokenizeSpec()
    """Text models only: how documents become contexts (an image is always one context)."""
    image: ImageSpec = ImageSpec()
    """Image models only: preprocessing settings beyond the model's image processor."""
    diffusion: DiffusionSpec | None = None
    """Diffusion models only (a diffusers pipeline): timesteps, noise seed and conditioning (see
    :mod:`pipeline.diffusion`)."""
    hooks: list[str] = Field(min_length=1)
    """Hook points, TransformerLens style, globs allowed: ``blocks.*.hook_resid_post``."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """The dtype activations are stored in."""
    max_bytes_per_token: int = Field(default=4 << 20, gt=0)
    """The most bytes a token may take over every hook asked for (a guard against a glob that
    would store, say, every head's ``attn.hook_result`` of every layer); 4 MiB by default."""
    compute: ExtractCompute = ExtractCompute()
    """Where and how extraction runs."""
    version_of: str | None = None
    """The dataset this one is a new version of (``strata reprocess`` sets it when a model's
    revision moved); recorded in the manifest, so ``Store.versions`` lists it."""

    @field_validator("hooks", mode="before")
    @classmethod
    def _one_hook(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("name", "version_of")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            check_name(v)
        return v
