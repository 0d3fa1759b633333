"""The store: a root URI holding activation datasets (and, later, SAEs, feature tables and
analysis results)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from store import catalog as _catalog
from store import layout
from store.commits import utcnow
from store.dtypes import check_dtype
from store.errors import DatasetExistsError, DatasetNotFoundError
from store.lease import DatasetLease
from store.manifest import IDENTITY_META_KEYS, DatasetInfo, fingerprint
from store.storage import Storage, open_storage
from store.writer import DatasetWriter, create_hook_array, new_hook_info

if TYPE_CHECKING:
    from zarr.abc.store import Store as ZarrStore

    from store.dataset import ActivationDataset

log = logging.getLogger(__name__)

DEFAULT_UNIT_CONTEXTS = 256


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


class Store:
    """A Strata store on a local folder or ``s3://bucket/prefix``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.uri = storage.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @cached_property
    def zarr_store(self) -> ZarrStore:
        return self.storage.zarr_store()

    # -- manifests ------------------------------------------------------------------------

    def _load_info(self, name: str) -> DatasetInfo:
        key = layout.manifest_key(name)
        try:
            return DatasetInfo.from_json(self.storage.read(key))
        except FileNotFoundError:
            names = self.datasets()
            raise DatasetNotFoundError(
                f"no dataset {name!r} in store {self.uri}; it holds: {', '.join(names) if names else 'no datasets'}"
            ) from None

    def _write_info(self, info: DatasetInfo) -> None:
        # The manifest is written last: a dataset exists for readers once it does.
        self.storage.write(layout.manifest_key(info.name), info.to_json())
        _catalog.write_entry(self.storage, info)

    # -- public API -----------------------------------------------------------------------

    def datasets(self) -> list[str]:
        """Names of the datasets whose manifest is committed."""
        return [n for n in self.storage.list_dirs(layout.DATASETS) if self.storage.exists(layout.manifest_key(n))]

    def dataset(self, name: str) -> ActivationDataset:
        from store.dataset import ActivationDataset

        return ActivationDataset(self, name)

    def writer(self, name: str) -> DatasetWriter:
        """A writer for an existing dataset (workers open one each)."""
        layout.check_name(name)
        return DatasetWriter(self, name)

    def lease(self, name: str, *, owner: str = "", stale_after_s: float = 60.0) -> DatasetLease:
        """A write lease on a dataset, for a job's driver: ``with store.lease(name): ...``."""
        layout.check_name(name)
        return DatasetLease(self.storage, name, owner=owner, stale_after_s=stale_after_s, heartbeat_s=min(10.0, stale_after_s / 4))

    def create_dataset(
        self,
        name: str,
        *,
        hooks: Mapping[str, int],
        context_size: int,
        dtype: str = "float16",
        num_units: int,
        unit_contexts: int = DEFAULT_UNIT_CONTEXTS,
        meta: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> DatasetWriter:
        """Create an activation dataset (driver only) and return its writer.

        With ``exist_ok``, a dataset of the same identity (fingerprint) is reopened, grown to
        ``num_units`` and given any new hooks; a different identity is always refused, never
        overwritten.
        """
        layout.check_name(name)
        check_dtype(dtype)
        _positive_int("context_size", context_size)
        _positive_int("num_units", num_units)
        _positive_int("unit_contexts", unit_contexts)
        if not isinstance(hooks, Mapping) or not hooks:
            raise ValueError("`hooks` must map at least one hook name to its width, e.g. {'blocks.0.hook_resid_post': 768}")
        for hook, d in hooks.items():
            layout.check_hook(hook)
            _positive_int(f"hooks[{hook!r}]", d)
        meta = dict(meta or {})
        fp = fingerprint(context_size=context_size, dtype=dtype, meta=meta)
        unit_rows = unit_contexts * context_size

        if self.storage.exists(layout.manifest_key(name)):
            old = self._load_info(name)
            if old.fingerprint != fp or old.unit_contexts != unit_contexts:
                pairs = [
                    ("context_size", old.context_size, context_size),
                    ("dtype", old.dtype, dtype),
                    ("unit_contexts", old.unit_contexts, unit_contexts),
                    *[(k, old.meta.get(k), meta.get(k)) for k in IDENTITY_META_KEYS],
                ]
                diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in pairs if a != b)
                raise DatasetExistsError(f"dataset {name!r} already exists with a different identity ({diff}); choose a new name")
            if not exist_ok:
                raise DatasetExistsError(f"dataset {name!r} already exists in {self.uri}; pass exist_ok=True to reopen it")
            w = DatasetWriter(self, name)
            w.add_hooks(hooks)
            w.grow(max(num_units, w.info.num_units))
            return w

        info = DatasetInfo(
            name=name,
            fingerprint=fp,
            context_size=context_size,
            unit_contexts=unit_contexts,
            num_units=num_units,
            dtype=dtype,
            hooks={h: new_hook_info(unit_rows, d, dtype) for h, d in hooks.items()},
            meta=meta,
            created_at=utcnow(),
        )
        for hook in info.hooks:
            create_hook_array(self, info, hook)
        self._write_info(info)
        return DatasetWriter(self, name)

    def catalog(self, *, rebuild: bool = False) -> pa.Table:
        """One row per dataset with its identity fields (Parquet under ``catalog/``, also
        queryable with DuckDB: ``SELECT * FROM 'STORE/catalog/*.parquet'``). Entries lost or
        stale are rebuilt from the manifests."""
        return _catalog.read(self, rebuild=rebuild)


def open(  # noqa: A001
    uri: str | os.PathLike[str] = "./acts", *, storage_options: dict[str, Any] | None = None, durable: bool = False
) -> Store:
    """Open a store, creating its root when missing: a local folder or ``s3://bucket/prefix``.

    ``storage_options`` go to fsspec/s3fs (``endpoint_url``, ``key``, ``secret``, ...); by
    default they come from the usual AWS environment. ``durable=True`` fsyncs local files
    before committing them, so commits survive a power loss, at some write throughput."""
    return Store(open_storage(uri, storage_options, durable=durable))
