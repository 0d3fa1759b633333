"""Shuffled training batches from the store, deterministic and resumable.

The order is a pure function of a few numbers: the seed, the epoch, and the set of units
(committed when the iterator was made, or chosen with ``units=``). Each epoch permutes the
units, groups them into windows of about ``buffer_rows`` rows, and permutes the rows inside
each window; the epoch's row stream is the windows one after another. Every kept row appears
exactly once per epoch.

* ``epochs=N``: batch ``b`` of epoch ``e`` is rows ``[b * batch_size, (b + 1) * batch_size)``
  of that epoch's stream; an epoch's last batch may be short (``drop_last`` drops it).
* ``epochs=None`` (training): the epochs' streams are joined into one endless stream and
  batch ``b`` is rows ``[b * batch_size, (b + 1) * batch_size)`` of it, so every batch is full
  (a batch may straddle two epochs).

The state is ``(epoch, batch)`` or, endless, the global batch index; resuming skips whole
windows without reading them.

Two daemon threads work ahead of the consumer: one maps the next window's shard files (and
checks each unit the first time), the other gathers batches (``prefetch`` of them) straight
out of the mapped files, so reads, the shuffle and training overlap, and no window is ever
copied whole. Rows within a batch come grouped by unit, in row order (see ``_Loader._gather``).

The threads never outlive the iterator: ``close()`` stops them, as do ``with``, exhausting
it, garbage collection and interpreter exit (an ``atexit`` hook), so a script that takes one
batch and exits ends cleanly.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from strata.store.datasets.manifest import DatasetInfo
from strata.store.dtypes import storage_dtype, to_torch
from strata.store.errors import NotCommittedError

if TYPE_CHECKING:
    import torch

_END = object()
#: The output dtypes a batch may have, by name (``str(torch.float32) == "torch.float32"``).
_TORCH_OUT = ("torch.float32", "torch.float16", "torch.bfloat16")


class BatchSource(Protocol):
    """What the iterator reads of a dataset (an
    :class:`~strata.store.datasets.reader.ActivationDataset` is one)."""

    name: str

    @property
    def info(self) -> DatasetInfo: ...

    def check_hook(self, hook: str) -> str: ...

    def committed_units(self, hook: str | None = None) -> list[int]: ...

    def unit_counts(self, hook: str | None, unit: int) -> tuple[int, int]: ...

    def special_mask(self, unit: int) -> np.ndarray: ...

    def unit_array(self, hook: str, unit: int) -> np.ndarray: ...
_LIVE: weakref.WeakSet[_Loader] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # Daemon threads still running torch or NumPy code while the interpreter tears down abort
    # the process ("terminate called without an active exception"); stop and join them first.
    for loader in list(_LIVE):
        loader.stop()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass(frozen=True)
class _Order:
    """The row order: pure functions of (seed, epoch) over a fixed set of units."""

    units: tuple[int, ...]
    kept: dict[int, int]  # unit -> rows kept (special rows left out when skipping them)
    unit_rows: int
    seed: int
    shuffle: bool
    units_per_window: int

    @property
    def rows_per_epoch(self) -> int:
        return sum(self.kept.values())

    def windows(self, epoch: int) -> list[list[int]]:
        units = list(self.units)
        if self.shuffle:
            units = [units[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(units))]
        k = self.units_per_window
        return [units[i : i + k] for i in range(0, len(units), k)]

    def window_order(self, epoch: int, index: int, keep: list[np.ndarray]) -> np.ndarray:
        """Positions (in the window, units laid out in order, ``unit_rows`` apart) of the
        window's kept rows, in stream order. ``keep[i]``: kept rows of the window's unit i."""
        kept = np.concatenate([slot * self.unit_rows + k for slot, k in enumerate(keep)])
        if self.shuffle:
            kept = kept[np.random.default_rng([self.seed, epoch, index]).permutation(kept.size)]
        return kept

    def plan(self, epoch: int, skip: int, epochs: int | None) -> Iterator[tuple[int, int, list[int], int]]:
        """``(epoch, window index, units, rows to skip)`` from row ``skip`` of ``epoch`` on."""
        while epochs is None or epoch < epochs:
            for wi, units in enumerate(self.windows(epoch)):
                n = sum(self.kept[u] for u in units)
                if skip >= n:
                    skip -= n
                    continue
                yield epoch, wi, units, skip
                skip = 0
            epoch += 1
            skip = 0


#: Units from which the first pass of an iterator shows progress (``progress=None``): mapping a unit
#: checks all of its bytes, so a first pass over many units takes a while.
PROGRESS_UNITS = 16


class _Loader:
    """The two loader threads of one run of the iterator. They hold the dataset and the
    order, never the iterator, so an iterator that is dropped is collected and stops them."""

    def __init__(self, ds: BatchSource, hooks: list[str], order: _Order, *, batch_size: int, epochs: int | None,
                 drop_last: bool, dtype: torch.dtype, prefetch: int, skip_special: bool, single: bool, progress: bool | None = None) -> None:
        self.ds, self.hooks, self.order, self.progress = ds, hooks, order, progress
        self.batch_size, self.epochs, self.drop_last = batch_size, epochs, drop_last
        self.dtype, self.skip_special, self.single = dtype, skip_special, single
        self.stop_event = threading.Event()
        self.out: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.threads: list[threading.Thread] = []

    def start(self, epoch: int, skip: int) -> None:
        windows: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.threads = [
            threading.Thread(target=self._reader, args=(epoch, skip, windows), name="strata-batches-read", daemon=True),
            threading.Thread(target=self._gatherer, args=(epoch, windows), name="strata-batches-gather", daemon=True),
        ]
        _LIVE.add(self)
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()
        self.threads = []
        _LIVE.discard(self)

    def _put(self, q: queue.Queue, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue) -> Any:
        while not self.stop_event.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def _keep(self, unit: int) -> np.ndarray:
        rows, special = self.ds.unit_counts(None, unit)
        if self.skip_special and special:
            return np.flatnonzero(~self.ds.special_mask(unit))
        return np.arange(rows)

    def _reader(self, epoch: int, skip: int, windows: queue.Queue) -> None:
        """Map the next windows (checking units the first time) while batches are gathered. The
        first pass over many units (each checked in full as it is mapped) shows a progress bar."""
        bar = None
        if skip == 0 and self.progress is not False and (self.progress or len(self.order.units) >= PROGRESS_UNITS):
            # disable=None: a widget in Jupyter, text on a terminal, nothing when stderr is neither.
            bar = tqdm(total=len(self.order.units), unit="unit", desc=f"{self.ds.name}: first pass",
                       disable=None if self.progress is None else not self.progress)
        try:
            for e, wi, units, skip_rows in self.order.plan(epoch, skip, self.epochs):
                mapped = {h: [self.ds.unit_array(h, u) for u in units] for h in self.hooks}
                if bar is not None:
                    if e == epoch:
                        bar.update(len(units))
                    else:
                        bar.close()
                        bar = None
                order = self.order.window_order(e, wi, [self._keep(u) for u in units])[skip_rows:]
                if not self._put(windows, (e, order, mapped)):
                    return
            self._put(windows, _END)
        except BaseException as exc:  # surfaced in the consumer's thread
            self._put(windows, _Failure(exc))
        finally:
            if bar is not None:
                bar.close()

    def _gather(self, window: dict[str, list[np.ndarray]], idx: np.ndarray, out: dict[str, np.ndarray], at: int) -> None:
        """Rows ``idx`` (window positions) into ``out[h][at:]``, straight from the mapped units.

        Rows come grouped by unit within the batch, in row order within each unit: one
        contiguous ``take`` per unit, walking memory forwards (what the hardware prefetcher
        is good at), with no scatter and no intermediate copy. Which rows form a batch is the
        shuffle; their order inside it is immaterial to training (the loss is a mean over the
        batch), so a batch is still a uniform sample of the window."""
        ur = self.order.unit_rows
        slots = idx // ur
        order = np.argsort(idx)
        counts = np.bincount(slots, minlength=len(next(iter(window.values()))))
        rows = (idx - slots * ur)[order]
        pos = 0
        for slot, k in enumerate(counts):
            if k:
                for h in self.hooks:
                    # mode="clip" writes straight into `out` (mode="raise" buffers it); the
                    # indices are in range by construction.
                    np.take(window[h][slot], rows[pos : pos + k], axis=0, out=out[h][at + pos : at + pos + k], mode="clip")
                pos += k

    def _emit(self, parts: dict[str, np.ndarray], e: int) -> bool:
        stored = self.ds.info.dtype
        tensors = {}
        for h, a in parts.items():
            t = to_torch(a, stored)
            tensors[h] = t if t.dtype == self.dtype else t.to(self.dtype)
        return self._put(self.out, (e, tensors[self.hooks[0]] if self.single else tensors))

    def _new(self, n: int) -> dict[str, np.ndarray]:
        sdt = storage_dtype(self.ds.info.dtype)
        return {h: np.empty((n, self.ds.info.hooks[h].d), dtype=sdt) for h in self.hooks}

    def _gatherer(self, epoch: int, windows: queue.Queue) -> None:
        """Produce the batch sequence. Batches are fresh arrays (never views of the mapped
        files). With finite epochs, rows short of a batch at an epoch's end form its last
        batch; endless, they carry over into the next epoch's first batch."""
        bs = self.batch_size
        carry: dict[str, np.ndarray] | None = None
        cur = epoch
        item: Any = None
        try:
            while True:
                item = self._get(windows)
                if item is _END or isinstance(item, _Failure):
                    break
                e, order, window = item
                if e != cur:
                    if carry is not None and self.epochs is not None:
                        if not self.drop_last and not self._emit(carry, cur):
                            return
                        carry = None
                    cur = e
                at = 0
                if carry is not None:
                    c = next(iter(carry.values())).shape[0]
                    take = order[: bs - c]
                    merged = self._new(c + take.size)
                    for h in self.hooks:
                        merged[h][:c] = carry[h]
                    self._gather(window, take, merged, c)
                    carry, at = merged, take.size
                    if c + take.size == bs:
                        if not self._emit(carry, e):
                            return
                        carry = None
                while carry is None and at + bs <= order.size:
                    parts = self._new(bs)
                    self._gather(window, order[at : at + bs], parts, 0)
                    if not self._emit(parts, e):
                        return
                    at += bs
                if at < order.size:
                    rest = self._new(order.size - at)
                    self._gather(window, order[at:], rest, 0)
                    carry = rest if carry is None else {h: np.concatenate([carry[h], rest[h]]) for h in self.hooks}
            if isinstance(item, _Failure):
                self._put(self.out, item)
                return
            if item is _END and not self.stop_event.is_set():
                if carry is not None and not self.drop_last and not self._emit(carry, cur):
                    return
                self._put(self.out, _END)
        except BaseException as exc:
            self._put(self.out, _Failure(exc))


def _check_int(key: str, val: Any, *, minimum: int) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{key}` must be {what}, got {val!r}")
    return int(val)


class BatchIterator:
    """Iterator of ``[batch, d]`` tensors (a dict ``{hook: tensor}`` of row-aligned batches
    for several hooks). See the module docstring for the order and the endless mode.

    ``state_dict()`` after consuming a batch resumes right after it: the next batch after
    ``load_state_dict`` equals the next batch of an uninterrupted run. Use as a context
    manager, or call :meth:`close`, to stop the loader threads promptly.

    ``progress``: a bar over the units of the first pass (each unit is checked in full when first
    mapped): ``None`` (default) shows it for iterators over at least :data:`PROGRESS_UNITS` units,
    as a widget in Jupyter or text on a terminal, and nothing when stderr is neither; ``True``
    always, ``False`` never.
    """

    def __init__(
        self,
        ds: BatchSource,
        hooks: str | Sequence[str],
        *,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        skip_special: bool = True,
        buffer_rows: int = 1 << 17,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
        prefetch: int = 4,
        units: Sequence[int] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.hooks:
            raise ValueError("`hooks` must name at least one hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"`hooks` names a hook twice: {self.hooks}")
        for h in self.hooks:
            ds.check_hook(h)
        batch_size = _check_int("batch_size", batch_size, minimum=1)
        buffer_rows = _check_int("buffer_rows", buffer_rows, minimum=1)
        prefetch = _check_int("prefetch", prefetch, minimum=1)
        seed = _check_int("seed", seed, minimum=0)
        if epochs is not None:
            epochs = _check_int("epochs", epochs, minimum=1)
        import torch  # lazy: batches are torch tensors, but `import strata.store` must not pay for torch

        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or str(dtype) not in _TORCH_OUT:
            raise ValueError(f"`dtype` must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        self.ds = ds
        self.batch_size, self.shuffle, self.seed, self.epochs = batch_size, bool(shuffle), seed, epochs
        self.skip_special, self.buffer_rows, self.drop_last = bool(skip_special), buffer_rows, bool(drop_last)
        self.dtype, self.prefetch, self.progress = dtype, prefetch, progress

        committed = set(ds.committed_units(None))
        for h in self.hooks:
            committed &= set(ds.committed_units(h))
        if units is not None:
            wanted = sorted({_check_int("units[]", u, minimum=0) for u in units})
            missing = [u for u in wanted if u not in committed]
            if missing:
                raise NotCommittedError(f"dataset {ds.name!r}: unit(s) {missing[:8]} are not committed for all of {self.hooks}")
            committed = set(wanted)
        if not committed:
            raise NotCommittedError(f"dataset {ds.name!r} has no unit committed for all of {self.hooks}")
        kept = {}
        for u in sorted(committed):
            rows, special = ds.unit_counts(None, u)
            kept[u] = rows - (special if skip_special else 0)
        self._order = _Order(
            units=tuple(sorted(committed)), kept=kept, unit_rows=ds.info.unit_rows, seed=seed, shuffle=self.shuffle,
            units_per_window=max(1, -(-buffer_rows // ds.info.unit_rows)) if shuffle else 1,
        )
        if self._order.rows_per_epoch == 0:
            raise NotCommittedError(f"dataset {ds.name!r}: every committed row is a special token")
        if epochs is None and self._order.rows_per_epoch < batch_size:
            raise ValueError(
                f"`batch_size` {batch_size} is larger than an epoch ({self._order.rows_per_epoch} rows); "
                "an endless iterator would repeat rows within a batch"
            )
        self._epoch = 0
        self._batch = 0
        self._loader: _Loader | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def units(self) -> list[int]:
        return list(self._order.units)

    @property
    def rows_per_epoch(self) -> int:
        return self._order.rows_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        n = self.rows_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless iterator (epochs=None) has no length")
        return self.batches_per_epoch * self.epochs

    # -- running ------------------------------------------------------------------------------

    def _start(self) -> None:
        if self.epochs is None:
            start = self._batch * self.batch_size  # `_batch` counts batches of the endless stream
            epoch, skip = divmod(start, self.rows_per_epoch)
        else:
            epoch, skip = self._epoch, self._batch * self.batch_size
        loader = _Loader(
            self.ds, self.hooks, self._order, batch_size=self.batch_size, epochs=self.epochs, drop_last=self.drop_last,
            dtype=self.dtype, prefetch=self.prefetch, skip_special=self.skip_special, single=self.single, progress=self.progress,
        )
        loader.start(epoch, skip)
        self._loader = loader
        self._finalizer = weakref.finalize(self, loader.stop)

    def close(self) -> None:
        """Stop the loader threads (also done when the iterator is exhausted, collected, or
        the interpreter exits)."""
        if self._finalizer is not None:
            self._finalizer()  # runs loader.stop once
            self._finalizer = None
        self._loader = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._loader is None:
            if self.epochs is not None and self._epoch >= self.epochs:
                raise StopIteration
            self._start()
        assert self._loader is not None
        item = self._loader.out.get()
        if item is _END:
            self.close()
            self._epoch, self._batch = self.epochs or 0, 0
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        e, batch = item
        self._batch += 1
        if self.epochs is not None:
            self._epoch = e
            if self._batch >= self.batches_per_epoch:
                self._epoch, self._batch = e + 1, 0
        return batch

    # -- resuming -----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([[u, self._order.kept[u]] for u in self._order.units]).encode()).hexdigest()[:16]
        return {
            "dataset": self.ds.name,
            "fingerprint": self.ds.info.fingerprint,
            "hooks": self.hooks,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "skip_special": self.skip_special,
            "buffer_rows": self.buffer_rows,
            "drop_last": self.drop_last,
            "endless": self.epochs is None,
            "units_digest": digest,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts, plus the configuration it is valid for."""
        return {"epoch": self._epoch, "batch": self._batch, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._config()
        for key, val in mine.items():
            if state.get(key) != val:
                hint = " (the dataset's committed units changed since the state was saved)" if key == "units_digest" else ""
                raise ValueError(f"cannot resume: `{key}` is {state.get(key)!r} in the saved state but {val!r} here{hint}")
        self.close()
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
