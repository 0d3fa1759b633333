"""Verify and repair every artifact of a store: activation datasets, SAEs (with their training
checkpoints), feature tables and analysis results (``strata verify STORE``).

Each artifact is checked on its own: a damaged one is reported and never stops the others from
being checked (or read). What is checked is what reads depend on: every commit record (each
carries its own checksum) and every file it names, the manifests (checksummed too), and for a
dataset its driver-written files (see :mod:`store.datasets.verify`). On a local store a symbolic link
anywhere inside is a problem: Strata never follows one, and it would make a folder's contents
something other than what was committed.

Repair removes what is damaged, holding the artifact's write lease, and says which job to rerun:

* dataset: :func:`store.datasets.verify.repair` (damaged units, commit index, Zarr metadata, document
  index, tokenizer, tokenized corpus shards and the units they fed); rerun the extraction.
* a dataset folder with tokenized shards and no manifest (a ``strata extract --dry-run``'s, kept for
  the extraction that reuses them): not damage, checked all the same (a damaged shard would fail that
  extraction) and noted as planned; repair removes a damaged shard (the extraction tokenizes it again).
* SAE, analysis, checkpoint: the commit record (the artifact vanishes whole), then the files it
  names; rerun the training or analysis job (training resumes from intact checkpoints).
* feature table: a damaged unit's record and file (the encode job recomputes that unit); a damaged
  merged generation (the manifest stops naming it; the encode job merges again); a damaged
  manifest (the encode job writes it again and keeps the intact units it finds).

A damaged dataset manifest is not removed: it is the only record of the dataset's unit grid, and
removing it would orphan every unit. Verify says so; the user restores it or deletes the dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from strata.store import layout
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts, protocol
from strata.store.datasets.manifest import dataset_names
from strata.store.datasets.reader import open_dataset
from strata.store.datasets.tokenized import shards_kind
from strata.store.datasets.verify import VerifyReport
from strata.store.datasets.writer import dataset_lease
from strata.store.errors import CorruptionError, FormatVersionError, StrataError
from strata.store.features import format as feature_format
from strata.store.features.merge import load_generation
from strata.store.features.table import table_names
from strata.store.features.writer import table_lease
from strata.store.root import StoreRoot
from strata.store.saes.handles import SAES

log = logging.getLogger(__name__)

#: The kinds `strata verify --kind` takes, and the folder each lives in.
KINDS = {"dataset": layout.DATASETS, "sae": SAES, "features": feature_format.FEATURES, "analysis": ANALYSES}
_RERUN = {
    "dataset": "rerun its extraction (`strata extract SPEC`)",
    "sae": "rerun its training (`strata sae train SPEC`; it resumes from intact checkpoints)",
    "features": "rerun its encode job (`strata features encode SPEC`)",
    "analysis": "rerun the analysis job that wrote it (`strata similarity SPEC` or `strata analyze SPEC`)",
}


@dataclass
class Check:
    """The outcome of checking one artifact."""

    kind: str
    name: str
    problems: list[str] = field(default_factory=list)  # "KEY: what is wrong"
    notes: list[str] = field(default_factory=list)  # worth saying, not a failure
    files: int = 0
    nbytes: int = 0
    dataset: VerifyReport | None = None  # a dataset's own report
    damaged: dict[str, Any] = field(default_factory=dict)  # what repair needs to know, by part
    links: list[str] = field(default_factory=list)  # symbolic links inside the artifact's folder

    @property
    def ok(self) -> bool:
        if self.dataset is not None:
            return self.dataset.ok and not self.links
        return not self.problems and not self.links

    def __str__(self) -> str:
        if self.dataset is not None:
            lines = [f"dataset {self.dataset}"]
        elif self.kind == "dataset" and self.problems and "shards" not in self.damaged:  # its manifest: nothing else could be checked
            lines = [f"dataset {self.name}: {'DAMAGED' if 'manifest' in self.damaged else 'UNREADABLE'}: {p}" for p in self.problems]
        else:
            state = "OK" if self.ok else f"{len(self.problems) + len(self.links)} problem(s)"
            lines = [f"{self.kind} {self.name}: {state}: {self.files} files, {self.nbytes / 2**20:.1f} MiB checked"]
            lines += [f"  {p}" for p in self.problems]
        lines += [f"  {k}: a symbolic link inside the store (Strata never follows one)" for k in self.links]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class StoreReport:
    uri: str
    checks: list[Check] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # symbolic links outside any artifact's folder

    @property
    def ok(self) -> bool:
        return not self.links and all(c.ok for c in self.checks)

    def __str__(self) -> str:
        if not self.checks and not self.links:
            return f"{self.uri}: nothing to verify"
        lines = [str(c) for c in self.checks]
        lines += [f"{k}: a symbolic link inside the store (Strata never follows one)" for k in self.links]
        return "\n".join(lines)


def names_of(store: StoreRoot, kind: str) -> list[str]:
    """The artifacts of a kind that verify checks."""
    if kind == "dataset":
        return sorted(dataset_names(store.storage) + planned_names(store))
    if kind == "features":
        return table_names(store)
    return artifacts.names(store.storage, KINDS[kind])


def planned_names(store: StoreRoot) -> list[str]:
    """Dataset folders with committed tokenized shards and no manifest: a dry run's plan."""
    out = []
    for n in store.storage.list_dirs(layout.DATASETS):
        try:
            kind = shards_kind(n)
        except StrataError:  # a name Strata never writes: not ours to check
            continue
        if not store.storage.exists(layout.manifest_key(n)) and artifacts.names(store.storage, kind):
            out.append(n)
    return out


def check_kinds(kinds: Sequence[str] | None) -> list[str]:
    kinds = list(KINDS) if not kinds else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown artifact kind(s) {bad}; valid: {', '.join(KINDS)}")
    return kinds


def verify_store(store: StoreRoot, *, kinds: Sequence[str] | None = None, name: str | None = None,
                 committed_only: bool = False) -> StoreReport:
    """Check every artifact of ``kinds`` (default all), or only those called ``name``. An
    unknown ``name`` raises :class:`~store.commit.artifacts.ArtifactNotFoundError` listing what there is."""
    kinds = check_kinds(kinds)
    report = StoreReport(store.uri)
    todo = [(k, n) for k in kinds for n in names_of(store, k) if name is None or n == name]
    if name is not None and not todo:
        held = "; ".join(f"{k}: {', '.join(ns)}" for k in kinds if (ns := names_of(store, k)))
        raise artifacts.ArtifactNotFoundError(
            f"no {' or '.join(kinds)} called {name!r} in store {store.uri}; it holds {held or 'nothing of those kinds'}"
        )
    links = symlinks(store)
    for kind, n in todo:
        check = Check(kind, n)
        try:
            _CHECKERS[kind](store, n, check, committed_only=committed_only)
        except (StrataError, OSError, ValueError) as e:  # one artifact never stops the others
            check.problems.append(f"{KINDS[kind]}/{n}: could not be checked ({e})")
            check.damaged["unreadable"] = str(e)
            check.dataset = None
        prefix = f"{KINDS[kind]}/{n}/"
        check.links = [k for k in links if k.startswith(prefix)]
        report.checks.append(check)
    owned = tuple(f"{KINDS[k]}/{n}/" for k, n in todo)
    scope = ("",) if len(kinds) == len(KINDS) else tuple(f"{KINDS[k]}/" for k in kinds)  # narrowed: links of those kinds only
    report.links = [k for k in links if k.startswith(scope) and not k.startswith(owned)] if name is None else []
    return report


def symlinks(store: StoreRoot) -> list[str]:
    """Keys of symbolic links inside the store (none can exist on S3); never followed."""
    return store.storage.links("")


# -- checks ------------------------------------------------------------------------------------


def _check_dataset(store: StoreRoot, name: str, check: Check, *, committed_only: bool) -> None:
    if not store.storage.exists(layout.manifest_key(name)):
        _check_planned(store, name, check)
        return
    try:
        ds = open_dataset(store, name)
    except CorruptionError as e:
        check.problems.append(str(e))
        check.damaged["manifest"] = str(e)
        return
    except FormatVersionError as e:  # written by another Strata: not damage, but not checked either
        check.problems.append(str(e))
        return
    check.dataset = ds.verify(committed_only=committed_only)


def _check_planned(store: StoreRoot, name: str, check: Check) -> None:
    """A dry run's tokenized shards (no dataset yet): each record and the files it names."""
    kind = shards_kind(name)
    keys = artifacts.names(store.storage, kind)
    for key in keys:
        try:
            art = artifacts.get(store.storage, kind, key)
        except CorruptionError as e:
            check.problems.append(f"{kind}/{key}/{artifacts.COMMIT}: {e}")
            check.damaged.setdefault("shards", []).append(key)
            continue
        if art is None:
            continue  # removed meanwhile
        check.files += 1
        if _check_files(store.storage, art.record.files, check):
            check.damaged.setdefault("shards", []).append(key)
    check.notes.append(f"planned by a dry run: {len(keys)} tokenized shard(s), no dataset yet (its extraction reuses them)")


def _check_files(storage: Any, files: Sequence[protocol.FileEntry], check: Check) -> list[str]:
    bad = []
    for f in files:
        msg = protocol.verify_file(storage, f)
        check.files += 1
        check.nbytes += f.nbytes
        if msg is not None:
            check.problems.append(f"{f.key}: {msg}")
            bad.append(f.key)
    return bad


def _check_folder(storage: Any, kind: str, name: str, check: Check) -> None:
    """A committed artifact folder: its record and every file it names."""
    prefix = artifacts.folder(kind, name)
    try:
        art = artifacts.get(storage, kind, name)
    except CorruptionError as e:
        check.problems.append(f"{prefix}/{artifacts.COMMIT}: {e}")
        check.damaged.setdefault("folders", []).append((kind, name, None))
        return
    if art is None:
        return
    check.files += 1  # the record
    if _check_files(storage, art.record.files, check):
        check.damaged.setdefault("folders", []).append((kind, name, art.record))


def _check_sae(store: StoreRoot, name: str, check: Check, *, committed_only: bool) -> None:
    _check_folder(store.storage, SAES, name, check)
    ckpt = f"{SAES}/{name}/checkpoints"
    for step in artifacts.names(store.storage, ckpt):
        _check_folder(store.storage, ckpt, step, check)


def _check_analysis(store: StoreRoot, name: str, check: Check, *, committed_only: bool) -> None:
    _check_folder(store.storage, ANALYSES, name, check)


def _check_features(store: StoreRoot, name: str, check: Check, *, committed_only: bool) -> None:
    storage = store.storage
    key = feature_format.manifest_key(name)
    try:
        info = feature_format.load_info(storage, name)
    except CorruptionError as e:
        check.problems.append(f"{key}: {e}")
        check.damaged["manifest"] = True
        return
    if info is None:
        return
    check.files += 1
    if b'"checksum"' not in storage.read(key):
        check.notes.append(f"{key} has no checksum (written by an older Strata); the next encode job writes it with one")
    good, bad = feature_format.unit_records(storage, info)
    for unit, msg in sorted(bad.items()):
        check.problems.append(f"{feature_format.commit_key(name, unit)}: {msg}")
    bad_units = set(bad)
    for unit, rec in sorted(good.items()):
        check.files += 1
        if _check_files(storage, rec.files, check):
            bad_units.add(unit)
    check.damaged["units"] = sorted(bad_units)
    if info.merged:
        try:
            gen = load_generation(storage, info, info.merged)
        except CorruptionError as e:
            check.problems.append(f"{feature_format.merged_dir(name)}/{info.merged}/commit.json: {e}")
            check.damaged["generation"] = info.merged
            return
        check.files += 1
        if _check_files(storage, list(gen.files.values()), check):
            check.damaged["generation"] = info.merged


_CHECKERS = {"dataset": _check_dataset, "sae": _check_sae, "features": _check_features, "analysis": _check_analysis}


# -- repair ------------------------------------------------------------------------------------


def repair_store(store: StoreRoot, report: StoreReport) -> list[str]:
    """Repair what ``report`` found, artifact by artifact (each under its own write lease).
    Returns what was done and what to rerun, one line each."""
    out: list[str] = []
    for link in report.links:
        out.append(_remove_link(store, link))
    for check in report.checks:
        if check.ok:
            continue
        try:
            out += [_remove_link(store, k) for k in check.links]
            out += _REPAIRERS[check.kind](store, check)
        except StrataError as e:  # e.g. its lease is held by a running job: the others are still repaired
            out.append(f"{check.kind} {check.name}: not repaired ({e})")
    return out


def _remove_link(store: StoreRoot, key: str) -> str:
    store.storage.delete(key)  # unlinks the link itself, never its target
    return f"{key}: removed the symbolic link"


def _repair_dataset(store: StoreRoot, check: Check) -> list[str]:
    if check.damaged.get("shards"):  # a dry run's: no units were made from them yet
        out = []
        with dataset_lease(store.storage, check.name, owner="strata verify --repair") as lease:
            for key in check.damaged["shards"]:
                artifacts.delete(store.storage, shards_kind(check.name), key, lease=lease)
                out.append(f"{shards_kind(check.name)}/{key}: removed the damaged tokenized shard (the extraction tokenizes it again)")
        return out
    if check.dataset is None and "manifest" not in check.damaged:
        return [f"dataset {check.name}: not repaired: it could not be checked ({check.damaged.get('unreadable')})"]
    if check.dataset is None:
        return [f"dataset {check.name}: not repaired: its manifest is damaged and is the only record of its unit grid; "
                f"restore {layout.manifest_key(check.name)} from a copy, or delete the dataset and {_RERUN['dataset']}"]
    if not check.dataset.problems:
        return []  # incomplete only: nothing is damaged
    rep = open_dataset(store, check.name).repair(check.dataset)
    return [str(rep)]


def _repair_folders(store: StoreRoot, check: Check) -> list[str]:
    out = []
    for kind, name, rec in check.damaged.get("folders", []):
        with artifacts.lease(store.storage, kind, name, owner="strata verify --repair") as lease:
            prefix = artifacts.folder(kind, name)
            lease.check()
            store.storage.delete(f"{prefix}/{artifacts.COMMIT}")  # the record first: it vanishes whole
            for f in rec.files if rec is not None else ():  # a damaged record's files are left to `strata gc`
                store.storage.delete(f.key)
        out.append(f"{kind}/{name}: removed (its commit record{' and files' if rec is not None else ''})")
    if out:
        out.append(f"  {check.kind} {check.name}: {_RERUN[check.kind]} to rebuild it")
    return out


def _repair_features(store: StoreRoot, check: Check) -> list[str]:
    storage, name = store.storage, check.name
    out = []
    with table_lease(storage, name, owner="strata verify --repair") as lease:
        if check.damaged.get("manifest"):
            lease.check()
            storage.delete(feature_format.manifest_key(name))
            out.append(f"features {name}: removed its damaged manifest (the encode job writes it again and keeps the intact units)")
        for unit in check.damaged.get("units", []):
            lease.check()
            storage.delete(feature_format.commit_key(name, unit))  # the record first: the unit is invisible
            pattern = feature_format.unit_key_pattern(name, unit)
            for key in storage.list(feature_format.units_dir(name)):
                if pattern.fullmatch(key):
                    storage.delete(key)
            out.append(f"features {name}: removed unit {unit}")
        gen = check.damaged.get("generation")
        if gen:
            info = feature_format.load_info(storage, name)
            if info is not None and info.merged == gen:
                lease.check()
                feature_format.write_info(storage, info.with_changes(merged=None, updated_at=protocol.utcnow()))
            prefix = feature_format.generation_dir(name, gen)
            storage.delete(f"{prefix}/commit.json")
            for key in storage.list(prefix):
                storage.delete(key)
            out.append(f"features {name}: removed merged generation {gen} (statistics, top rows, feature-major copy)")
    if out:
        out.append(f"  features {name}: {_RERUN['features']} to rebuild it")
    return out


_REPAIRERS = {"dataset": _repair_dataset, "sae": _repair_folders, "features": _repair_features, "analysis": _repair_folders}
