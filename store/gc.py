"""Garbage collection: files that no commit record (or manifest) references, left by crashed or
losing attempts, older than a grace period.

What is collected, per dataset: token files of attempts that lost or crashed (a committed unit's
token file is the one its record names); shards of units with no commit record (a writer died
between its shard and its record); document-index and tokenizer files the manifest no longer
points at; temporary ``.partial`` files. Per artifact folder (SAEs, analyses, checkpoints): the
files of a folder that was never committed. Never a file a commit record names.

Safety: a dataset or folder whose lease is held by a live job is skipped (its writers are at
work), a damaged commit record makes its unit's files off limits (we cannot tell what it
names), and only files older than the grace period are collected (a live writer publishes its
file milliseconds before its record; one hour by default is ample).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from store import artifacts, layout
from store.artifacts import COMMIT
from store.errors import StrataError
from store.lease import Lease

if TYPE_CHECKING:
    from store.core import Store

log = logging.getLogger(__name__)

ARTIFACT_KINDS = ("saes", "analyses")


@dataclass
class Garbage:
    key: str
    nbytes: int
    age_s: float
    why: str


@dataclass
class GcReport:
    garbage: list[Garbage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what was left alone, and why
    deleted: int = 0

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.garbage)

    def __str__(self) -> str:
        lines = [f"{g.key}\t{g.nbytes:,} bytes\t{g.age_s / 3600:.1f} h old\t{g.why}" for g in self.garbage]
        lines += [f"skipped {s}" for s in self.skipped]
        verb = f"deleted {self.deleted}" if self.deleted else "would delete"
        lines.append(f"{verb} {len(self.garbage)} file(s), {self.nbytes / 2**20:.1f} MiB")
        return "\n".join(lines)


def _live(store: Store, prefix: str, what: str) -> bool:
    holder = Lease(store.storage, prefix, what=what).holder()
    return holder is not None


def _age(store: Store, key: str, now: float) -> float:
    try:
        return now - store.storage.modified(key)
    except FileNotFoundError:
        return -1.0


def _dataset_garbage(store: Store, name: str, grace_s: float, now: float, report: GcReport) -> None:
    prefix = layout.dataset_dir(name)
    if _live(store, prefix, f"dataset {name!r}"):
        report.skipped.append(f"dataset {name!r}: a job holds its write lease")
        return
    try:
        ds = store.dataset(name)
    except StrataError as e:
        report.skipped.append(f"dataset {name!r}: {e}")
        return
    referenced: set[str] = set()
    off_limits: set[int] = {u for (_h, u) in ds.damaged}
    committed = {hook: set(ds.committed_units(hook)) for hook in ds.info.hooks}
    for hook in [None, *ds.info.hooks]:
        for u in ds.committed_units(hook):
            referenced.update(f.key for f in ds.record(hook, u).files)
    referenced.update(e["key"] for e in ds.info.aux.values())
    keep_prefixes = (f"{prefix}/commits/", f"{prefix}/lease/", f"{prefix}/manifest.json", f"{prefix}/verify.json")
    for key in store.storage.list(prefix):
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
        if why is None:
            continue
        age = _age(store, key, now)
        if age >= grace_s:
            report.garbage.append(Garbage(key, store.storage.size(key), age, why))


def _artifact_garbage(store: Store, kind: str, grace_s: float, now: float, report: GcReport) -> None:
    for name in store.storage.list_dirs(kind):
        prefix = f"{kind}/{name}"
        if _live(store, prefix, f"{kind} {name!r}"):
            report.skipped.append(f"{kind} {name!r}: a job holds its lease")
            continue
        committed = store.storage.exists(f"{prefix}/{COMMIT}")
        referenced: set[str] = set()
        if committed:
            art = artifacts.get(store.storage, kind, name)
            referenced = {f.key for f in art.record.files} if art is not None else set()
        nested = {f"{prefix}/{sub}/" for sub in store.storage.list_dirs(prefix) if sub not in ("lease",)}
        for key in store.storage.list(prefix):
            if key in referenced or key == f"{prefix}/{COMMIT}" or key.startswith(f"{prefix}/lease/"):
                continue
            if committed and any(key.startswith(n) for n in nested):
                continue  # nested artifacts (checkpoints) are collected as their own kind below
            age = _age(store, key, now)
            if age >= grace_s:
                why = "file of an artifact folder that was never committed" if not committed else "file its commit record does not name"
                report.garbage.append(Garbage(key, store.storage.size(key), age, why))
        for sub in store.storage.list_dirs(prefix):
            if sub not in ("lease",) and committed:
                _artifact_garbage(store, f"{prefix}/{sub}", grace_s, now, report)


def collect(store: Store, *, grace_s: float = 3600.0) -> GcReport:
    """What gc would delete (nothing is deleted)."""
    report = GcReport()
    now = time.time()
    for name in store.storage.list_dirs(layout.DATASETS):
        if store.storage.exists(layout.manifest_key(name)):
            _dataset_garbage(store, name, grace_s, now, report)
    for kind in ARTIFACT_KINDS:
        _artifact_garbage(store, kind, grace_s, now, report)
    for key in [*store.storage.list("tmp"), *store.storage.list_temporary("")]:
        age = _age(store, key, now)
        if age >= grace_s:
            report.garbage.append(Garbage(key, store.storage.size(key), age, "temporary file (of a write that died)"))
    return report


def apply(store: Store, report: GcReport, *, grace_s: float = 3600.0) -> GcReport:
    """Delete what ``collect`` found, after collecting again: a file is deleted only if it is
    still garbage now (a job may have committed it since the listing)."""
    still = {g.key for g in collect(store, grace_s=grace_s).garbage}
    for g in report.garbage:
        if g.key in still:
            store.storage.delete(g.key)
            report.deleted += 1
    return report
