"""Whether an artifact still describes the store's data: every SAE, feature table and analysis
records the fingerprint of each dataset it was built from (and an analysis the commit time of
each SAE it read). A dataset removed and made again under the same name with another identity
(another corpus, model or tokenizer) leaves such an artifact *stale*: its numbers are about
data the store no longer holds, so pairing it with the dataset now there (its tokens, its
committed units) would be wrong without any error.

:func:`stale_inputs` says why an artifact is stale (None when it is not); :func:`check_inputs`
raises :class:`~store.errors.StaleArtifactError` with that reason, naming both fingerprints. A
dataset that is gone altogether is not stale here: reads that need it fail on their own with
:class:`~store.errors.DatasetNotFoundError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from strata.store.datasets.manifest import load_manifest
from strata.store.errors import DatasetNotFoundError, StaleArtifactError
from strata.store.layout import check_name
from strata.store.root import StoreRoot


def current_fingerprint(store: StoreRoot, dataset: str) -> str | None:
    """The fingerprint of the dataset now committed under ``dataset``, or None when there is none."""
    try:
        return load_manifest(store.storage, check_name(dataset)).fingerprint
    except (DatasetNotFoundError, FileNotFoundError):
        return None


def dataset_inputs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(dataset, fingerprint)`` pairs a lineage or input record names: its own ``dataset`` and
    ``fingerprint``, and those of any ``sources`` it lists (a crosscoder's)."""
    out = []
    for r in [record, *(record.get("sources") or [])]:
        if isinstance(r, Mapping) and isinstance(r.get("dataset"), str) and isinstance(r.get("fingerprint"), str):
            out.append((r["dataset"], r["fingerprint"]))
    return out


def stale_inputs(store: StoreRoot, what: str, inputs: Iterable[tuple[str, str]]) -> str | None:
    """Why ``what`` (e.g. ``"feature table 'ft'"``) no longer matches the store, or None."""
    for dataset, recorded in inputs:
        now = current_fingerprint(store, dataset)
        if now is not None and now != recorded:
            return (f"{what} was built from dataset {dataset!r} with fingerprint {recorded}, but that dataset now has fingerprint "
                    f"{now} (it was replaced under the same name); rebuild it from the new dataset, or remove it")
    return None


def check_inputs(store: StoreRoot, what: str, inputs: Iterable[tuple[str, str]]) -> None:
    """Raise :class:`StaleArtifactError` when :func:`stale_inputs` finds a reason."""
    why = stale_inputs(store, what, inputs)
    if why is not None:
        raise StaleArtifactError(why)
