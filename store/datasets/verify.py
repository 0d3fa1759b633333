"""Verify and repair a dataset (the last part of the commit protocol).

``verify`` checks every committed unit's files against their commit records (size and every
block checksum), reports damaged records, and counts what is committed: a dataset with units
missing is *incomplete*, which is not OK unless only committed units were asked about.

``verify`` reads the commit records themselves, not the commit index that readers use (a
damaged record must not hide behind the index), checks the index against them, and checks the
driver-written files: the document index and tokenizer (against the manifest's checksums) and
the Zarr metadata (against what the manifest says it must be).

``repair`` removes the commit record (then the file) of every unit that failed, under the
dataset's write lease, so the next extraction recomputes exactly those units; rebuilds the
commit index from the records and the Zarr metadata from the manifest; and removes a damaged
document index or tokenizer, which only the extraction can write again (its driver replaces a
content-named file whose bytes do not match).

A dataset of a sharded corpus also has its plan (the ``shards`` table, a driver-written file) and,
beside it, a tokenized shard per row (:mod:`strata.store.datasets.tokenized`): ``verify`` checks
that each one is committed, that its files match their checksums and its document part reads, and
that its recorded counts are the plan's. ``repair`` removes a damaged or missing tokenized shard and
the units its contexts fed (the plan's ``first_unit`` and ``units``), and renames the plan's row
to ``KEY.removed`` (:data:`REMOVED`): the row keeps its counts and place, but the next extraction,
which trusts a row only under the key it would give the shard, tokenizes that shard again and
recomputes exactly those units. The outcome of
the last verify or repair is kept in ``datasets/NAME/verify.json`` so a later
``strata extract`` that finds nothing to do can say whether the data was ever checked.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from strata.store import layout
from strata.store.commit import artifacts, protocol
from strata.store.commit.lease import Lease
from strata.store.datasets.commits import CommitState, decode_commit_index
from strata.store.datasets.manifest import DatasetInfo, load_manifest, read_aux
from strata.store.datasets.shards import create_hook_array
from strata.store.datasets.tokenized import DOCS, TokenizedShard, decode_shards_table, shards_kind
from strata.store.datasets.tokens import decode_tokens
from strata.store.datasets.writer import DatasetWriter, dataset_lease
from strata.store.errors import CorruptionError
from strata.store.root import StoreRoot
from strata.store.storage import Storage, open_storage

log = logging.getLogger(__name__)


class DatasetFiles(Protocol):
    """What the checks read of a dataset: its name, storage and manifest (a
    :class:`~strata.store.datasets.commits.CommitState` or an ``ActivationDataset``)."""

    @property
    def name(self) -> str: ...

    @property
    def storage(self) -> Storage: ...

    @property
    def info(self) -> DatasetInfo: ...


class Verifiable(DatasetFiles, Protocol):
    """A dataset opened for reading (an ``ActivationDataset``): what :func:`verify` and
    :func:`repair` refresh after they change it, and the store it lives in."""

    @property
    def store(self) -> StoreRoot: ...

    def refresh(self) -> object: ...


#: What a problem with a driver-written file is about (``Problem.unit`` is then -1).
AUX = -1
#: What a problem with a tokenized corpus shard is about (``Problem.unit`` is then -2, ``Problem.shard`` its key).
SHARD = -2
#: The suffix :func:`repair` gives the plan's key of a tokenized shard it removed (see the module's docstring).
REMOVED = ".removed"


@dataclass
class Problem:
    hook: str | None  # None: the unit's token table
    unit: int  # AUX: a driver-written file (document index, tokenizer, commit index, Zarr metadata); SHARD: a tokenized shard
    file: str
    message: str
    shard: str | None = None  # SHARD: the key the dataset's plan names the tokenized shard by

    def __str__(self) -> str:
        if self.unit < 0:
            return f"{self.file}: {self.message}"
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
    rebuilt: list[str] = field(default_factory=list)  # driver-written files written again from what they derive from
    removed_files: list[str] = field(default_factory=list)  # damaged driver-written files only the extraction can rewrite
    removed_shards: list[Problem] = field(default_factory=list)  # damaged or missing tokenized shards, removed
    shard_units: list[int] = field(default_factory=list)  # committed units those shards fed, removed with them
    left: list[str] = field(default_factory=list)  # what repair cannot fix, and what to do instead

    @property
    def units(self) -> list[int]:
        return sorted({p.unit for p in self.removed} | set(self.shard_units))

    @property
    def rerun(self) -> bool:
        """Whether the extraction job must run again to rebuild what was removed."""
        return bool(self.removed or self.removed_files or self.removed_shards)

    def __str__(self) -> str:
        if not (self.removed or self.rebuilt or self.removed_files or self.removed_shards or self.left):
            return f"{self.dataset}: nothing to repair"
        lines = []
        if self.removed:
            lines.append(f"{self.dataset}: removed the commit records of {len(self.removed)} damaged part(s) of unit(s) {self.units}:")
            lines += [f"  {p}" for p in self.removed]
        lines += [f"{self.dataset}: rebuilt {k}" for k in self.rebuilt]
        lines += [f"{self.dataset}: removed the damaged {k}" for k in self.removed_files]
        lines += [f"{self.dataset}: removed tokenized shard {p.shard} ({p.message})" for p in self.removed_shards]
        if self.removed_shards:
            lines.append(f"  and the {len(self.shard_units)} committed unit(s) they fed: {self.shard_units}" if self.shard_units
                         else "  (no committed unit was fed by them)")
        lines += [f"{self.dataset}: not repaired: {k}" for k in self.left]
        if self.removed or self.removed_shards:
            lines.append("  the next `strata extract` of this dataset recomputes exactly those")
        if self.removed_files:
            lines.append(f"  rerun the extraction job of dataset {self.dataset!r} (`strata extract SPEC`) to rebuild the removed file(s)")
        return "\n".join(lines)


def verify(dataset: Verifiable, *, hooks: list[str] | None = None, committed_only: bool = False) -> VerifyReport:
    """Check every committed unit of ``dataset`` (or of ``hooks``) and its driver-written files."""
    dataset.refresh()
    # The records themselves, not the index readers use: a damaged record must not hide behind it.
    ds = CommitState(dataset.storage, dataset.name, use_index=False)
    ds.refresh()
    hooks = ds.hooks() if hooks is None else [ds.check_hook(h) for h in hooks]
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
    shards = None
    for kind, entry in ds.info.aux.items():
        try:
            got = read_aux(ds.storage, ds.info, kind)
            if kind == "shards" and got is not None:  # the bytes are what was written; check they are a plan
                shards = decode_shards_table(got[1], where=got[0])
        except CorruptionError as e:
            report.problems.append(Problem(None, AUX, str(entry.get("key", kind)), str(e).split(": ", 1)[-1]))
        report.files_checked += 1
    if shards is not None:
        _check_tokenized_shards(ds, shards, report)
    index_problem = _check_index(ds)
    if index_problem is not None:
        report.problems.append(index_problem)
    for key, msg in _check_zarr_metadata(ds).items():
        report.problems.append(Problem(None, AUX, key, msg))
    report.units_checked = len(units)
    _record_outcome(ds, report.to_dict())
    return report


def _check_tokenized_shards(ds: DatasetFiles, shards: Any, report: VerifyReport) -> None:
    """Every tokenized shard the plan names: committed, its files intact, its document part
    readable, its recorded counts the plan's (a shard planned from other counts packs other units)."""
    kind = shards_kind(ds.name)
    for row in shards.select(["key", "name", "fingerprint", "records", "docs", "tokens", "contexts", "first_unit", "units"]).to_pylist():
        key = row["key"]
        problem = functools.partial(_shard_problem, report, row)
        if key.endswith(REMOVED):
            problem(f"{kind}/{key[: -len(REMOVED)]}", "removed by a repair; the next extraction tokenizes it again")
            continue
        prefix = f"{kind}/{key}"
        try:
            sh = TokenizedShard.open(ds.storage, ds.name, key)
        except (CorruptionError, ValueError) as e:
            problem(f"{prefix}/{artifacts.COMMIT}", f"its commit record is damaged ({str(e).split(': ', 1)[-1]})")
            continue
        if sh is None:
            problem(prefix, "missing (no commit record)")
            continue
        report.files_checked += 1 + len(sh.art.record.files)
        report.bytes_checked += sum(f.nbytes for f in sh.art.record.files)
        # Every file against its checksums; the document part by reading it (a checked read), once.
        bad = [(f.key, m) for f in sh.art.record.files if f.key != f"{prefix}/{DOCS}" and (m := protocol.verify_file(ds.storage, f))]
        if not bad:
            try:
                sh.docs()
            except CorruptionError as e:
                bad.append((f"{prefix}/{DOCS}", str(e).split(": ", 1)[-1]))
        if bad:
            problem(bad[0][0], bad[0][1])
            continue
        meta = sh.meta
        differ = [f"{c} {meta.get(c)} (the plan says {row[c]})" for c in ("records", "docs", "tokens", "contexts", "fingerprint")
                  if c in meta and meta[c] != row[c]]
        if differ:
            problem(f"{prefix}/{artifacts.COMMIT}", f"its record differs from the plan: {', '.join(differ)}")


def _shard_problem(report: VerifyReport, row: dict[str, Any], file: str, msg: str) -> None:
    """Report a problem with the tokenized shard of the plan's ``row``, naming the corpus shard and its units."""
    first, n = row["first_unit"], row["units"]
    units = f"units {first}-{first + n - 1}" if n else "no units"
    report.problems.append(Problem(None, SHARD, file, f"tokenized shard of {row['name']} ({units}): {msg}", shard=row["key"]))


def _check_index(ds: CommitState) -> Problem | None:
    """What is wrong with the commit index: damaged, or naming records that differ from the
    records themselves (the index is what readers see). Records
    missing from it are fine: it is compacted at the end of a job."""
    entry = ds.info.aux.get("commit_index")
    if entry is None:
        return None
    key = str(entry.get("key", "commit_index"))
    try:
        got = read_aux(ds.storage, ds.info, "commit_index")
        assert got is not None
        index = decode_commit_index(got[1], where=key)
    except CorruptionError:
        return None  # reported with the other driver-written files
    for part, units in index.items():
        for unit, e in units.items():
            if (part, unit) in ds.damaged:
                continue  # reported as the unit's own problem; repair rebuilds the index anyway
            try:
                raw = ds.storage.read(e.key) if e.key == layout.commit_key(ds.name, part, unit) else None
            except FileNotFoundError:
                raw = None
            if raw != e.raw and not _same_record(raw, e.raw, where=e.key):  # same record, other bytes (an older writer's): fine
                what = "names a record that is not there" if raw is None else "disagrees with the record"
                return Problem(None, AUX, key, f"the commit index {what} (unit {unit} {part or 'tokens'}; readers see the index)")
    return None


def _same_record(a: bytes | None, b: bytes, *, where: str) -> bool:
    if a is None:
        return False
    try:
        return protocol.CommitRecord.from_json(a, where=where) == protocol.CommitRecord.from_json(b, where=where)
    except CorruptionError:
        return False


def _expected_zarr_metadata(ds: DatasetFiles) -> dict[str, Any]:
    """The Zarr metadata documents (key -> parsed JSON) the dataset's manifest implies: made by
    the same code the driver uses, in a scratch store."""
    with tempfile.TemporaryDirectory(prefix="strata-verify-") as tmp:
        scratch = open_storage(tmp)
        for hook in ds.info.hooks:
            create_hook_array(scratch, ds.info, hook)
        prefix = layout.dataset_dir(ds.name)
        return {k: json.loads(scratch.read(k)) for k in scratch.list(prefix) if k.endswith("zarr.json")}


def _check_zarr_metadata(ds: DatasetFiles) -> dict[str, str]:
    """Damaged Zarr metadata files of the dataset (key -> what is wrong). Strata's reads do not
    use them (the manifest says where each unit is), but every other Zarr reader does."""
    out: dict[str, str] = {}
    for key, want in _expected_zarr_metadata(ds).items():
        try:
            got = json.loads(ds.storage.read(key))
        except FileNotFoundError:
            out[key] = "Zarr metadata is missing"
            continue
        except ValueError as e:
            out[key] = f"Zarr metadata is not JSON ({e})"
            continue
        if not isinstance(got, dict):
            out[key] = "Zarr metadata is not a JSON object"
            continue
        attrs_ok = all(got.get("attributes", {}).get(a) == v for a, v in want.get("attributes", {}).items())
        others = {k for k in set(want) | set(got) if k != "attributes"}
        bad = sorted(k for k in others if got.get(k) != want.get(k)) + ([] if attrs_ok else ["attributes"])
        if bad:
            out[key] = f"Zarr metadata differs from what the manifest implies ({', '.join(bad)})"
    return out


def _record_outcome(ds: DatasetFiles, outcome: dict[str, Any]) -> None:
    # Best effort: a reader with read-only credentials verifies all the same.
    try:
        ds.storage.write(layout.verify_key(ds.name), json.dumps(outcome, sort_keys=True).encode())
    except OSError as e:
        log.debug("could not record the verify outcome of %r: %s", ds.name, e)


def last_outcome(ds: DatasetFiles) -> dict[str, Any] | None:
    """The outcome of the last verify or repair of the dataset, or None when it never ran."""
    try:
        out = json.loads(ds.storage.read(layout.verify_key(ds.name)))
        return out if isinstance(out, dict) else None
    except (FileNotFoundError, ValueError):
        return None


def repair(ds: Verifiable, report: VerifyReport | None = None) -> RepairReport:
    """Remove the records and files of every damaged unit part, holding the write lease."""
    with dataset_lease(ds.storage, ds.name, owner="strata verify --repair") as lease:
        report = report if report is not None else verify(ds)
        out = RepairReport(ds.name)
        rebuild_index = False
        shard_problems = [p for p in report.problems if p.unit == SHARD]
        for p in report.problems:
            lease.check()
            if p.unit == SHARD:
                continue  # below, all together: one new plan
            if p.unit < 0:
                rebuild_index |= _repair_aux(ds, p, out)
                continue
            # The record first, so the unit is invisible before its file goes.
            ds.storage.delete(layout.commit_key(ds.name, p.hook, p.unit))
            if p.hook is None:
                for key in ds.storage.list(layout.tokens_dir(ds.name)):
                    if layout.tokens_key_pattern(ds.name, p.unit).fullmatch(key):
                        ds.storage.delete(key)
            else:
                ds.storage.delete(layout.shard_key(ds.name, p.hook, p.unit))
            out.removed.append(p)
        if shard_problems:
            _repair_shards(ds, shard_problems, lease, out)
        ds.refresh()
        if out.removed or rebuild_index:  # the commit index must not name the removed records
            DatasetWriter(ds.store, ds.name, fence=lease.token).compact_commits(full=True)
            key = (load_manifest(ds.storage, ds.name).aux.get("commit_index") or {}).get("key")
            if rebuild_index and key:
                out.rebuilt.append(str(key))
            ds.refresh()
        _record_outcome(ds, {**report.to_dict(), "repaired_units": out.units,
                              "ok": False if out.removed or out.removed_shards else report.ok})
    return out


def _repair_shards(ds: Verifiable, problems: list[Problem], lease: Lease, out: RepairReport) -> None:
    """Remove damaged or missing tokenized shards and the committed units their contexts fed (the
    records first: the units vanish before their shard), then rename their rows of the plan to
    ``KEY.removed`` so the next extraction tokenizes them again (see the module's docstring)."""
    got = read_aux(ds.storage, load_manifest(ds.storage, ds.name), "shards")
    if got is None:  # pragma: no cover - a SHARD problem comes from the plan
        return
    table = decode_shards_table(got[1], where=got[0])
    keys = table.column("key").to_pylist()
    first, count = table.column("first_unit").to_pylist(), table.column("units").to_pylist()
    bad = {p.shard for p in problems}
    units = sorted({u for i, k in enumerate(keys) if k in bad for u in range(first[i], first[i] + count[i])})
    w = DatasetWriter(ds.store, ds.name, fence=lease.token)
    out.shard_units = w.forget_units(units)
    for k in sorted(k for k in bad if k is not None):
        lease.check()
        artifacts.delete(ds.storage, shards_kind(ds.name), k.removesuffix(REMOVED), lease=lease)
    out.removed_shards = [p for p in problems if p.shard is not None and not p.shard.endswith(REMOVED)]
    renamed = [k + REMOVED if k in bad and not k.endswith(REMOVED) else k for k in keys]
    if renamed != keys:
        lease.check()
        w.write_shards_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(renamed, pa.string())))


def _repair_aux(ds: DatasetFiles, p: Problem, out: RepairReport) -> bool:
    """Repair one damaged driver-written file; True when the commit index must be rebuilt."""
    name = p.file.rsplit("/", 1)[-1]
    if p.file == (ds.info.aux.get("shards") or {}).get("key"):
        # The plan is the only record of which committed units came from which shard: without it
        # no extraction can tell what to keep, so removing it would strand the dataset.
        out.left.append(f"{p.file}: the plan of its sharded corpus is damaged, and only it says which units came from which shard; "
                        f"delete the dataset (`strata rm STORE {ds.name}`) and extract it again")
        return False
    if name.startswith("commit_index-"):
        return True  # rebuilt from the records themselves (compact_commits writes it again, replacing damage)
    if name == "zarr.json":
        want = _expected_zarr_metadata(ds).get(p.file)
        if want is not None:
            ds.storage.write(p.file, json.dumps(want, indent=2).encode())
            out.rebuilt.append(p.file)
        return False
    # The document index or tokenizer: only the extraction knows their content. Remove the
    # damaged file (reads then say it is missing); the extraction's driver writes it again.
    if p.file.startswith(layout.aux_dir(ds.name) + "/"):
        ds.storage.delete(p.file)
        out.removed_files.append(p.file)
    return False
