"""Analysis results as a notebook sees them: each a committed artifact folder
(:mod:`strata.store.commit.artifacts`) holding Parquet results, plots, and ``provenance.json``
(its identity and inputs, checked against the store so a result about replaced data is refused)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

from strata.store.commit import artifacts, parquet
from strata.store.datasets import stale
from strata.store.errors import CorruptionError, FormatVersionError, StaleArtifactError
from strata.store.root import StoreRoot
from strata.store.saes.handles import SAES
from strata.store.views.plots import analysis_plot
from strata.store.views.summaries import analysis_html

#: The store folder analysis results live in.
ANALYSES = "analyses"
PROVENANCE = "provenance.json"  # an analysis's identity and provenance (analysis.similarity.runner writes it)


class AnalysisHandle:
    """A committed analysis result: ``.table()`` (its results), ``.meta`` (provenance),
    ``.files`` and ``.read(name)``."""

    def __init__(self, store: StoreRoot, name: str, *, allow_stale: bool = False) -> None:
        self.store = store
        self.name = name
        self.artifact = artifacts.require(store, ANALYSES, name, what="analysis")
        if not allow_stale:
            why = self.stale_inputs
            if why is not None:
                raise StaleArtifactError(why)

    @property
    def stale_inputs(self) -> str | None:
        """Why the result no longer describes the store, or None: a dataset it read was replaced
        under the same name (another fingerprint), or an SAE it read was committed again."""
        if PROVENANCE not in self.artifact.files:
            return None  # nothing checked to compare with; .meta says why
        inputs = [i for i in self.meta.get("inputs") or [] if isinstance(i, dict)]
        why = stale.stale_inputs(self.store, f"analysis {self.name!r}", [p for i in inputs for p in stale.dataset_inputs(i)])
        if why is not None:
            return why
        for i in inputs:
            if isinstance(i.get("sae"), str) and "committed_at" in i:
                art = artifacts.get(self.store.storage, SAES, i["sae"])
                if art is not None and art.record.committed_at != i["committed_at"]:
                    return (f"analysis {self.name!r} read SAE {i['sae']!r} as committed at {i['committed_at']}, but that SAE was "
                            f"committed again at {art.record.committed_at}; compute it again under a new name, or remove it")
        return None

    def __repr__(self) -> str:
        return f"AnalysisHandle({self.name!r}, files={self.artifact.files})"

    def _repr_html_(self) -> str:
        """Jupyter's summary: kind, inputs (datasets and SAEs with their versions), plots, files
        and the first rows of the results."""
        return analysis_html(self)

    def plot(self, metric: str | None = None) -> Any:
        """The plot stored with the result (its PNG) as a matplotlib Figure, which Jupyter shows
        inline; with several plots (a layers analysis: one per metric) ``metric`` picks one. An
        analysis or metric without a plot is a one-line :class:`~strata.store.views.html.ViewError`
        naming the plots there are."""
        return analysis_plot(self, metric)

    @cached_property
    def meta(self) -> dict[str, Any]:
        """Its identity and provenance (``kind``, ``spec``, ``inputs``, ``provenance``,
        ``versions``), from ``provenance.json``: a checked file, the one source of these values.
        Results written before this carried a copy in their commit record, which nothing reads."""
        if PROVENANCE not in self.artifact.files:
            raise FormatVersionError(
                f"analysis {self.name!r} has no {PROVENANCE} (written by an older Strata): its provenance cannot be checked; "
                f"run its spec again under a new name, or delete it"
            )
        meta = self.artifact.read_json(PROVENANCE)
        if not isinstance(meta, dict):
            raise CorruptionError(f"analysis {self.name!r}: {PROVENANCE} is not a JSON object")
        return meta

    @property
    def files(self) -> list[str]:
        return self.artifact.files

    def read(self, rel: str) -> bytes:
        return self.artifact.read(rel)

    def table(self, rel: str = "results.parquet") -> pa.Table:
        try:
            return parquet.read(self.artifact.read(rel))
        except pa.ArrowInvalid as e:
            raise CorruptionError(f"analysis {self.name!r}: {rel} is not Parquet ({e})") from None

    @property
    def path(self) -> Path:
        return self.artifact.local_path()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
