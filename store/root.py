"""What the artifact layers need of a store: its storage and its root URI.

:class:`strata.store.core.Store` sits on top and hands out readers and writers (datasets,
feature tables, SAEs, analyses); those take a :class:`StoreRoot` rather than importing core, so
the store's modules import one way only, from core down.
"""

from __future__ import annotations

from typing import Protocol

from strata.store.storage import Storage


class StoreRoot(Protocol):
    """A store as its artifacts see it (``Store`` is one)."""

    @property
    def storage(self) -> Storage:
        """The backend every key is read from and written to."""
        ...

    @property
    def uri(self) -> str:
        """The store's root, for messages (``./acts``, ``s3://bucket/prefix``)."""
        ...
