"""Errors of the extraction pipeline. Each is a :class:`store.StrataError` (the CLI prints it as
one line) and also the matching built-in, so callers can catch either."""

from __future__ import annotations

from strata.store.errors import StrataError


class PipelineError(StrataError):
    """Base of the pipeline's own errors."""


class SpecError(PipelineError, ValueError):
    """A job spec that does not validate (names the bad key)."""


class CorpusError(PipelineError, ValueError):
    """A corpus that cannot be read: missing files, empty, missing text field."""


class ModelNotFoundError(PipelineError, LookupError):
    """An unknown model id, revision or local folder."""


class UnknownHookError(PipelineError, LookupError):
    """A hook name or pattern that the model does not have."""


class UnsupportedModelError(PipelineError, ValueError):
    """A model architecture without a hook mapping."""


class WorkerError(PipelineError, RuntimeError):
    """A unit that failed in a worker after all retries."""


class ClusterError(PipelineError, ConnectionError):
    """A Ray cluster that cannot be reached or joined."""


class ShardChangedError(CorpusError):
    """A corpus shard whose size, mtime, ETag or version differs from what was listed."""
