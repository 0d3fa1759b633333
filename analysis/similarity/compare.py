"""``compare``: similarity metrics between two (dataset, hook) sides of the store.

Rows are paired by :func:`store.datasets.aligned.align_tokens` (``align="tokens"``) or pooled per
document (``align="docs"``, documents present on both sides), each side as its ``pool`` says:
``mean`` over the document's non-special tokens (the default), its ``cls`` token (vision
encoders with a CLS token), or its ``last`` non-special token (largest ``doc_position``: the
sentence embedding of a causal LM). ``pool`` is one name for both sides or a pair ``(a, b)``,
e.g. ``("cls", "last")`` for images through a ViT against their captions through a causal LM;
the pools used are recorded in the provenance (``alignment.pool``). Then:

* **streaming metrics** (``linear_cka``, ``debiased_cka``, ``cca``, ``svcca``, ``pwcca``,
  ``procrustes``, ``r2``, ``cosine``) come from one pass of float64 co-moments
  (:class:`Moments`): the pairs are cut into ranges of whole side-A units, each range is one
  task (a Ray task when Ray runs in this process) that reads its rows from the store in chunks
  of ``chunk_rows`` and returns its partial moments (``O(d^2)`` floats: ~14 MB at d = 768), and
  the parts are merged exactly. The values do not depend on the number of tasks or the chunk
  size beyond float64 rounding. ``r2`` fits on the training units and scores on held-out units
  (``holdout``: a seeded fraction of side A's units), both directions;
* **sampled metrics** (``rbf_cka``, ``minibatch_cka``, ``mutual_knn``, ``rsa``, ``cknna``) hold ``n x n``
  matrices, so they run on a seeded uniform sample of ``sample_rows`` pairs (``n_sample`` in the
  result).

``align="patches"`` pairs two image datasets' rows by (image, patch position) where their grids
match (a denoiser against a vision encoder, :mod:`._patches`). A diffusion dataset holds each image
at several timesteps: a side ``(dataset, hook, timestep)`` reads that timestep's rows only (needed
to pool or pair an image's rows; the timesteps are recorded in the provenance).

``max_rows`` keeps the first pairs in side-A row order (the fewest units read). With
``align="docs"`` the pooled matrices (``documents x d``) are held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp
from tqdm.auto import tqdm

from strata.pipeline.executor import Executor, StoreRef
from strata.pipeline.vision import CLS_TOKEN  # a vision encoder's CLS row (registers -2, -3, ...; patches 0..P-1)
from strata.store.datasets.aligned import AlignmentError, align_tokens, check_same_corpus

from ._cknna import cknna
from ._moments import Moments, check_precision
from ._patches import align_patches, at_timestep, check_timestep, keep_timesteps, split_side
from ._ridge import r2_from_moments
from ._sampled import minibatch_cka, mutual_knn, rbf_cka, rsa
from ._streaming import from_moments
from ._tasks import split_ranges
from .errors import AnalysisError
from .spec import DEFAULT_METRICS, METRICS, POOLS, SAMPLED, STREAM, AnalyzeCompute, CompareSettings, sections

if TYPE_CHECKING:
    from strata.store import ActivationDataset
    from strata.store.datasets.aligned import Alignment

log = logging.getLogger(__name__)

__all__ = ["METRICS", "STREAM", "SAMPLED", "POOLS", "CompareSettings", "ComparePlan", "compare", "plan_compare", "run_compare", "min_rows"]

Side = tuple["ActivationDataset", str]
SideArg = Side | tuple["ActivationDataset", str, int]  # (dataset, hook) or (dataset, hook, timestep) of a diffusion dataset
# The compute keys a comparison uses, and the settings recorded in its provenance (in this order).
_COMPUTE_KEYS = ("chunk_rows", "tasks")
_RECORDED = ("keep", "ridge", "holdout", "sample_rows", "seed", "sigma_frac", "knn_k", "minibatch_size", "rsa_metric",
             "chunk_rows", "tasks", "precision")


def min_rows(metric: str, settings: CompareSettings) -> int:
    """Fewest aligned rows ``metric`` is defined on."""
    return {"debiased_cka": 4, "cosine": 1, "rbf_cka": 3, "rsa": 3, "r2": 4,
            "minibatch_cka": settings.minibatch_size, "mutual_knn": settings.knn_k + 1, "cknna": max(4, settings.knn_k + 1)}.get(metric, 2)


@dataclass
class ComparePlan:
    """What :func:`run_compare` will do, checked before anything is read (``plan_compare``)."""

    a: Side
    b: Side
    metrics: list[str]
    align: str
    settings: CompareSettings
    compute: AnalyzeCompute
    alignment: Alignment | None = None  # align="tokens"
    docs: dict[str, Any] = field(default_factory=dict)  # align="docs": ids, rows and doc index per side
    pool: tuple[str, str] = ("mean", "mean")  # align="docs": how each side's document becomes one row
    n: int = 0
    test_units: list[int] = field(default_factory=list)
    timesteps: tuple[int | None, int | None] = (None, None)  # a diffusion side's chosen timestep
    cache: dict[Any, np.ndarray] | None = None  # align="docs": pooled sides shared between plans (timestep heatmaps)

    @property
    def n_sample(self) -> int:
        return min(self.settings.sample_rows, self.n) if any(m in SAMPLED for m in self.metrics) else 0

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"align": self.align, "n": self.n, "n_sample": self.n_sample, "metrics": self.metrics,
                               "options": self.options(), "holdout_units": self.test_units}
        if self.alignment is not None:
            out["alignment"] = self.alignment.summary()
            out["units_a"], out["units_b"] = list(self.alignment.units[0]), list(self.alignment.units[1])
        else:
            out["alignment"] = {"method": "docs", "documents": self.n, "candidates": self.docs.get("candidates"),
                                "pool": list(self.pool)}
        if self.timesteps != (None, None):
            out["timesteps"] = list(self.timesteps)
        return out

    def options(self) -> dict[str, Any]:
        """The settings the values depend on, as every result records them."""
        return {k: getattr(self.compute if k in _COMPUTE_KEYS else self.settings, k) for k in _RECORDED}


def _label(side: Side) -> str:
    return f"{side[0].name}:{side[1]}"


def _check_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    names = list(DEFAULT_METRICS if metrics is None else ([metrics] if isinstance(metrics, str) else metrics))
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise AnalysisError(f"unknown metric {bad[0]!r}; valid metrics are: {', '.join(METRICS)}")
    if not names:
        raise AnalysisError("no metric asked for; valid metrics are: " + ", ".join(METRICS))
    return list(dict.fromkeys(names))


def _check_pool(pool: Any, align: str) -> tuple[str, str]:
    """``pool`` as a (side a, side b) pair of valid names; a pool other than ``mean`` needs ``align="docs"``."""
    pair = (pool, pool) if isinstance(pool, str) else tuple(pool) if isinstance(pool, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(not isinstance(p, str) or p not in POOLS for p in pair):
        raise AnalysisError(f"`pool` must be one of {', '.join(map(repr, POOLS))} or a pair of them (side a, side b), got {pool!r}")
    if align != "docs" and pair != ("mean", "mean"):
        raise AnalysisError(f"`pool` {pool!r} pools documents; it needs `align` 'docs' (align 'tokens' pairs token rows, unpooled)")
    return pair  # type: ignore[return-value]


def plan_compare(a: SideArg, b: SideArg, metrics: Sequence[str] | None = None, *, settings: CompareSettings | None = None,
                 compute: AnalyzeCompute | None = None, **fields: Any) -> ComparePlan:
    """Check the inputs and pair the rows; raises :class:`AnalysisError` (or the store's
    ``AlignmentError``/``HookNotFoundError``) with a one-line message before any activation is read.

    ``settings``: a :class:`CompareSettings` (a ``kind: compare`` analysis of a spec is one), or
    its keys as keywords (``align``, ``pool``, ``max_rows``, ``sample_rows``, ``seed``, ...) with its
    defaults; ``compute``: the analyses' compute section, or its ``chunk_rows`` and ``tasks`` as
    keywords. ``pool`` (``align="docs"``): see the module docstring."""
    if settings is None:
        # The keyword path words its errors for a Python caller (the spec's for a spec file).
        fields["metrics"] = _check_metrics(metrics)
        _check_pool(fields.get("pool", "mean"), fields.get("align", "tokens"))
        if fields.get("align", "tokens") not in ("tokens", "docs", "patches"):
            raise AnalysisError(f"`align` must be 'tokens', 'docs' or 'patches', got {fields['align']!r}")
        if fields.get("max_rows") is not None and fields["max_rows"] < 1:
            raise AnalysisError(f"`max_rows` must be >= 1, got {fields['max_rows']}")
        if "precision" in fields:
            try:
                check_precision(fields["precision"])
            except ValueError as e:
                raise AnalysisError(str(e)) from None
    elif metrics is not None:
        raise AnalysisError("compare: `metrics` given both in the settings and as an argument; give one")
    settings, compute = sections("compare", CompareSettings, settings, compute, fields, compute_keys=_COMPUTE_KEYS,
                                 explicit=("metrics", "align", "pool", "max_rows"))
    names, align, max_rows = list(dict.fromkeys(settings.metrics)), settings.align, settings.max_rows
    pools = _check_pool(settings.pool, align)
    (a, ta), (b, tb) = split_side(a), split_side(b)
    for ds, hook in (a, b):
        ds.check_hook(hook)
    same = a[0].store.uri == b[0].store.uri and a[0].name == b[0].name
    for (ds, _), t in ((a, ta), (b, tb)):
        check_timestep(ds, t, align=align, same_dataset=same)
    da, db = a[0].info.hooks[a[1]].d, b[0].info.hooks[b[1]].d
    if "cosine" in names and da != db:
        raise AnalysisError(f"cosine needs the same width on both sides, but {_label(a)} has d={da} and {_label(b)} d={db}")
    plan = ComparePlan(a, b, names, align, settings, compute, pool=pools, timesteps=(ta, tb))
    if align in ("tokens", "patches"):
        al = align_tokens([a, b]) if align == "tokens" else align_patches(a, b, (ta, tb))
        if align == "tokens" and (ta, tb) != (None, None):
            al = keep_timesteps(al, [a, b], [ta, tb])
        if max_rows is not None and max_rows < len(al):
            al = al.subset(slice(0, max_rows))
        plan.alignment, plan.n = al, len(al)
    elif align == "docs":
        plan.docs = _doc_pairs(a, b, pools, (ta, tb))
        ids = plan.docs["ids"][: max_rows or None]
        plan.docs["ids"], plan.n = ids, int(ids.size)
    for m in names:
        need = min_rows(m, settings)
        n = plan.n_sample if m in SAMPLED else plan.n
        if n < need:
            what = "documents" if align == "docs" else "aligned rows"
            raise AnalysisError(f"{m} needs at least {need} {what}, but {_label(a)} and {_label(b)} have {n}")
    if "r2" in names:
        plan.test_units = _holdout(plan)
    return plan


def _holdout(plan: ComparePlan) -> list[int]:
    """Held-out side-A units (or document ids, with align="docs") for r2: a seeded fraction, at least one."""
    groups = np.unique(plan.alignment.rows[0] // plan.a[0].info.unit_rows) if plan.alignment is not None else plan.docs["ids"]
    if groups.size < 2:
        what = "units" if plan.alignment is not None else "documents"
        raise AnalysisError(f"r2 fits on some {what} and scores on others, but {_label(plan.a)} has only {groups.size} {what[:-1]}")
    k = min(groups.size - 1, max(1, int(round(plan.settings.holdout * groups.size))))
    pick = np.random.default_rng([plan.settings.seed, 2]).permutation(groups.size)[:k]
    return sorted(int(g) for g in groups[pick])


# -- align="docs" ----------------------------------------------------------------------------------



def _side_doc_rows(ds: ActivationDataset, hook: str, pool: str = "mean", timestep: int | None = None) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """(rows, their doc ids) of ``hook``'s committed tokens that ``pool`` reads (``mean``: every
    non-special token; ``cls``: the CLS row; ``last``: the non-special token of largest
    ``doc_position``; one row per document but for ``mean``), and the documents known to be
    whole (every row in a committed unit). ``timestep``: a diffusion dataset's rows at that timestep only."""
    t = at_timestep(ds.tokens(hook), timestep)
    if pool == "cls":
        cls = pc.and_(t.column("special"), pc.equal(t.column("token_id"), CLS_TOKEN))
        t = t.filter(pc.and_(cls, pc.greater_equal(t.column("doc_id"), 0)))
        if t.num_rows == 0:
            raise AnalysisError(f"dataset {ds.name!r} (hook {hook!r}) has no CLS token rows (token_id -1, special): "
                                "pool='cls' needs a dataset with a CLS token (ViT, CLIP, DINOv2); use pool='mean'")
    else:
        t = t.filter(pc.and_(pc.invert(t.column("special")), pc.greater_equal(t.column("doc_id"), 0)))
    rows, docs = t.column("row").to_numpy(), t.column("doc_id").to_numpy()
    if pool != "mean" and rows.size:
        # One row per document: the first CLS row (an image has one), or the last token. Sorted by
        # (doc, key, row), the wanted row is the first (cls) or the last (last) of each document's run.
        key = -rows if pool == "cls" else t.column("doc_position").to_numpy()
        order = np.lexsort((rows, key, docs))
        ends = np.r_[np.flatnonzero(np.diff(docs[order])), order.size - 1]
        rows, docs = rows[order[ends]], docs[order[ends]]
    index = ds.docs()
    if index is None:
        whole = set(np.unique(docs).tolist())
    else:
        ur = ds.info.unit_rows
        committed = set(ds.committed_units(hook))
        whole = {int(d) for d, s, e in zip(index.column("doc_id").to_numpy(), index.column("row_start").to_numpy(),
                                          index.column("row_end").to_numpy())
                 if s >= 0 and all(u in committed for u in range(s // ur, (e - 1) // ur + 1))}
        if pool == "last" and "dropped_tokens" in index.column_names:
            cut = int(np.count_nonzero(index.column("dropped_tokens").to_numpy() > 0))
            if cut:
                log.warning("dataset %s: %d document(s) lost their tail to truncation; pool='last' takes their last kept token",
                            ds.name, cut)
    return rows, docs, whole


def _doc_pairs(a: Side, b: Side, pool: tuple[str, str] = ("mean", "mean"),
               timesteps: tuple[int | None, int | None] = (None, None)) -> dict[str, Any]:
    check_same_corpus([a, b], by_docs=True)
    ra, da, wa = _side_doc_rows(*a, pool[0], timesteps[0])
    rb, db, wb = _side_doc_rows(*b, pool[1], timesteps[1])
    ids = np.array(sorted(wa & wb & set(np.unique(da).tolist()) & set(np.unique(db).tolist())), dtype=np.int64)
    if ids.size == 0:
        raise AlignmentError(f"cannot align {_label(a)} with {_label(b)} by documents: no document is wholly committed on both sides")
    return {"ids": ids, "a": (ra, da), "b": (rb, db), "candidates": [len(wa), len(wb)]}


def _pool_task(ref: StoreRef, name: str, hook: str, rows: np.ndarray, slot: np.ndarray, n_docs: int, chunk_rows: int) -> dict[str, np.ndarray]:
    """Sums and counts of ``rows`` per document slot (``slot[i]`` of row ``i``)."""
    ds = ref.dataset(name)
    sums = np.zeros((n_docs, ds.info.hooks[hook].d))
    for s in range(0, rows.size, chunk_rows):
        x = np.asarray(ds.read(hook, rows=rows[s : s + chunk_rows]), dtype=np.float64)
        k = x.shape[0]
        onehot = sp.csr_matrix((np.ones(k), (slot[s : s + k], np.arange(k))), shape=(n_docs, k))
        sums += onehot @ x
    return {"sums": sums, "counts": np.bincount(slot, minlength=n_docs).astype(np.int64)}


def _pooled(plan: ComparePlan, ex: Executor) -> tuple[np.ndarray, np.ndarray]:
    ids = plan.docs["ids"]
    parts = max(1, plan.compute.tasks or ex.default_tasks())
    groups = np.array_split(np.arange(ids.size), min(parts, ids.size))
    out = []
    for key, (ds, hook), t, pool in (("a", plan.a, plan.timesteps[0], plan.pool[0]), ("b", plan.b, plan.timesteps[1], plan.pool[1])):
        memo = (ds.store.uri, ds.name, ds.info.fingerprint, hook, t, pool, ids.tobytes())
        if plan.cache is not None and memo in plan.cache:
            out.append(plan.cache[memo])
            continue
        rows, docs = plan.docs[key]
        pos = np.searchsorted(ids, docs)
        inside = (pos < ids.size) & (ids[np.minimum(pos, ids.size - 1)] == docs)
        rows, pos = rows[inside], pos[inside]
        tasks = []
        for g in groups:
            sel = (pos >= g[0]) & (pos <= g[-1])
            tasks.append((ex.store_ref(ds), ds.name, hook, rows[sel], pos[sel] - g[0], g.size, plan.compute.chunk_rows))
        res = ex.map(_pool_task, tasks)
        sums = np.concatenate([r["sums"] for r in res])
        counts = np.concatenate([r["counts"] for r in res])
        out.append(sums / counts[:, None])
        if plan.cache is not None:
            plan.cache[memo] = out[-1]
    return out[0], out[1]


# -- align="tokens": partial moments per range of units -------------------------------------------


def _moments_task(ref_a: StoreRef, name_a: str, hook_a: str, ref_b: StoreRef, name_b: str, hook_b: str,
                  rows_a: np.ndarray, rows_b: np.ndarray, test: np.ndarray | None, chunk_rows: int,
                  precision: str = "auto", cosine: bool = True) -> dict[str, Any]:
    """Co-moments of the pairs ``(rows_a[i], rows_b[i])``; with ``test`` (a mask), separate
    moments of the training and held-out pairs."""
    ds_a = ref_a.dataset(name_a)
    ds_b = ds_a if (ref_a, name_a) == (ref_b, name_b) else ref_b.dataset(name_b)
    da, db = ds_a.info.hooks[hook_a].d, ds_b.info.hooks[hook_b].d
    new = lambda: Moments(da, db, precision=precision, cosine=cosine)  # noqa: E731
    parts = {"train": new(), "test": new()} if test is not None else {"all": new()}
    for s in range(0, rows_a.size, chunk_rows):
        x = ds_a.read(hook_a, rows=rows_a[s : s + chunk_rows])
        y = ds_b.read(hook_b, rows=rows_b[s : s + chunk_rows])
        if test is None:
            parts["all"].update(x, y)
        else:
            t = test[s : s + chunk_rows]
            parts["train"].update(x[~t], y[~t])
            parts["test"].update(x[t], y[t])
    return {k: m.to_dict() for k, m in parts.items()}


def _streamed(plan: ComparePlan, ex: Executor, progress: bool | None = None) -> dict[str, Moments]:
    al = plan.alignment
    ur = plan.a[0].info.unit_rows
    units = al.rows[0] // ur
    test = np.isin(units, plan.test_units) if plan.test_units else None
    ranges = split_ranges(units, plan.compute.tasks or ex.default_tasks())
    (ds_a, hook_a), (ds_b, hook_b) = plan.a, plan.b
    ra, rb = ex.store_ref(ds_a), ex.store_ref(ds_b)
    tasks = [(ra, ds_a.name, hook_a, rb, ds_b.name, hook_b, al.rows[0][r], al.rows[1][r],
              None if test is None else test[r], plan.compute.chunk_rows, plan.settings.precision, "cosine" in plan.metrics) for r in ranges]
    log.info("compare %s vs %s: %d pairs in %d task(s)", _label(plan.a), _label(plan.b), len(al), len(tasks))
    # disable=None: a widget in Jupyter, text on a terminal, nothing otherwise; delay: only a pass that takes a while shows one.
    with tqdm(total=len(al), unit="row", unit_scale=True, desc=f"compare {_label(plan.a)} vs {_label(plan.b)}",
              delay=1.0 if progress is None else 0.0,
              disable=None if progress is None else not progress) as bar:
        results = []
        for t, res in zip(tasks, ex.imap(_moments_task, tasks)):
            results.append(res)
            bar.update(int(t[6].size))
    keys = results[0].keys()
    return {k: Moments.sum(Moments.from_dict(r[k]) for r in results) for k in keys}


# -- running -----------------------------------------------------------------------------------------


def _sample_index(plan: ComparePlan) -> np.ndarray:
    rng = np.random.default_rng([plan.settings.seed, 1])
    return np.sort(rng.choice(plan.n, size=plan.n_sample, replace=False))


def _sampled_values(plan: ComparePlan, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    o = plan.settings
    fns = {
        "rbf_cka": lambda: rbf_cka(x, y, sigma_frac=o.sigma_frac),
        "minibatch_cka": lambda: minibatch_cka(x, y, batch_size=o.minibatch_size, seed=o.seed),
        "mutual_knn": lambda: mutual_knn(x, y, k=o.knn_k),
        "rsa": lambda: rsa(x, y, metric=o.rsa_metric),  # type: ignore[arg-type]
        "cknna": lambda: cknna(x, y, k=o.knn_k),
    }
    return {m: float(fns[m]()) for m in plan.metrics if m in SAMPLED}


def _linear_values(plan: ComparePlan, parts: dict[str, Moments]) -> dict[str, float]:
    whole = parts["all"] if "all" in parts else parts["train"].copy().merge(parts["test"])
    names = [m for m in plan.metrics if m in STREAM and m != "r2"]
    out: dict[str, float] = {}
    try:
        out.update(from_moments(whole, names, keep=plan.settings.keep) if names else {})
        if "r2" in plan.metrics:
            r2 = r2_from_moments(parts["train"], parts["test"], ridge=plan.settings.ridge)
            out["r2_a_to_b"], out["r2_b_to_a"] = r2["x_to_y"], r2["y_to_x"]
    except ValueError as e:  # undefined on this data (zero variance, ...): one line, named
        raise AnalysisError(f"{_label(plan.a)} vs {_label(plan.b)}: {e}") from None
    return out


def run_compare(plan: ComparePlan, executor: Executor | None = None, *, progress: bool | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """The metrics of a plan and its provenance (alignment, rows, sample, settings). ``progress``:
    a bar over the streamed rows (``None``: where someone watches, see :func:`compare`)."""
    ex = executor or Executor.auto()
    values: dict[str, float] = {}
    if plan.align == "docs":
        x, y = _pooled(plan, ex)
        ids = plan.docs["ids"]
        test = np.isin(ids, plan.test_units)
        parts = {"all": Moments.from_arrays(x, y)}
        if plan.test_units:
            parts = {"train": Moments.from_arrays(x[~test], y[~test]), "test": Moments.from_arrays(x[test], y[test])}
        values.update(_linear_values(plan, parts) if any(m in STREAM for m in plan.metrics) else {})
        if plan.n_sample:
            idx = _sample_index(plan)
            values.update(_sampled_values(plan, x[idx], y[idx]))
    else:
        if any(m in STREAM for m in plan.metrics):
            values.update(_linear_values(plan, _streamed(plan, ex, progress)))
        if plan.n_sample:
            idx = _sample_index(plan)
            al = plan.alignment
            x = np.asarray(plan.a[0].read(plan.a[1], rows=al.rows[0][idx]), dtype=np.float64)
            y = np.asarray(plan.b[0].read(plan.b[1], rows=al.rows[1][idx]), dtype=np.float64)
            try:
                values.update(_sampled_values(plan, x, y))
            except ValueError as e:
                raise AnalysisError(f"{_label(plan.a)} vs {_label(plan.b)}: {e}") from None
    values["n"] = float(plan.n)
    if plan.n_sample:
        values["n_sample"] = float(plan.n_sample)
    return values, plan.provenance()


def compare(a: SideArg, b: SideArg, metrics: Sequence[str] | None = None, *, settings: CompareSettings | None = None,
            compute: AnalyzeCompute | None = None, use_ray: bool | None = None, progress: bool | None = None, **fields: Any) -> dict[str, float]:
    """Similarity of ``a = (dsA, hookA)`` and ``b = (dsB, hookB)`` over their aligned rows; a
    diffusion dataset's side is ``(ds, hook, timestep)`` (its rows at that timestep).

    ``metrics``: names from :data:`METRICS` (default ``linear_cka, debiased_cka, svcca,
    procrustes``); ``fields``: keys of :class:`CompareSettings` (``align="tokens"``, ``"docs"`` or ``"patches"``,
    ``pool`` with ``align="docs"``: ``mean``, ``cls`` or ``last``, or a pair of them (side a, side b),
    see the module docstring; ``max_rows``, ``sample_rows``, ``seed``, ``ridge``, ``holdout``, ...)
    and of the compute section (``tasks``, ``chunk_rows``), or the sections themselves as
    ``settings`` and ``compute``. Returns ``{metric: value}`` (``r2`` as ``r2_a_to_b`` and
    ``r2_b_to_a``) plus ``n`` (rows or documents of the streaming metrics) and, with a sampled
    metric, ``n_sample``. Partial moments run as Ray tasks when Ray is running in this process
    (``use_ray``), else here. ``progress``: a bar over the streamed rows of a pass that takes over a
    second (``None``: a widget in Jupyter, text on a terminal, nothing when stderr is neither;
    ``True`` always, ``False`` never).
    """
    plan = plan_compare(a, b, metrics, settings=settings, compute=compute, **fields)
    return run_compare(plan, Executor.auto(use_ray), progress=progress)[0]
