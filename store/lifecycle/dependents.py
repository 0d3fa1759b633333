"""What was built from what: the dependency graph between a store's artifacts, read from what
each one recorded, and deleting an artifact with (or refusing it because of) its dependents.

    an SAE            was built from its dataset(s)       ``lineage.json``: ``dataset`` (or ``datasets``,
                                                          ``sources[].dataset``); else its commit's ``meta``
    a feature table   from its SAE and its dataset        the table's ``manifest.json``: ``sae``, ``dataset``
    an analysis       from datasets, SAEs, feature tables its commit's ``meta.inputs``: ``dataset``, ``sae``,
                                                          ``features`` of each input

A record that cannot be read (damaged, or a format this Strata does not know) is reported in
:attr:`Graph.damaged` and counts as depending on nothing: one damaged artifact never blocks
`strata rm` or `strata gc` of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from strata.store import layout
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts
from strata.store.commit.lease import Lease
from strata.store.datasets.catalog import delete_dataset
from strata.store.errors import LeaseHeldError, StrataError
from strata.store.features.format import FEATURES, load_info, table_dir
from strata.store.root import StoreRoot
from strata.store.saes.handles import SAES

log = logging.getLogger(__name__)

Kind = Literal["dataset", "sae", "features", "analysis"]
KINDS: tuple[Kind, ...] = ("dataset", "sae", "features", "analysis")
#: The folder under the store root that holds each kind.
FOLDERS: dict[str, str] = {"dataset": layout.DATASETS, "sae": SAES, "features": FEATURES, "analysis": ANALYSES}
_WORDS = {"dataset": "dataset", "sae": "SAE", "features": "feature table", "analysis": "analysis"}


@dataclass(frozen=True, order=True)
class Ref:
    """One artifact of the store: its kind and name."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in FOLDERS:
            raise ValueError(f"unknown artifact kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        self.prefix  # noqa: B018 - checks the name: names never become paths outside the store root

    @property
    def prefix(self) -> str:
        """Its folder under the store root."""
        if self.kind == "dataset":
            return layout.dataset_dir(self.name)
        if self.kind == "features":
            return table_dir(self.name)
        return artifacts.folder(FOLDERS[self.kind], self.name)

    def __str__(self) -> str:
        return f"{_WORDS[self.kind]} {self.name!r}"


@dataclass
class Graph:
    """Every artifact the store holds and what each was built from."""

    sources: dict[Ref, set[Ref]] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)  # records that could not be read, and why

    def dependents(self, ref: Ref) -> list[Ref]:
        """Everything built from ``ref``, directly or not, in the order to delete them: each
        before whatever it was built from (``ref`` itself is left out)."""
        direct: dict[Ref, set[Ref]] = {}
        for a, srcs in self.sources.items():
            for src in srcs:
                direct.setdefault(src, set()).add(a)
        out: list[Ref] = []
        seen = {ref}

        def visit(r: Ref) -> None:
            for d in sorted(direct.get(r, ())):
                if d not in seen:
                    seen.add(d)
                    visit(d)
                    out.append(d)  # after its own dependents

        visit(ref)
        return out


def _names(value: Any, key: str) -> Iterator[str]:
    """Strings under ``key`` anywhere in a JSON value (a name, or a list of names)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == key and isinstance(v, str):
                yield v
            elif k == key and isinstance(v, list):
                yield from (x for x in v if isinstance(x, str))
            else:
                yield from _names(v, key)
    elif isinstance(value, list):
        for v in value:
            yield from _names(v, key)


def _sae_sources(store: StoreRoot, name: str) -> set[Ref]:
    art = artifacts.get(store.storage, SAES, name)
    if art is None:
        return set()
    lin = art.read_json("lineage.json") if "lineage.json" in art.files else {}
    if not isinstance(lin, dict):
        lin = {}
    # Lineage fields only (not the spec or sae-lens's config inside it, which may name other things).
    found = {lin["dataset"]} if isinstance(lin.get("dataset"), str) else set()
    found |= {d for d in lin.get("datasets", []) if isinstance(d, str)} if isinstance(lin.get("datasets"), list) else set()
    found |= set(_names(lin.get("sources", []), "dataset"))
    if not found and isinstance(art.meta.get("dataset"), str):
        found.add(art.meta["dataset"])
    return {Ref("dataset", d) for d in found}


def _features_sources(store: StoreRoot, name: str) -> set[Ref]:
    info = load_info(store.storage, name)
    return set() if info is None else {Ref("sae", info.sae), Ref("dataset", info.dataset)}


def _analysis_sources(store: StoreRoot, name: str) -> set[Ref]:
    art = artifacts.get(store.storage, ANALYSES, name)
    if art is None:
        return set()
    inputs = art.meta.get("inputs", [])
    out = {Ref("dataset", d) for d in _names(inputs, "dataset")}
    out |= {Ref("sae", n) for n in _names(inputs, "sae")}
    out |= {Ref("features", n) for n in _names(inputs, "features")}
    return out


def _valid(kind: str, name: str) -> bool:
    try:
        Ref(kind, name)
    except StrataError:
        return False
    return True


def graph(store: StoreRoot) -> Graph:
    """The dependency graph of ``store``, read from its records (reads only)."""
    g = Graph()
    storage = store.storage
    for name in storage.list_dirs(layout.DATASETS):
        if storage.exists(f"{layout.DATASETS}/{name}/manifest.json") and _valid("dataset", name):
            g.sources[Ref("dataset", name)] = set()
    readers = (("sae", SAES, "commit.json", _sae_sources), ("features", FEATURES, "manifest.json", _features_sources),
               ("analysis", ANALYSES, "commit.json", _analysis_sources))
    for kind, folder, marker, read in readers:
        for name in storage.list_dirs(folder):
            if not storage.exists(f"{folder}/{name}/{marker}") or not _valid(kind, name):
                continue  # not committed (work in progress, which `strata gc` lists), or not a name Strata writes
            ref = Ref(kind, name)
            try:
                g.sources[ref] = read(store, name)
            except (StrataError, OSError, ValueError) as e:
                g.sources[ref] = set()
                g.damaged.append(f"{ref}: its record cannot be read ({e}); it is not counted as a dependent of anything")
    return g


# -- deleting ---------------------------------------------------------------------------------


def exists(store: StoreRoot, ref: Ref) -> bool:
    """Whether ``ref`` is in the store: committed, or (a feature table) its manifest written.
    A damaged record still counts: it can be deleted."""
    marker = "manifest.json" if ref.kind in ("dataset", "features") else artifacts.COMMIT
    return store.storage.exists(f"{ref.prefix}/{marker}")


def names(store: StoreRoot, kind: str) -> list[str]:
    folder = FOLDERS[kind]
    return [n for n in store.storage.list_dirs(folder) if _valid(kind, n) and exists(store, Ref(kind, n))]


def check_no_links(store: StoreRoot, ref: Ref) -> None:
    """Refuse an artifact that is, or holds, a symbolic link: deleting through it would delete
    (or create lease files) outside the store."""
    found = store.storage.links(ref.prefix)
    if found:
        raise StrataError(
            f"refusing to touch {ref}: {', '.join(found[:3])}{' ...' if len(found) > 3 else ''} is a symbolic link, and Strata "
            "never follows a link out of the store root; remove the link itself (or move the real files into the store)"
        )


def check_not_held(store: StoreRoot, refs: list[Ref]) -> None:
    """Refuse at once when a live job holds the lease of any of ``refs``, before any of them is
    deleted (each delete takes its lease again, so a job starting meanwhile is still refused)."""
    for ref in refs:
        lease = Lease(store.storage, ref.prefix, what=str(ref))
        cur = lease.holder()
        if cur is not None:
            raise LeaseHeldError(lease.held_message(cur))


def _lease(store: StoreRoot, ref: Ref, owner: str) -> Lease:
    return Lease(store.storage, ref.prefix, what=str(ref), owner=owner)


def delete(store: StoreRoot, ref: Ref, *, owner: str = "strata rm") -> None:
    """Delete one artifact under its own lease (refused while a job holds it): the record that
    makes it visible first (its manifest or commit record), so readers never see half of it."""
    check_no_links(store, ref)
    if ref.kind == "dataset":
        delete_dataset(store, ref.name)  # holds the dataset's lease, manifest first
        return
    storage = store.storage
    with _lease(store, ref, owner) as lease:
        lease.check()
        lease_prefix = f"{layout.lease_dir(ref.prefix)}/"
        keys = [k for k in storage.list(ref.prefix) if not k.startswith(lease_prefix)]
        first = f"{ref.prefix}/{'manifest.json' if ref.kind == 'features' else artifacts.COMMIT}"
        records = [k for k in keys if k.endswith(("/commit.json", "/manifest.json")) or "/commits/" in k]
        # The top record first (the artifact vanishes whole), then nested ones (checkpoints,
        # merged generations, unit records), then the files they named.
        for key in [first, *sorted(set(records) - {first}), *sorted(set(keys) - set(records) - {first})]:
            storage.delete(key)
