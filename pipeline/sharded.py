"""The sharded plan: a corpus of many shards, tokenized by tasks where they run, planned from per-shard counts.

A shard is one corpus file, or a row-group range of a large Parquet file (:mod:`strata.pipeline.sources`).
A task (:func:`tokenize_shard`) reads one shard, tokenizes it, packs it alone (contexts never span
two shards) and commits its token stream and its part of the document index to the store
(:mod:`strata.store.datasets.tokenized`). The driver receives only counts, a few hundred bytes a
shard, and turns them into the plan (:class:`ShardPlan`), a pure function of the shard list and the counts:

- shard ``i`` has ``contexts_i`` contexts and ``units_i = ceil(contexts_i / unit_contexts)`` units;
  its units follow those of the shards before it, so unit ``u`` is a fixed range of one shard's
  contexts, and appending shards adds units without touching the ones before;
- default document ids are ordinals over the whole corpus: a shard's records (empty ones
  included) follow the records of the shards before it.

A unit's contexts are built where it is computed (:class:`ShardUnit`), from its shard's token
stream in the store: the driver holds O(shards + units), never a per-document or per-token array.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from strata import store
from strata.pipeline.config import CorpusSpec, TokenizeSpec
from strata.pipeline.corpus import document_of
from strata.pipeline.errors import CorpusError
from strata.pipeline.executor import Executor, Tasks
from strata.pipeline.packing import Contexts, EncodedBatch, TokenizerInfo, encode_batch
from strata.pipeline.plan import Packer, TokenSource
from strata.pipeline.sources import ShardReader, ShardRef
from strata.store.commit.lease import Fence
from strata.store.datasets.pairing import SetHash
from strata.store.datasets.tokenized import SHARDS_SCHEMA, TokenizedShard, write_shard
from strata.store.errors import StrataError
from strata.store.storage import Storage

log = logging.getLogger(__name__)

#: Version of what a tokenized shard holds: part of its key, so a change of format re-tokenizes.
SHARD_FORMAT = 1


@dataclass(frozen=True)
class ShardSettings:
    """Everything a tokenized shard depends on besides its bytes (part of its key)."""

    tokenizer: TokenizerInfo
    format: str
    text_field: str
    id_field: str | None
    text_unit: str
    keep_fields: tuple[str, ...]
    context_size: int
    packing: str
    prepend_bos: bool
    split_long: bool
    chunk_docs: int

    @classmethod
    def of(cls, src: CorpusSpec, t: TokenizeSpec, tok: TokenizerInfo) -> ShardSettings:
        return cls(tok, src.format, src.text_field, src.id_field, src.text_unit, tuple(src.keep_fields), t.context_size,
                   t.packing, t.prepend_bos, t.split_long, t.chunk_docs)

    def fingerprint(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("tokenizer", "chunk_docs")}
        d["tokenizer"] = self.tokenizer.fingerprint
        d["version"] = SHARD_FORMAT
        return xxhash.xxh3_128_hexdigest(json.dumps(d, sort_keys=True).encode())

    def key_for(self, ref: ShardRef) -> str:
        """The tokenized shard's artifact name: the shard as listed, and these settings."""
        h = xxhash.xxh3_128(json.dumps(ref.listing(), sort_keys=True).encode())
        h.update(self.fingerprint().encode())
        return f"s{h.hexdigest()[:31]}"

    @property
    def ordinal_ids(self) -> bool:
        """Document ids are record ordinals (no ``id_field``; text files read by line)."""
        return self.id_field is None and not (self.format == "text" and self.text_unit == "file")

    def packing_info(self) -> TokenizerInfo:
        """The tokenizer without its (large) serialization: what packing a unit needs."""
        return dataclasses.replace(self.tokenizer, backend_json="")


# -- one shard, in a task -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """What a tokenization task is handed (small: the tokenizer goes through Ray's object store once)."""

    listing: dict[str, Any]
    key: str
    src: CorpusSpec
    store_uri: str
    store_options: dict[str, Any] | None
    corpus_options: dict[str, Any] | None
    dataset: str
    fence: Fence | None  # None: a dry run's task, which counts and writes nothing
    write: bool = True


def _where_am_i() -> str:
    try:
        import ray  # lazy: only to name the node a task ran on; a local run never imports Ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - naming the node is best effort
        pass
    return socket.gethostname()


def tokenize_shard(job: ShardJob, settings: ShardSettings) -> dict[str, Any]:
    """Tokenize and pack one shard, commit its token stream and document part (unless a dry run),
    and return its counts. A shard committed already (same listing and settings) is not read
    again. Every problem with the shard's contents is a one-line :class:`CorpusError` naming it."""
    try:
        storage: Storage | None = store.open(job.store_uri, storage_options=job.store_options, create=False).storage
    except StrataError:
        if job.write:
            raise
        storage = None  # a count for a plan, before the store exists
    done = TokenizedShard.open(storage, job.dataset, job.key) if storage is not None else None
    if done is not None:
        return {**done.meta, "key": job.key, "reused": True, "node": _where_am_i(), "pid": os.getpid()}
    ref = ShardRef.from_listing(job.listing)
    reader = ShardReader(ref, job.src, storage_options=job.corpus_options)
    counts, parts, docs = _tokenize(reader, ref, job.src, settings)
    meta = {"shard": ref.name, "listing": job.listing, "fingerprint": reader.fingerprint, **counts}
    if job.write:
        assert job.fence is not None and storage is not None
        tokens = [np.concatenate([getattr(p, a) for p in parts]) if parts else np.zeros(0, np.int32) for a in ("ids", "start", "end")]
        write_shard(storage, job.dataset, job.key, ids=tokens[0], start=tokens[1], end=tokens[2], docs=docs, meta=meta, lease=job.fence)
    return {**meta, "key": job.key, "reused": False, "node": _where_am_i(), "pid": os.getpid()}


class _Batches(TokenSource):
    """Token batches of one shard held in memory, as a :class:`TokenSource` for packing."""

    def __init__(self, parts: Sequence[EncodedBatch]) -> None:
        self.parts = list(parts)
        self.lens = np.concatenate([p.lens for p in parts]) if parts else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)

    def read(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - the index needs no tokens
        raise NotImplementedError


def _tokenize(reader: ShardReader, ref: ShardRef, src: CorpusSpec,
              st: ShardSettings) -> tuple[dict[str, Any], list[EncodedBatch], pa.Table]:
    text_field = "text" if st.format == "text" else st.text_field
    id_field = ("id" if st.text_unit == "file" else None) if st.format == "text" else st.id_field
    ids: list[int] = []
    texts: list[str] = []
    fields: dict[str, list[Any]] = {f: [] for f in st.keep_fields}
    parts: list[EncodedBatch] = []
    seen_fields: set[str] = set()
    records = skipped = chars = 0
    pairs = SetHash()
    for ordinal, (rec, names, where) in enumerate(reader.records()):
        records += 1
        doc = document_of(rec, names, where, text_field=text_field, id_field=id_field, ordinal=ordinal)
        if doc is None:
            skipped += 1
            continue
        text, doc_id = doc
        ids.append(doc_id)
        texts.append(text)
        chars += len(text)
        if not st.ordinal_ids:  # ids are the corpus's own: a set hash that adds up across shards
            pairs.add(doc_id, text.encode("utf-8"))
        for f, values in fields.items():
            if f in rec:
                seen_fields.add(f)
            values.append(rec.get(f))
        if len(texts) >= st.chunk_docs:
            parts.append(encode_batch(st.tokenizer.backend_json, texts))
            texts = []
    if texts:
        parts.append(encode_batch(st.tokenizer.backend_json, texts))
    doc_ids = np.asarray(ids, dtype=np.int64)
    if doc_ids.size and len(np.unique(doc_ids)) != doc_ids.size:
        raise CorpusError(f"shard {ref.name}: document ids from `corpus.id_field` {id_field!r} are not unique")
    kept: dict[str, pa.Array] = {}
    for f, values in fields.items():
        try:
            kept[f] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise CorpusError(f"shard {ref.name}: `corpus.keep_fields` {f!r}: its values do not form one column type ({e})") from None
    source = _Batches(parts)
    packer = Packer(source, doc_ids, st.packing_info(), st.context_size, st.packing, st.prepend_bos, st.split_long)  # type: ignore[arg-type]
    docs, dropped, dropped_docs, partial = packer.document_index(kept)
    docs = docs.add_column(1, "n_tokens", pa.array(source.lens, pa.int64()))
    counts = {
        "records": records, "docs": int(doc_ids.size), "skipped_empty": skipped, "chars": chars,
        "tokens": int(source.lens.sum()), "contexts": len(packer), "dropped_tokens": dropped, "dropped_docs": dropped_docs,
        "partial_docs": partial, "id_min": int(doc_ids.min()) if doc_ids.size else 0, "id_max": int(doc_ids.max()) if doc_ids.size else -1,
        "doc_set": [pairs.total, pairs.count], "fields_seen": sorted(seen_fields),
    }
    return counts, parts, docs


# -- the plan, on the driver ----------------------------------------------------------------------


@dataclass
class ShardPlan:
    """Units of a sharded corpus from per-shard counts: ``first_unit``, ``units``, ``id_offset`` per shard."""

    names: list[str]
    keys: list[str]
    results: list[dict[str, Any]]  # per shard: the task's counts (and where it ran)
    unit_contexts: int
    context_size: int
    ordinal_ids: bool

    def __post_init__(self) -> None:
        contexts = np.array([int(r["contexts"]) for r in self.results], dtype=np.int64)
        records = np.array([int(r["records"]) for r in self.results], dtype=np.int64)
        self.contexts = contexts
        self.units_of = -(-contexts // self.unit_contexts)
        self.first_unit = np.concatenate([[0], np.cumsum(self.units_of)[:-1]]).astype(np.int64) if len(contexts) else np.zeros(0, np.int64)
        self.id_offset = (np.concatenate([[0], np.cumsum(records)[:-1]]).astype(np.int64) if self.ordinal_ids and len(records)
                          else np.zeros(len(records), np.int64))

    @property
    def units(self) -> int:
        return int(self.units_of.sum())

    @property
    def n_contexts(self) -> int:
        return int(self.contexts.sum())

    def unit_range(self, u: int) -> tuple[int, int, int]:
        """``(shard, first context, end context)`` of unit ``u`` within its shard."""
        if not 0 <= u < self.units:
            raise IndexError(f"unit {u} is outside the plan's {self.units} units")
        i = int(np.searchsorted(self.first_unit, u, side="right")) - 1  # the last shard starting at or before u: it holds u
        c0 = (u - int(self.first_unit[i])) * self.unit_contexts
        return i, c0, min(int(self.contexts[i]), c0 + self.unit_contexts)

    def unit_contexts_of(self, u: int) -> int:
        _, c0, c1 = self.unit_range(u)
        return c1 - c0

    def units_of_shard(self, i: int) -> range:
        return range(int(self.first_unit[i]), int(self.first_unit[i] + self.units_of[i]))

    def total(self, field: str) -> int:
        return int(sum(int(r.get(field, 0)) for r in self.results))

    def table(self) -> pa.Table:
        """The dataset's shards table (see :data:`strata.store.datasets.tokenized.SHARDS_SCHEMA`)."""
        r = self.results
        id_min = np.array([int(x["id_min"]) for x in r], np.int64) + self.id_offset
        id_max = np.array([int(x["id_max"]) for x in r], np.int64) + self.id_offset
        return pa.table({
            "key": self.keys, "name": self.names, "fingerprint": [x["fingerprint"] for x in r],
            "listing": [json.dumps(x["listing"], sort_keys=True) for x in r],
            "records": [int(x["records"]) for x in r], "docs": [int(x["docs"]) for x in r], "tokens": [int(x["tokens"]) for x in r],
            "contexts": self.contexts, "first_unit": self.first_unit, "units": self.units_of, "id_offset": self.id_offset,
            "id_min": id_min, "id_max": id_max,
            **{c: [int(x.get(c, 0)) for x in r] for c in ("skipped_empty", "chars", "dropped_tokens", "dropped_docs", "partial_docs")},
            "doc_set": [f"{int(x['doc_set'][0]):016x}:{int(x['doc_set'][1])}" for x in r],
        }, schema=SHARDS_SCHEMA)

    def doc_set_hash(self) -> str | None:
        """The corpus's document set hash (:mod:`strata.store.datasets.pairing`), when its ids are
        its own (``corpus.id_field``); None for ordinal ids, which a shard cannot hash alone."""
        if self.ordinal_ids:
            return None
        h = SetHash()
        for x in self.results:
            part = SetHash()
            part.total, part.count = int(x["doc_set"][0]), int(x["doc_set"][1])
            h.merge(part)
        return h.hexdigest()

    def state_fingerprint(self) -> str:
        """Of the corpus's contents as planned: every shard's fingerprint and counts, in order."""
        h = xxhash.xxh3_128()
        for x in self.results:
            h.update(json.dumps([x["fingerprint"], int(x["records"]), int(x["contexts"])]).encode())
        return f"xxh3_128:{h.hexdigest()}"

    def unit(self, u: int, dataset: str, settings: ShardSettings, tok: TokenizerInfo | None = None) -> ShardUnit:
        i, c0, c1 = self.unit_range(u)
        return ShardUnit(dataset, self.keys[i], c0, c1, int(self.id_offset[i]), tok or settings.packing_info(), settings.context_size,
                         settings.packing, settings.prepend_bos, settings.split_long)


@dataclass
class ShardedExtraction:
    """A sharded plan as the extraction job runs it (the attributes of ``pipeline.extract.Plan``)."""

    plan: ShardPlan
    settings: ShardSettings
    dataset: str
    forget: list[int] = dataclasses.field(default_factory=list)  # committed units a changed shard invalidates
    changed: list[str] = dataclasses.field(default_factory=list)  # names of the shards that changed
    documents: None = None  # the index is stored in parts, with the tokenized shards
    held_back_contexts: int = 0
    bad_images: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._tok = self.settings.packing_info()

    @property
    def units(self) -> int:
        return self.plan.units

    @property
    def unit_contexts(self) -> int:
        return self.plan.unit_contexts

    @property
    def n_contexts(self) -> int:
        return self.plan.n_contexts

    @property
    def dropped_tokens(self) -> int:
        return self.plan.total("dropped_tokens")

    @property
    def dropped_docs(self) -> int:
        return self.plan.total("dropped_docs")

    @property
    def partial_docs(self) -> int:
        return self.plan.total("partial_docs")

    def contexts_in(self, u: int) -> int:
        return self.plan.unit_contexts_of(u)

    def unit(self, u: int) -> ShardUnit:
        return self.plan.unit(u, self.dataset, self.settings, self._tok)

    def summary(self) -> dict[str, int]:
        return {
            "contexts": self.n_contexts, "tokens": self.n_contexts * self.plan.context_size, "units": self.units,
            "held_back_contexts": 0, "dropped_tokens": self.dropped_tokens, "dropped_docs": self.dropped_docs,
            "partial_docs": self.partial_docs, "shards": len(self.plan.keys), "docs": self.plan.total("docs"),
            "corpus_tokens": self.plan.total("tokens"),
        }


# -- a unit's contexts, where it is computed --------------------------------------------------------


class StoredShardSource(TokenSource):
    """A tokenized shard in the store as a :class:`TokenSource`: per-document lengths from its
    document part, tokens by checked range reads."""

    def __init__(self, shard: TokenizedShard) -> None:
        self.shard = shard
        docs = shard.docs()
        self.lens = docs.column("n_tokens").to_numpy().astype(np.int64)
        self.doc_ids = docs.column("doc_id").to_numpy().astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)

    def read(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.shard.read(int(self.offsets[i0]), int(self.offsets[i1]))


_PACKERS: dict[tuple[Any, ...], Packer] = {}


@dataclass(frozen=True)
class ShardUnit:
    """A unit of a sharded plan as its worker is handed it: which shard, which of its contexts.
    :meth:`load` builds the contexts from the shard's token stream in the store."""

    dataset: str
    key: str
    c0: int
    c1: int
    id_offset: int
    tok: TokenizerInfo
    context_size: int
    packing: str
    prepend_bos: bool
    split_long: bool

    def __len__(self) -> int:
        return self.c1 - self.c0

    def load(self, storage: Storage) -> Contexts:
        cache_key = (storage.uri, self.dataset, self.key, self.id_offset, self.context_size, self.packing, self.prepend_bos, self.split_long)
        packer = _PACKERS.get(cache_key)
        if packer is None:
            shard = TokenizedShard.open(storage, self.dataset, self.key)
            if shard is None:
                raise CorpusError(f"dataset {self.dataset!r}: tokenized shard {self.key} is missing from the store (removed while the job ran?)")
            source = StoredShardSource(shard)
            packer = Packer(source, source.doc_ids + np.int64(self.id_offset), self.tok, self.context_size, self.packing,  # type: ignore[arg-type]
                            self.prepend_bos, self.split_long)
            _PACKERS.clear()  # one shard's index per worker: units of a shard mostly run back to back
            _PACKERS[cache_key] = packer
        if self.c1 > len(packer):
            raise CorpusError(f"dataset {self.dataset!r}: tokenized shard {self.key} packs into {len(packer)} contexts, "
                              f"the plan wants [{self.c0}, {self.c1})")
        return packer.contexts(self.c0, self.c1)


def known_results(table: pa.Table | None) -> dict[str, dict[str, Any]]:
    """Per-shard counts of a dataset's shards table, by key: shards planned before need no task."""
    if table is None:
        return {}
    out = {}
    for row in table.to_pylist():
        total, count = row["doc_set"].split(":")
        off = int(row["id_offset"])
        out[row["key"]] = {
            **{c: int(row[c]) for c in ("records", "docs", "tokens", "contexts", "skipped_empty", "chars", "dropped_tokens",
                                         "dropped_docs", "partial_docs")},
            "fingerprint": row["fingerprint"], "listing": json.loads(row["listing"]), "shard": row["name"],
            "id_min": int(row["id_min"]) - off, "id_max": int(row["id_max"]) - off, "doc_set": [int(total, 16), int(count)],
            "fields_seen": None, "key": row["key"], "reused": True, "node": None,
        }
    return out


def plan_shards(refs: Sequence[ShardRef], settings: ShardSettings, *, src: CorpusSpec, store_uri: str,
                store_options: dict[str, Any] | None, corpus_options: dict[str, Any] | None, dataset: str, unit_contexts: int,
                executor: Executor | None = None, fence: Fence | None = None, write: bool = True,
                known: dict[str, dict[str, Any]] | None = None, window: int | None = None) -> ShardPlan:
    """Tokenize the shards not planned before (tasks of ``executor``, or here without one), each
    committing its tokenized shard when ``write``; gather the counts and check the whole corpus:
    not empty, every kept field seen, ``id_field`` ids unique across shards. The driver holds the
    counts only."""
    ex = executor or Executor()
    tasks = ex.using(Tasks(num_cpus=1, max_in_flight=window or max(2, 2 * ex.default_tasks()), max_retries=3))
    st = tasks.put(settings)
    plain = CorpusSpec.model_validate({**src.model_dump(), "storage_options": None})  # credentials travel apart, as the executor allows
    known = known or {}
    keys = [settings.key_for(r) for r in refs]
    todo = [(i, r) for i, r in enumerate(refs) if keys[i] not in known]
    jobs = (ShardJob(r.listing(), keys[i], plain, store_uri, store_options, corpus_options, dataset, fence, write) for i, r in todo)
    got: dict[str, dict[str, Any]] = {}
    for res in tasks.imap(tokenize_shard, ((j, st) for j in jobs), check=fence.check if fence is not None else None):
        got[res["key"]] = res
    results = [known.get(k) or got[k] for k in keys]
    docs = sum(int(r["docs"]) for r in results)
    if docs == 0:
        skipped = sum(int(r["skipped_empty"]) for r in results)
        what = f" ({skipped} empty documents skipped)" if skipped else ""
        raise CorpusError(f"corpus {src.path!r} is empty: its {len(refs)} shard(s) hold no documents with text in `{src.text_field}`{what}")
    seen = [r["fields_seen"] for r in results if r.get("fields_seen") is not None]
    never = [f for f in src.keep_fields if seen and not any(f in s for s in seen)]
    if never and len(seen) == len(results):
        raise CorpusError(f"`corpus.keep_fields` {never} appear in no document of {src.path!r}")
    plan = ShardPlan([str(r.get("shard") or ref.name) for r, ref in zip(results, refs)], keys, results, unit_contexts,
                     settings.context_size, settings.ordinal_ids)
    if not settings.ordinal_ids:
        _check_unique_ids(plan, src, ex, store_uri, store_options, dataset)
    return plan


def _check_unique_ids(plan: ShardPlan, src: CorpusSpec, ex: Executor, store_uri: str, store_options: dict[str, Any] | None,
                      dataset: str) -> None:
    """Document ids of ``corpus.id_field`` must be unique across shards: shards whose id ranges
    overlap are checked together, in a task (their ids are never gathered on the driver)."""
    lo = np.array([int(r["id_min"]) for r in plan.results]) + plan.id_offset
    hi = np.array([int(r["id_max"]) for r in plan.results]) + plan.id_offset
    has = np.array([int(r["docs"]) > 0 for r in plan.results])
    order = [i for i in np.argsort(lo, kind="stable") if has[i]]
    groups: list[list[int]] = []
    end = None
    for i in order:
        if end is not None and lo[i] <= end:
            groups[-1].append(int(i))
            end = max(end, hi[i])
        else:
            groups.append([int(i)])
            end = hi[i]
    overlapping = [g for g in groups if len(g) > 1]
    if not overlapping:
        return
    tasks = ex.using(Tasks(num_cpus=1, max_in_flight=max(2, ex.default_tasks()), max_retries=3))
    args = ((store_uri, store_options, dataset, [plan.keys[i] for i in g], [plan.names[i] for i in g]) for g in overlapping)
    for dup in tasks.imap(duplicate_ids, args):
        if dup is not None:
            raise CorpusError(f"corpus {src.path!r}: document ids from `corpus.id_field` {src.id_field!r} are not unique: "
                              f"id {dup[0]} is in {dup[1]} and in {dup[2]}")


def duplicate_ids(store_uri: str, store_options: dict[str, Any] | None, dataset: str, keys: list[str],
                  names: list[str]) -> tuple[int, str, str] | None:
    """A document id two of these tokenized shards share (id, one shard, the other), or None (a task)."""
    storage = store.open(store_uri, storage_options=store_options, create=False).storage
    ids, owner = [], []
    for j, k in enumerate(keys):
        sh = TokenizedShard.open(storage, dataset, k)
        if sh is None:  # a dry run that wrote nothing: nothing to compare here
            return None
        a = sh.docs().column("doc_id").to_numpy()
        ids.append(a)
        owner.append(np.full(a.size, j, np.int32))
    allids, who = np.concatenate(ids), np.concatenate(owner)
    order = np.argsort(allids, kind="stable")
    same = np.flatnonzero(np.diff(allids[order]) == 0)
    if not same.size:
        return None
    a, b = order[same[0]], order[same[0] + 1]
    return int(allids[a]), names[who[a]], names[who[b]]


def reconcile(old: pa.Table | None, new: ShardPlan, *, on_change: str, dataset: str, path: str) -> tuple[list[int], list[str]]:
    """What a plan changes in a dataset planned before from ``old`` (its shards table): the units
    whose commits must go, and the names of the shards that changed. Appended shards change
    nothing (their units are new). A changed shard (another fingerprint, record or context count)
    loses its units; when a change moves later shards (another unit count or record count, or
    shards removed), every unit from the first change on goes. ``on_change: refuse`` raises instead."""
    if old is None:
        return [], []
    n_old, n_new = old.num_rows, len(new.keys)
    o = {c: old.column(c).to_pylist() for c in ("fingerprint", "records", "contexts", "first_unit", "units", "id_offset", "name")}
    changed = [i for i in range(min(n_old, n_new))
               if (o["fingerprint"][i], o["records"][i], o["contexts"][i])
               != (new.results[i]["fingerprint"], int(new.results[i]["records"]), int(new.contexts[i]))]
    removed = list(range(n_new, n_old))
    if not changed and not removed:
        return [], []
    names = [o["name"][i] for i in changed + removed]
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if on_change == "refuse":
        what = f"{len(changed)} shard(s) changed" + (f", {len(removed)} removed" if removed else "")
        raise CorpusError(f"corpus {path!r}: {what} since dataset {dataset!r} was extracted ({listed}); "
                          "set `corpus.on_change: recompute` to recompute the units they feed, or extract under a new `name`")
    placed = not removed and all(
        (o["first_unit"][i], o["units"][i], o["id_offset"][i]) == (int(new.first_unit[i]), int(new.units_of[i]), int(new.id_offset[i]))
        for i in range(min(n_old, n_new)))
    old_units = int(sum(o["units"]))
    if placed:
        gone = sorted(u for i in changed for u in range(o["first_unit"][i], o["first_unit"][i] + o["units"][i]))
    else:
        j = min(changed + removed)
        gone = list(range(int(o["first_unit"][j]), old_units))
    log.warning("dataset %r: %s changed; %d unit(s) will be recomputed", dataset, listed, len(gone))
    return gone, names
