"""Shuffled training batches from the store, deterministic and resumable.

The order is a pure function of a few numbers: the seed, the epoch, and the snapshot of
committed units taken when the iterator was made. Each epoch permutes the units, groups them
into windows of about ``buffer_rows`` rows, and permutes the rows inside each window; the
epoch's row stream is the windows one after another, and batch ``b`` is rows
``[b * batch_size, (b + 1) * batch_size)`` of that stream. Every kept row appears exactly once
per epoch, and resuming at ``(epoch, batch)`` skips whole windows without reading them.

A daemon thread loads and shuffles the next windows while the consumer trains on the current
one, so storage reads overlap compute.
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

from store.dtypes import storage_dtype
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
        buffer_rows: int = 1 << 18,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 2,
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
        self._windows: queue.Queue[Any] = queue.Queue()
        self._cur: list[Any] | None = None

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

    def _load_window(self, epoch: int, index: int, units: list[int]) -> dict[str, np.ndarray]:
        """Rows of the window's units, special rows dropped, converted and permuted."""
        ds = self.ds
        n = sum(self.kept[u] for u in units)
        perm = (
            np.random.default_rng([self.seed, epoch, index]).permutation(n) if self.shuffle else np.arange(n)
        )
        # Row j of the window (in unit order) lands at position inv[j]: one scatter per unit
        # converts dtype and shuffles in the same pass.
        inv = np.empty(n, dtype=np.int64)
        inv[perm] = np.arange(n)
        out_name = _TORCH_OUT[self.dtype]
        out = {h: np.empty((n, ds.info.hooks[h].d), dtype=storage_dtype(out_name)) for h in self.hooks}
        at = 0
        from store.dataset import _copy_into

        for u in units:
            keep = None
            if self.skip_special and ds._commits[None][u].special:
                keep = np.flatnonzero(~ds._unit_tokens(u).column("special").to_numpy(zero_copy_only=False))
            k = self.kept[u]
            dst = inv[at : at + k]
            for h in self.hooks:
                vals = ds._unit_values(h, u, verify=True)
                if keep is not None:
                    vals = vals[keep]
                if not self.shuffle:
                    _copy_into(out[h][at : at + k], out_name, vals, ds.info.dtype)
                elif out_name == ds.info.dtype:
                    out[h][dst] = vals
                else:
                    tmp = np.empty((k, vals.shape[1]), dtype=out[h].dtype)
                    _copy_into(tmp, out_name, vals, ds.info.dtype)
                    out[h][dst] = tmp
            at += k
        return out

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

    def _loader(self, epoch: int, batch: int, stop: threading.Event, out: queue.Queue) -> None:
        try:
            for e, wi, units, skip in self._plan(epoch, batch):
                if stop.is_set():
                    return
                data = self._load_window(e, wi, units)
                item = (e, {h: a[skip:] for h, a in data.items()})
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_END)
        except BaseException as exc:  # surfaced in the consumer's thread
            out.put(_Failure(exc))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._windows = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=self._loader,
            args=(self._epoch, self._batch, self._stop, self._windows),
            name="strata-batches",
            daemon=True,
        )
        self._thread.start()
        # Consumer state: the current window's rows, the epoch they belong to, the read offset,
        # and a carry of rows short of a batch from the previous window of the same epoch.
        self._cur = None
        self._ended = False
        self._cur_epoch = self._epoch
        self._offset = 0
        self._carry: dict[str, np.ndarray] | None = None

    def close(self) -> None:
        """Stop the loader thread (also done when the iterator is exhausted)."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._windows.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
            self._thread = None
        self._cur = None

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass

    # -- consuming ----------------------------------------------------------------------------

    def __iter__(self) -> BatchIterator:
        return self

    def _emit(self, parts: dict[str, np.ndarray]) -> Any:
        tensors = {h: torch.from_numpy(a) for h, a in parts.items()}
        if self.dtype is torch.bfloat16:
            tensors = {h: t.view(torch.bfloat16) for h, t in tensors.items()}
        return tensors[self.hooks[0]] if self.single else tensors

    def _next_window(self) -> bool:
        if self._ended:
            return False
        item = self._windows.get()
        if item is _END:
            self._ended = True
            return False
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        epoch, data = item
        self._cur, self._cur_epoch, self._offset = data, epoch, 0
        return True

    def __next__(self) -> Any:
        if self._thread is None:
            if self.epochs is not None and self._epoch >= self.epochs:
                raise StopIteration
            self._start()
        bs = self.batch_size
        while True:
            if self._cur is None:
                if not self._next_window():
                    return self._finish_epoch_tail(final=True)
                if self._carry is not None and self._cur_epoch != self._carry_epoch:
                    tail = self._finish_epoch_tail(final=False)
                    if tail is not None:
                        return tail
            n = next(iter(self._cur.values())).shape[0]
            need = bs - (0 if self._carry is None else next(iter(self._carry.values())).shape[0])
            if self._offset + need <= n:
                lo, hi = self._offset, self._offset + need
                self._offset = hi
                if self._carry is None:
                    parts = {h: a[lo:hi] for h, a in self._cur.items()}
                else:
                    parts = {h: np.concatenate([self._carry[h], a[lo:hi]]) for h, a in self._cur.items()}
                    self._carry = None
                if self._offset >= n:
                    self._cur = None
                self._advance(self._cur_epoch)
                return self._emit(parts)
            # Not enough rows left in this window: carry them into the next window of the epoch.
            rest = {h: a[self._offset :] for h, a in self._cur.items()}
            self._carry = rest if self._carry is None else {h: np.concatenate([self._carry[h], rest[h]]) for h in rest}
            self._carry_epoch = self._cur_epoch
            self._cur = None

    def _finish_epoch_tail(self, *, final: bool) -> Any:
        """The short last batch of an epoch (unless drop_last); StopIteration at the very end."""
        carry, self._carry = self._carry, None
        if carry is not None and next(iter(carry.values())).shape[0] and not self.drop_last:
            self._advance(self._carry_epoch)
            return self._emit(carry)
        if carry is not None:
            self._epoch, self._batch = self._carry_epoch + 1, 0
        if final:
            self.close()
            self._epoch, self._batch = (self.epochs or 0), 0
            raise StopIteration
        return None

    def _advance(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0
        self._batch += 1
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = epoch + 1, 0

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
