"""Reading an activation dataset: committed units only, consistent while jobs still write."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch

from store import layout
from store.commits import CommitRecord, checksum
from store.dtypes import storage_dtype, to_torch
from store.errors import CorruptionError, HookNotFoundError, NotCommittedError
from store.manifest import DatasetInfo
from store.shards import ShardLayout
from store.tokens import decode_tokens, rows_of_docs
from store.writer import shard_layout

if TYPE_CHECKING:
    from store.batches import BatchIterator
    from store.core import Store

log = logging.getLogger(__name__)

_IO_THREADS = 16


def natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


@dataclass
class Problem:
    hook: str | None
    unit: int
    file: str
    message: str

    def __str__(self) -> str:
        return f"unit {self.unit} {'tokens' if self.hook is None else self.hook} ({self.file}): {self.message}"


@dataclass
class VerifyReport:
    dataset: str
    units_checked: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.dataset}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'} "
            f"({self.files_checked} files, {self.bytes_checked / 2**20:.1f} MiB checked)"
        )
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def _resolve_out_dtype(stored: str, as_: str, dtype: Any) -> tuple[str, np.dtype]:
    """(logical output dtype name, NumPy dtype of the output buffer)."""
    if dtype is None:
        name = stored if (as_ == "torch" or stored != "bfloat16") else "float32"
    elif isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = np.dtype(dtype).name if dtype != "bfloat16" else "bfloat16"
    if name not in ("float32", "float16", "bfloat16") or (name == "bfloat16" and as_ != "torch"):
        raise ValueError(f"cannot read as dtype {dtype!r}; valid: float32, float16, and bfloat16 with as_='torch'")
    return name, storage_dtype(name)


def _copy_into(out: np.ndarray, out_name: str, src: np.ndarray, src_name: str) -> None:
    """Copy stored values into an output slice, converting dtype in the same pass."""
    if out_name == src_name:
        out[...] = src
    elif src_name == "bfloat16":
        wide = out if out_name == "float32" else np.empty(out.shape, np.float32)
        np.left_shift(src, 16, out=wide.view(np.uint32), dtype=np.uint32)
        if wide is not out:
            out[...] = wide
    elif out_name == "bfloat16":
        out[...] = torch.from_numpy(np.ascontiguousarray(src, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        out[...] = src


class ActivationDataset:
    """A dataset opened for reading. It sees the units committed when it was opened (or last
    :meth:`refresh`-ed), so a notebook gets a consistent view while a job keeps writing."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.storage = store.storage
        self.name = name
        self.info: DatasetInfo = store._load_info(name)
        self._commits: dict[str | None, dict[int, CommitRecord]] = {}
        self._checked: set[tuple[str, int]] = set()  # size and shard index checked
        self._verified: set[tuple[str, int]] = set()  # checksum checked
        self._tokens: dict[int, pa.Table] = {}
        self.refresh()

    def __repr__(self) -> str:
        units = len(self._commits.get(None, {}))
        return f"ActivationDataset({self.name!r}, hooks={len(self.info.hooks)}, committed units={units}/{self.info.num_units})"

    # -- commit state ---------------------------------------------------------------------

    def refresh(self) -> ActivationDataset:
        """Pick up units (and hooks, and growth) committed since the dataset was opened."""
        self.info = self.store._load_info(self.name)
        groups: list[str | None] = [None, *self.info.hooks]
        todo: list[tuple[str | None, str]] = []
        for hook in groups:
            have = self._commits.setdefault(hook, {})
            for key in self.storage.list(layout.commits_dir(self.name, hook)):
                if key.endswith(".json") and layout.unit_of_commit_key(key) not in have:
                    todo.append((hook, key))
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            recs = list(pool.map(lambda t: CommitRecord.from_json(self.storage.read(t[1])), todo))
        for (hook, _), rec in zip(todo, recs):
            self._commits[hook][rec.unit] = rec
        # A hook's unit counts only with its token table (always committed first by the writer).
        for hook in self.info.hooks:
            toks = self._commits[None]
            for u in [u for u in self._commits[hook] if u not in toks]:
                del self._commits[hook][u]
        return self

    @property
    def hooks(self) -> list[str]:
        return sorted(self.info.hooks, key=natural_key)

    def _check_hook(self, hook: str) -> str:
        if hook not in self.info.hooks:
            raise HookNotFoundError(f"dataset {self.name!r} has no hook {hook!r}; it has: {', '.join(self.hooks)}")
        return hook

    def committed_units(self, hook: str | None = None) -> list[int]:
        """Units committed for ``hook`` (or whose token table is committed, for ``None``)."""
        if hook is not None:
            self._check_hook(hook)
        return sorted(self._commits.get(hook, {}))

    def num_rows(self, hook: str | None = None) -> int:
        """Committed token rows of ``hook`` (of the token table, for ``None``)."""
        if hook is not None:
            self._check_hook(hook)
        return sum(r.rows for r in self._commits.get(hook, {}).values())

    def unit_rows(self, unit: int) -> int:
        """Committed rows of a unit (its token table's)."""
        rec = self._commits[None].get(unit)
        return 0 if rec is None else rec.rows

    @property
    def is_complete(self) -> bool:
        return all(len(self._commits.get(h, {})) == self.info.num_units for h in [None, *self.info.hooks])

    # -- tokens ---------------------------------------------------------------------------

    def _read_token_file(self, rec: CommitRecord, where: str, *, verify: bool = False) -> bytes:
        try:
            data = self.storage.read(rec.file)
        except FileNotFoundError:
            raise CorruptionError(f"{where}: file is missing") from None
        if len(data) != rec.nbytes:
            raise CorruptionError(f"{where}: {len(data)} bytes, the commit record says {rec.nbytes} (truncated?)")
        if verify and checksum(data) != rec.checksum:
            raise CorruptionError(f"{where}: checksum mismatch")
        return data

    def _unit_tokens(self, unit: int) -> pa.Table:
        t = self._tokens.get(unit)
        if t is None:
            rec = self._commits[None].get(unit)
            if rec is None:
                raise NotCommittedError(f"dataset {self.name!r}: the token table of unit {unit} is not committed")
            where = f"dataset {self.name!r} unit {unit} tokens ({rec.file})"
            t = decode_tokens(self._read_token_file(rec, where), where=where)
            if t.num_rows != rec.rows:
                raise CorruptionError(f"{where}: {t.num_rows} rows, the commit record says {rec.rows}")
            self._tokens[unit] = t
        return t

    def tokens(self, hook: str | None = None, *, units: Iterable[int] | None = None) -> pa.Table:
        """The token table of committed units, in row order, with a ``row`` column (the global
        row index that :meth:`read` takes). With ``hook``, only units committed for that hook, so
        the table is row-aligned with ``read(hook)``."""
        chosen = self.committed_units(hook) if units is None else sorted(units)
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            tables = list(pool.map(self._unit_tokens, chosen))
        ur = self.info.unit_rows
        out = []
        for u, t in zip(chosen, tables):
            out.append(t.append_column("row", pa.array(np.arange(u * ur, u * ur + t.num_rows, dtype=np.int64))))
        if not out:
            from store.tokens import TOKEN_SCHEMA

            return TOKEN_SCHEMA.append(pa.field("row", pa.int64(), nullable=False)).empty_table()
        return pa.concat_tables(out)

    # -- activations ----------------------------------------------------------------------

    def _layout(self, hook: str) -> ShardLayout:
        return shard_layout(self.info, hook)

    def _record(self, hook: str, unit: int, hi: int) -> CommitRecord:
        rec = self._commits[hook].get(unit)
        if rec is not None and hi > rec.rows:
            raise NotCommittedError(
                f"dataset {self.name!r} hook {hook!r}: row {unit * self.info.unit_rows + hi - 1} is past the end of unit "
                f"{unit}, which holds {rec.rows} rows (rows {unit * self.info.unit_rows}..{unit * self.info.unit_rows + rec.rows - 1})"
            )
        if rec is None:
            committed = self.committed_units(hook)
            have = f"{len(committed)} of {self.info.num_units} units committed" + (
                f" (e.g. {committed[:8]})" if committed else ""
            )
            raise NotCommittedError(
                f"dataset {self.name!r} hook {hook!r}: rows {unit * self.info.unit_rows}..{unit * self.info.unit_rows + hi - 1} "
                f"lie in unit {unit}, which is not committed ({have}); call refresh() to see newer commits"
            )
        return rec

    def _where(self, hook: str, unit: int, rec: CommitRecord) -> str:
        return f"dataset {self.name!r} hook {hook!r} unit {unit} ({rec.file})"

    def _check_shard(self, hook: str, unit: int, rec: CommitRecord, size: int, tail: Callable[[int, int], Any]) -> None:
        """The unit's file against its commit record: its size always, its shard index once per
        dataset object. ``tail(start, end)`` reads bytes of the file."""
        where = self._where(hook, unit, rec)
        if size != rec.nbytes:
            raise CorruptionError(f"{where}: {size} bytes, the commit record says {rec.nbytes} (truncated?)")
        if (hook, unit) not in self._checked:
            sl = self._layout(hook)
            index = sl.decode_index(bytes(tail(size - sl.index_bytes, size)), where=where)
            sl.check_contiguous(index, rec.rows, size, where=where)
            self._checked.add((hook, unit))

    def _check_sum(self, hook: str, unit: int, rec: CommitRecord, values: np.ndarray) -> None:
        if checksum(values) != rec.checksum:
            raise CorruptionError(f"{self._where(hook, unit, rec)}: checksum mismatch (the file was modified after its commit)")

    def _size(self, hook: str, unit: int, rec: CommitRecord) -> int:
        try:
            return self.storage.size(rec.file)
        except FileNotFoundError:
            raise CorruptionError(f"{self._where(hook, unit, rec)}: file is missing") from None

    def _unit_values(self, hook: str, unit: int, lo: int = 0, hi: int | None = None, *, verify: bool = True) -> np.ndarray:
        """Stored values of rows ``[lo, hi)`` of one unit, as ``[hi - lo, d]`` of storage dtype
        in memory of its own. A whole unit is checked against its checksum when ``verify``."""
        rec = self._record(hook, unit, 0 if hi is None else hi)
        hi = rec.rows if hi is None else hi
        sl = self._layout(hook)
        sdt = storage_dtype(self.info.dtype)
        size = self._size(hook, unit, rec)
        self._check_shard(hook, unit, rec, size, lambda a, b: self.storage.read_range(rec.file, a, b))
        if lo == 0 and hi == rec.rows:
            out = np.empty((rec.rows, sl.d), dtype=sdt)
            if self.storage.read_into(rec.file, memoryview(out.reshape(-1)).cast("B")) != out.nbytes:
                raise CorruptionError(f"{self._where(hook, unit, rec)}: shorter than its commit record says (truncated?)")
            if verify:
                self._check_sum(hook, unit, rec, out)
            return out
        c0, c1 = lo // sl.chunk_rows, -(-hi // sl.chunk_rows)
        data = self.storage.read_range(rec.file, c0 * sl.chunk_bytes, c1 * sl.chunk_bytes)
        arr = np.frombuffer(data, dtype=sdt).reshape(-1, sl.d)
        base = c0 * sl.chunk_rows
        return arr[lo - base : hi - base]

    def _mapped_unit(self, hook: str, unit: int) -> np.ndarray:
        """A whole committed unit as a read-only ``[rows, d]`` view of the mapped shard file
        (local stores; read into memory elsewhere). Checked against its commit record the first
        time this dataset object maps it: size, shard index, then checksum."""
        rec = self._record(hook, unit, 0)
        sl = self._layout(hook)
        try:
            data = np.frombuffer(self.storage.map(rec.file), dtype=np.uint8)
        except FileNotFoundError:
            raise CorruptionError(f"{self._where(hook, unit, rec)}: file is missing") from None
        self._check_shard(hook, unit, rec, data.size, lambda a, b: data[a:b])
        arr = data[: rec.rows * sl.d * sl.itemsize].view(storage_dtype(self.info.dtype)).reshape(rec.rows, sl.d)
        if (hook, unit) not in self._verified:
            self._check_sum(hook, unit, rec, arr)
            self._verified.add((hook, unit))
        return arr

    def _extent(self, hook: str) -> int:
        """Rows of the dataset's row space: every unit full, but the last as committed (it
        may be short). Slices are taken over this, so a slice into uncommitted rows raises."""
        last = self.info.num_units - 1
        rec = self._commits[hook].get(last)
        return last * self.info.unit_rows + (rec.rows if rec is not None else self.info.unit_rows)

    def read(
        self,
        hook: str,
        rows: slice | Sequence[int] | np.ndarray | None = None,
        *,
        docs: Iterable[int] | None = None,
        as_: Literal["numpy", "torch"] = "numpy",
        dtype: Any = None,
    ) -> np.ndarray | torch.Tensor:
        """Activations ``[n, d]`` of ``hook`` at global token rows (a slice or an index array),
        or of every row of ``docs``; with neither, every committed row in order (aligned with
        ``tokens(hook)``). Whole units are checked against their checksum as they are read.
        NumPy output of bfloat16 data is widened to float32 exactly;
        ``as_="torch"`` returns bfloat16 as is. ``dtype`` converts (e.g. ``torch.float32``)."""
        self._check_hook(hook)
        if as_ not in ("numpy", "torch"):
            raise ValueError(f"as_ must be 'numpy' or 'torch', got {as_!r}")
        out_name, out_np = _resolve_out_dtype(self.info.dtype, as_, dtype)
        d = self.info.hooks[hook].d
        ur = self.info.unit_rows
        if rows is not None and docs is not None:
            raise ValueError("pass `rows` or `docs`, not both")

        # Plan: a list of (unit, lo, hi, take) where take indexes into the unit's [lo, hi) block.
        plan: list[tuple[int, int, int, np.ndarray | None]] = []
        if rows is None and docs is None:
            for u in self.committed_units(hook):
                plan.append((u, 0, self._commits[hook][u].rows, None))
            n = sum(hi - lo for _, lo, hi, _ in plan)
            positions = None
        else:
            if docs is not None:
                toks = self.tokens(hook)
                idx = toks.column("row").to_numpy()[rows_of_docs(toks, list(docs))]
            elif isinstance(rows, slice):
                start, stop, step = rows.indices(self._extent(hook))
                if step == 1:
                    u = start // ur
                    while start < stop:
                        hi_global = min(stop, (u + 1) * ur)
                        plan.append((u, start - u * ur, hi_global - u * ur, None))
                        start = hi_global
                        u += 1
                    idx = None
                else:
                    idx = np.arange(start, stop, step, dtype=np.int64)
            else:
                idx = np.asarray(rows)
                if idx.dtype.kind not in "iu" or idx.ndim != 1:
                    raise ValueError(f"rows must be a slice or a 1-d integer array, got dtype {idx.dtype} ndim {idx.ndim}")
                idx = idx.astype(np.int64)
                if idx.size and idx.min() < 0:
                    raise IndexError(f"row indices must be non-negative, got {int(idx.min())}")
            if idx is not None:
                n = idx.size
                units = idx // ur
                order = np.argsort(units, kind="stable")
                su = units[order]
                cuts = np.flatnonzero(np.diff(su)) + 1
                positions = []
                for grp in np.split(order, cuts):
                    if grp.size == 0:
                        continue
                    u = int(units[grp[0]])
                    local = idx[grp] - u * ur
                    lo, hi = int(local.min()), int(local.max()) + 1
                    plan.append((u, lo, hi, local - lo))
                    positions.append(grp)
            else:
                n = sum(hi - lo for _, lo, hi, _ in plan)
                positions = None

        # Check every unit is committed before reading anything.
        for u, _lo, hi, _ in plan:
            self._record(hook, u, hi)
        if len(plan) == 1 and plan[0][3] is None and out_name == self.info.dtype:
            # One block in the stored dtype: hand over the buffer it was read into, no copy.
            u, lo, hi, _ = plan[0]
            vals = self._unit_values(hook, u, lo, hi)
            return to_torch(vals, out_name) if as_ == "torch" else vals
        out = np.empty((n, d), dtype=out_np)
        at = 0
        for i, (u, lo, hi, take) in enumerate(plan):
            vals = self._unit_values(hook, u, lo, hi)
            if take is None:
                _copy_into(out[at : at + hi - lo], out_name, vals, self.info.dtype)
                at += hi - lo
            else:
                assert positions is not None
                tmp = np.empty((take.size, d), dtype=out_np)
                _copy_into(tmp, out_name, vals[take], self.info.dtype)
                out[positions[i]] = tmp
        if as_ == "torch":
            return to_torch(out, out_name)
        return out

    def iter_batches(self, hooks: str | Sequence[str], **options: Any) -> BatchIterator:
        """Shuffled training batches of ``hooks``: a ``[batch, d]`` tensor, or a dict of aligned
        tensors for several hooks. Options (``batch_size=4096, shuffle=True, seed=0, epochs=1,
        skip_special=True, buffer_rows=2**17, drop_last=False, dtype=torch.float32,
        prefetch=4``) are those of :class:`store.batches.BatchIterator`."""
        from store.batches import BatchIterator

        return BatchIterator(self, hooks, **options)

    # -- verification ---------------------------------------------------------------------

    def verify(self, *, hooks: Sequence[str] | None = None) -> VerifyReport:  # noqa: C901
        """Check every committed unit's files against its commit record (size, shard index,
        checksum, row count). Returns a report; never raises for a bad file."""
        self.refresh()
        report = VerifyReport(self.name)
        hooks = self.hooks if hooks is None else [self._check_hook(h) for h in hooks]
        units: set[int] = set()
        for unit, rec in sorted(self._commits[None].items()):
            self._tokens.pop(unit, None)
            try:
                report.bytes_checked += len(self._read_token_file(rec, "", verify=True))
                self._unit_tokens(unit)
            except (CorruptionError, OSError) as e:
                report.problems.append(Problem(None, unit, rec.file, str(e).rsplit("): ", 1)[-1].removeprefix(": ")))
            report.files_checked += 1
            units.add(unit)
        for hook in hooks:
            for unit, rec in sorted(self._commits[hook].items()):
                self._checked.discard((hook, unit))
                self._verified.discard((hook, unit))
                try:
                    arr = self._unit_values(hook, unit, verify=True)
                    report.bytes_checked += arr.nbytes
                except (CorruptionError, OSError) as e:
                    report.problems.append(Problem(hook, unit, rec.file, str(e).rsplit("): ", 1)[-1]))
                report.files_checked += 1
                units.add(unit)
        report.units_checked = len(units)
        return report
