"""The dataset manifest: identity, shape of the unit grid, hooks and free-form provenance."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from strata.store.commit import protocol, sealed
from strata.store.commit.protocol import FileEntry
from strata.store.errors import CorruptionError, DatasetNotFoundError, FormatVersionError
from strata.store.layout import DATASETS, aux_dir, hook_order, manifest_key
from strata.store.storage import Storage
from strata.store.views.info import info_html

FORMAT = "strata.activations"
# 2: block checksums in commit records (every partial read checked), token files with `row`,
# a document index, hooks in model order, write-lease generations.
# 3: commit records grouped by 1000 units (commits/PART/GGGGGG/UUUUUUUU.json) with a compacted
# commit index; the tokenizer and document table as driver-written files (`aux`).
FORMAT_VERSION = 3

# Fields of `meta` that are part of a dataset's identity (DESIGN.md, "activation dataset").
IDENTITY_META_KEYS = ("model", "revision", "tokenizer", "corpus_fingerprint", "packing", "prepend_bos")


@dataclass(frozen=True)
class HookInfo:
    d: int
    chunk_rows: int


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is. Written by the driver alone; workers and readers only read it."""

    name: str
    fingerprint: str
    context_size: int
    unit_contexts: int
    num_units: int
    dtype: str
    hooks: dict[str, HookInfo]
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    aux: dict[str, dict[str, Any]] = field(default_factory=dict)  # driver-written files (documents, tokenizer): file entries
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def unit_rows(self) -> int:
        return self.unit_contexts * self.context_size

    @property
    def capacity_rows(self) -> int:
        return self.num_units * self.unit_rows

    def __repr__(self) -> str:
        m = self.meta
        return (f"DatasetInfo({self.name!r}, model={m.get('model')!r}, revision={str(m.get('revision') or '')[:12]!r}, "
                f"hooks={len(self.hooks)}, units={self.num_units}, context_size={self.context_size}, dtype={self.dtype!r})")

    def _repr_html_(self) -> str:
        """Jupyter's summary of the manifest (identity and lineage, hooks and widths)."""
        return info_html(self)

    def __getattr__(self, key: str) -> Any:
        # `ds.info.model`, `ds.info.revision`, ...: the identity fields live in `meta`.
        meta = self.__dict__.get("meta", {})
        if key in meta:
            return meta[key]
        raise AttributeError(key)

    def to_json(self) -> bytes:
        d = asdict(self)
        return json.dumps(sealed.seal(d), indent=2, sort_keys=True).encode()  # every read checks it

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> DatasetInfo:
        """Parse a manifest; anything malformed is a :class:`CorruptionError` naming ``where``."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a Strata activation manifest (format={d.get('format') if isinstance(d, dict) else None!r})")
        except ValueError as e:
            raise CorruptionError(f"{where}: damaged manifest ({e})") from None
        # Manifests written before checksums have none and still read; a damaged key name fails below.
        d, _ = sealed.unseal(d, where=where, what="manifest")
        version = d.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: manifest format_version {version} is newer than this Strata reads ({FORMAT_VERSION}); upgrade strata"
            )
        if version < FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: dataset written in store format {version} (commit records laid out differently"
                f"{', partial reads unchecked' if version < 2 else ''}); this Strata reads format {FORMAT_VERSION}: "
                "extract it again (a new store or name)"
            )
        try:
            d["hooks"] = {h: HookInfo(**v) for h, v in d["hooks"].items()}
            return cls(**d)
        except (TypeError, KeyError, AttributeError) as e:
            raise CorruptionError(f"{where}: damaged manifest ({e})") from None

    def with_changes(self, **changes: Any) -> DatasetInfo:
        return replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """Flat identity and shape fields, as the catalog and `strata show` print them."""
        out: dict[str, Any] = {
            "name": self.name,
            "fingerprint": self.fingerprint,
            **{k: self.meta.get(k) for k in IDENTITY_META_KEYS},
            "context_size": self.context_size,
            "dtype": self.dtype,
            "unit_contexts": self.unit_contexts,
            "num_units": self.num_units,
            "hooks": sorted(self.hooks, key=hook_order),
            "created_at": self.created_at,
        }
        return out


def fingerprint(*, context_size: int, dtype: str, meta: dict[str, Any]) -> str:
    """Identity of a dataset: model + revision, tokenizer, corpus, context size, packing, BOS, dtype."""
    ident = {"context_size": context_size, "dtype": dtype}
    ident.update({k: meta.get(k) for k in IDENTITY_META_KEYS})
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dataset_names(storage: Storage) -> list[str]:
    """Names of the datasets whose manifest is committed."""
    return [n for n in storage.list_dirs(DATASETS) if storage.exists(manifest_key(n))]


def load_manifest(storage: Storage, name: str) -> DatasetInfo:
    """The committed manifest of dataset ``name``."""
    key = manifest_key(name)
    try:
        data = storage.read(key)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"no dataset {name!r} in store {storage.uri}") from None
    return DatasetInfo.from_json(data, where=f"{storage.uri}/{key}")


def write_manifest(storage: Storage, info: DatasetInfo) -> None:
    """Write (replace, atomically) a manifest: driver only, holding the dataset's lease."""
    storage.write(manifest_key(info.name), info.to_json())


def read_aux(storage: Storage, info: DatasetInfo, kind: str) -> tuple[str, bytes] | None:
    """A driver-written file the manifest lists (``documents``, ``tokenizer``, ``commit_index``),
    checked against the manifest's entry: ``(key, bytes)``; None when the manifest lists none."""
    entry = info.aux.get(kind)
    if entry is None:
        return None
    try:
        fe = FileEntry.from_dict(entry)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptionError(f"dataset {info.name!r}: the manifest's entry for its {kind} file is damaged ({e})") from None
    protocol.check_key(fe.key, protocol.check_inside(aux_dir(info.name)), where=f"dataset {info.name!r} manifest")
    return fe.key, bytes(protocol.read_whole(storage, fe, where=f"dataset {info.name!r} {kind} ({fe.key})"))
