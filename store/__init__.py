"""Strata's store: activation datasets in Zarr v3 + Parquet on a local disk or S3.

    import store
    s = store.open("./acts")
    ds = s.dataset("pythia-70m-pile")
    x = ds.read("blocks.3.hook_resid_post", rows=slice(0, 4096))
"""

from store.core import Store, open
from store.dataset import ActivationDataset, VerifyReport
from store.errors import (
    CorruptionError,
    DatasetExistsError,
    DatasetNotFoundError,
    HookNotFoundError,
    InvalidNameError,
    LeaseHeldError,
    NotCommittedError,
    StorageError,
    StrataError,
    UnitOutOfRangeError,
    WriteMismatchError,
)
from store.manifest import DatasetInfo
from store.tokens import TOKEN_COLUMNS, TOKEN_SCHEMA
from store.writer import DatasetWriter

__all__ = [
    "open",
    "Store",
    "ActivationDataset",
    "DatasetWriter",
    "DatasetInfo",
    "VerifyReport",
    "TOKEN_COLUMNS",
    "TOKEN_SCHEMA",
    "StrataError",
    "CorruptionError",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "HookNotFoundError",
    "InvalidNameError",
    "LeaseHeldError",
    "NotCommittedError",
    "StorageError",
    "UnitOutOfRangeError",
    "WriteMismatchError",
]
