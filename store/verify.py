"""Verify and repair a dataset (the last part of the commit protocol).

``verify`` checks every committed unit's files against their commit records (size and every
block checksum), reports damaged records, and counts what is committed: a dataset with units
missing is *incomplete*, which is not OK unless only committed units were asked about.

``repair`` removes the commit record (then the file) of every unit that failed, under the
dataset's write lease, so the next extraction recomputes exactly those units. The outcome of
the last verify or repair is kept in ``datasets/NAME/verify.json`` so a later
``strata extract`` that finds nothing to do can say whether the data was ever checked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from store import layout, protocol
from store.errors import CorruptionError
from store.tokens import decode_tokens

if TYPE_CHECKING:
    from store.dataset import ActivationDataset

log = logging.getLogger(__name__)


@dataclass
class Problem:
    hook: str | None  # None: the unit's token table
    unit: int
    file: str
    message: str

    def __str__(self) -> str:
        return f"unit {self.unit} {'tokens' if self.hook is None else self.hook} ({self.file}): {self.message}"


@dataclass
class VerifyReport:
    dataset: str
    num_units: int = 0
    committed: dict[str, int] = field(default_factory=dict)  # "tokens" and each hook -> committed units
    committed_only: bool = False
    units_checked: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(n == self.num_units for n in self.committed.values())

    @property
    def ok(self) -> bool:
        return not self.problems and (self.committed_only or self.complete)

    def __str__(self) -> str:
        least = min(self.committed.values(), default=0)
        counts = f"{least} of {self.num_units} units committed" + (
            "" if len(set(self.committed.values())) <= 1 else f" (per part: {', '.join(f'{k} {v}' for k, v in self.committed.items())})"
        )
        if self.problems:
            state = f"{len(self.problems)} problem(s)"
        elif not self.complete:
            state = "OK so far (committed units only)" if self.committed_only else "INCOMPLETE"
        else:
            state = "OK"
        head = f"{self.dataset}: {state}: {counts}; {self.files_checked} files, {self.bytes_checked / 2**20:.1f} MiB checked"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "ok": self.ok, "complete": self.complete, "num_units": self.num_units,
            "committed": self.committed, "problems": [str(p) for p in self.problems], "at": protocol.utcnow(),
        }


@dataclass
class RepairReport:
    dataset: str
    removed: list[Problem] = field(default_factory=list)  # units whose records were removed

    @property
    def units(self) -> list[int]:
        return sorted({p.unit for p in self.removed})

    def __str__(self) -> str:
        if not self.removed:
            return f"{self.dataset}: nothing to repair"
        lines = [f"{self.dataset}: removed the commit records of {len(self.removed)} damaged part(s) of unit(s) {self.units}:"]
        lines += [f"  {p}" for p in self.removed]
        lines.append("  the next `strata extract` of this dataset recomputes exactly those")
        return "\n".join(lines)


def verify(ds: ActivationDataset, *, hooks: list[str] | None = None, committed_only: bool = False) -> VerifyReport:
    ds.refresh()
    hooks = ds.hooks if hooks is None else [ds.check_hook(h) for h in hooks]
    report = VerifyReport(ds.name, num_units=ds.info.num_units, committed_only=committed_only)
    report.committed = {"tokens": len(ds.committed_units(None)), **{h: len(ds.committed_units(h)) for h in hooks}}
    for (hook, unit), msg in sorted(ds.damaged.items(), key=lambda x: (x[0][1], x[0][0] or "")):
        if hook is None or hook in hooks:
            report.problems.append(Problem(hook, unit, layout.commit_key(ds.name, hook, unit), msg.split(": ", 1)[-1]))
    units: set[int] = set()
    for part in [None, *hooks]:
        for unit in ds.committed_units(part):
            rec = ds.record(part, unit)
            bad = protocol.verify_file(ds.storage, rec.file)
            if bad is None and part is None:
                try:  # the bytes are what was committed; check they are a token table of the unit
                    t = decode_tokens(protocol.read_whole(ds.storage, rec.file, where=rec.file.key), where=rec.file.key)
                    if t.num_rows != rec.rows:
                        bad = f"{t.num_rows} rows, the commit record says {rec.rows}"
                except CorruptionError as e:
                    bad = str(e).split(": ", 1)[-1]
            if bad is not None:
                report.problems.append(Problem(part, unit, rec.file.key, bad))
            report.files_checked += 1
            report.bytes_checked += rec.file.nbytes
            units.add(unit)
    for kind, entry in ds.info.aux.items():
        try:
            ds.aux_file(kind)
        except CorruptionError as e:
            report.problems.append(Problem(None, -1, str(entry.get("key", kind)), str(e).split(": ", 1)[-1]))
    report.units_checked = len(units)
    _record_outcome(ds, report.to_dict())
    return report


def _record_outcome(ds: ActivationDataset, outcome: dict[str, Any]) -> None:
    # Best effort: a reader with read-only credentials verifies all the same.
    try:
        ds.storage.write(layout.verify_key(ds.name), json.dumps(outcome, sort_keys=True).encode())
    except OSError as e:
        log.debug("could not record the verify outcome of %r: %s", ds.name, e)


def last_outcome(ds: ActivationDataset) -> dict[str, Any] | None:
    """The outcome of the last verify or repair of the dataset, or None when it never ran."""
    try:
        out = json.loads(ds.storage.read(layout.verify_key(ds.name)))
        return out if isinstance(out, dict) else None
    except (FileNotFoundError, ValueError):
        return None


def repair(ds: ActivationDataset, report: VerifyReport | None = None) -> RepairReport:
    """Remove the records and files of every damaged unit part, holding the write lease."""
    with ds.store.lease(ds.name, owner="strata verify --repair") as lease:
        report = report if report is not None else verify(ds)
        out = RepairReport(ds.name)
        for p in report.problems:
            if p.unit < 0:
                continue  # the document index is rewritten by the next extraction's driver
            lease.check()
            # The record first, so the unit is invisible before its file goes.
            ds.storage.delete(layout.commit_key(ds.name, p.hook, p.unit))
            if p.hook is None:
                for key in ds.storage.list(layout.tokens_dir(ds.name)):
                    if layout.tokens_key_pattern(ds.name, p.unit).fullmatch(key):
                        ds.storage.delete(key)
            else:
                ds.storage.delete(layout.shard_key(ds.name, p.hook, p.unit))
            out.removed.append(p)
        ds.refresh()
        if out.removed:  # the commit index must not name the removed records
            ds.store.writer(ds.name, fence=lease.token).compact_commits(full=True)
            ds.refresh()
        _record_outcome(ds, {**report.to_dict(), "repaired_units": out.units, "ok": False if out.removed else report.ok})
    return out
