"""One error hierarchy for Strata.

Every error also inherits the matching built-in, so callers can catch either
(``except KeyError`` keeps working for an unknown dataset, say).
"""

from __future__ import annotations


class StrataError(Exception):
    """Base of every error Strata raises on purpose."""


class InvalidNameError(StrataError, ValueError):
    """A dataset or hook name that is empty, malformed, or would escape the store root."""


class DatasetNotFoundError(StrataError, LookupError):
    """The store holds no committed dataset of that name."""


class DatasetExistsError(StrataError, FileExistsError):
    """A dataset of that name exists with a different identity."""


class HookNotFoundError(StrataError, LookupError):
    """The dataset has no such hook point."""


class WriteMismatchError(StrataError, ValueError):
    """A write whose shape, dtype or row count does not match the unit."""


class UnitOutOfRangeError(StrataError, IndexError):
    """A unit index outside ``[0, num_units)``."""


class NotCommittedError(StrataError, LookupError):
    """Rows of a unit that has no commit record yet."""


class CorruptionError(StrataError, OSError):
    """A stored file whose checksum, size or structure does not match its commit record."""


class FormatVersionError(StrataError, ValueError):
    """Data written in a store format this version of Strata does not read."""


class LeaseHeldError(StrataError, RuntimeError):
    """Another live job holds the write lease of a dataset."""


class StorageError(StrataError, OSError):
    """A store root that cannot be opened or written."""


class CredentialsError(StorageError, PermissionError):
    """A remote store that refused access for want of valid credentials (the message names the
    store, never a credential)."""


class StoreNotFoundError(StrataError, FileNotFoundError):
    """A store root that does not exist (or holds no Strata store), opened with ``create=False``."""


class LeaseLostError(StrataError, RuntimeError):
    """This job's write lease was taken over by another job: it must stop writing."""


class UnknownDocumentError(StrataError, LookupError):
    """Document ids that the dataset does not hold."""


class RowOutOfRangeError(StrataError, IndexError):
    """Row indices past the dataset's rows."""


class StaleArtifactError(StrataError, ValueError):
    """An SAE, feature table or analysis built from a dataset that has since been replaced under
    the same name (its recorded fingerprint differs from the dataset's now)."""
