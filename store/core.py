"""The store: a root URI holding activation datasets (and, later, SAEs, feature tables and
analysis results)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from strata.store import layout
from strata.store.analyses.handles import ANALYSES, AnalysisHandle
from strata.store.commit import artifacts
from strata.store.commit.lease import Lease
from strata.store.commit.protocol import utcnow
from strata.store.datasets import catalog
from strata.store.datasets.manifest import IDENTITY_META_KEYS, DatasetInfo, dataset_names, fingerprint, load_manifest, write_manifest
from strata.store.datasets.reader import ActivationDataset, open_dataset
from strata.store.datasets.shards import create_hook_array
from strata.store.datasets.state import DatasetState
from strata.store.datasets.versions import DatasetVersion, versions
from strata.store.datasets.writer import DatasetWriter, dataset_lease, new_hook_info
from strata.store.dtypes import check_dtype
from strata.store.errors import CredentialsError, DatasetExistsError, StorageError, StoreNotFoundError, StrataError
from strata.store.features.table import FeatureTable, table_names
from strata.store.saes.handles import SAES, SAEHandle
from strata.store.storage import Storage, auth_failure, open_storage
from strata.store.views.summaries import store_html

if TYPE_CHECKING:
    from zarr.abc.store import Store as ZarrStore

log = logging.getLogger(__name__)

DEFAULT_UNIT_CONTEXTS = 256
STORE_FORMAT = "strata.store"
STORE_VERSION = 2


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

    def _repr_html_(self) -> str:
        """Jupyter's summary: datasets (from the catalog), SAEs, feature tables and analyses."""
        return store_html(self)

    @cached_property
    def zarr_store(self) -> ZarrStore:
        """A Zarr v3 store rooted at the store's root (any Zarr reader opens the arrays)."""
        return self.storage.zarr_store()

    # -- datasets -------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        """Names of the datasets whose manifest is committed."""
        return dataset_names(self.storage)

    def dataset(self, name: str, *, version: str | None = None) -> ActivationDataset:
        """The dataset of exactly that name; with ``version``, one of the versions of ``name``
        (see :meth:`versions`): ``"latest"`` the newest, or a revision (a prefix of its hash)."""
        return open_dataset(self, name, version=version)

    def dataset_state(self, name: str) -> DatasetState:
        """What dataset ``name`` holds, as metadata only (identity, hooks, committed units per
        hook, token rows per unit, version record): what planners read, never activations."""
        return DatasetState.read(self.dataset(name))

    def versions(self, name: str) -> list[DatasetVersion]:
        """The versions of dataset ``name``, oldest first by creation time: the dataset itself and
        those made from it when its model's revision moved (``strata reprocess`` names them
        ``name@REVISION``). Each has ``.name``, ``.revision``, ``.short``, ``.created_at``."""
        return versions(self, name)

    def manifest(self, name: str) -> DatasetInfo:
        """The committed manifest of a dataset."""
        return load_manifest(self.storage, layout.check_name(name))

    def writer(self, name: str, *, fence: int | None = None) -> DatasetWriter:
        """A writer for an existing dataset (workers open one each). ``fence`` is the lease
        generation of the job it works for (see :class:`DatasetWriter`)."""
        return DatasetWriter(self, layout.check_name(name), fence=fence)

    def lease(self, name: str, *, owner: str = "", stale_after_s: float = 60.0) -> Lease:
        """A write lease on a dataset, for a job's driver: ``with store.lease(name) as lease:``;
        ``lease.token`` is the job's fencing token."""
        return dataset_lease(self.storage, name, owner=owner, stale_after_s=stale_after_s)

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
        fence: int | None = None,
    ) -> DatasetWriter:
        """Create an activation dataset (driver only) and return its writer.

        With ``exist_ok``, a dataset of the same identity (fingerprint) is reopened, grown to
        ``num_units`` and given any new hooks; a different identity is always refused, never
        overwritten. ``fence``: the creating job's lease generation.
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
            old = self.manifest(name)
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
            w = DatasetWriter(self, name, fence=fence)
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
            create_hook_array(self.storage, info, hook)
        # The manifest is written last: a dataset exists for readers once it does.
        write_manifest(self.storage, info)
        w = DatasetWriter(self, name, fence=fence)
        self.update_catalog(name)
        return w

    def delete_dataset(self, name: str) -> None:
        """Delete a dataset and its catalog entry, holding its write lease. The manifest goes
        first, so readers never see a half-deleted dataset."""
        catalog.delete_dataset(self, name)

    # -- other artifacts -------------------------------------------------------------------

    def saes(self) -> list[str]:
        """Names of the committed SAEs."""
        return artifacts.names(self.storage, SAES)

    def sae(self, name: str) -> SAEHandle:
        """A committed SAE (``.load()``, ``.lineage``, ``.metrics``, ``.path``)."""
        return SAEHandle(self, name)

    def analyses(self) -> list[str]:
        """Names of the committed analysis results."""
        return artifacts.names(self.storage, ANALYSES)

    def analysis(self, name: str, *, allow_stale: bool = False) -> AnalysisHandle:
        """A committed analysis result (``.table()``, ``.meta``). One computed from a dataset
        (or SAE) since replaced under the same name raises ``StaleArtifactError`` unless
        ``allow_stale`` (to inspect or remove it)."""
        return AnalysisHandle(self, name, allow_stale=allow_stale)

    def features(self, name: str, *, allow_stale: bool = False) -> FeatureTable:
        """A feature table of SAE latents (``.stats()``, ``.top(f, k)``, ``.activations(f)``, ``.latents(rows=...)``).
        One whose dataset was replaced under the same name raises ``StaleArtifactError``
        unless ``allow_stale`` (to inspect or remove it)."""
        return FeatureTable(self, name, allow_stale=allow_stale)

    def feature_tables(self) -> list[str]:
        """Names of the feature tables."""
        return table_names(self)

    def artifact_lease(self, kind: str, name: str, *, owner: str = "", stale_after_s: float = 60.0) -> Lease:
        """The write lease of an artifact folder (``saes``/``analyses``/... and a name)."""
        return artifacts.lease(self.storage, kind, name, owner=owner, stale_after_s=stale_after_s)

    def update_catalog(self, name: str) -> None:
        """Rewrite a dataset's catalog entry from its commit records (drivers do this)."""
        catalog.write_entry(self.dataset(name))

    def catalog(self, *, live: bool = False) -> pa.Table:
        """One row per dataset: identity, shape, committed units, rows and completeness (as of
        the last job; ``live=True`` recounts now). Also queryable with DuckDB:
        ``SELECT * FROM 'STORE/catalog/*.parquet'``. Never writes."""
        return catalog.read(self, live=live)


def _check_marker(storage: Storage, *, create: bool) -> None:
    try:
        raw = storage.read(layout.MARKER)
    except FileNotFoundError:
        raw = None
    if raw is None:
        if not create:
            legacy = " (it holds datasets of an older Strata: extract them again)" if storage.list_dirs(layout.DATASETS) else ""
            raise StoreNotFoundError(f"no Strata store at {storage.uri}{legacy}; create one with store.open(uri) or `strata extract`")
        storage.put_if_absent(layout.MARKER, json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}).encode())
        return
    try:
        marker = json.loads(raw)
        version = int(marker["version"])
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{storage.uri}/{layout.MARKER} is damaged; it should say {{'format': '{STORE_FORMAT}', ...}}") from None
    if version > STORE_VERSION:
        raise StorageError(f"store {storage.uri} has format version {version}, newer than this Strata ({STORE_VERSION}); upgrade strata")


def open(  # noqa: A001
    uri: str | os.PathLike[str] = "./acts",
    *,
    storage_options: dict[str, Any] | None = None,
    durable: bool = False,
    create: bool = True,
) -> Store:
    """Open a store: a local folder or ``s3://bucket/prefix``.

    By default the root is created when missing (``strata.json`` marks it as a store). Readers
    pass ``create=False``: a missing root, or one that holds no store, is then an error and
    nothing is created. ``storage_options`` go to fsspec/s3fs (``endpoint_url``, ``key``,
    ``secret``, ...); by default they come from the usual AWS environment, and they are never
    written into the store. ``durable=True`` fsyncs local files before committing them, so
    commits survive a power loss, at some write throughput."""
    try:
        storage = open_storage(uri, storage_options, durable=durable, create=create)
        _check_marker(storage, create=create)
    except StrataError:
        raise
    except Exception as e:  # a notebook gets one line too, not botocore's 75-line traceback
        text = os.fspath(uri) if isinstance(uri, (str, os.PathLike)) else repr(uri)
        why = auth_failure(e, remote="://" in text and not text.startswith("file://"))
        if why is None:
            raise
        raise CredentialsError(f"cannot open store {text}: {why}") from None
    return Store(storage)
