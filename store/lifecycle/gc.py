"""Garbage collection: files that no commit record (or manifest) references, left by crashed or
losing attempts, older than a grace period.

What is collected, per dataset: token files of attempts that lost or crashed (a committed unit's
token file is the one its record names); shards of units with no commit record (a writer died
between its shard and its record); document-index and tokenizer files the manifest no longer
points at; temporary ``.partial`` files; tokenized corpus shards
(``datasets/NAME/shards/KEY/``) the dataset's plan (its shards table) no longer names (a changed
shard's old tokenization, a failed attempt's), and the files of a shard folder never committed (a
task that died before its record). Per feature table: unit files no commit record names
(a failed attempt's) and merged generations that were never committed. Per artifact folder
(SAEs, analyses, checkpoints): the files of a folder that was never committed. Never a file a
commit record names.

Work in progress is listed apart (:attr:`GcReport.in_progress`) and never collected, whatever
its age: anything under a lease a live job holds (its in-flight attempts included), the
checkpoints of an unfinished SAE run (its rerun resumes from them), a feature table whose encode
job has not finished, a dataset folder with committed tokenized shards and no manifest (a
``strata extract --dry-run``'s: the extraction that follows reuses them). Only ``abandoned=[NAME]`` (``strata gc --abandoned NAME``) deletes one,
under its lease.

Safety: a damaged commit record makes what it may name off limits (we cannot tell what it
names) and is reported, never an error for the whole store; only files older than the grace
period are collected (a live writer publishes its file milliseconds before its record; one hour
by default is ample); a symbolic link is never followed, only listed as foreign.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from strata.store import layout
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts
from strata.store.commit.artifacts import COMMIT
from strata.store.commit.lease import Lease
from strata.store.datasets.reader import open_dataset
from strata.store.datasets.tokenized import DOCS, TOKENS, shards_kind
from strata.store.datasets.verify import REMOVED
from strata.store.errors import StrataError
from strata.store.features.format import FEATURES, load_info, merged_dir, unit_records, units_dir
from strata.store.root import StoreRoot
from strata.store.saes.handles import SAES
from strata.store.storage import Storage

log = logging.getLogger(__name__)

ARTIFACT_KINDS = (SAES, ANALYSES)
_KIND_OF = {layout.DATASETS: "dataset", SAES: "sae", FEATURES: "features", ANALYSES: "analysis"}


@dataclass
class Garbage:
    key: str
    nbytes: int
    age_s: float
    why: str


@dataclass
class InProgress:
    """Work that belongs to a run: never collected unless named with ``abandoned``."""

    kind: str  # "dataset" | "sae" | "features" | "analysis"
    name: str
    prefix: str
    state: str  # what it is, in words
    keys: list[str]
    nbytes: int
    live: bool  # a job holds its lease now


@dataclass
class GcReport:
    garbage: list[Garbage] = field(default_factory=list)
    in_progress: list[InProgress] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # symbolic links: never followed, left alone
    skipped: list[str] = field(default_factory=list)  # what was left alone, and why (damaged records)
    deleted: int | None = None  # files deleted by :func:`apply`; None before

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.garbage)

    def __str__(self) -> str:
        lines = [f"{g.key}\t{g.nbytes:,} bytes\t{g.age_s / 3600:.1f} h old\t{g.why}" for g in self.garbage]
        for w in self.in_progress:
            files = "" if w.live else f"{len(w.keys)} file(s), {w.nbytes / 2**20:.1f} MiB\t"
            lines.append(f"in progress {w.prefix}\t{files}{w.state}")
        lines += [f"foreign {k}\ta symbolic link: never followed, left alone (remove it yourself)" for k in self.foreign]
        lines += [f"skipped {s}" for s in self.skipped]
        size = f"{self.nbytes / 2**20:.1f} MiB"
        if self.deleted is None:
            lines.append(f"would delete {len(self.garbage)} file(s), {size}")
        elif self.deleted == len(self.garbage):
            lines.append(f"deleted {self.deleted} file(s), {size}")
        else:
            lines.append(f"deleted {self.deleted} of {len(self.garbage)} file(s) ({len(self.garbage) - self.deleted} were no longer garbage)")
        return "\n".join(lines)


def links(storage: Storage) -> list[str]:
    """Keys of the store that are symbolic links (to a folder or a file). No Strata command
    follows one: ``verify`` reports them, ``gc`` lists them as foreign, ``rm`` refuses them."""
    return storage.links("")


class _Leases:
    """Live-lease checks, cached per folder for one pass."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._seen: dict[str, dict | None] = {}

    def holder(self, prefix: str) -> dict | None:
        if prefix not in self._seen:
            self._seen[prefix] = Lease(self.storage, prefix, what=prefix).holder()
        return self._seen[prefix]

    def state(self, prefix: str) -> str:
        h = self.holder(prefix) or {}
        return f"in flight: {h.get('owner') or 'a job'} (pid {h.get('pid')} on {h.get('host')}) holds its lease"


def _age(storage: Storage, key: str, now: float) -> float:
    try:
        return now - storage.modified(key)
    except FileNotFoundError:
        return -1.0


def _size(storage: Storage, key: str) -> int:
    try:
        return storage.size(key)
    except FileNotFoundError:
        return 0


class _Pass:
    def __init__(self, store: StoreRoot, grace_s: float, report: GcReport) -> None:
        self.store, self.storage, self.grace_s, self.report = store, store.storage, grace_s, report
        self.now = time.time()
        self.leases = _Leases(store.storage)

    def garbage(self, key: str, why: str) -> None:
        age = _age(self.storage, key, self.now)
        if age >= self.grace_s:
            self.report.garbage.append(Garbage(key, _size(self.storage, key), age, why))

    def files(self, prefix: str) -> list[str]:
        lease_prefix = f"{layout.lease_dir(prefix)}/"
        return [k for k in self.storage.list(prefix) if not k.startswith(lease_prefix)]

    def held(self, kind: str, name: str, prefix: str, state: str, *, live: bool = False) -> None:
        # Work a live job holds is never deleted, so its files are not even listed (a dataset
        # being extracted may hold thousands).
        keys = [] if live else self.files(prefix) + self.storage.list_temporary(prefix)
        self.report.in_progress.append(InProgress(kind, name, prefix, state, keys, sum(_size(self.storage, k) for k in keys), live))

    def live(self, kind: str, name: str, prefix: str) -> bool:
        if self.leases.holder(prefix) is None:
            return False
        self.held(kind, name, prefix, self.leases.state(prefix), live=True)
        return True

    # -- datasets -----------------------------------------------------------------------------

    def dataset(self, name: str) -> None:
        prefix = layout.dataset_dir(name)
        if self.live("dataset", name, prefix):
            return
        try:
            ds = open_dataset(self.store, name)
        except StrataError as e:
            self.report.skipped.append(f"dataset {name!r}: {e}")
            return
        referenced: set[str] = set()
        off_limits: set[int] = {u for (_h, u) in ds.damaged}
        committed = {hook: set(ds.committed_units(hook)) for hook in ds.info.hooks}
        for hook in [None, *ds.info.hooks]:
            for u in ds.committed_units(hook):
                referenced.update(f.key for f in ds.record(hook, u).files)
        referenced.update(e["key"] for e in ds.info.aux.values())
        try:
            plan = ds.shards()
        except StrataError as e:  # a damaged plan: we cannot tell which tokenized shards it names
            self.report.skipped.append(f"dataset {name!r}: its shards table is unreadable ({e}); its tokenized shards are left alone")
        else:
            named = set() if plan is None else {k.removesuffix(REMOVED) for k in plan.column("key").to_pylist()}
            self.tokenized_shards(name, named)
        keep_prefixes = (f"{prefix}/commits/", f"{prefix}/lease/", f"{prefix}/manifest.json", f"{prefix}/verify.json",
                         f"{shards_kind(name)}/")
        for key in self.storage.list(prefix):
            if key in referenced or key.startswith(keep_prefixes) or key.endswith("zarr.json"):
                continue
            why = None
            if key.startswith(f"{layout.tokens_dir(name)}/unit-"):
                unit = int(key.rsplit("/", 1)[-1].split(".")[0].removeprefix("unit-"))
                why = None if unit in off_limits else "token file of an attempt that lost or crashed"
            elif "/acts/" in key and "/c/" in key:
                unit = int(key.rsplit("/c/", 1)[1].split("/")[0])
                hook = key.split("/acts/", 1)[1].split("/c/", 1)[0]
                if unit not in off_limits and unit not in committed.get(hook, set()):
                    why = "shard of a unit with no commit record (its writer died)"
            elif key.startswith(f"{layout.aux_dir(name)}/"):
                why = "document index or tokenizer the manifest no longer points at"
            elif key.startswith(f"{prefix}/tmp/") or key.endswith(".partial"):
                why = "temporary file"
            if why is not None:
                self.garbage(key, why)

    def tokenized_shards(self, name: str, named: set[str] | None) -> int:
        """Collect the tokenized shards of dataset ``name`` its plan does not name (``named``; None:
        no dataset yet, so every committed shard is kept), and the files of shard folders never
        committed. Returns how many committed shards are kept. One listing for all of them (a
        corpus may have many thousands of shards)."""
        kind = shards_kind(name)
        folders: dict[str, list[str]] = {}
        for f in self.storage.list(kind):
            folders.setdefault(f[len(kind) + 1 :].split("/", 1)[0], []).append(f)
        kept = 0
        for key, files in sorted(folders.items()):
            prefix = f"{kind}/{key}"
            files = [f for f in files if not f.startswith(f"{prefix}/lease/")]
            committed = f"{prefix}/{COMMIT}" in files
            if committed and named is not None and key not in named:
                # Whole or not at all (a record naming deleted files would be reused by the next
                # extraction), and the record first: the shard vanishes before its files go.
                if min(_age(self.storage, f, self.now) for f in files) >= self.grace_s:
                    for f in sorted(files, key=lambda k: k != f"{prefix}/{COMMIT}"):
                        self.garbage(f, "tokenized shard the dataset's plan no longer names")
                continue
            if committed:
                kept += 1
                if {f.rsplit("/", 1)[-1] for f in files} <= {COMMIT, TOKENS, DOCS}:
                    continue  # what every tokenized shard holds: no record to read
                try:
                    art = artifacts.get(self.storage, kind, key)
                except (StrataError, ValueError) as e:
                    self.report.skipped.append(f"{prefix}: damaged commit record ({e}); its files are left alone")
                    continue
                listed = {f.key for f in art.record.files} if art is not None else set(files)
                for f in files:
                    if f not in listed and f != f"{prefix}/{COMMIT}":
                        self.garbage(f, "file its commit record does not name")
            elif named is None or key not in named:
                for f in files:
                    self.garbage(f, "file of a tokenized shard that was never committed (its task died)")
            # a named shard with no record: damage `strata verify` reports and repairs; its files are evidence
        return kept

    def planned(self, name: str) -> None:
        """A dataset folder with no manifest: a dry run's tokenized shards (work in progress, kept
        for the extraction that reuses them) and the files of shard folders never committed."""
        try:
            prefix = layout.dataset_dir(name)
        except StrataError:
            return  # a name Strata never writes: left alone
        if not self.storage.list_dirs(shards_kind(name)) or self.live("dataset", name, prefix):
            return  # nothing of ours, or an extraction planning it now
        kept = self.tokenized_shards(name, None)
        if kept:
            listed = {g.key for g in self.report.garbage}
            keys = [k for k in self.files(prefix) + self.storage.list_temporary(prefix) if k not in listed]
            self.report.in_progress.append(InProgress(
                "dataset", name, prefix, f"planned by a dry run: {kept} tokenized shard(s), no dataset yet (its extraction reuses them)",
                keys, sum(_size(self.storage, k) for k in keys), False))

    # -- feature tables -----------------------------------------------------------------------

    def feature_table(self, name: str) -> None:
        prefix = f"{FEATURES}/{name}"
        if self.live("features", name, prefix):
            return
        try:
            info = load_info(self.storage, name)
            if info is None:
                for key in self.files(prefix):
                    self.garbage(key, "file of a feature table whose manifest was never written")
                return
            good, bad = unit_records(self.storage, info)
        except StrataError as e:
            self.report.skipped.append(f"feature table {name!r}: {e} (its files are left alone)")
            return
        named = {r.file.key for r in good.values()}
        for key in self.storage.list(units_dir(name)):
            stem = key.rsplit("/", 1)[-1]
            try:
                unit: int | None = int(stem.split(".")[0].removeprefix("unit-"))
            except ValueError:
                unit = None
            if key not in named and unit not in bad:  # a damaged record's file is evidence for `verify`
                self.garbage(key, "unit file of a failed attempt (no commit record names it)")
        for gen in self.storage.list_dirs(merged_dir(name)):
            gprefix = f"{merged_dir(name)}/{gen}"
            if gen != info.merged and not self.storage.exists(f"{gprefix}/{COMMIT}"):
                for key in self.storage.list(gprefix):
                    self.garbage(key, "file of a merged generation that was never committed")
        if info.merged is None:
            self.held("features", name, prefix, f"unfinished: {len(good)} unit(s) encoded, not merged (rerun its job to finish)")

    # -- SAEs, analyses, checkpoints ----------------------------------------------------------

    def artifact(self, kind: str, name: str) -> None:
        prefix = artifacts.folder(kind, name)  # a name Strata never writes: skipped by collect, left alone
        top = kind in ARTIFACT_KINDS
        what = _KIND_OF.get(kind, "sae")
        if top and self.live(what, name, prefix):
            return
        committed = self.storage.exists(f"{prefix}/{COMMIT}")
        referenced: set[str] = set()
        if committed:
            try:
                art = artifacts.get(self.storage, kind, name)
            except (StrataError, ValueError) as e:
                self.report.skipped.append(f"{kind}/{name}: damaged commit record ({e}); its files are left alone")
                return
            referenced = {f.key for f in art.record.files} if art is not None else set()
        elif kind == SAES:
            steps = self.checkpoints(name)
            if steps:
                self.held("sae", name, prefix, f"unfinished: checkpoint at step {steps[-1]} (rerun its job to resume)")
                return
        nested = {f"{prefix}/{sub}/" for sub in self.storage.list_dirs(prefix) if sub != "lease"}
        for key in self.files(prefix):
            if key in referenced or key == f"{prefix}/{COMMIT}":
                continue
            if committed and any(key.startswith(n) for n in nested):
                continue  # nested artifacts (checkpoints) are collected as their own kind below
            self.garbage(key, "file of an artifact folder that was never committed" if not committed else "file its commit record does not name")
        if committed:
            for sub in self.storage.list_dirs(prefix):
                if sub != "lease":
                    for n in self.storage.list_dirs(f"{prefix}/{sub}"):
                        try:
                            self.artifact(f"{prefix}/{sub}", n)
                        except (StrataError, ValueError) as e:  # not a folder Strata writes: left alone
                            self.report.skipped.append(f"{prefix}/{sub}/{n}: {e}")

    def checkpoints(self, name: str) -> list[int]:
        """Steps of the committed checkpoints of SAE ``name`` (``saes/NAME/checkpoints/step-N``,
        as :mod:`analysis.sae.checkpoint` writes them), oldest first."""
        kind = f"{SAES}/{name}/checkpoints"
        steps = []
        for n in self.storage.list_dirs(kind):
            if n.startswith("step-") and n[5:].isdigit() and self.storage.exists(f"{kind}/{n}/{COMMIT}"):
                steps.append(int(n[5:]))
        return sorted(steps)

    # -- temporary files ----------------------------------------------------------------------

    def temporary(self) -> None:
        """``.partial`` files anywhere, and the store's ``tmp/``: except under a live lease (a
        writer at work renames its ``.partial`` any moment) or in work in progress."""
        held = tuple(f"{w.prefix}/" for w in self.report.in_progress)
        listed = {g.key for g in self.report.garbage}
        for key in [*self.storage.list("tmp"), *self.storage.list_temporary("")]:
            parts = key.split("/")
            if len(parts) > 2 and parts[0] in _KIND_OF:
                if key.startswith(held) or self.leases.holder(f"{parts[0]}/{parts[1]}") is not None:
                    continue
            if key in listed:
                continue
            self.garbage(key, "temporary file (of a write that died)")


def collect(store: StoreRoot, *, grace_s: float = 3600.0, abandoned: Sequence[str] = ()) -> GcReport:
    """What gc would delete (nothing is deleted). ``abandoned``: names (``NAME`` or
    ``KIND/NAME``, e.g. ``saes/run-1``) of work in progress to delete too, whatever its age;
    refused when one names nothing in progress or work a live job holds."""
    report = GcReport()
    p = _Pass(store, grace_s, report)
    storage = store.storage
    work = [(p.dataset if storage.exists(f"{layout.DATASETS}/{n}/manifest.json") else p.planned, layout.DATASETS, n)
            for n in storage.list_dirs(layout.DATASETS)]
    work += [(p.feature_table, FEATURES, n) for n in storage.list_dirs(FEATURES)]
    work += [(functools.partial(p.artifact, kind), kind, n) for kind in ARTIFACT_KINDS for n in storage.list_dirs(kind)]
    for step, folder, name in work:
        try:
            step(name)
        except (StrataError, ValueError) as e:  # one bad folder (a name Strata never writes, a damaged record) never stops the rest
            report.skipped.append(f"{folder}/{name}: {e}")
    p.temporary()
    report.foreign = links(storage)
    for want in abandoned:
        run = _pick(report, want)
        listed = {g.key for g in report.garbage}
        for key in run.keys:
            if key not in listed:
                report.garbage.append(Garbage(key, _size(storage, key), _age(storage, key, p.now), f"abandoned {run.prefix}: {run.state}"))
    return report


def _pick(report: GcReport, want: str) -> InProgress:
    found = [w for w in report.in_progress if want in (w.name, w.prefix)]
    have = ", ".join(w.prefix for w in report.in_progress) or "none"
    if not found:
        raise StrataError(f"--abandoned {want!r}: no work in progress of that name; work in progress: {have}")
    if len(found) > 1:
        raise StrataError(f"--abandoned {want!r} is ambiguous: say which of {', '.join(w.prefix for w in found)}")
    if found[0].live:
        raise StrataError(f"--abandoned {want!r}: {found[0].prefix} is {found[0].state}; it is not abandoned")
    return found[0]


def _order(keys: list[str]) -> list[str]:
    # Records first (a checkpoint, a table vanishes whole for readers), then what they named.
    return sorted(keys, key=lambda k: (not (k.endswith(("/commit.json", "/manifest.json")) or "/commits/" in k), k))


def apply(store: StoreRoot, report: GcReport, *, grace_s: float = 3600.0, abandoned: Sequence[str] = ()) -> GcReport:
    """Delete what ``collect`` found, after collecting again: a file is deleted only if it is
    still garbage now (a job may have committed it, or taken a lease, since the listing).
    Abandoned work is deleted under its own lease, so no job can start on it meanwhile."""
    again = collect(store, grace_s=grace_s, abandoned=abandoned)
    still = {g.key for g in again.garbage}
    mine: dict[str, list[str]] = {}
    for want in abandoned:
        w = _pick(again, want)
        mine[w.prefix] = [k for k in w.keys if k in still]
    in_work = {k for keys in mine.values() for k in keys}
    deleted = 0
    for g in report.garbage:
        if g.key in still and g.key not in in_work:
            store.storage.delete(g.key)
            deleted += 1
    for prefix, keys in mine.items():
        with Lease(store.storage, prefix, what=prefix, owner="strata gc --abandoned") as lease:
            for key in _order(keys):
                lease.check()
                store.storage.delete(key)
                deleted += 1
    report.deleted = deleted
    return report
