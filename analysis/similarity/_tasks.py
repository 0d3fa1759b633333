"""Running partial computations per range of units: as Ray tasks, or in this process.

Each task opens the store itself (from a :class:`StoreRef`: a URI and options, never a live
object) and returns a small dict of NumPy arrays (co-moments are ``O(d^2)``: about 14 MB for
``d = 768``), so activation data never travels through Ray's object store.

Credentials follow the extraction pipeline's rule (``pipeline.cluster``): a private Ray started by
this process gets the caller's ``storage_options``; a cluster joined at an address gets only the
non-secret ones, and its workers use their own credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from strata.store import ActivationDataset, Store

log = logging.getLogger(__name__)

__all__ = ["StoreRef", "Executor", "split_ranges"]


@dataclass(frozen=True)
class StoreRef:
    """How a task opens the store: its URI and the storage options it may use."""

    uri: str
    options: dict[str, Any] | None = None

    def open(self) -> Store:
        from strata import store

        return store.open(self.uri, storage_options=self.options, create=False)

    def dataset(self, name: str) -> ActivationDataset:
        return self.open().dataset(name)


def _ray_private() -> bool:
    import ray

    node = ray._private.worker.global_worker.node
    return bool(getattr(node, "head", False))


class Executor:
    """Runs ``fn(*args)`` for each task: as Ray tasks (``num_cpus=1`` each) when Ray is running in
    this process (or ``use_ray=True``), else one after another here. Results keep the task order."""

    def __init__(self, use_ray: bool | None = None) -> None:
        if use_ray is None:
            try:
                import ray

                use_ray = ray.is_initialized()
            except ImportError:  # pragma: no cover - ray is a dependency
                use_ray = False
        self.use_ray = bool(use_ray)

    @property
    def private(self) -> bool:
        """Whether the workers are this process's own (and may get its credentials)."""
        return (not self.use_ray) or _ray_private()

    def ref(self, ds: ActivationDataset) -> StoreRef:
        from strata.store.storage import public_options

        opts = getattr(ds.storage, "storage_options", None) or None
        return StoreRef(ds.store.uri, opts if self.private else public_options(opts))

    def default_tasks(self) -> int:
        if not self.use_ray:
            return 1
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        if not self.use_ray:
            return [fn(*args) for args in tasks]
        import ray

        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        return ray.get([remote.remote(*args) for args in tasks])


def split_ranges(units: np.ndarray, parts: int) -> list[np.ndarray]:
    """Pair indices cut into at most ``parts`` contiguous ranges of whole units of roughly equal
    size (``units[i]``: the side-0 unit of pair ``i``, non-decreasing)."""
    n = units.size
    if n == 0:
        return []
    starts = np.r_[0, np.flatnonzero(np.diff(units)) + 1]
    parts = max(1, min(int(parts), starts.size))
    # Cut at the unit start nearest each ideal boundary, so every range holds whole units.
    cuts = sorted({int(starts[np.argmin(np.abs(starts - n * p / parts))]) for p in range(1, parts)} - {0})
    bounds = [0, *cuts, n]
    return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
