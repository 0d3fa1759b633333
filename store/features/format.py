"""The on-disk format of feature tables: where files live, the manifest, the unit tables, and
a checked file object that lets Parquet readers read committed files block by block.

    features/NAME/manifest.json                       identity (SAE + its commit, dataset, hook,
                                                      d_sae, top_k, ...) and the merged generation (driver)
    features/NAME/units/unit-K.ATTEMPT.parquet        unit K's sparse latents, row-major:
                                                      row int64, feature int32, value float32
    features/NAME/commits/K.json                      unit K's commit record (put-if-absent)
    features/NAME/merged/GEN/commit.json              a merged generation's commit record: every file below
    features/NAME/merged/GEN/stats.parquet            one row per feature: count, density, mean, max, sum, histogram
    features/NAME/merged/GEN/top.parquet              the top-k rows of each feature (feature, rank, row, value)
    features/NAME/merged/GEN/sample.parquet           the quantile sample (feature, quantile, row, value)
    features/NAME/merged/GEN/index.parquet            where each feature lives in the blocks (row group, start, count)
    features/NAME/merged/GEN/fm/block-B.parquet       feature-major copy of features [B*bf, (B+1)*bf):
                                                      sorted by (feature, row), row groups cut at feature boundaries
    features/NAME/lease/GEN.json                      the write lease (the encode job's driver)

Every file is Parquet (DuckDB reads each one, e.g. ``SELECT * FROM 'STORE/features/NAME/units/*.parquet'``)
and every read through Strata is checked against a commit record.
"""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from strata.store.commit import parquet, protocol, sealed
from strata.store.commit.protocol import FileEntry
from strata.store.errors import CorruptionError, FormatVersionError, StrataError
from strata.store.layout import attempt_key, attempt_key_pattern, check_name
from strata.store.storage import Storage

FEATURES = "features"
FORMAT = "strata.features"
# 2: the manifest carries a checksum of its own body (store.sealed); version 1 manifests have none
# and still read, so tables written before keep working until their next encode job rewrites them.
FORMAT_VERSION = 2
UNIT_SCHEMA = pa.schema([pa.field("row", pa.int64(), nullable=False), pa.field("feature", pa.int32(), nullable=False),
                         pa.field("value", pa.float32(), nullable=False)])
BLOCK_SCHEMA = pa.schema([pa.field("feature", pa.int32(), nullable=False), pa.field("row", pa.int64(), nullable=False),
                          pa.field("value", pa.float32(), nullable=False)])
#: Checksum block of feature-major files: a one-feature read checks one or two of these.
BLOCK_CHECK_BYTES = 256 << 10


class FeatureTableNotFoundError(StrataError, LookupError):
    """No feature table of that name (or it has no merged statistics yet)."""


class FeatureTableExistsError(StrataError, FileExistsError):
    """A feature table of that name exists with another identity (SAE, dataset, options)."""


class FeatureOutOfRangeError(StrataError, IndexError):
    """A feature index outside ``[0, d_sae)``."""


# -- keys -------------------------------------------------------------------------------------


def table_dir(name: str) -> str:
    return f"{FEATURES}/{check_name(name, what='feature table')}"


def manifest_key(name: str) -> str:
    return f"{table_dir(name)}/manifest.json"


def units_dir(name: str) -> str:
    return f"{table_dir(name)}/units"


def unit_key(name: str, unit: int, attempt: str) -> str:
    return attempt_key(units_dir(name), unit, attempt)  # one file per attempt, as for token tables


def unit_key_pattern(name: str, unit: int) -> re.Pattern[str]:
    return attempt_key_pattern(units_dir(name), unit)


def commits_dir(name: str) -> str:
    return f"{table_dir(name)}/commits"


def commit_key(name: str, unit: int) -> str:
    return f"{commits_dir(name)}/{unit:08d}.json"


def merged_dir(name: str) -> str:
    return f"{table_dir(name)}/merged"


def generation_dir(name: str, gen: str) -> str:
    if not re.fullmatch(r"g\d{6}-[0-9a-f]{8}", gen or ""):
        raise CorruptionError(f"feature table {name!r}: the manifest names a malformed merged generation {gen!r}")
    return f"{merged_dir(name)}/{gen}"


def block_name(b: int) -> str:
    return f"fm/block-{b:05d}.parquet"


# -- the manifest -----------------------------------------------------------------------------

#: Fields that make a feature table what it is: a rerun with any of them changed is refused.
IDENTITY_FIELDS = ("sae", "sae_fingerprint", "dataset", "dataset_fingerprint", "hook", "d_in", "d_sae", "top_k",
                   "skip_special", "hist", "sample", "block_features")


@dataclass(frozen=True)
class FeatureTableInfo:
    """What a feature table is; written by the encode job's driver alone."""

    name: str
    sae: str
    sae_fingerprint: str  # of the SAE's commit: its files' sizes and checksums
    dataset: str
    dataset_fingerprint: str
    hook: str
    d_in: int
    d_sae: int
    unit_rows: int  # token rows per unit of the dataset
    top_k: int
    skip_special: bool
    hist: dict[str, Any]  # {"lo", "hi", "bins"}: the log-spaced histogram bins
    sample: dict[str, int]  # {"quantiles", "per_quantile", "seed"}
    block_features: int  # features per feature-major block file
    sae_lineage: dict[str, Any] = field(default_factory=dict)  # units the SAE trained on / held out
    merged: str | None = None  # the current merged generation
    created_at: str = ""
    updated_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    def with_changes(self, **kw: Any) -> FeatureTableInfo:
        return replace(self, **kw)

    def to_json(self) -> bytes:
        body = {**asdict(self), "format_version": FORMAT_VERSION}  # written now: sealed, so the current version
        return json.dumps(sealed.seal(body), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> FeatureTableInfo:
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError("not a Strata feature-table manifest")
            if int(d.get("format_version", 0)) > FORMAT_VERSION:
                raise FormatVersionError(f"{where}: feature table format {d['format_version']} is newer than this Strata reads; upgrade strata")
            d, is_sealed = sealed.unseal(d, where=where, what="feature-table manifest")
            if not is_sealed and int(d.get("format_version", 0)) >= 2:
                raise ValueError("its checksum is missing")
            info = cls(**d)
            if info.d_sae <= 0 or info.block_features <= 0 or info.top_k <= 0 or info.unit_rows <= 0:
                raise ValueError("non-positive sizes")
            return info
        except (ValueError, TypeError, CorruptionError) as e:
            if isinstance(e, (FormatVersionError, CorruptionError)):
                raise
            raise CorruptionError(f"{where}: damaged feature-table manifest ({e})") from None


def load_info(storage: Storage, name: str) -> FeatureTableInfo | None:
    key = manifest_key(name)
    try:
        data = storage.read(key)
    except FileNotFoundError:
        return None
    info = FeatureTableInfo.from_json(data, where=f"{storage.uri}/{key}")
    if info.name != name:
        raise CorruptionError(f"{storage.uri}/{key}: the manifest describes feature table {info.name!r}")
    return info


def write_info(storage: Storage, info: FeatureTableInfo) -> None:
    """Replace the manifest atomically: driver only, holding the table's lease."""
    storage.write(manifest_key(info.name), info.to_json())


# -- Parquet files ----------------------------------------------------------------------------


def encode_unit(row: np.ndarray, feature: np.ndarray, value: np.ndarray) -> bytes:
    """A unit's table, row-major (sorted by row, then feature). Row-group statistics on ``row``
    let readers of a few rows skip the rest."""
    t = pa.table({"row": row.astype(np.int64, copy=False), "feature": feature.astype(np.int32, copy=False),
                  "value": value.astype(np.float32, copy=False)}, schema=UNIT_SCHEMA)
    return parquet.to_bytes(t, row_group_size=1 << 18, use_dictionary=False, column_encoding={"row": "DELTA_BINARY_PACKED"})


def decode_table(data: Any, schema: pa.Schema, *, where: str) -> pa.Table:
    """A committed Parquet file's table, cast to ``schema``; anything else is corruption."""
    try:
        t = parquet.read(data)
        return t.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, KeyError, ValueError) as e:
        raise CorruptionError(f"{where}: not the expected Parquet table ({str(e).splitlines()[0]})") from None


def read_table(storage: Storage, entry: FileEntry, schema: pa.Schema, *, where: str) -> pa.Table:
    return decode_table(protocol.read_whole(storage, entry, where=where), schema, where=where)


class CheckedFile(io.RawIOBase):
    """A committed file as a read-only file object whose every read is checked (the blocks it
    touches), so pyarrow reads one row group of a large file without reading the rest."""

    def __init__(self, storage: Storage, entry: FileEntry, *, where: str) -> None:
        super().__init__()
        self.storage, self.entry, self.where = storage, entry, where
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.entry.nbytes}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def size(self) -> int:
        return self.entry.nbytes

    def read(self, n: int = -1) -> bytes:
        end = self.entry.nbytes if n is None or n < 0 else min(self.entry.nbytes, self.pos + n)
        if end <= self.pos:
            return b""
        out = protocol.read_checked(self.storage, self.entry, self.pos, end, where=self.where).tobytes()
        self.pos = end
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


# -- commit records of units ------------------------------------------------------------------


def check_unit_record(rec: protocol.CommitRecord, info: FeatureTableInfo, unit: int, *, where: str) -> protocol.CommitRecord:
    """A unit's record, validated against what such a record may say (records are untrusted)."""
    extra = rec.extra
    ok = (rec.unit == unit and rec.hook == info.hook and len(rec.files) == 1 and 0 < rec.rows <= info.unit_rows
          and isinstance(extra.get("entries"), int) and isinstance(extra.get("encoded_rows"), int)
          and 0 <= extra["encoded_rows"] <= rec.rows and extra.get("sae_fingerprint") == info.sae_fingerprint)
    if not ok:
        raise CorruptionError(f"{where}: damaged commit record (it does not describe unit {unit} of this feature table)")
    protocol.check_key(rec.file.key, unit_key_pattern(info.name, unit), where=where)
    return rec


def unit_records(storage: Storage, info: FeatureTableInfo) -> tuple[dict[int, protocol.CommitRecord], dict[int, str]]:
    """The committed units' records, and what is wrong with any damaged one (by unit)."""
    keys: dict[int, str] = {}
    for key in storage.list(commits_dir(info.name)):
        m = re.fullmatch(r"(\d{8})\.json", key.rsplit("/", 1)[-1])
        if m and key == commit_key(info.name, int(m.group(1))):
            keys[int(m.group(1))] = key

    def load(unit: int) -> protocol.CommitRecord | str | None:
        try:
            rec = protocol.read_record(storage, keys[unit])
            return None if rec is None else check_unit_record(rec, info, unit, where=keys[unit])
        except CorruptionError as e:
            return str(e)

    good: dict[int, protocol.CommitRecord] = {}
    bad: dict[int, str] = {}
    with ThreadPoolExecutor(16) as pool:  # records are small: on S3 the latency of each is what counts
        for unit, got in zip(keys, pool.map(load, keys)):
            if isinstance(got, str):
                bad[unit] = got
            elif got is not None:
                good[unit] = got
    return good, bad
