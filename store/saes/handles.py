"""SAEs as a notebook sees them: each a committed artifact folder (:mod:`strata.store.commit.artifacts`)
in sae-lens's own layout, with its lineage, metrics and training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from strata.store.commit import artifacts, parquet
from strata.store.datasets import stale
from strata.store.datasets.reader import open_dataset
from strata.store.errors import CorruptionError, StaleArtifactError
from strata.store.root import StoreRoot
from strata.store.saes.crosscoder import load_crosscoder
from strata.store.saes.topk_transcoder import is_topk_transcoder
from strata.store.saes.topk_transcoder import load as load_topk_transcoder
from strata.store.views.summaries import sae_html

#: The store folder SAEs live in.
SAES = "saes"


def load_folder(path: str | Path, device: str = "cpu") -> Any:
    """The model of an SAE folder, by its cfg.json ``architecture``: Strata's own layouts through
    their loaders in ``store/saes/`` (torch and safetensors only), any other through sae-lens's
    ``SAE.load_from_disk``."""
    cfg = json.loads((Path(path) / "cfg.json").read_text(encoding="utf-8"))
    if is_topk_transcoder(cfg):
        return load_topk_transcoder(path, device=device)  # torch only when called (store.saes.topk_transcoder)
    if cfg.get("architecture") == "crosscoder":
        return load_crosscoder(path, device=device)  # torch only when called (store.saes.crosscoder)
    from sae_lens import SAE  # lazy: sae-lens (and torch under it) loads in seconds; listing SAEs must not wait

    return SAE.load_from_disk(str(path), device=device)


class SAEHandle:
    """A committed SAE: ``.load()`` (a sae-lens SAE), ``.lineage``, ``.metrics``, ``.path``
    (a folder ``sae_lens.SAE.load_from_disk`` accepts; S3 stores download to a local cache),
    ``.curves()``, ``.unseen_units()``, ``.check()`` (every file), ``.stale_inputs`` (its dataset
    replaced since: the weights load, ``unseen_units()`` refuses)."""

    def __init__(self, store: StoreRoot, name: str) -> None:
        self.store = store
        self.name = name
        self.artifact = artifacts.require(store, SAES, name, what="SAE")

    def __repr__(self) -> str:
        lin = self.lineage
        return f"SAEHandle({self.name!r}, dataset={lin.get('dataset')!r}, hook={lin.get('hook')!r})"

    def _repr_html_(self) -> str:
        """Jupyter's summary: lineage, architecture, metrics (FVU, L0, dead fraction, CE), files."""
        return sae_html(self)

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
        """The SAE, through sae-lens (``SAE.load_from_disk``), or through Strata's own loader for
        Strata's layouts (:func:`load_folder`)."""
        return load_folder(self.path, device=device)

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
        ds = open_dataset(self.store, lin["dataset"])
        seen = set(lin.get("units", [])) | set(lin.get("holdout_units", []))
        return [u for u in ds.committed_units(lin["hook"]) if u not in seen]
