"""Corpus readers: JSON lines, Parquet, plain text and Hugging Face ``datasets``.

A corpus is an ordered list of non-empty documents, each with a stable integer id, and a
fingerprint of their ids and texts. Document ids are, by default, the ordinal of the record in
the corpus (files in sorted order, records in file order, empty records counted), so appending
documents never renumbers the ones before. With ``id_field``, integer ids are used as they are
and string ids are hashed to a stable 63-bit integer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from strata.pipeline.config import CorpusSpec
from strata.pipeline.errors import CorpusError
from strata.pipeline.sources import ShardReader, list_shards
from strata.pipeline.sources import check_field as check_field  # re-exported: readers of other corpora use it
from strata.pipeline.sources import text_lines as text_lines  # re-exported: images.py reads metadata.jsonl with it
from strata.store.datasets.pairing import SetHash

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Documents in order: ``texts[i]`` has id ``doc_ids[i]``."""

    texts: list[str]
    doc_ids: np.ndarray
    skipped_empty: int = 0
    files: list[str] = field(default_factory=list)
    fields: dict[str, list[Any]] = field(default_factory=dict)  # kept document fields (`corpus.keep_fields`), per document

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self, n: int | None = None) -> str:
        """Fingerprint of the first ``n`` documents (all by default): ids and texts, in order."""
        n = len(self.texts) if n is None else n
        if n > len(self.texts):
            raise ValueError(f"the corpus has {len(self.texts)} documents, not {n}")
        h = xxhash.xxh3_128()
        for i in range(n):
            _hash_doc(h, int(self.doc_ids[i]), self.texts[i])
        return f"xxh3_128:{h.hexdigest()}"

    @property
    def stats(self) -> dict[str, Any]:
        chars = sum(len(t) for t in self.texts)
        return {"docs": len(self.texts), "skipped_empty": self.skipped_empty, "chars": chars, "files": len(self.files)}


def stable_id(value: Any) -> int:
    """A document's id as an int: an integer as is, a string hashed to a stable 63-bit integer."""
    if isinstance(value, (bool, np.bool_)):
        raise CorpusError(f"document id {value!r} is a boolean; ids must be integers or strings")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return xxhash.xxh3_64_intdigest(value.encode("utf-8")) >> 1
    raise CorpusError(f"document id {value!r} has type {type(value).__name__}; ids must be integers or strings")


def corpus_files(src: CorpusSpec) -> list[str]:
    """The files of a corpus (a file, a glob, or a folder or prefix searched for ``corpus.format``'s
    suffixes, ``.gz`` / ``.zst`` included), sorted: local paths, or fsspec URLs for a remote
    corpus; a path that matches none is a one-line CorpusError."""
    return list(dict.fromkeys(r.url for r in list_shards(src, split_parquet=False)))


def _records_files(src: CorpusSpec, scan: CorpusScan) -> Iterator[tuple[Any, Any, str]]:
    shards = list_shards(src, split_parquet=False)
    scan.files = list(dict.fromkeys(r.url for r in shards))
    for ref in shards:
        yield from ShardReader(ref, src).records()


def load_hf_dataset(src: CorpusSpec) -> Any:
    """The ``datasets.Dataset`` of an hf corpus (a folder saved with ``save_to_disk``, or a hub
    dataset at ``config`` / ``split``); a missing dataset or split is a one-line CorpusError."""
    import datasets  # lazy: HF datasets imports in ~1 s; only hf corpora need it

    try:
        if os.path.isdir(src.path):
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise CorpusError(f"`corpus.split` {src.split!r} is not in {src.path}; it has: {', '.join(ds)}")
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.path, name=src.config, split=src.split)
    except CorpusError:
        raise
    except Exception as e:  # datasets raises many types for a missing dataset or split
        raise CorpusError(f"cannot load Hugging Face dataset {src.path!r} (config={src.config!r}, split={src.split!r}): {e}") from None
    return ds


def _records_hf(src: CorpusSpec) -> Iterator[tuple[Any, Any, str]]:
    ds = load_hf_dataset(src)
    names = list(ds.column_names)
    check_field(src.text_field, names, "text_field", src.path)
    if src.id_field is not None:
        check_field(src.id_field, names, "id_field", src.path)
    for keep in src.keep_fields:
        check_field(keep, names, "keep_fields", src.path)
    cols = list(dict.fromkeys([src.text_field] + ([src.id_field] if src.id_field else []) + list(src.keep_fields)))
    for batch in ds.select_columns(cols).iter(batch_size=8192):
        for i in range(len(batch[src.text_field])):
            yield {c: batch[c][i] for c in cols}, names, src.path


def document_of(rec: Any, fields: Any, where: str, *, text_field: str, id_field: str | None, ordinal: int) -> tuple[str, int] | None:
    """A record's ``(text, document id)``, or None for an empty one (no text, or only blanks);
    a missing field or a text that is not a string is a one-line :class:`CorpusError`."""
    if text_field not in rec:
        check_field(text_field, fields, "text_field", where)
    text = rec[text_field]
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        raise CorpusError(f"{where}: `corpus.text_field` {text_field!r} holds a {type(text).__name__}, not a string")
    if id_field is None:
        return text, ordinal
    if id_field not in rec:
        check_field(id_field, fields, "id_field", where)
    return text, stable_id(rec[id_field])


@dataclass
class CorpusBatch:
    """Consecutive documents of a corpus: texts, ids and kept fields."""

    texts: list[str]
    doc_ids: np.ndarray
    fields: dict[str, list[Any]]


@dataclass
class CorpusScan:
    """What one pass over a corpus learns without keeping its texts: its size, its
    fingerprints, its document ids (8 bytes a document)."""

    docs: int = 0
    skipped_empty: int = 0
    chars: int = 0
    files: list[str] = field(default_factory=list)
    fingerprint: str = ""  # of every document
    prefix_fingerprint: str | None = None  # of the first `prefix_docs` documents, when asked
    doc_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    doc_set_hash: str | None = None  # order-independent hash of (id, content) pairs: see store.pairing

    @property
    def stats(self) -> dict[str, Any]:
        return {"docs": self.docs, "skipped_empty": self.skipped_empty, "chars": self.chars, "files": len(self.files)}


def _hash_doc(h: Any, doc_id: int, text: str) -> None:
    b = text.encode("utf-8")
    h.update(int(doc_id).to_bytes(8, "little", signed=True))
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def iter_corpus(src: CorpusSpec, *, batch_docs: int = 4096, scan: CorpusScan | None = None) -> Iterator[CorpusBatch]:
    """The corpus's non-empty documents, in a deterministic order, ``batch_docs`` at a time
    (memory: one batch). Every problem with the corpus is a one-line :class:`CorpusError`;
    an empty corpus and ids that repeat are errors at the end of the pass. ``scan``, when
    given, is filled in as the pass goes (sizes, files)."""
    scan = scan if scan is not None else CorpusScan()
    if src.keep_fields and src.format == "text":
        raise CorpusError("`corpus.keep_fields` needs records with fields: a jsonl, parquet or hf corpus, not text files")
    if src.format == "hf":
        records = _records_hf(src)
    else:
        records = _records_files(src, scan)
    text_field = "text" if src.format == "text" else src.text_field
    id_field = ("id" if src.text_unit == "file" else None) if src.format == "text" else src.id_field
    seen_fields: set[str] = set()
    all_ids: list[np.ndarray] = []
    batch = CorpusBatch([], np.zeros(0, np.int64), {f: [] for f in src.keep_fields})
    ids: list[int] = []

    def flush() -> CorpusBatch:
        nonlocal batch, ids
        batch.doc_ids = np.asarray(ids, dtype=np.int64)
        all_ids.append(batch.doc_ids)
        done, batch, ids = batch, CorpusBatch([], np.zeros(0, np.int64), {f: [] for f in src.keep_fields}), []
        return done

    for ordinal, (rec, fields, where) in enumerate(records):
        if src.max_docs is not None and scan.docs >= src.max_docs:
            break
        doc = document_of(rec, fields, where, text_field=text_field, id_field=id_field, ordinal=ordinal)
        if doc is None:
            scan.skipped_empty += 1
            continue
        text, doc_id = doc
        ids.append(doc_id)
        batch.texts.append(text)
        for f, values in batch.fields.items():
            if f in rec:
                seen_fields.add(f)
            values.append(rec.get(f))
        scan.docs += 1
        scan.chars += len(text)
        if len(batch.texts) >= batch_docs:
            yield flush()
    if batch.texts:
        yield flush()
    if not scan.docs:
        what = f" ({scan.skipped_empty} empty documents skipped)" if scan.skipped_empty else ""
        raise CorpusError(f"corpus {src.path!r} is empty: no documents with text in `{text_field}`{what}")
    never = [f for f in src.keep_fields if f not in seen_fields]
    if never:
        raise CorpusError(f"`corpus.keep_fields` {never} appear in no document of {src.path!r}")
    scan.doc_ids = np.concatenate(all_ids)
    if len(np.unique(scan.doc_ids)) != len(scan.doc_ids):
        raise CorpusError(f"corpus {src.path!r}: document ids from `corpus.id_field` {id_field!r} are not unique")
    if scan.skipped_empty:
        log.info("corpus %s: skipped %d empty documents", src.path, scan.skipped_empty)


def scan_corpus(src: CorpusSpec, *, prefix_docs: int | None = None) -> CorpusScan:
    """One streaming pass: sizes, ids, the fingerprint of every document and, with
    ``prefix_docs``, of the first ones (the part an existing dataset was made from)."""
    scan = CorpusScan()
    h = xxhash.xxh3_128()
    pairs = SetHash()
    seen = 0
    for b in iter_corpus(src, scan=scan):
        for doc_id, text in zip(b.doc_ids, b.texts):
            if prefix_docs is not None and seen == prefix_docs:
                scan.prefix_fingerprint = f"xxh3_128:{h.copy().hexdigest()}"
            _hash_doc(h, int(doc_id), text)
            pairs.add(int(doc_id), text.encode("utf-8"))
            seen += 1
    if prefix_docs is not None and seen == prefix_docs:
        scan.prefix_fingerprint = f"xxh3_128:{h.copy().hexdigest()}"
    scan.fingerprint = f"xxh3_128:{h.hexdigest()}"
    scan.doc_set_hash = pairs.hexdigest()
    return scan


def read_corpus(src: CorpusSpec) -> Corpus:
    """Read every document of a corpus into memory (small corpora, tests; jobs stream it)."""
    scan = CorpusScan()
    texts: list[str] = []
    fields: dict[str, list[Any]] = {f: [] for f in src.keep_fields}
    for b in iter_corpus(src, scan=scan):
        texts.extend(b.texts)
        for f, v in b.fields.items():
            fields[f].extend(v)
    return Corpus(texts=texts, doc_ids=scan.doc_ids, skipped_empty=scan.skipped_empty, files=scan.files, fields=fields)
