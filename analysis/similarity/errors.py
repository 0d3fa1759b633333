"""Errors of analyses over the store. Each is a :class:`store.StrataError` (the CLI prints it as
one line and exits 2) and a ``ValueError``, so callers can catch either."""

from __future__ import annotations

from strata.store.errors import StrataError


class AnalysisError(StrataError, ValueError):
    """An analysis that cannot run on its inputs: too few rows for a metric, widths that do not
    fit, a label that does not exist, a result name taken by other inputs."""
