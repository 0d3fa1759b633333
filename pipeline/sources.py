"""Corpus shards wherever fsspec reaches: listing them, reading their records, fingerprinting them.

A corpus path is a local file, folder or glob, or any fsspec URL (``s3://bucket/prefix/``,
``s3://bucket/prefix/*.jsonl.gz``, ``gs://...``, ``hf://datasets/...``). :func:`list_shards`
turns it into :class:`ShardRef` values (one per file, or per row-group range of a large Parquet
file), each recording what was listed (size, ETag or version, mtime); a :class:`ShardReader`
reads one shard's records and checks that it is still the shard that was listed
(:class:`ShardChangedError` otherwise).

``.gz`` and ``.zst`` files are decompressed here, frame by frame, rather than by fsspec: fsspec
reads a truncated ``.zst`` without error (as if it were empty), and a truncated file must be an
error naming it. Parquet files are never wrapped (Parquet compresses its own pages).
"""

from __future__ import annotations

import copy
import glob as _glob
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
import zstandard

from strata.pipeline.config import CorpusSpec
from strata.pipeline.errors import CorpusError, ShardChangedError
from strata.store.storage import auth_failure

#: A corpus format's file suffixes (before any ``.gz`` / ``.zst``).
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",), "text": (".txt", ".md", ".text")}
#: Suffixes that say a file's format plainly; ``.json``, ``.md`` and ``.text`` files often sit
#: beside a corpus as metadata or documentation, so they never make a folder "mixed".
_DECISIVE = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".zst": "zstd"}
_LOCAL_PROTOCOLS = (None, "file", "local")
_CHUNK = 1 << 20
# Listing and reading fail fast on an endpoint that does not answer (botocore's default is 5
# attempts over ~10 s); s3fs still retries timeouts and broken reads itself. A user's own
# `config_kwargs` values win.
_S3_FAIL_FAST = {"connect_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}


@dataclass(frozen=True)
class ShardRef:
    """One shard of a corpus: a file, or a row-group range of a large Parquet file."""

    url: str
    """What opens it: a local path, or a full fsspec URL (``s3://b/k.jsonl.zst``)."""
    format: str
    """``jsonl``, ``parquet`` or ``text``: the corpus's format."""
    compression: str | None
    """None, ``gzip`` or ``zstd`` (by extension: ``.gz``, ``.zst``); never for Parquet."""
    size: int
    """Bytes on storage, as listed."""
    etag: str | None = None
    """Object stores: the ETag (quotes stripped), when listed."""
    version: str | None = None
    """The object's version id (or generation), when the store reports one."""
    mtime_ns: int | None = None
    """Local files: the modification time, in ns."""
    row_groups: tuple[int, int] | None = None
    """A split Parquet file: row groups ``[a, b)``."""

    @property
    def remote(self) -> bool:
        """Read through fsspec (a URL with a protocol other than ``file``)."""
        return fsspec.core.split_protocol(self.url)[0] not in _LOCAL_PROTOCOLS

    @property
    def name(self) -> str:
        """The url, plus ``#row-groups a-b`` when split: how messages name the shard."""
        return self.url if self.row_groups is None else f"{self.url}#row-groups {self.row_groups[0]}-{self.row_groups[1]}"

    def listing(self) -> dict[str, Any]:
        """Every field, JSON-able (recorded in a dataset's plan)."""
        d = asdict(self)
        d["row_groups"] = list(self.row_groups) if self.row_groups is not None else None
        return d

    @classmethod
    def from_listing(cls, d: dict[str, Any]) -> ShardRef:
        """The inverse of :meth:`listing`."""
        d = dict(d)
        if d.get("row_groups") is not None:
            d["row_groups"] = (int(d["row_groups"][0]), int(d["row_groups"][1]))
        return cls(**d)

    def listed_fingerprint(self) -> str | None:
        """Object storage: ``etag:<etag>:<size>`` (or ``version:<v>:<size>``); None for a local
        file (its fingerprint comes from its bytes, see :attr:`ShardReader.fingerprint`)."""
        if not self.remote:
            return None
        if self.etag:
            return f"etag:{self.etag}:{self.size}"
        if self.version:
            return f"version:{self.version}:{self.size}"
        return None


# ------------------------------------------------------------------ names and formats


def compression_of(name: str) -> str | None:
    """``gzip`` / ``zstd`` for a ``.gz`` / ``.zst`` name, else None."""
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            return comp
    return None


def _bare(name: str) -> str:
    """The name without a compression suffix, lower-cased."""
    name = name.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def format_of(name: str) -> str | None:
    """The corpus format a file name says (``a.jsonl.zst`` -> jsonl), None when it says none."""
    bare = _bare(name)
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if bare.endswith(suffixes):
            return fmt
    return None


def _decisive_format(name: str) -> str | None:
    bare = _bare(name)
    return next((fmt for suffix, fmt in _DECISIVE.items() if bare.endswith(suffix)), None)


def _hidden(rel: str) -> bool:
    """A hidden or ``_``-prefixed file or folder (``.git/``, ``_SUCCESS``, ``_temporary/``)."""
    return any(part.startswith((".", "_")) for part in rel.replace("\\", "/").split("/") if part)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard (``d/x/**/*.jsonl`` -> ``d/x/``)."""
    head = pattern[: min(i for i in (pattern.find(c) for c in "*?[") if i >= 0)]
    return head[: head.rfind("/") + 1]


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def is_remote(path: str) -> bool:
    """A path with a protocol other than ``file://``."""
    return fsspec.core.split_protocol(path)[0] not in _LOCAL_PROTOCOLS


# ------------------------------------------------------------------ filesystems and their errors


def _secrets(options: Any) -> list[str]:
    if isinstance(options, dict):
        return [s for v in options.values() for s in _secrets(v)]
    if isinstance(options, (list, tuple)):
        return [s for v in options for s in _secrets(v)]
    return [options] if isinstance(options, str) and len(options) >= 4 else []


def _scrub(text: str, storage_options: dict[str, Any] | None) -> str:
    """``text`` with every string value of ``storage_options`` blanked out (keys, endpoints)."""
    for s in sorted(_secrets(storage_options or {}), key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def storage_error(e: BaseException, url: str, *, storage_options: dict[str, Any] | None = None) -> CorpusError:
    """A one-line :class:`CorpusError` naming ``url`` for an exception raised while listing or
    reading it (credentials, a missing bucket, an unreachable endpoint, ...); never shows a value
    of ``storage_options`` (botocore's messages can carry the key id or the endpoint)."""
    proto = fsspec.core.split_protocol(url)[0]
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    # The innermost botocore error first: its code (InvalidAccessKeyId, ...) says more than s3fs's PermissionError.
    for c in [*(c for c in chain if isinstance(getattr(c, "response", None), dict)), e]:
        auth = auth_failure(c, remote=True)
        if auth is not None:
            return CorpusError(f"{url}: {auth}")
    for c in chain:
        code = str((getattr(c, "response", None) or {}).get("Error", {}).get("Code", "")) if isinstance(getattr(c, "response", None), dict) else ""
        if code == "NoSuchBucket" or "bucket does not exist" in str(c).lower():
            bucket = fsspec.core.split_protocol(url)[1].split("/", 1)[0]
            return CorpusError(f"{url}: no such bucket {bucket!r} (check the URL, the region and the endpoint)")
        if type(c).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError") or isinstance(
            c, (ConnectionError, TimeoutError)
        ):
            where = " and the endpoint (`storage_options.client_kwargs.endpoint_url` or AWS_ENDPOINT_URL)" if proto in ("s3", "s3a") else ""
            return CorpusError(f"{url}: cannot reach the {proto or 'storage'} endpoint ({type(c).__name__}); check the network{where}")
    first = (str(e).strip().splitlines() or [""])[0]
    return CorpusError(f"{url}: {type(e).__name__}: {_scrub(first, storage_options)}")


def _options(protocol: str, storage_options: dict[str, Any] | None, *, fail_fast: bool = True) -> dict[str, Any]:
    # A deep copy: botocore rewrites a `retries` dict it is given.
    opts = copy.deepcopy(dict(storage_options or {}))
    if protocol in ("s3", "s3a"):
        config = opts["config_kwargs"] = dict(opts.get("config_kwargs") or {})
        for k, v in _S3_FAIL_FAST.items():
            if fail_fast or k != "retries":  # reading a shard keeps botocore's retries: a transient error must not fail a job
                config.setdefault(k, copy.deepcopy(v))
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None, *, fail_fast: bool = True) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path in it; an unknown protocol, or one whose
    package is missing, is a one-line CorpusError naming the URL. ``fail_fast`` (listing, before
    any work): one attempt at an endpoint; reading a shard retries as botocore does."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        return fsspec.core.url_to_fs(url, **_options(protocol, storage_options, fail_fast=fail_fast))
    except ImportError as e:
        hint = "`pip install strata[gcs]` (gcsfs)" if protocol in ("gs", "gcs") else f"the package fsspec names ({_scrub(str(e), storage_options)})"
        raise CorpusError(f"{url}: reading {protocol}:// needs a package that is not installed: {hint}") from None
    except ValueError as e:
        if "protocol not known" in str(e).lower():
            raise CorpusError(
                f"{url}: fsspec has no protocol {protocol!r} (valid: a local path, or s3://, gs://, hf://, http(s):// ... URLs)"
            ) from None
        raise storage_error(e, url, storage_options=storage_options) from None
    except Exception as e:  # fsspec backends raise their own types when they are set up
        raise storage_error(e, url, storage_options=storage_options) from None


# ------------------------------------------------------------------ listing


def _local_ref(path: str, fmt: str) -> ShardRef:
    st = os.stat(path)
    return ShardRef(path, fmt, None if fmt == "parquet" else compression_of(path), st.st_size, mtime_ns=st.st_mtime_ns)


def _remote_ref(fs: Any, path: str, info: dict[str, Any], fmt: str) -> ShardRef:
    url = fs.unstrip_protocol(path)
    etag = info.get("ETag") or info.get("etag") or info.get("blob_id")
    version = info.get("VersionId") or info.get("generation")
    return ShardRef(
        url, fmt, None if fmt == "parquet" else compression_of(path), int(info.get("size") or info.get("Size") or 0),
        etag=str(etag).strip('"') if etag else None, version=str(version) if version else None,
    )


def _pick(src: CorpusSpec, names: list[tuple[str, str]], *, is_glob: bool) -> list[str]:
    """The files of a folder / prefix (``is_glob`` False: those with the format's suffixes) or
    of a glob (all it matched), as (name, path relative to the root) pairs -> names; refuses a
    mix of formats."""
    fmt = src.format
    names = [(n, rel) for n, rel in names if not _hidden(rel)]
    decisive: dict[str, str] = {}
    for n, _ in names:
        decisive.setdefault(_decisive_format(n) or "", n)
    decisive.pop("", None)
    picked = [n for n, _ in names] if is_glob else [n for n, _ in names if format_of(n) == fmt]
    kinds = sorted(decisive)
    if len(kinds) > 1 and (is_glob or fmt in decisive):
        a, b = (fmt, next(k for k in kinds if k != fmt)) if fmt in decisive else (kinds[0], kinds[1])
        suffix = FORMAT_SUFFIXES[fmt][0]
        raise CorpusError(
            f"corpus path {src.path!r} mixes formats: {decisive[a]} ({a}) and {decisive[b]} ({b}); "
            f"name the {fmt} files alone with a glob, e.g. {src.path.rstrip('/')}{'' if is_glob else '/**'}/*{suffix}*"
        )
    if not picked:
        other = f" (it holds {kinds[0]} files such as {decisive[kinds[0]]}: is `corpus.format` {kinds[0]}?)" if kinds else ""
        raise CorpusError(f"corpus path {src.path!r} matches no {fmt} files{other}")
    return picked


def _list_local(src: CorpusSpec) -> list[ShardRef]:
    p = _local_path(src.path)
    if any(c in p for c in "*?["):
        root = _glob_root(p)
        names = [(f, f[len(root):]) for f in _glob.glob(p, recursive=True) if os.path.isfile(f)]
        files = _pick(src, names, is_glob=True)
    elif os.path.isdir(p):
        names = [(str(f), str(f.relative_to(p))) for f in Path(p).rglob("*") if f.is_file()]
        files = _pick(src, names, is_glob=False)
    elif os.path.isfile(p):
        files = [p]
    else:
        raise CorpusError(f"corpus path {p!r} does not exist (expected a file, a glob or a folder)")
    return [_local_ref(f, src.format) for f in sorted(files)]


def _list_remote(src: CorpusSpec, storage_options: dict[str, Any] | None) -> list[ShardRef]:
    url = src.path
    fs, path = filesystem(url, storage_options)
    try:
        if any(c in path for c in "*?["):
            try:
                found = fs.glob(path, detail=True)
            except ValueError as e:
                raise CorpusError(f"corpus path {url!r} is not a valid glob ({e})") from None
            infos = {k: v for k, v in found.items() if v.get("type") == "file"}
            if not infos:
                raise CorpusError(f"corpus path {url!r} matches no files")
            root = _glob_root(path)
            names = [(k, k[len(root):]) for k in infos]
            picked = _pick(src, names, is_glob=True)
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError as e:
                if "bucket does not exist" in str(e).lower():
                    raise storage_error(e, url, storage_options=storage_options) from None
                raise CorpusError(f"corpus path {url!r} does not exist (expected an object, a prefix or a glob)") from None
            if info.get("type") == "file":
                return [_remote_ref(fs, path, info, src.format)]
            root = path.rstrip("/")
            infos = {k: v for k, v in fs.find(root, detail=True).items() if v.get("type", "file") == "file"}
            names = [(k, k[len(root):].lstrip("/")) for k in infos]
            picked = _pick(src, names, is_glob=False)
    except CorpusError:
        raise
    except Exception as e:
        raise storage_error(e, url, storage_options=storage_options) from None
    return [_remote_ref(fs, k, infos[k], src.format) for k in sorted(picked)]


def _row_group_ranges(sizes: list[int], shard_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row groups gathered until each range holds about ``shard_bytes``."""
    ranges: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= shard_bytes:
            ranges.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _split_parquet(ref: ShardRef, shard_bytes: int, storage_options: dict[str, Any] | None) -> list[ShardRef]:
    with _parquet_source(ref, storage_options) as fh:
        try:
            meta = pq.ParquetFile(fh).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(f"{ref.url}: not a Parquet file ({str(e).splitlines()[0]}); `corpus.format` is parquet: is it jsonl or text?") from None
    sizes = [sum(meta.row_group(i).column(c).total_compressed_size for c in range(meta.num_columns)) for i in range(meta.num_row_groups)]
    ranges = _row_group_ranges(sizes, shard_bytes)
    if len(ranges) <= 1:
        return [ref]
    return [ShardRef(**{**asdict(ref), "row_groups": r}) for r in ranges]


def list_shards(
    src: CorpusSpec, *, storage_options: dict[str, Any] | None = None, shard_bytes: int | None = None, split_parquet: bool = True
) -> list[ShardRef]:
    """The shards of ``src.path`` (formats jsonl / parquet / text; local path or any fsspec URL):
    one file, a folder or prefix (searched recursively, hidden and ``_``-prefixed names left
    out), or a glob; sorted by url. Parquet files larger than ``shard_bytes`` (default
    ``src.shard_mb`` MiB) split into row-group ranges of about that many bytes (from the
    footer's row-group sizes), unless ``split_parquet`` is False. ``storage_options`` default
    to ``src.storage_options``."""
    if src.format not in FORMAT_SUFFIXES:
        raise CorpusError(f"`corpus.format` {src.format!r} has no shards; sharded corpora are {', '.join(FORMAT_SUFFIXES)}")
    opts = src.storage_options if storage_options is None else storage_options
    refs = _list_remote(src, opts) if is_remote(src.path) else _list_local(src)
    if src.format != "parquet" or not split_parquet:
        return refs
    limit = shard_bytes if shard_bytes is not None else src.shard_mb << 20
    return [s for r in refs for s in (_split_parquet(r, limit, opts) if r.size > limit else [r])]


# ------------------------------------------------------------------ reading


def _open_raw(ref: ShardRef, storage_options: dict[str, Any] | None) -> IO[bytes]:
    if not ref.remote:
        path = _local_path(ref.url)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ShardChangedError(f"{ref.name}: the shard no longer exists (it was listed; was the corpus changed?)") from None
    fs, path = filesystem(ref.url, storage_options, fail_fast=False)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardChangedError(f"{ref.name}: the shard no longer exists (it was listed; was the corpus changed?)") from None
    except Exception as e:
        raise storage_error(e, ref.url, storage_options=storage_options) from None


@contextmanager
def _parquet_source(ref: ShardRef, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    """What ``pq.ParquetFile`` opens: a local path (Arrow's own file reader, faster than a
    Python file object), or fsspec's file object."""
    if not ref.remote:
        path = _local_path(ref.url)
        if not os.path.exists(path):
            raise ShardChangedError(f"{ref.name}: the shard no longer exists (it was listed; was the corpus changed?)")
        yield path
        return
    with _open_raw(ref, storage_options) as fh:
        yield fh


def _decompressed(chunks: Iterable[bytes], compression: str | None, where: str) -> Iterator[bytes]:
    """The bytes of a gzip or zstd stream (every member / frame), checking that the last one
    ends: a truncated file is a CorpusError naming it."""
    if compression is None:
        yield from chunks
        return
    d: Any = None
    for chunk in chunks:
        while chunk:
            if d is None:
                d = zstandard.ZstdDecompressor().decompressobj() if compression == "zstd" else zlib.decompressobj(wbits=31)
            try:
                out = d.decompress(chunk)
            except (zlib.error, zstandard.ZstdError) as e:
                raise CorpusError(f"{where}: not valid {compression} data ({e}); is the file compressed as its extension says?") from None
            if out:
                yield out
            if d.eof:
                chunk, d = d.unused_data, None
            else:
                chunk = b""
    if d is not None:
        raise CorpusError(f"{where}: the {compression} stream is truncated (it ends before its end-of-frame marker); copy the file again")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (with their ``\\n``) of a byte stream given in chunks, as iterating a binary file gives them."""
    pending: list[bytes] = []
    for c in chunks:
        if b"\n" not in c:
            pending.append(c)
            continue
        if pending:
            c, pending = b"".join(pending) + c, []
        parts = c.split(b"\n")
        rest = parts.pop()
        for p in parts:
            yield p + b"\n"
        if rest:
            pending.append(rest)
    if pending:
        yield b"".join(pending)


def decode_lines(lines: Iterable[bytes], where: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of UTF-8 lines; bytes that are not UTF-8 are a one-line error naming
    ``where``, the line and the byte offset."""
    offset = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(
                f"{where}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {offset + e.start}); re-encode the corpus as UTF-8"
            ) from None
        offset += len(raw)


def text_lines(f: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file (local or at an fsspec URL; ``.gz`` / ``.zst``
    decompressed); bytes that are not UTF-8 are a one-line error naming the file, line and byte
    offset."""
    if is_remote(f):
        fs, path = filesystem(f, storage_options)
        opener: Callable[[], IO[bytes]] = lambda: fs.open(path, "rb")  # noqa: E731
    else:
        opener = lambda: open(_local_path(f), "rb")  # noqa: E731
    with opener() as fh:
        chunks = iter(lambda: fh.read(_CHUNK), b"")
        yield from decode_lines(_split_lines(_decompressed(chunks, compression_of(f), f)), f)


def check_field(name: str, fields: Any, key: str, where: str) -> None:
    """Raise a CorpusError naming `corpus.{key}` when ``name`` is not one of ``fields`` of ``where``."""
    if name not in fields:
        raise CorpusError(f"`corpus.{key}` {name!r} is not a field of {where}; its fields are: {', '.join(map(str, fields))}")


class ShardReader:
    """Reads one shard's records, checking it is the shard that was listed."""

    def __init__(self, ref: ShardRef, src: CorpusSpec, *, storage_options: dict[str, Any] | None = None) -> None:
        self.ref = ref
        self.src = src
        self.storage_options = src.storage_options if storage_options is None else storage_options
        self._hash = xxhash.xxh3_128()
        self._raw_bytes = 0
        self._done = False
        self._fingerprint: str | None = None

    # -- listing checks

    def _check_unchanged(self, when: str, *, nbytes: int | None = None) -> None:
        ref = self.ref
        gone = f"{ref.name}: the shard no longer exists (it was listed; was the corpus changed?)"
        if ref.remote:
            fs, path = filesystem(ref.url, self.storage_options)
            try:
                fs.invalidate_cache(path)
                info = fs.info(path)
            except FileNotFoundError:
                raise ShardChangedError(gone) from None
            except Exception as e:
                raise storage_error(e, ref.url, storage_options=self.storage_options) from None
            now = _remote_ref(fs, path, info, ref.format)
            pairs = (("size", ref.size, now.size), ("ETag", ref.etag, now.etag), ("version", ref.version, now.version))
            diffs = [f"{k} {a!r} -> {b!r}" for k, a, b in pairs if a is not None and a != b]
        else:
            try:
                st = os.stat(_local_path(ref.url))
            except FileNotFoundError:
                raise ShardChangedError(gone) from None
            pairs = (("size", ref.size, st.st_size), ("mtime_ns", ref.mtime_ns, st.st_mtime_ns))
            diffs = [f"{k} {a} -> {b}" for k, a, b in pairs if a is not None and a != b]
        if nbytes is not None and nbytes != ref.size:
            diffs.append(f"{nbytes} bytes read, {ref.size} listed")
        if diffs:
            raise ShardChangedError(f"{ref.name}: the shard changed since it was listed ({when}: {'; '.join(diffs)}); list the corpus again")

    # -- records

    def records(self) -> Iterator[tuple[dict[str, Any], Sequence[str], str]]:
        """(record, its field names, where) for each record, in order (``where``: ``URL:LINE``
        for lines, the shard's name for Parquet and whole text files); one pass."""
        if self._done:
            raise RuntimeError(f"{self.ref.name}: a ShardReader reads its shard once")
        self._check_unchanged("at open")
        if self.ref.format == "parquet":
            yield from self._parquet()
            self._check_unchanged("after the read")
        else:
            lines = self._lines()
            yield from self._jsonl(lines) if self.ref.format == "jsonl" else self._text(lines)
            self._check_unchanged("after the read", nbytes=self._raw_bytes)
        self._done = True

    def _raw_chunks(self) -> Iterator[bytes]:
        with _open_raw(self.ref, self.storage_options) as fh:
            while True:
                try:
                    chunk = fh.read(_CHUNK)
                except Exception as e:
                    self._check_unchanged("while reading")
                    raise storage_error(e, self.ref.url, storage_options=self.storage_options) from None
                if not chunk:
                    return
                self._raw_bytes += len(chunk)
                self._hash.update(chunk)
                yield chunk

    def _lines(self) -> Iterator[tuple[int, str]]:
        url = self.ref.url
        return decode_lines(_split_lines(_decompressed(self._raw_chunks(), self.ref.compression, url)), url)

    def _jsonl(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[dict[str, Any], Sequence[str], str]]:
        f = self.ref.url
        for lineno, line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (is it a Parquet file? set `corpus.format: parquet`)" if line.startswith("PAR1") else ""
                raise CorpusError(f"{f}:{lineno}: not valid JSON ({e.msg}){hint}") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{f}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            yield rec, rec.keys(), f"{f}:{lineno}"

    def _text(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[dict[str, Any], Sequence[str], str]]:
        f = self.ref.url
        if self.src.text_unit == "file":
            yield {"text": "".join(line for _, line in lines), "id": f}, ("text", "id"), f
        else:
            for lineno, line in lines:
                yield {"text": line.rstrip("\n")}, ("text",), f"{f}:{lineno}"

    def _parquet_file(self, fh: Any) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(fh)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(
                f"{self.ref.url}: not a Parquet file ({str(e).splitlines()[0]}); `corpus.format` is parquet: is it jsonl or text?"
            ) from None

    def _parquet(self) -> Iterator[tuple[dict[str, Any], Sequence[str], str]]:
        src, ref = self.src, self.ref
        where = ref.name
        with _parquet_source(ref, self.storage_options) as fh:
            pf = self._parquet_file(fh)
            names = pf.schema_arrow.names
            check_field(src.text_field, names, "text_field", where)
            if src.id_field is not None:
                check_field(src.id_field, names, "id_field", where)
            for keep in src.keep_fields:
                check_field(keep, names, "keep_fields", where)
            cols = list(dict.fromkeys([src.text_field] + ([src.id_field] if src.id_field else []) + list(src.keep_fields)))
            groups = None if ref.row_groups is None else list(range(*ref.row_groups))
            if groups is not None and ref.row_groups[1] > pf.metadata.num_row_groups:
                raise ShardChangedError(f"{where}: the file has {pf.metadata.num_row_groups} row groups now; list the corpus again")
            for batch in pf.iter_batches(columns=cols, batch_size=8192, row_groups=groups):
                for rec in batch.to_pylist():
                    yield rec, names, where

    # -- fingerprint

    @property
    def fingerprint(self) -> str:
        """After :meth:`records` is exhausted. A remote shard with an ETag or version: its
        :meth:`ShardRef.listed_fingerprint`, confirmed (size and ETag re-checked at open and at
        the end). Otherwise ``xxh3_128:<hex>`` of the raw stored bytes (compressed, as stored);
        for a row-group range, of its row groups' column chunks and its schema."""
        if not self._done:
            raise RuntimeError(f"{self.ref.name}: read the shard's records to the end before asking its fingerprint")
        if self._fingerprint is None:
            listed = self.ref.listed_fingerprint()
            if listed is not None:
                self._fingerprint = listed
            elif self.ref.format != "parquet":
                self._fingerprint = f"xxh3_128:{self._hash.hexdigest()}"
            else:
                self._fingerprint = self._parquet_hash()
                self._check_unchanged("after the fingerprint")
        return self._fingerprint

    def _parquet_hash(self) -> str:
        h = xxhash.xxh3_128()
        with _open_raw(self.ref, self.storage_options) as fh:
            if self.ref.row_groups is None:
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    h.update(chunk)
                return f"xxh3_128:{h.hexdigest()}"
            meta = self._parquet_file(fh).metadata
            a, b = self.ref.row_groups
            h.update(str(meta.schema.to_arrow_schema()).encode("utf-8"))
            h.update(f"row-groups {a}-{b}".encode())
            for i in range(a, b):
                rg = meta.row_group(i)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else col.data_page_offset
                    fh.seek(start)
                    left = col.total_compressed_size
                    while left > 0:
                        chunk = fh.read(min(left, _CHUNK))
                        if not chunk:
                            raise ShardChangedError(f"{self.ref.name}: the file ends inside row group {i}; list the corpus again")
                        h.update(chunk)
                        left -= len(chunk)
        return f"xxh3_128:{h.hexdigest()}"
