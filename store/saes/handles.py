"""What the store holds besides activation datasets, as seen from a notebook: SAEs (in
sae-lens's own layout) and analysis results, each a committed artifact folder
(:mod:`store.commit.artifacts`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from strata.store.commit import artifacts
from strata.store.commit import parquet
from strata.store.lifecycle import stale
from strata.store.commit.artifacts import Artifact, ArtifactNotFoundError
from strata.store.errors import CorruptionError, FormatVersionError, StaleArtifactError

if TYPE_CHECKING:
    from strata.store.core import Store

SAES = "saes"
ANALYSES = "analyses"
PROVENANCE = "provenance.json"  # an analysis's identity and provenance (analysis.similarity.runner writes it)


def _get(store: Store, kind: str, name: str, what: str) -> Artifact:
    art = artifacts.get(store.storage, kind, name)
    if art is None:
        have = artifacts.names(store.storage, kind)
        raise ArtifactNotFoundError(f"no {what} {name!r} in store {store.uri}; it holds: {', '.join(have) if have else f'no {what}s'}")
    return art


class SAEHandle:
    """A committed SAE: ``.load()`` (a sae-lens SAE), ``.lineage``, ``.metrics``, ``.path``
    (a folder ``sae_lens.SAE.load_from_disk`` accepts; S3 stores download to a local cache),
    ``.curves()``, ``.unseen_units()``, ``.check()`` (every file), ``.stale_inputs`` (its dataset
    replaced since: the weights load, ``unseen_units()`` refuses)."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.artifact = _get(store, SAES, name, "SAE")

    def __repr__(self) -> str:
        lin = self.lineage
        return f"SAEHandle({self.name!r}, dataset={lin.get('dataset')!r}, hook={lin.get('hook')!r})"

    @property
    def lineage(self) -> dict[str, Any]:
        """Which data the SAE saw and how it was trained (``lineage.json``)."""
        return self.artifact.read_json("lineage.json")

    @property
    def metrics(self) -> dict[str, Any]:
        """Its evaluation on the held-out units (``metrics.json``; empty when none was run)."""
        return self.artifact.read_json("metrics.json") if "metrics.json" in self.artifact.files else {}

    @property
    def cfg(self) -> dict[str, Any]:
        """sae-lens's ``cfg.json`` (architecture, d_in, d_sae, ...)."""
        return self.artifact.read_json("cfg.json")

    @property
    def meta(self) -> dict[str, Any]:
        """What the training job committed with it: ``config_hash`` and the resolved ``config``
        (how a rerun tells a finished SAE from the same name with another config)."""
        return self.artifact.meta

    @property
    def files(self) -> list[str]:
        return self.artifact.files

    @property
    def path(self) -> Path:
        return self.artifact.local_path()

    def load(self, device: str = "cpu") -> Any:
        """The SAE, through sae-lens (``SAE.load_from_disk``), after checking every file."""
        from sae_lens import SAE

        return SAE.load_from_disk(str(self.path), device=device)

    def check(self) -> None:
        """Check every file of the SAE against its commit record (the weights too, which
        ``.lineage`` and ``.cfg`` never read): raises :class:`CorruptionError` naming the SAE and
        the first damaged file. Jobs call it on the driver before dispatching work, so a damaged
        SAE is one clear error rather than workers crashing on load."""
        bad = artifacts.verify(self.store.storage, self.artifact)
        if bad:
            more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
            raise CorruptionError(f"SAE {self.name!r} in store {self.store.uri} is damaged: {bad[0]}{more}")

    def curves(self) -> pa.Table:
        """Training curves, one row per logged step (``curves.parquet``)."""
        try:
            return parquet.read(self.artifact.read("curves.parquet"))
        except pa.ArrowInvalid as e:
            raise CorruptionError(f"SAE {self.name!r}: curves.parquet is not Parquet ({e})") from None

    @property
    def stale_inputs(self) -> str | None:
        """Why the SAE's lineage no longer describes the store (its dataset was replaced under
        the same name: another fingerprint), or None. The weights still load; what pairs the
        SAE with its dataset refuses (:meth:`check_inputs`)."""
        return stale.stale_inputs(self.store, f"SAE {self.name!r}", stale.dataset_inputs(self.lineage))

    def check_inputs(self) -> None:
        """Raise :class:`~store.errors.StaleArtifactError` when :attr:`stale_inputs` is set:
        before reading the SAE's dataset through its lineage."""
        why = self.stale_inputs
        if why is not None:
            raise StaleArtifactError(why)

    def unseen_units(self) -> list[int]:
        """Units of its dataset committed for its hook that it was neither trained nor
        evaluated on (the dataset grew since). :class:`~store.errors.StaleArtifactError` when
        the dataset was replaced: its units are not the ones the lineage names."""
        self.check_inputs()
        lin = self.lineage
        ds = self.store.dataset(lin["dataset"])
        seen = set(lin.get("units", [])) | set(lin.get("holdout_units", []))
        return [u for u in ds.committed_units(lin["hook"]) if u not in seen]


class AnalysisHandle:
    """A committed analysis result: ``.table()`` (its results), ``.meta`` (provenance),
    ``.files`` and ``.read(name)``."""

    def __init__(self, store: Store, name: str, *, allow_stale: bool = False) -> None:
        self.store = store
        self.name = name
        self.artifact = _get(store, ANALYSES, name, "analysis")
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
