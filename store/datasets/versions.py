"""Dataset versions: a dataset made again after its model's revision moved is a new dataset
(``strata reprocess`` names it by its ``version_pattern``, ``{name}@{revision:.8}`` by default)
whose manifest records ``meta["version_of"]``, the name it is a version of. The base dataset and
every dataset made from it are the versions of that name, oldest first."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from strata.store.datasets.manifest import DatasetInfo, dataset_names, load_manifest
from strata.store.errors import CorruptionError, DatasetNotFoundError, FormatVersionError
from strata.store.root import StoreRoot

log = logging.getLogger(__name__)

LATEST = "latest"


@dataclass(frozen=True)
class DatasetVersion:
    """One version of a dataset, as :meth:`store.Store.versions` lists them."""

    name: str
    """The dataset's own name in the store (``s.dataset(v.name)`` opens it)."""
    base: str
    """The name it is a version of (the first version's name)."""
    revision: str | None
    """The model revision it was made with, as the manifest records it (a commit hash, or
    ``local-xxh3:HEX`` for a local model folder)."""
    created_at: str
    """When the dataset was created (UTC, ISO 8601): versions are ordered by it."""
    model: str | None
    """The model it was made with."""

    @property
    def short(self) -> str:
        """The revision's first 8 hex digits, as ``{revision:.8}`` names a version."""
        return revision_value(self.revision)[:8] if self.revision else "-"


def revision_value(revision: str) -> str:
    """The hash of a revision: a commit hash as it is, a local folder's ``local-xxh3:HEX`` as HEX."""
    return revision.split(":", 1)[-1]


def base_of(info: DatasetInfo, *, infos: dict[str, DatasetInfo]) -> str:
    """The name a dataset is a version of (its own name when it is no other's version).

    Versions made before the manifest recorded ``version_of`` are recognised by the default
    pattern's ``NAME@...``, when NAME is gone or holds the same model."""
    recorded = info.meta.get("version_of")
    if isinstance(recorded, str) and recorded:
        return recorded
    if "@" in info.name:
        stem = info.name.split("@", 1)[0]
        other = infos.get(stem)
        if stem and (other is None or other.meta.get("model") == info.meta.get("model")):
            return stem
    return info.name


def readable_infos(s: StoreRoot) -> dict[str, DatasetInfo]:
    """The manifests of every committed dataset that can be read (a damaged one is left out:
    `strata ls` and `strata verify` report it)."""
    out: dict[str, DatasetInfo] = {}
    for name in dataset_names(s.storage):
        try:
            out[name] = load_manifest(s.storage, name)
        except (CorruptionError, FormatVersionError, DatasetNotFoundError) as e:
            log.warning("dataset %r left out of the versions: %s", name, e)
    return out


def families(infos: dict[str, DatasetInfo]) -> dict[str, list[DatasetVersion]]:
    """Every base name and its versions, oldest first."""
    out: dict[str, list[DatasetVersion]] = {}
    for info in infos.values():
        base = base_of(info, infos=infos)
        out.setdefault(base, []).append(DatasetVersion(
            name=info.name, base=base, revision=info.meta.get("revision"), created_at=info.created_at, model=info.meta.get("model"),
        ))
    for vs in out.values():
        vs.sort(key=lambda v: (v.created_at, v.name != v.base, v.name))
    return out


def versions(s: StoreRoot, name: str) -> list[DatasetVersion]:
    """The versions of dataset ``name`` (or of the one ``name`` is a version of), oldest first; an
    unknown name is an error that lists the datasets."""
    infos = readable_infos(s)
    fams = families(infos)
    # A version's own name stands for its family too: "the versions of tiny@1a2b3c4d" are tiny's.
    found = fams.get(name) or (fams[base_of(infos[name], infos=infos)] if name in infos else None)
    if not found:
        held = sorted(infos)
        raise DatasetNotFoundError(f"no dataset {name!r} and no version of it in store {s.uri}; "
                                   f"it holds: {', '.join(held) if held else 'no datasets'}")
    return found


def describe(vs: list[DatasetVersion]) -> str:
    return ", ".join(f"{v.name} (revision {v.short}, {v.created_at})" for v in vs)


def pick(s: StoreRoot, name: str, version: str) -> str:
    """The name of the dataset that ``s.dataset(name, version=...)`` opens: ``"latest"`` is the
    newest version; otherwise a revision prefix (or a version's own name) that picks exactly one."""
    if not isinstance(version, str) or not version:
        raise ValueError(f"`version` must be 'latest' or a revision (a prefix of its hash), got {version!r}")
    vs = versions(s, name)
    if version == LATEST:
        return vs[-1].name
    wanted = version.lower()
    hits = [v for v in vs if v.name == version or (v.revision is not None and (
        revision_value(v.revision).lower().startswith(wanted) or v.revision.lower().startswith(wanted)))]
    if len({v.name for v in hits}) == 1:
        return hits[0].name
    if not hits:
        raise DatasetNotFoundError(f"dataset {name!r} has no version of revision {version!r}; its versions, oldest first: "
                                   f"{describe(vs)}; pass version='latest' or a revision prefix")
    raise DatasetNotFoundError(f"revision {version!r} matches several versions of dataset {name!r} ({describe(hits)}); "
                               "give more of the revision")
