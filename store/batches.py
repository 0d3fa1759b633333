"""Shuffled training batches from the store, deterministic and resumable.

The order is a pure function of a few numbers: the seed, the epoch, and the snapshot of
committed units taken when the iterator was made. Each epoch permutes the units, groups them
into windows of about ``buffer_rows`` rows, and permutes the rows inside each window; the
epoch's row stream is the windows one after another, and batch ``b`` is rows
``[b * batch_size, (b + 1) * batch_size)`` of that stream. Every kept row appears exactly once
per epoch, and resuming at ``(epoch, batch)`` skips whole windows without reading them.

Two daemon threads work ahead of the consumer: one maps the next window's shard files (and
checks each unit's checksum the first time), the other gathers batches (``prefetch`` of them)
straight out of the mapped files, so reads, the shuffle and training overlap, and no window is
ever copied whole. Rows within a batch come grouped by unit (see ``_gather``).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from store.dtypes import storage_dtype, to_torch
from store.errors import NotCommittedError

if TYPE_CHECKING:
    from store.dataset import ActivationDataset

_END = object()
_TORCH_OUT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchIterator:
    """Iterator of ``[batch, d]`` tensors (a dict ``{hook: tensor}`` for several hooks).

    ``epochs=None`` never ends. ``state_dict()`` after consuming batch ``b`` resumes at ``b + 1``:
    the next batch after ``load_state_dict`` equals the next batch of an uninterrupted run.
    """

    def __init__(
        self,
        ds: ActivationDataset,
        hooks: str | Sequence[str],
        *,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        skip_special: bool = True,
        buffer_rows: int = 1 << 17,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 4,
    ) -> None:
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.hooks:
            raise ValueError("`hooks` must name at least one hook")
        for h in self.hooks:
            ds._check_hook(h)
        for key, val in (("batch_size", batch_size), ("buffer_rows", buffer_rows), ("prefetch", prefetch)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"`{key}` must be a positive int, got {val!r}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0):
            raise ValueError(f"`epochs` must be a positive int or None (endless), got {epochs!r}")
        if dtype not in _TORCH_OUT:
            raise ValueError(f"`dtype` must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epochs = epochs
        self.skip_special = skip_special
        self.buffer_rows = buffer_rows
        self.drop_last = drop_last
        self.dtype = dtype
        self.prefetch = prefetch

        units = set(ds.committed_units(None))
        for h in self.hooks:
            units &= set(ds.committed_units(h))
        self.units = sorted(units)
        if not self.units:
            raise NotCommittedError(f"dataset {ds.name!r} has no unit committed for all of {self.hooks}")
        toks = ds._commits[None]
        self.kept = {u: toks[u].rows - (toks[u].special if skip_special else 0) for u in self.units}
        self.rows_per_epoch = sum(self.kept.values())
        if self.rows_per_epoch == 0:
            raise NotCommittedError(f"dataset {ds.name!r}: every committed row is a special token")
        self.units_per_window = max(1, -(-buffer_rows // ds.info.unit_rows)) if shuffle else 1

        self._epoch = 0
        self._batch = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()

    # -- the order: pure functions of (seed, epoch) -------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        n = self.rows_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless iterator (epochs=None) has no length")
        return self.batches_per_epoch * self.epochs

    def _windows_of(self, epoch: int) -> list[list[int]]:
        units = list(self.units)
        if self.shuffle:
            units = [units[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(units))]
        k = self.units_per_window
        return [units[i : i + k] for i in range(0, len(units), k)]

    def _window_order(self, epoch: int, index: int, units: list[int]) -> np.ndarray:
        """Positions (in the window buffer, units laid out in order) of the window's kept
        rows, in stream order."""
        ds, ur = self.ds, self.ds.info.unit_rows
        parts = []
        for slot, u in enumerate(units):
            if self.skip_special and ds._commits[None][u].special:
                keep = np.flatnonzero(~ds._unit_tokens(u).column("special").to_numpy(zero_copy_only=False))
            else:
                keep = np.arange(ds._commits[None][u].rows)
            parts.append(slot * ur + keep)
        kept = np.concatenate(parts)
        if self.shuffle:
            kept = kept[np.random.default_rng([self.seed, epoch, index]).permutation(kept.size)]
        return kept

    def _map_window(self, units: list[int]) -> dict[str, list[np.ndarray]]:
        """The window's units as mapped ``[rows, d]`` arrays per hook (checked on first use)."""
        return {h: [self.ds._mapped_unit(h, u) for u in units] for h in self.hooks}

    # -- the loader thread --------------------------------------------------------------------

    def _plan(self, epoch: int, batch: int):
        """(epoch, window index, units, rows to skip) from a position, endlessly or to the end."""
        skip = batch * self.batch_size
        while self.epochs is None or epoch < self.epochs:
            for wi, units in enumerate(self._windows_of(epoch)):
                n = sum(self.kept[u] for u in units)
                if skip >= n:
                    skip -= n
                    continue
                yield epoch, wi, units, skip
                skip = 0
            epoch += 1
            skip = 0

    @staticmethod
    def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    @staticmethod
    def _get(q: queue.Queue, stop: threading.Event) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def _reader(self, epoch: int, batch: int, stop: threading.Event, windows: queue.Queue) -> None:
        """Map the next windows (and check units the first time) while batches are gathered."""
        try:
            for e, wi, units, skip in self._plan(epoch, batch):
                window = self._map_window(units)
                order = self._window_order(e, wi, units)[skip:]
                if not self._put(windows, (e, order, window), stop):
                    return
            self._put(windows, _END, stop)
        except BaseException as exc:
            self._put(windows, _Failure(exc), stop)

    def _gather(self, window: dict[str, list[np.ndarray]], idx: np.ndarray, out: dict[str, np.ndarray], at: int) -> None:
        """Rows ``idx`` (window positions) into ``out[h][at:]``, straight from the mapped units.

        Rows come grouped by unit within the batch (each group in shuffled order): one
        contiguous ``take`` per unit, with no scatter and no intermediate copy. The batch is
        still a uniform sample of the window, which is what training sees."""
        ur = self.ds.info.unit_rows
        slots = idx // ur
        order = np.argsort(slots, kind="stable")
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

    def _gatherer(self, epoch: int, batch: int, stop: threading.Event, windows: queue.Queue, out: queue.Queue) -> None:
        """Produce the exact batch sequence from (epoch, batch) on. Batches are fresh arrays
        (never views of the mapped files), converted to the requested dtype."""
        stored = self.ds.info.dtype
        sdt = storage_dtype(stored)
        bs = self.batch_size

        def emit(parts: dict[str, np.ndarray], e: int, b: int) -> bool:
            tensors = {}
            for h, a in parts.items():
                t = to_torch(a, stored)
                tensors[h] = t if t.dtype == self.dtype else t.to(self.dtype)
            return self._put(out, (e, b, tensors[self.hooks[0]] if self.single else tensors), stop)

        def new(n: int) -> dict[str, np.ndarray]:
            return {h: np.empty((n, self.ds.info.hooks[h].d), dtype=sdt) for h in self.hooks}

        try:
            carry: dict[str, np.ndarray] | None = None  # rows short of a batch, from the last window
            cur_epoch, b = epoch, batch
            item: Any = None
            while True:
                item = self._get(windows, stop)
                if item is _END or isinstance(item, _Failure):
                    break
                e, order, window = item
                if e != cur_epoch:
                    if carry is not None and not self.drop_last and not emit(carry, cur_epoch, b):
                        return
                    carry, cur_epoch, b = None, e, 0
                at = 0
                if carry is not None:
                    c = next(iter(carry.values())).shape[0]
                    idx = order[: bs - c]
                    merged = new(c + idx.size)
                    for h in self.hooks:
                        merged[h][:c] = carry[h]
                    self._gather(window, idx, merged, c)
                    carry, at = merged, idx.size
                    if c + idx.size == bs:
                        if not emit(carry, e, b):
                            return
                        carry, b = None, b + 1
                while carry is None and at + bs <= order.size:
                    parts = new(bs)
                    self._gather(window, order[at : at + bs], parts, 0)
                    if not emit(parts, e, b):
                        return
                    at, b = at + bs, b + 1
                if at < order.size:
                    rest = new(order.size - at)
                    self._gather(window, order[at:], rest, 0)
                    if carry is None:
                        carry = rest
                    else:
                        carry = {h: np.concatenate([carry[h], rest[h]]) for h in self.hooks}
            if isinstance(item, _Failure):
                self._put(out, item, stop)
                return
            if item is _END and not stop.is_set():
                if carry is not None and not self.drop_last and not emit(carry, cur_epoch, b):
                    return
                self._put(out, _END, stop)
        except BaseException as exc:  # surfaced in the consumer's thread
            self._put(out, _Failure(exc), stop)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        windows: queue.Queue[Any] = queue.Queue(maxsize=1)
        args = (self._epoch, self._batch, self._stop, windows)
        self._threads = [
            threading.Thread(target=self._reader, args=args, name="strata-batches-read", daemon=True),
            threading.Thread(target=self._gatherer, args=(*args, self._queue), name="strata-batches-gather", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._thread = self._threads[1]

    def close(self) -> None:
        """Stop the loader thread (also done when the iterator is exhausted)."""
        if self._thread is not None:
            self._stop.set()
            for t in self._threads:
                t.join()
            self._thread = None

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass

    # -- consuming ----------------------------------------------------------------------------

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            if self.epochs is not None and self._epoch >= self.epochs:
                raise StopIteration
            self._start()
        item = self._queue.get()
        if item is _END:
            self.close()
            self._epoch, self._batch = self.epochs or 0, 0
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        e, b, batch = item
        self._epoch, self._batch = e, b + 1
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = e + 1, 0
        return batch

    # -- resuming -----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([[u, self.kept[u]] for u in self.units]).encode()).hexdigest()[:16]
        return {
            "dataset": self.ds.name,
            "hooks": self.hooks,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "skip_special": self.skip_special,
            "buffer_rows": self.buffer_rows,
            "drop_last": self.drop_last,
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
