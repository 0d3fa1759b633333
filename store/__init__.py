"""Strata's store: activation datasets in Zarr v3 + Parquet on a local disk or S3.

    from strata import store
    s = store.open("./acts")
    ds = s.dataset("pythia-70m-pile")
    x = ds.read("blocks.3.hook_resid_post", rows=slice(0, 4096))
"""

from strata.store.analyses.handles import AnalysisHandle
from strata.store.commit.artifacts import Artifact, ArtifactExistsError, ArtifactNotFoundError
from strata.store.commit.lease import Fence, Lease
from strata.store.core import Store, open
from strata.store.datasets.aligned import AlignmentError, align_tokens, iter_aligned
from strata.store.datasets.batches import BatchIterator
from strata.store.datasets.documents import DOC_COLUMNS, DOC_SCHEMA
from strata.store.datasets.manifest import DatasetInfo
from strata.store.datasets.reader import ActivationDataset
from strata.store.datasets.tokens import TOKEN_COLUMNS, TOKEN_SCHEMA
from strata.store.datasets.verify import RepairReport, VerifyReport
from strata.store.datasets.versions import DatasetVersion
from strata.store.datasets.writer import DatasetWriter
from strata.store.errors import (
    CorruptionError,
    CredentialsError,
    DatasetExistsError,
    DatasetNotFoundError,
    FormatVersionError,
    HookNotFoundError,
    InvalidNameError,
    LeaseHeldError,
    LeaseLostError,
    NotCommittedError,
    RowOutOfRangeError,
    StaleArtifactError,
    StorageError,
    StoreNotFoundError,
    StrataError,
    UnitOutOfRangeError,
    UnknownDocumentError,
    WriteMismatchError,
)
from strata.store.saes.handles import SAEHandle

__all__ = [
    "open",
    "Store",
    "iter_aligned",
    "align_tokens",
    "AlignmentError",
    "ActivationDataset",
    "BatchIterator",
    "DatasetWriter",
    "DatasetInfo",
    "DatasetVersion",
    "Lease",
    "Fence",
    "Artifact",
    "ArtifactExistsError",
    "ArtifactNotFoundError",
    "SAEHandle",
    "AnalysisHandle",
    "VerifyReport",
    "RepairReport",
    "TOKEN_COLUMNS",
    "TOKEN_SCHEMA",
    "DOC_COLUMNS",
    "DOC_SCHEMA",
    "StrataError",
    "CorruptionError",
    "StaleArtifactError",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "FormatVersionError",
    "HookNotFoundError",
    "InvalidNameError",
    "LeaseHeldError",
    "LeaseLostError",
    "NotCommittedError",
    "RowOutOfRangeError",
    "StorageError",
    "CredentialsError",
    "StoreNotFoundError",
    "UnitOutOfRangeError",
    "UnknownDocumentError",
    "WriteMismatchError",
]
