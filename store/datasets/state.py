"""A dataset's state as metadata: its identity, hooks and widths, committed units per hook and the
token rows of each unit, and its version record. Never activations.

Planners (``strata reprocess``, an SAE's held-out split, a feature table's units) need to know what
a dataset holds, and what it will hold once a planned extraction has run, without reading
activations. :class:`DatasetState` is that snapshot: :meth:`DatasetState.read` takes it from an
open dataset through the reader's public methods, :meth:`DatasetState.planned` stands for a
dataset that does not exist yet, and :meth:`DatasetState.extended` is the state after more units
are committed. It answers the reader's metadata questions (``hooks``, ``committed_units``,
``unit_counts``, ``info.fingerprint``, ``info.hooks[h].d``, ``info.context_size``) so code written
against a dataset's metadata takes either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from strata.store.layout import hook_order

if TYPE_CHECKING:  # type only: the reader imports the whole read path
    from strata.store.datasets.reader import ActivationDataset


@dataclass(frozen=True)
class HookShape:
    """One hook's stored row width."""

    d: int


@dataclass(frozen=True)
class StateInfo:
    """The identity fields a dataset's manifest gives planners."""

    fingerprint: str
    context_size: int
    hooks: Mapping[str, HookShape]
    unit_contexts: int
    num_units: int
    meta: Mapping[str, Any]

    @property
    def unit_rows(self) -> int:
        return self.unit_contexts * self.context_size


def _frozen(units: Mapping[str | None, Iterable[int]]) -> Mapping[str | None, frozenset[int]]:
    return MappingProxyType({h: frozenset(us) for h, us in units.items()})


@dataclass(frozen=True)
class DatasetState:
    """What a dataset holds, as metadata. ``units[None]`` are the token table's committed units."""

    name: str
    info: StateInfo
    units: Mapping[str | None, frozenset[int]]
    rows: Mapping[int, int] = field(default_factory=dict)
    """Token rows of each committed unit of the token table whose record is sound."""
    exists: bool = True
    """False for a dataset a planned extraction will create."""

    @classmethod
    def read(cls, ds: ActivationDataset) -> DatasetState:
        """The state of an open dataset (its committed units as of its last refresh)."""
        info = ds.info
        units: dict[str | None, list[int]] = {h: ds.committed_units(h) for h in ds.hooks}
        units[None] = ds.committed_units(None)
        rows = {u: ds.unit_counts(None, u)[0] for u in units[None] if (None, u) not in ds.damaged}
        shapes = {h: HookShape(int(info.hooks[h].d)) for h in ds.hooks}
        return cls(ds.name, StateInfo(info.fingerprint, info.context_size, MappingProxyType(shapes), info.unit_contexts,
                                      info.num_units, MappingProxyType(dict(info.meta))),
                   _frozen(units), MappingProxyType(rows))

    @classmethod
    def planned(cls, name: str, *, fingerprint: str, context_size: int, unit_contexts: int, meta: Mapping[str, Any]) -> DatasetState:
        """A dataset that does not exist yet: no hook, no unit."""
        info = StateInfo(fingerprint, context_size, MappingProxyType({}), unit_contexts, 0, MappingProxyType(dict(meta)))
        return cls(name, info, _frozen({None: ()}), exists=False)

    def extended(self, units: Mapping[str | None, Iterable[int]], *, widths: Mapping[str, int]) -> DatasetState:
        """The state once ``units`` (hook -> units; None: the token table) are committed too and
        the hooks of ``widths`` exist. A unit added here counts as a whole unit of rows."""
        merged = {h: set(us) for h, us in self.units.items()}
        for h, us in units.items():
            merged.setdefault(h, set()).update(us)
        shapes = {**self.info.hooks, **{h: HookShape(int(d)) for h, d in widths.items()}}
        n = max([self.info.num_units, *(u + 1 for us in merged.values() for u in us)])
        info = StateInfo(self.info.fingerprint, self.info.context_size, MappingProxyType(shapes), self.info.unit_contexts, n,
                         self.info.meta)
        return DatasetState(self.name, info, _frozen(merged), self.rows, exists=self.exists)

    @property
    def hooks(self) -> list[str]:
        return sorted(self.info.hooks, key=hook_order)

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def revision(self) -> str | None:
        """The model revision the dataset was made with (its version's identity)."""
        v = self.info.meta.get("revision")
        return None if v is None else str(v)

    @property
    def version_of(self) -> str | None:
        """The dataset this one is a new version of, when a model revision moved."""
        v = self.info.meta.get("version_of")
        return None if v is None else str(v)

    def committed_units(self, hook: str | None = None) -> list[int]:
        return sorted(self.units.get(hook, frozenset()))

    def unit_counts(self, hook: str | None, unit: int) -> tuple[int, int]:
        """``(token rows, 0)`` of a unit: as committed, or a whole unit for one not committed yet."""
        return self.rows.get(unit, self.info.unit_rows), 0
