"""Image corpora: a folder of image files, or an image column of Parquet files or a Hugging Face
dataset. One document per image.

**Folder** (``format: images``): image files (``.png .jpg .jpeg .gif .bmp .webp .tif .tiff``)
under ``path`` (or matching a glob), in sorted path order. A document's ``file_name`` is its
path relative to the folder (for a glob, to the glob's first directory without wildcards), and
its id is that name hashed to a stable 63-bit integer (:func:`strata.pipeline.corpus.stable_id`, the
same hash a text corpus applies to string ids, so ``id_field: file_name`` over a captions file
gives the same ids). An optional ``metadata.jsonl`` in the folder (the Hugging Face
``imagefolder`` convention: one JSON object per line with a ``file_name``) gives each image its
fields: ``id_field``, ``caption_field`` and ``keep_fields`` name fields of it.

**Parquet / HF** (``image_field``): each record's image is encoded bytes, a ``{bytes, path}``
struct (how ``datasets`` stores an ``Image`` feature in Parquet), or a ``datasets.Image``
feature (read undecoded). Ids as for text corpora: ``id_field``, else the record's ordinal.

Images are not decoded here: a scan reads their bytes (the corpus fingerprint covers them);
decoding, and the count of images that do not decode, belong to planning
(:func:`pipeline.vision.check_images`, in CPU tasks). A record whose image is missing (a null
value, a ``path`` that does not exist) is kept with no bytes, to be reported as unreadable,
never dropped silently. Units read their images' bytes back by position through an
:class:`ImageSource`, so the driver never holds more than a unit's worth of images.
"""

from __future__ import annotations

import glob as _glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from strata.pipeline.config import CorpusSpec
from strata.pipeline.corpus import CorpusScan, check_field, corpus_files, load_hf_dataset, stable_id, text_lines
from strata.pipeline.errors import CorpusError
from strata.store.datasets.pairing import SetHash

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SIDECAR = "metadata.jsonl"


@dataclass
class ImageBatch:
    """Consecutive images of a corpus: ids, encoded bytes (None: unreadable), where each came
    from, captions and kept fields."""

    doc_ids: np.ndarray
    payloads: list[bytes | None]
    where: list[str]
    locators: np.ndarray  # [n, 2] int64: (file index, row in file), to read the image again
    captions: list[str | None]
    fields: dict[str, list[Any]]
    errors: list[str | None]  # why a payload is None


@dataclass
class ImageScan(CorpusScan):
    """A :class:`CorpusScan` of an image corpus, plus what reads images back and pairs them."""

    locators: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    caption_set_hash: str | None = None


def _payload(value: Any, *, base: str | None = None) -> tuple[bytes | None, str | None]:
    """Encoded image bytes from a column value, or (None, why)."""
    if value is None:
        return None, "no image (null)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"]), None
        path = value.get("path")
        if path:
            full = path if os.path.isabs(path) or base is None else os.path.join(base, path)
            try:
                with open(full, "rb") as fh:
                    return fh.read(), None
            except OSError as e:
                return None, f"cannot read {path!r}: {e.strerror or e}"
        return None, "no image (neither bytes nor path)"
    if hasattr(value, "save"):  # a decoded PIL image (a `datasets.Image` feature read decoded)

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), None
    raise CorpusError(f"image value of type {type(value).__name__}; expected encoded bytes, a {{bytes, path}} struct or an image")


# -- folders -----------------------------------------------------------------------------------


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    root = []
    for p in parts:
        if any(c in p for c in "*?["):
            break
        root.append(p)
    return str(Path(*root)) if root else "."


def image_files(src: CorpusSpec) -> tuple[str, list[str]]:
    """The folder images are named relative to, and the image files in sorted order."""
    p = src.path
    if any(c in p for c in "*?["):
        root = _glob_root(p)
        files = sorted(f for f in _glob.glob(p, recursive=True) if os.path.isfile(f) and f.lower().endswith(IMAGE_SUFFIXES))
    elif os.path.isdir(p):
        root = p
        files = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
    elif os.path.isfile(p):
        raise CorpusError(f"corpus path {p!r} is a file; `format: images` reads a folder (or a glob) of image files")
    else:
        raise CorpusError(f"corpus path {p!r} does not exist (expected a folder or a glob of image files)")
    if not files:
        raise CorpusError(f"corpus path {p!r} holds no image files ({' '.join(IMAGE_SUFFIXES)})")
    return root, files


def _sidecar(root: str, src: CorpusSpec) -> dict[str, dict[str, Any]] | None:
    path = os.path.join(root, SIDECAR)
    wanted = [f for f in (src.id_field, src.caption_field, *src.keep_fields) if f]
    if not os.path.isfile(path):
        if wanted:
            raise CorpusError(
                f"`corpus` names fields {wanted} but {root!r} has no {SIDECAR} (one JSON object per image, with `file_name`) to read them from"
            )
        return None
    out: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "file_name" not in rec:
            raise CorpusError(f"{path}:{lineno}: expected a JSON object with a `file_name`")
        names.update(rec)
        out[Path(rec["file_name"]).as_posix()] = rec
    for key, name in (("id_field", src.id_field), ("caption_field", src.caption_field), *(("keep_fields", k) for k in src.keep_fields)):
        if name is not None:
            check_field(name, sorted(names), key, path)
    return out


def _iter_folder(src: CorpusSpec, files_out: list[str]) -> Iterator[tuple[Any, bytes | None, str | None, str, tuple[int, int], dict[str, Any]]]:
    root, files = image_files(src)
    files_out.extend(files)
    side = _sidecar(root, src)
    for i, f in enumerate(files):
        name = Path(os.path.relpath(f, root)).as_posix()
        rec = (side or {}).get(name, {})
        try:
            with open(f, "rb") as fh:
                data, err = fh.read(), None
        except OSError as e:
            data, err = None, f"cannot read: {e.strerror or e}"
        rid = rec.get(src.id_field) if src.id_field else name
        if src.id_field and rid is None:
            raise CorpusError(f"{os.path.join(root, SIDECAR)}: image {name!r} has no `{src.id_field}` (`corpus.id_field`)")
        yield rid, data, err, f, (i, 0), {"file_name": name, **rec}


# -- columns -----------------------------------------------------------------------------------


def _iter_parquet(src: CorpusSpec, files_out: list[str]) -> Iterator[tuple[Any, bytes | None, str | None, str, tuple[int, int], dict[str, Any]]]:

    files = corpus_files(src)
    files_out.extend(files)
    ordinal = 0
    for fi, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(f"{f}: not a Parquet file ({str(e).splitlines()[0]})") from None
        names = pf.schema_arrow.names
        cols = _columns(src, names, f)
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            for rec in batch.to_pylist():
                data, err = _payload(rec[src.image_field], base=os.path.dirname(f))
                rid = rec[src.id_field] if src.id_field else ordinal
                yield rid, data, err, f"{f}#{row}", (fi, row), rec
                row += 1
                ordinal += 1


def _columns(src: CorpusSpec, names: list[str], where: str) -> list[str]:
    assert src.image_field is not None
    check_field(src.image_field, names, "image_field", where)
    for key, name in (("id_field", src.id_field), ("caption_field", src.caption_field), *(("keep_fields", k) for k in src.keep_fields)):
        if name is not None:
            check_field(name, names, key, where)
    return list(dict.fromkeys([src.image_field, *(f for f in (src.id_field, src.caption_field) if f), *src.keep_fields]))


def load_hf(src: CorpusSpec) -> Any:
    """The ``datasets.Dataset`` of an hf image corpus, its image column left undecoded."""
    import datasets  # lazy: HF datasets imports in ~1 s; only hf corpora need it

    ds = load_hf_dataset(src)
    assert src.image_field is not None
    check_field(src.image_field, list(ds.column_names), "image_field", src.path)
    if isinstance(ds.features[src.image_field], datasets.Image):
        ds = ds.cast_column(src.image_field, datasets.Image(decode=False))
    return ds


def _iter_hf(src: CorpusSpec, files_out: list[str]) -> Iterator[tuple[Any, bytes | None, str | None, str, tuple[int, int], dict[str, Any]]]:
    ds = load_hf(src)
    cols = _columns(src, list(ds.column_names), src.path)
    row = 0
    for batch in ds.select_columns(cols).iter(batch_size=256):
        for i in range(len(batch[src.image_field])):
            rec = {c: batch[c][i] for c in cols}
            data, err = _payload(rec[src.image_field])
            rid = rec[src.id_field] if src.id_field else row
            yield rid, data, err, f"{src.path}#{row}", (0, row), rec
            row += 1


# -- the pass ----------------------------------------------------------------------------------


def iter_images(src: CorpusSpec, *, batch_docs: int = 256, scan: ImageScan | None = None) -> Iterator[ImageBatch]:
    """The corpus's images in a deterministic order, ``batch_docs`` at a time (memory: one
    batch of encoded images). ``scan``, when given, is filled in as the pass goes."""
    scan = scan if scan is not None else ImageScan()
    reader = {"images": _iter_folder, "parquet": _iter_parquet, "hf": _iter_hf}[src.format]
    files: list[str] = []
    ids_all: list[np.ndarray] = []
    locs_all: list[np.ndarray] = []
    fp, docs_h, caps_h = xxhash.xxh3_128(), SetHash(), SetHash()
    n_caps = 0
    new = lambda: ImageBatch(np.zeros(0, np.int64), [], [], np.zeros((0, 2), np.int64), [], {f: [] for f in src.keep_fields}, [])  # noqa: E731
    batch, ids, locs = new(), [], []

    def flush() -> ImageBatch:
        nonlocal batch, ids, locs
        batch.doc_ids = np.asarray(ids, dtype=np.int64)
        batch.locators = np.asarray(locs, dtype=np.int64).reshape(-1, 2)
        ids_all.append(batch.doc_ids)
        locs_all.append(batch.locators)
        done, batch, ids, locs = batch, new(), [], []
        return done

    for rid, data, err, where, loc, rec in reader(src, files):
        if src.max_docs is not None and scan.docs >= src.max_docs:
            break
        doc_id = stable_id(rid)
        caption = rec.get(src.caption_field) if src.caption_field else None
        if caption is not None and not isinstance(caption, str):
            raise CorpusError(f"{where}: `corpus.caption_field` {src.caption_field!r} holds a {type(caption).__name__}, not a string")
        fp.update(doc_id.to_bytes(8, "little", signed=True))
        fp.update((-1 if data is None else len(data)).to_bytes(8, "little", signed=True))
        if data is not None:
            fp.update(data)
            docs_h.add(doc_id, data)
            scan.chars += len(data)
        if caption and caption.strip():
            caps_h.add(doc_id, caption.encode("utf-8"))
            n_caps += 1
        ids.append(doc_id)
        locs.append(loc)
        batch.payloads.append(data)
        batch.errors.append(err)
        batch.where.append(where)
        batch.captions.append(caption)
        for f, values in batch.fields.items():
            values.append(rec.get(f))
        scan.docs += 1
        if len(batch.payloads) >= batch_docs:
            yield flush()
    if batch.payloads:
        yield flush()
    scan.files = files
    if not scan.docs:
        raise CorpusError(f"corpus {src.path!r} holds no images")
    scan.doc_ids = np.concatenate(ids_all)
    scan.locators = np.concatenate(locs_all)
    if len(np.unique(scan.doc_ids)) != len(scan.doc_ids):
        what = f"`corpus.id_field` {src.id_field!r}" if src.id_field else "file names"
        raise CorpusError(f"corpus {src.path!r}: image ids from {what} are not unique")
    scan.fingerprint = f"xxh3_128:{fp.hexdigest()}"
    scan.doc_set_hash = docs_h.hexdigest()
    scan.caption_set_hash = caps_h.hexdigest() if n_caps else None


def scan_images(src: CorpusSpec, *, prefix_docs: int | None = None) -> ImageScan:
    """One pass over an image corpus: ids, sizes, fingerprints (of every image's id and bytes,
    and with ``prefix_docs`` of the first ones), set hashes for pairing."""
    scan = ImageScan()
    for _ in iter_images(src, scan=scan):
        pass
    if prefix_docs is not None and prefix_docs <= scan.docs:
        # A second, shorter pass: cheap next to the model, and only for a grown corpus.
        part = ImageScan()
        for _ in iter_images(src.updated(max_docs=prefix_docs), scan=part):
            pass
        scan.prefix_fingerprint = part.fingerprint
    return scan


class ImageSource:
    """Reads images back by their position in the corpus (the same order as the scan)."""

    def __init__(self, src: CorpusSpec, files: list[str], locators: np.ndarray) -> None:
        self.src, self.files, self.locators = src, list(files), np.asarray(locators, np.int64).reshape(-1, 2)
        self._hf: Any = None

    def __len__(self) -> int:
        return len(self.locators)

    def read(self, positions: np.ndarray) -> list[bytes | None]:
        locs = self.locators[np.asarray(positions, np.int64)]
        fmt = self.src.format
        if fmt == "images":
            out: list[bytes | None] = []
            for fi, _ in locs:
                try:
                    with open(self.files[fi], "rb") as fh:
                        out.append(fh.read())
                except OSError:
                    out.append(None)
            return out
        if fmt == "hf":
            if self._hf is None:
                self._hf = load_hf(self.src).select_columns([self.src.image_field])
            rows = self._hf.select([int(r) for _, r in locs])[self.src.image_field]
            return [_payload(v)[0] for v in rows]
        return self._read_parquet(locs)

    def _read_parquet(self, locs: np.ndarray) -> list[bytes | None]:
        out: dict[tuple[int, int], bytes | None] = {}
        for fi in np.unique(locs[:, 0]):
            f = self.files[int(fi)]
            pf = pq.ParquetFile(f)
            rows = locs[locs[:, 0] == fi, 1]
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
            table = pf.read_row_groups(groups, columns=[self.src.image_field])
            col = table.column(0).to_pylist()
            base = {g: int(sum(pf.metadata.row_group(h).num_rows for h in groups if h < g)) for g in groups}
            for r in rows:
                g = int(np.searchsorted(starts, r, side="right") - 1)
                out[(int(fi), int(r))] = _payload(col[base[g] + int(r - starts[g])], base=os.path.dirname(f))[0]
        return [out[(int(a), int(b))] for a, b in locs]

    def remove(self) -> None:
        """Nothing to clean up (the plan's interface: a token source removes its spill files)."""
