"""Reading a feature table of SAE latents: ``fs = s.features(name)``.

    fs.stats()                  pyarrow: feature, count, density, mean_activation, max_activation
    fs.top(f, k=20)             pyarrow: row, activation, doc_id, position, token, context (highest first)
    fs.activations(f)           pyarrow: row, activation (every row where feature f fires, by row)
    fs.sample(f)                pyarrow: quantile, row, activation, ... (the seeded quantile sample)
    fs.histogram(f)             pyarrow: lo, hi, count (fixed log-spaced bins)
    fs.latents(rows=...)        torch [n, d_sae], sparse COO (``dense=True``: a dense tensor)

A table opened sees the units committed at that moment and the merged generation its manifest
names (``fs.refresh()`` picks up newer ones). Statistics, ``top``, ``activations`` and ``sample``
come from the merged generation: they cover ``fs.merged_units``; ``fs.stale`` says whether units
were committed since (the encode job is running, or died before merging: rerun it). ``latents``
reads the unit tables, so it covers every committed unit. Every read is checked against a commit
record. A table whose dataset was replaced under the same name (another fingerprint) is refused
with :class:`~store.errors.StaleArtifactError` naming both fingerprints; ``allow_stale=True``
opens it to inspect or remove (``fs.stale_inputs`` says why), but reads that pair it with the
dataset's tokens (``top``, ``sample``, ``windows``) still refuse. With ``skip_special`` (the
default) special rows (BOS, separators, padding) are not
encoded: their latents read as zero and ``density`` counts encoded rows only.

The format is described in :mod:`store.features.format`; the statistics in
:mod:`store.features.stats`; the feature-major copy in :mod:`store.features.merge`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from strata.store.commit import protocol
from strata.store.datasets.reader import ActivationDataset, open_dataset
from strata.store.datasets.stale import check_inputs, stale_inputs
from strata.store.errors import CorruptionError, NotCommittedError, RowOutOfRangeError, StaleArtifactError
from strata.store.features.format import (
    FEATURES,
    UNIT_SCHEMA,
    CheckedFile,
    FeatureOutOfRangeError,
    FeatureTableExistsError,
    FeatureTableInfo,
    FeatureTableNotFoundError,
    block_name,
    load_info,
    read_table,
    unit_records,
)
from strata.store.features.merge import INDEX_SCHEMA, Generation, load_generation
from strata.store.features.stats import DECODER_NORMS, DECODER_NORMS_TYPE, hist_edges
from strata.store.layout import check_name
from strata.store.root import StoreRoot
from strata.store.views.feature import FeatureView
from strata.store.views.summaries import features_html

if TYPE_CHECKING:
    import torch

__all__ = ["FeatureTable", "FeatureTableNotFoundError", "FeatureTableExistsError", "FeatureOutOfRangeError", "table_names"]

log = logging.getLogger(__name__)

STATS_COLUMNS = ["feature", "count", "density", "mean_activation", "max_activation"]
_UNIT_CACHE = 16


def table_names(store: StoreRoot) -> list[str]:
    """Names of the feature tables whose manifest is written."""
    return [n for n in store.storage.list_dirs(FEATURES) if store.storage.exists(f"{FEATURES}/{n}/manifest.json")]


class FeatureTable:
    """A feature table opened for reading (see the module docstring)."""

    def __init__(self, store: StoreRoot, name: str, *, allow_stale: bool = False) -> None:
        self.store = store
        self.allow_stale = allow_stale
        self.storage = store.storage
        self.name = check_name(name, what="feature table")
        self._units: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._text: dict[int, str] = {}
        self._gen: Generation | None = None
        self.refresh()

    def __repr__(self) -> str:
        return (f"FeatureTable({self.name!r}, sae={self.info.sae!r}, d_sae={self.info.d_sae}, "
                f"units={len(self.units)}, merged={len(self.merged_units)})")

    def _repr_html_(self) -> str:
        """Jupyter's summary: SAE and dataset (with fingerprints), d_sae, what is encoded and
        merged, and the density summary (from the merged statistics)."""
        return features_html(self)

    def show(self, feature: int, **options: Any) -> FeatureView:
        """Feature ``feature`` in the notebook: the served feature page's view (density,
        histogram, top contexts with token shading, logit effects and neighbours where stored).
        ``options`` go to :func:`~strata.store.features.view.feature_data` (``top``, ``before``,
        ``after``, ``bins``). A feature out of range is a one-line :class:`FeatureOutOfRangeError`."""
        return FeatureView(self, feature, **options)

    # -- state ----------------------------------------------------------------------------

    def refresh(self) -> FeatureTable:
        """Pick up units committed and generations merged since the table was opened."""
        info = load_info(self.storage, self.name)
        if info is None:
            have = table_names(self.store)
            raise FeatureTableNotFoundError(
                f"no feature table {self.name!r} in store {self.store.uri}; it holds: {', '.join(have) if have else 'no feature tables'}"
            )
        self.info: FeatureTableInfo = info
        #: Why the table no longer matches its dataset (replaced under the same name), or None.
        self.stale_inputs: str | None = stale_inputs(self.store, f"feature table {self.name!r}", [(info.dataset, info.dataset_fingerprint)])
        if self.stale_inputs is not None and not self.allow_stale:
            raise StaleArtifactError(self.stale_inputs)
        self._records, self.damaged = unit_records(self.storage, info)
        gen = load_generation(self.storage, info, info.merged) if info.merged else None
        if gen is None or self._gen is None or gen.name != self._gen.name:
            for k in ("_stats", "_top", "_sample", "_index", "_block_meta"):
                self.__dict__.pop(k, None)
        self._gen = gen
        return self

    @property
    def d_sae(self) -> int:
        return self.info.d_sae

    @property
    def units(self) -> list[int]:
        """Units whose feature table is committed."""
        return sorted(self._records)

    @property
    def merged_units(self) -> list[int]:
        """Units the statistics, top rows and feature-major copy cover."""
        return [] if self._gen is None else self._gen.units

    @property
    def stale(self) -> bool:
        """Whether units were committed that the merged statistics do not cover yet."""
        return set(self.units) != set(self.merged_units)

    @property
    def encoded_rows(self) -> int:
        """Rows the merged statistics were computed over (``density``'s denominator)."""
        return self._generation().encoded_rows

    def _generation(self) -> Generation:
        if self._gen is None:
            raise NotCommittedError(
                f"feature table {self.name!r} has no merged statistics yet ({len(self.units)} unit(s) encoded): its encode job is "
                "running or stopped before merging; run `strata features encode` again to finish it"
            )
        return self._gen

    def _read(self, rel: str, schema: pa.Schema) -> pa.Table:
        gen = self._generation()
        return read_table(self.storage, gen.files[rel], schema, where=f"feature table {self.name!r} ({gen.name}/{rel})")

    def check_feature(self, feature: Any) -> int:
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)):
            raise TypeError(f"a feature index must be an int, got {feature!r}")
        if not 0 <= int(feature) < self.d_sae:
            raise FeatureOutOfRangeError(
                f"feature {int(feature)} is out of range: feature table {self.name!r} has features 0..{self.d_sae - 1} (d_sae={self.d_sae})"
            )
        return int(feature)

    # -- merged statistics ----------------------------------------------------------------

    @cached_property
    def _stats(self) -> pa.Table:
        nb = self.info.hist["bins"] + 2
        schema = pa.schema([("feature", pa.int32()), ("count", pa.int64()), ("density", pa.float64()), ("mean_activation", pa.float64()),
                            ("max_activation", pa.float32()), ("sum_activation", pa.float64()), ("hist", pa.list_(pa.int64()))])
        if self.info.sae_lineage.get("architecture") == "crosscoder":  # per-source decoder norms (store.features.stats)
            schema = schema.append(pa.field(DECODER_NORMS, DECODER_NORMS_TYPE))
        t = self._read("stats.parquet", schema)
        if t.num_rows != self.d_sae or not np.array_equal(t.column("feature").to_numpy(), np.arange(self.d_sae)):
            raise CorruptionError(f"feature table {self.name!r}: stats.parquet does not hold one row per feature")
        if t.num_rows and not pc.all(pc.equal(pc.list_value_length(t.column("hist")), nb)).as_py():
            raise CorruptionError(f"feature table {self.name!r}: stats.parquet histograms do not have {nb} bins")
        return t

    def stats(self, *, full: bool = False) -> pa.Table:
        """One row per feature: ``feature, count, density, mean_activation, max_activation``
        (``full=True`` adds ``sum_activation`` and ``hist``). Dead features have zeros."""
        return self._stats if full else self._stats.select(STATS_COLUMNS)

    def histogram(self, feature: int) -> pa.Table:
        """The feature's activation histogram on the table's fixed log-spaced bins:
        ``lo, hi, count`` (the first bin is everything below the lowest edge, the last
        everything at or above the highest)."""
        f = self.check_feature(feature)
        h = self.info.hist
        edges = hist_edges(h["lo"], h["hi"], h["bins"])
        counts = np.asarray(self._stats.column("hist")[f].as_py(), dtype=np.int64)
        return pa.table({"lo": np.r_[-np.inf, edges], "hi": np.r_[edges, np.inf], "count": counts})

    def _by_feature(self, rel: str, cols: list[tuple[str, pa.DataType]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        t = self._read(rel, pa.schema([("feature", pa.int32()), *cols]))
        feat = t.column("feature").to_numpy()
        if feat.size and np.any(np.diff(feat) < 0):
            raise CorruptionError(f"feature table {self.name!r}: {rel} is not sorted by feature")
        offsets = np.searchsorted(feat, np.arange(self.d_sae + 1))
        return offsets, {c: t.column(c).to_numpy() for c, _ in cols}

    @cached_property
    def _top(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self._by_feature("top.parquet", [("rank", pa.int32()), ("row", pa.int64()), ("value", pa.float32())])

    @cached_property
    def _sample(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self._by_feature("sample.parquet", [("quantile", pa.int16()), ("row", pa.int64()), ("value", pa.float32())])

    def top(self, feature: int, k: int = 20, *, before: int = 8, after: int = 4) -> pa.Table:
        """The ``k`` rows where ``feature`` is highest (ties: smaller row first): ``row,
        activation, doc_id, position, token, context``; ``context`` is the text of up to
        ``before``/``after`` tokens around the row within its context, the token marked ``[[ ]]``."""
        f = self.check_feature(feature)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.info.top_k:
            raise ValueError(f"k must be an int in 1..{self.info.top_k} (the table keeps the top {self.info.top_k} rows per feature), got {k!r}")
        off, cols = self._top
        a, b = int(off[f]), min(int(off[f + 1]), int(off[f]) + k)
        return self._with_text(cols["row"][a:b], cols["value"][a:b], before=before, after=after)

    def sample(self, feature: int, *, before: int = 8, after: int = 4) -> pa.Table:
        """The seeded sample of the feature's activations by quantile (0 is the top quantile):
        ``quantile`` then the columns of :meth:`top`."""
        f = self.check_feature(feature)
        off, cols = self._sample
        a, b = int(off[f]), int(off[f + 1])
        t = self._with_text(cols["row"][a:b], cols["value"][a:b], before=before, after=after)
        return t.add_column(0, "quantile", pa.array(cols["quantile"][a:b]))

    # -- the feature-major copy -----------------------------------------------------------

    @cached_property
    def _index(self) -> np.ndarray:
        t = self._read("index.parquet", INDEX_SCHEMA)
        if t.num_rows != self.d_sae:
            raise CorruptionError(f"feature table {self.name!r}: index.parquet has {t.num_rows} rows for {self.d_sae} features")
        return np.stack([t.column(c).to_numpy().astype(np.int64) for c in ("row_group", "start", "count")], axis=1)

    @cached_property
    def _block_meta(self) -> dict[int, Any]:
        return {}

    def activations(self, feature: int) -> pa.Table:
        """Every row where ``feature`` fires, in row order: ``row, activation`` (one checked
        row-group read of the feature-major copy)."""
        f = self.check_feature(feature)
        rg, start, count = (int(x) for x in self._index[f])
        if count == 0:
            return pa.table({"row": pa.array([], pa.int64()), "activation": pa.array([], pa.float32())})
        b = f // self.info.block_features
        gen = self._generation()
        rel = block_name(b)
        where = f"feature table {self.name!r} ({gen.name}/{rel})"
        src = CheckedFile(self.storage, gen.files[rel], where=where)
        try:
            pf = pq.ParquetFile(src, metadata=self._block_meta.get(b))
            self._block_meta.setdefault(b, pf.metadata)
            t = pf.read_row_group(rg, columns=["feature", "row", "value"]).slice(start, count)
        except (pa.ArrowInvalid, OSError, IndexError) as e:
            if isinstance(e, CorruptionError):
                raise
            raise CorruptionError(f"{where}: not the expected Parquet block ({str(e).splitlines()[0]})") from None
        feats = t.column("feature").to_numpy()
        if t.num_rows != count or feats[0] != f or feats[-1] != f:
            raise CorruptionError(f"{where}: the index does not match the block for feature {f}")
        return pa.table({"row": t.column("row"), "activation": t.column("value")})

    # -- text around rows -----------------------------------------------------------------

    @cached_property
    def dataset(self) -> ActivationDataset:
        """The activation dataset the table encodes; :class:`StaleArtifactError` when the dataset
        under that name is no longer the one encoded (its tokens would not be the table's rows),
        even for a table opened with ``allow_stale``."""
        ds = open_dataset(self.store, self.info.dataset)
        check_inputs(self.store, f"feature table {self.name!r}", [(ds.name, self.info.dataset_fingerprint)])
        return ds

    @cached_property
    def _tokenizer(self) -> Any:
        return self.dataset.tokenizer()

    def token_text(self, token_id: int) -> str:
        """A token's text; for an image dataset, ``<CLS>``, ``<REG r>`` or ``<patch i (row, col)>``."""
        t = self._text.get(token_id)
        if t is None:
            image = self.dataset.info.meta.get("image")
            if image is not None:
                grid = image.get("layout", {}).get("grid") or [0, 0]
                i = int(token_id)
                t = "<CLS> " if i == -1 else f"<REG {-2 - i}> " if i < -1 else (
                    f"<patch {i} ({i // grid[1]}, {i % grid[1]})> " if grid[1] else f"<patch {i}> ")
            else:
                tok = self._tokenizer
                t = tok.decode([int(token_id)], skip_special_tokens=False) if tok is not None else f"<{int(token_id)}>"
            self._text[token_id] = t
        return t

    def windows(self, rows: np.ndarray, *, before: int = 8, after: int = 4) -> list[tuple[np.ndarray, list[str]]]:
        """For each row, the rows of its window (``before``/``after`` tokens around it, within its
        context) and their decoded tokens."""
        if min(before, after) < 0:
            raise ValueError(f"before and after must be >= 0, got {before} and {after}")
        ds, ur = self.dataset, self.info.unit_rows
        out = []
        for r in np.asarray(rows, dtype=np.int64):
            u, local = divmod(int(r), ur)
            t = ds.unit_tokens(u)
            pos = int(t.column("position")[local].as_py())
            lo = max(local - before, local - pos)
            hi = min(local + after + 1, local - pos + ds.info.context_size, t.num_rows)
            ids = t.column("token_id").slice(lo, hi - lo).to_numpy()
            out.append((np.arange(lo, hi) + u * ur, [self.token_text(int(i)) for i in ids]))
        return out

    def _with_text(self, rows: np.ndarray, values: np.ndarray, *, before: int, after: int) -> pa.Table:
        ds, ur = self.dataset, self.info.unit_rows
        doc, pos, token, context = [], [], [], []
        for r, (wrows, texts) in zip(rows, self.windows(rows, before=before, after=after)):
            u, local = divmod(int(r), ur)
            t = ds.unit_tokens(u)
            doc.append(t.column("doc_id")[local].as_py())
            pos.append(t.column("position")[local].as_py())
            i = int(r - wrows[0])
            token.append(texts[i])
            context.append("".join(texts[:i]) + "[[" + texts[i] + "]]" + "".join(texts[i + 1 :]))
        return pa.table({"row": pa.array(rows, pa.int64()), "activation": pa.array(values, pa.float32()), "doc_id": pa.array(doc, pa.int64()),
                         "position": pa.array(pos, pa.int32()), "token": pa.array(token, pa.string()), "context": pa.array(context, pa.string())})

    # -- row-major reads ------------------------------------------------------------------

    def _unit(self, unit: int) -> tuple[np.ndarray, ...]:
        got = self._units.get(unit)
        if got is None:
            if unit in self.damaged:
                raise CorruptionError(f"feature table {self.name!r} unit {unit}: {self.damaged[unit]}")
            rec = self._records.get(unit)
            if rec is None:
                raise NotCommittedError(
                    f"feature table {self.name!r}: unit {unit} (rows {unit * self.info.unit_rows}..{(unit + 1) * self.info.unit_rows - 1}) "
                    f"is not encoded ({len(self._records)} unit(s) are); call refresh() to see newer commits"
                )
            where = f"feature table {self.name!r} unit {unit} ({rec.file.key})"
            t = read_table(self.storage, rec.file, UNIT_SCHEMA, where=where)
            if t.num_rows != rec.extra["entries"]:
                raise CorruptionError(f"{where}: {t.num_rows} entries, its commit record says {rec.extra['entries']}")
            got = (t.column("row").to_numpy(), t.column("feature").to_numpy(), t.column("value").to_numpy(), rec.rows)
            self._units[unit] = got
            if len(self._units) > _UNIT_CACHE:
                self._units.popitem(last=False)
        else:
            self._units.move_to_end(unit)
        return got

    def latents(self, rows: slice | Any, *, dense: bool = False) -> torch.Tensor:
        """The latents ``[len(rows), d_sae]`` of global token rows (a slice or an index array),
        as a sparse COO tensor (``dense=True``: dense float32). Rows of units not encoded raise
        :class:`NotCommittedError`; rows past a unit's end raise :class:`RowOutOfRangeError`."""
        import torch  # lazy: only latents are torch tensors; reading a table's stats must not pay for torch

        ur = self.info.unit_rows
        if isinstance(rows, slice):
            # A unit whose record is damaged counts too: its rows raise, they are never silently left out.
            end = max([u * ur + self._records[u].rows for u in self._records] + [(u + 1) * ur for u in self.damaged], default=0)
            idx = np.arange(*rows.indices(end), dtype=np.int64)
        else:
            idx = np.asarray(rows)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise TypeError(f"rows must be a slice or a 1-d array of integer row indices, got {idx.dtype} with {idx.ndim} dimension(s)")
            idx = idx.astype(np.int64)
        if idx.size and idx.min() < 0:
            raise RowOutOfRangeError(f"row indices must be non-negative, got {int(idx.min())}")
        pos_parts, feat_parts, val_parts = [], [], []
        for u in np.unique(idx // ur):
            sel = np.flatnonzero(idx // ur == u)
            urow, ufeat, uval, nrows = self._unit(int(u))
            if int(idx[sel].max()) >= u * ur + nrows:
                raise RowOutOfRangeError(f"feature table {self.name!r}: row {int(idx[sel].max())} is past the end of unit {int(u)} ({nrows} rows)")
            a, b = np.searchsorted(urow, idx[sel], "left"), np.searchsorted(urow, idx[sel], "right")
            n = b - a
            take = np.repeat(a - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(int(n.sum()))
            pos_parts.append(np.repeat(sel, n))
            feat_parts.append(ufeat[take])
            val_parts.append(uval[take])
        pos = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
        feat = np.concatenate(feat_parts).astype(np.int64) if feat_parts else np.zeros(0, np.int64)
        val = np.concatenate(val_parts) if val_parts else np.zeros(0, np.float32)
        shape = (idx.size, self.d_sae)
        if dense:
            out = torch.zeros(shape, dtype=torch.float32)
            out[torch.from_numpy(pos), torch.from_numpy(feat)] = torch.from_numpy(val)
            return out
        ind = torch.from_numpy(np.stack([pos, feat]))
        return torch.sparse_coo_tensor(ind, torch.from_numpy(val), shape, check_invariants=False).coalesce()  # indices built valid above

    # -- verification ---------------------------------------------------------------------

    def verify(self) -> list[str]:
        """What is wrong with the table's committed files (empty when every one is intact)."""
        problems = [f"unit {u}: {m}" for u, m in sorted(self.damaged.items())]
        files = [r.file for r in self._records.values()] + (list(self._gen.files.values()) if self._gen else [])
        for f in files:
            bad = protocol.verify_file(self.storage, f)
            if bad is not None:
                problems.append(f"{f.key}: {bad}")
        return problems
