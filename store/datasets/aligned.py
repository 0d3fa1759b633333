"""Row alignment between (dataset, hook) sides, and shuffled batches of aligned rows.

Two sides align when their rows are the same tokens of the same documents:

* one dataset (two hooks of it): row ``r`` pairs with row ``r`` (method ``rows``);
* the same tokenizer over the same documents (two models sharing a tokenizer, or one model
  packed two ways): tokens pair by ``(doc_id, doc_position)`` (method ``doc_position``);
* different tokenizers over the same documents: tokens pair when their character spans end at
  the same offset of the same document, ``(doc_id, char_end)`` (method ``char_end``): both
  tokens then complete the same prefix of the text. Byte-level BPE can split one multi-byte
  character over several tokens that all carry the character's span; only the token that the
  document's next token does not overlap (next ``char_start >= char_end``) completes the
  character and may pair. Tokens ending inside a token of the other side do not pair; the
  fraction of each side's tokens that pair is reported (``Alignment.paired_fraction``).

Special rows (BOS, separators, padding) never pair. Only units committed for a side's hook are
used. "The same documents" is checked where the manifests say: datasets whose
``corpus_fingerprint`` differs hold different documents under the same ids and are refused,
as are sides that have no token in common. (Pooled per document, an image corpus and its
captions pair by their set hashes instead; see :func:`check_same_corpus` and
:mod:`store.datasets.pairing`. Their tokens never pair.)

``iter_aligned(sides, ...)`` yields tuples of row-aligned float32 tensors, one per side, for
cross-model training (crosscoders, linear maps). The order is a pure function of ``(seed,
epoch)``: side 0's committed units are permuted, grouped into windows of about ``buffer_rows``
pairs, and the pairs of a window permuted; every pair appears once per epoch. Rows are gathered
from memory-mapped, checked units, so a window's units are read once. It runs in the caller's
thread (no loader threads to stop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.store.datasets.reader import ActivationDataset
from strata.store.dtypes import storage_dtype, to_torch
from strata.store.errors import NotCommittedError, StrataError

if TYPE_CHECKING:
    import torch

__all__ = ["AlignmentError", "Alignment", "AlignedBatches", "align_tokens", "iter_aligned", "check_same_corpus"]

SideRef = tuple["ActivationDataset", str]


class AlignmentError(StrataError, ValueError):
    """Sides whose rows cannot be paired: different documents, no common tokens, or a
    cross-tokenizer alignment without character spans."""


@dataclass(frozen=True)
class Alignment:
    """Row pairs of ``k`` sides: ``rows[s][i]`` is the global row of pair ``i`` on side ``s``;
    pairs are ordered by side 0's row."""

    method: str  # "rows" | "doc_position" | "char_end"
    rows: tuple[np.ndarray, ...]
    candidates: tuple[int, ...]  # non-special committed tokens of each side
    units: tuple[tuple[int, ...], ...]  # committed units of each side's hook that were used

    def __len__(self) -> int:
        return int(self.rows[0].size)

    @property
    def paired_fraction(self) -> tuple[float, ...]:
        """Of each side's non-special committed tokens, the fraction that paired."""
        return tuple(len(self) / c if c else 0.0 for c in self.candidates)

    def subset(self, idx: np.ndarray | slice) -> Alignment:
        """The pairs ``idx`` (kept in side-0 order when ``idx`` is sorted)."""
        return Alignment(self.method, tuple(r[idx] for r in self.rows), self.candidates, self.units)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "pairs": len(self), "candidates": list(self.candidates),
                "paired_fraction": [round(f, 6) for f in self.paired_fraction]}


def _describe(side: SideRef) -> str:
    return f"{side[0].name}:{side[1]}"


def _same_dataset(a: ActivationDataset, b: ActivationDataset) -> bool:
    return a.store.uri == b.store.uri and a.name == b.name


def _tokens(ds: ActivationDataset, hook: str, units: Sequence[int] | None, *, boundaries: bool = False) -> tuple[pa.Table, tuple[int, ...]]:
    """Non-special token rows of ``hook``'s committed units (or of ``units``, which must be
    committed), with ``row``; with ``boundaries``, only tokens that end on a character boundary
    (see :func:`_completes_characters`)."""
    committed = ds.committed_units(hook)
    if units is None:
        chosen = committed
    else:
        chosen = sorted({int(u) for u in units})
        missing = [u for u in chosen if u not in set(committed)]
        if missing:
            raise NotCommittedError(f"dataset {ds.name!r} hook {hook!r}: unit(s) {missing[:8]} are not committed")
    if not chosen:
        raise AlignmentError(f"dataset {ds.name!r} has no unit committed for hook {hook!r}: nothing to align")
    t = ds.tokens(units=chosen)
    keep = pc.and_(pc.invert(t.column("special")), pc.greater_equal(t.column("doc_id"), 0))
    if boundaries and "char_end" in t.column_names:
        keep = pc.and_(keep, pa.array(_completes_characters(t)))
    return t.filter(keep), tuple(chosen)


def _paired_by_captions(a: ActivationDataset, b: ActivationDataset) -> bool:
    """Whether one side is an image corpus and the other its captions: one side's
    ``caption_set_hash`` equals the other side's ``doc_set_hash`` (see :mod:`store.datasets.pairing`)."""
    ma, mb = a.info.meta, b.info.meta
    return any(cap is not None and cap == docs
               for cap, docs in ((ma.get("caption_set_hash"), mb.get("doc_set_hash")),
                                 (mb.get("caption_set_hash"), ma.get("doc_set_hash"))))


def check_same_corpus(sides: Sequence[SideRef], *, by_docs: bool = False) -> None:
    """Refuse sides extracted from different corpora. With ``by_docs`` (documents pooled, not
    tokens paired), an image corpus and its captions pair although their fingerprints differ,
    when the caption set hash of one equals the document set hash of the other."""
    seen: dict[str, tuple[ActivationDataset, str]] = {}
    for ds, hook in sides:
        fp = ds.info.meta.get("corpus_fingerprint")
        if fp is None:
            continue
        for other, (ods, ofp) in seen.items():
            if ofp != fp and not (by_docs and _paired_by_captions(ods, ds)):
                hint = (" (for an image corpus and its captions, extract the captions from the same records: "
                        "the caption set hashes must match)") if by_docs else ""
                raise AlignmentError(
                    f"cannot align {other} with {ds.name}:{hook}: they were extracted from different corpora "
                    f"(corpus fingerprints {ofp[:16]}... and {fp[:16]}...), so a document id names different texts; "
                    f"extract both from the same corpus{hint}"
                )
        seen[f"{ds.name}:{hook}"] = (ds, fp)


def _method(sides: Sequence[SideRef]) -> str:
    first = sides[0][0]
    if all(_same_dataset(first, ds) for ds, _ in sides[1:]):
        return "rows"
    toks = {ds.info.meta.get("tokenizer") for ds, _ in sides}
    return "doc_position" if len(toks) == 1 else "char_end"


def align_tokens(sides: Sequence[SideRef], *, units: Sequence[int] | None = None) -> Alignment:
    """Pair the token rows of ``sides`` (see the module docstring). ``units``: restrict side 0
    to these committed units (the other sides use every committed unit)."""
    if len(sides) < 2:
        raise ValueError(f"alignment needs at least two (dataset, hook) sides, got {len(sides)}")
    for ds, hook in sides:
        ds.check_hook(hook)
    method = _method(sides)
    if method != "rows":
        check_same_corpus(sides)
    if method == "rows":
        ds = sides[0][0]
        common = set(ds.committed_units(sides[0][1]))
        for _, hook in sides[1:]:
            common &= set(ds.committed_units(hook))
        if units is not None:
            common &= {int(u) for u in units}
        t, used = _tokens(ds, sides[0][1], sorted(common) if common else [])  # raises when empty
        rows = t.column("row").to_numpy()
        return _finish(method, [rows] * len(sides), [rows.size] * len(sides), [used] * len(sides), sides)

    key = ["doc_id", "doc_position"] if method == "doc_position" else ["doc_id", "char_end"]
    tables, cands, used_units = [], [], []
    for i, (ds, hook) in enumerate(sides):
        t, used = _tokens(ds, hook, units if i == 0 else None)
        if method == "char_end" and "char_end" not in t.column_names:
            raise AlignmentError(
                f"cannot align {_describe(sides[0])} with {_describe(sides[i])} across tokenizers: dataset {ds.name!r} "
                "has no character spans (char_start/char_end) in its token tables; it was extracted before Strata "
                "recorded them: extract it again under a new name, or use `align: docs`"
            )
        cands.append(t.num_rows)
        used_units.append(used)
        if method == "char_end":
            t, _ = _tokens(ds, hook, used, boundaries=True)
        t = t.select([*key, "row"]).filter(pc.greater_equal(t.column(key[1]), 0))
        # One row per key (a boundary token is unique per offset; max() only makes that certain).
        g = t.group_by(key).aggregate([("row", "max")])
        tables.append(pa.table({key[0]: g.column(key[0]), key[1]: g.column(key[1]), f"row{i}": g.column("row_max")}))
    joined = tables[0]
    for t in tables[1:]:
        joined = joined.join(t, keys=key, join_type="inner")
    rows = [joined.column(f"row{i}").to_numpy().astype(np.int64) for i in range(len(sides))]
    order = np.argsort(rows[0], kind="stable")
    return _finish(method, [r[order] for r in rows], cands, used_units, sides)


def _completes_characters(t: pa.Table) -> np.ndarray:
    """Which rows of a whole token table (special rows included, row order) end on a character
    boundary of their document. Byte-level BPE can split one character's bytes over several
    tokens that all carry the character's span, so a token ends its prefix only when the
    document's next token (``doc_position + 1``) starts at or after its ``char_end``, or is the
    document's separator; when the next token is not in the table, only padding right after it
    (the document's end in a padded context) tells. Otherwise (a dropped tail, an uncommitted
    unit) the token does not pair: unknown is not a boundary."""
    doc, pos = t.column("doc_id").to_numpy(), t.column("doc_position").to_numpy()
    start, end = t.column("char_start").to_numpy(), t.column("char_end").to_numpy()
    special = t.column("special").to_numpy(zero_copy_only=False).astype(bool)
    rows = t.column("row").to_numpy()
    ok = np.zeros(t.num_rows, bool)
    order = np.lexsort((pos, doc))
    cur, nxt = order[:-1], order[1:]
    has_next = (doc[nxt] == doc[cur]) & (pos[nxt] == pos[cur] + 1) & (doc[cur] >= 0)
    ok[cur[has_next]] = special[nxt[has_next]] | (start[nxt[has_next]] >= end[cur[has_next]])
    lonely = np.setdiff1d(np.flatnonzero(doc >= 0), cur[has_next])
    after = np.searchsorted(rows, rows[lonely] + 1)
    found = after < rows.size
    found[found] = rows[after[found]] == rows[lonely[found]] + 1
    ok[lonely[found]] = doc[after[found]] < 0
    return ok


def _finish(method: str, rows: list[np.ndarray], cands: list[int], units: list[tuple[int, ...]], sides: Sequence[SideRef]) -> Alignment:
    if rows[0].size == 0:
        names = " and ".join(_describe(s) for s in sides)
        why = {"rows": "every committed row is special",
               "doc_position": "no (doc_id, doc_position) is committed on every side",
               "char_end": "no token of one side ends where a token of the other side ends, in a common document"}[method]
        raise AlignmentError(f"cannot align {names}: no common rows ({why}); are they over the same documents?")
    return Alignment(method, tuple(np.ascontiguousarray(r, dtype=np.int64) for r in rows), tuple(cands), tuple(units))


# -- batches -------------------------------------------------------------------------------------


def _check_int(key: str, val: Any, *, minimum: int) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < minimum:
        raise ValueError(f"`{key}` must be an int >= {minimum}, got {val!r}")
    return int(val)


@dataclass
class AlignedBatches:
    """Iterator of tuples of row-aligned ``[batch, d_s]`` tensors; see the module docstring and
    :func:`iter_aligned`. ``state_dict()`` / ``load_state_dict()`` resume after the last
    batch taken, without reading the skipped rows."""

    sides: list[SideRef]
    alignment: Alignment
    batch_size: int = 4096
    shuffle: bool = True
    seed: int = 0
    epochs: int | None = 1
    buffer_rows: int = 1 << 17
    drop_last: bool = False
    dtype: Any = None
    _epoch: int = 0
    _batch: int = 0
    _bounds: np.ndarray = field(init=False, repr=False)
    _gen: Iterator[tuple[Any, ...]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import torch  # lazy: batches are torch tensors, but `import strata.store` must not pay for torch

        self.dtype = self.dtype or torch.float32
        ur = self.sides[0][0].info.unit_rows
        u0 = self.alignment.rows[0] // ur
        # Pairs are ordered by side 0's row, so each side-0 unit's pairs are one run.
        cuts = np.flatnonzero(np.diff(u0)) + 1
        self._units = u0[np.r_[0, cuts]] if u0.size else np.zeros(0, np.int64)
        self._bounds = np.r_[0, cuts, u0.size]
        mean = max(1, u0.size // max(1, self._units.size))
        self._per_window = max(1, -(-self.buffer_rows // mean)) if self.shuffle else 1

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless iterator (epochs=None) has no length")
        return self.batches_per_epoch * self.epochs

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.alignment)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_stream(self, epoch: int) -> Iterator[np.ndarray]:
        """Pair indices of one epoch, window by window."""
        order = np.arange(self._units.size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        for w, s in enumerate(range(0, order.size, self._per_window)):
            idx = np.concatenate([np.arange(self._bounds[i], self._bounds[i + 1]) for i in order[s : s + self._per_window]])
            if self.shuffle:
                idx = idx[np.random.default_rng([self.seed, epoch, w]).permutation(idx.size)]
            yield idx

    def _batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(epoch, pair indices)`` of each batch from the saved position on."""
        bs, n = self.batch_size, len(self.alignment)
        epoch = self._epoch
        skip = self._batch * bs
        if self.epochs is None:  # one endless stream: batch b is rows [b bs, (b+1) bs)
            epoch, skip = divmod(skip, n)
        carry = np.zeros(0, np.int64)
        while self.epochs is None or epoch < self.epochs:
            for idx in self._epoch_stream(epoch):
                if skip >= idx.size:
                    skip -= idx.size
                    continue
                buf = np.concatenate([carry, idx[skip:]])
                skip = 0
                full = buf.size // bs
                for b in range(full):
                    yield epoch, buf[b * bs : (b + 1) * bs]
                carry = buf[full * bs :]
            if self.epochs is not None:
                if carry.size and not self.drop_last:
                    yield epoch, carry
                carry = np.zeros(0, np.int64)
            epoch += 1

    def _gather(self, side: int, pairs: np.ndarray) -> torch.Tensor:
        ds, hook = self.sides[side]
        rows = self.alignment.rows[side][pairs]
        ur, d = ds.info.unit_rows, ds.info.hooks[hook].d
        out = np.empty((rows.size, d), dtype=storage_dtype(ds.info.dtype))
        units = rows // ur
        by_unit = np.argsort(units, kind="stable")
        cuts = np.r_[0, np.flatnonzero(np.diff(units[by_unit])) + 1, rows.size]
        for a, b in zip(cuts[:-1], cuts[1:]):
            at = by_unit[a:b]
            u = int(units[at[0]])
            out[at] = ds.unit_array(hook, u)[rows[at] - u * ur]
        t = to_torch(out, ds.info.dtype)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def __iter__(self) -> AlignedBatches:
        return self

    def __next__(self) -> tuple[Any, ...]:
        if self._gen is None:
            if self.epochs is not None and self._epoch >= self.epochs:
                raise StopIteration
            self._gen = self._batches()
        try:
            epoch, pairs = next(self._gen)
        except StopIteration:
            self._gen = None
            self._epoch, self._batch = self.epochs or 0, 0
            raise
        batch = tuple(self._gather(s, pairs) for s in range(len(self.sides)))
        self._batch += 1
        if self.epochs is not None:
            self._epoch = epoch
            if self._batch >= self.batches_per_epoch:
                self._epoch, self._batch = epoch + 1, 0
        return batch

    def __enter__(self) -> AlignedBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing runs in the background; provided so it is used like ``ds.iter_batches``."""
        self._gen = None

    def _config(self) -> dict[str, Any]:
        return {"sides": [_describe(s) for s in self.sides], "pairs": len(self.alignment), "seed": self.seed,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "buffer_rows": self.buffer_rows,
                "drop_last": self.drop_last, "endless": self.epochs is None}

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts, plus the configuration it is valid for."""
        return {"epoch": self._epoch, "batch": self._batch, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, val in self._config().items():
            if state.get(key) != val:
                raise ValueError(f"cannot resume: `{key}` is {state.get(key)!r} in the saved state but {val!r} here")
        self._gen = None
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])


def iter_aligned(
    sides: Sequence[SideRef],
    *,
    batch_size: int = 4096,
    shuffle: bool = True,
    seed: int = 0,
    epochs: int | None = 1,
    buffer_rows: int = 1 << 17,
    drop_last: bool = False,
    dtype: Any = None,
    alignment: Alignment | None = None,
) -> AlignedBatches:
    """Batches of row-aligned activations of ``sides`` (``[(dsA, hookA), (dsB, hookB), ...]``):
    each a tuple of tensors ``[batch, d_s]`` (float32 unless ``dtype``), the rows of one token
    on every side. ``epochs=None`` is endless (every batch full). ``alignment``: pairs computed
    before (default :func:`align_tokens` of ``sides``)."""
    sides = [(ds, hook) for ds, hook in sides]
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    buffer_rows = _check_int("buffer_rows", buffer_rows, minimum=1)
    if epochs is not None:
        epochs = _check_int("epochs", epochs, minimum=1)
    al = alignment if alignment is not None else align_tokens(sides)
    if len(al.rows) != len(sides):
        raise ValueError(f"`alignment` has {len(al.rows)} sides but {len(sides)} sides were given")
    if epochs is None and len(al) < batch_size:
        raise ValueError(f"`batch_size` {batch_size} is larger than an epoch ({len(al)} aligned rows); "
                         "an endless iterator would repeat rows within a batch")
    return AlignedBatches(sides, al, batch_size=batch_size, shuffle=bool(shuffle), seed=seed, epochs=epochs,
                          buffer_rows=buffer_rows, drop_last=bool(drop_last), dtype=dtype)
