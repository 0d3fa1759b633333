"""``strata extract SPEC --dry-run``: plan an extraction without writing a dataset, and say what it would hold.

Everything a real run checks first is checked (the store, the lease, the model, the hooks, the
corpus); then the corpus is tokenized and planned exactly as the real run plans it, and a small
table says what the dataset would be: shards, documents, tokens, contexts, tokens dropped, units,
and bytes per hook and in total. No dataset is created. A sharded corpus's tokenized shards are
committed under the dataset's name (``datasets/NAME/shards/``), under its lease, so the real run
that follows reuses them instead of reading the corpus again; ``strata gc`` lists them as work in
progress until that run (``strata gc --abandoned NAME`` removes them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from strata.pipeline.config import ExtractSpec
from strata.pipeline.executor import open_executor
from strata.pipeline.extract import Plan, plan, plan_sharded, start
from strata.pipeline.sharded import ShardedExtraction
from strata.pipeline.worker import peak_rss_bytes
from strata.store.dtypes import storage_dtype


@dataclass
class DryRun:
    """What an extraction would do."""

    name: str
    store: str
    plan_kind: str  # "sharded" | "documents"
    shards: int
    shards_tokenized: int  # shards this dry run read (the others were tokenized before)
    docs: int
    corpus_tokens: int
    contexts: int
    context_size: int
    dropped_tokens: int
    units: int
    unit_contexts: int
    held_back_contexts: int
    hook_bytes: dict[str, int] = field(default_factory=dict)
    existing_units: int = 0  # units the dataset has already
    recompute_units: int = 0  # committed units a changed shard would recompute
    changed_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    driver_peak_rss: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.hook_bytes.values())

    def table(self) -> str:
        """The plan as a small two-column table."""
        rows: list[tuple[str, str]] = [
            ("plan", f"{self.plan_kind} ({self.shards:,} shard(s), {self.shards_tokenized:,} tokenized by this run)"
             if self.plan_kind == "sharded" else self.plan_kind),
            ("documents", f"{self.docs:,}"),
            ("corpus tokens", f"{self.corpus_tokens:,}"),
            ("contexts", f"{self.contexts:,} x {self.context_size} tokens = {self.contexts * self.context_size:,} token rows"),
            ("tokens dropped", f"{self.dropped_tokens:,}"),
            ("units", f"{self.units:,} of {self.unit_contexts} contexts" + (f" ({self.held_back_contexts} contexts held back)"
                                                                          if self.held_back_contexts else "")),
        ]
        if self.existing_units:
            rows.append(("already in the dataset", f"{self.existing_units:,} unit(s)"))
        if self.changed_shards:
            rows.append(("changed shards", f"{len(self.changed_shards)} ({', '.join(self.changed_shards[:3])}"
                                           f"{', ...' if len(self.changed_shards) > 3 else ''}): {self.recompute_units} unit(s) to recompute"))
        rows += [(f"bytes {h}", _size(b)) for h, b in self.hook_bytes.items()]
        rows.append(("bytes in total", _size(self.total_bytes)))
        rows.append(("planned in", f"{self.seconds:.1f} s, driver peak RSS {self.driver_peak_rss / 2**20:.0f} MiB"))
        width = max(len(k) for k, _ in rows)
        head = f"dry run: dataset {self.name!r} in {self.store} (nothing written but tokenized shards)"
        return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _size(n: int) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:,.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def dry_run_extract(spec: ExtractSpec) -> DryRun:
    """Plan ``spec`` as :func:`strata.pipeline.extract.run_extract` would, without creating the dataset."""
    t0 = time.perf_counter()
    s, lease, p = start(spec, owner="strata extract --dry-run")
    pl: Plan | ShardedExtraction
    with open_executor(spec.compute.executor, spec.compute.address) as ex:
        if p.shards is not None:
            with lease:
                pl = plan_sharded(p, ex, fence=lease.fence())
        else:
            pl = plan(p, ex)
            source: Any = getattr(pl.packer, "source", None)
            if hasattr(source, "remove"):
                source.remove()
    itemsize = storage_dtype(spec.dtype).itemsize
    d = int(p.meta["d_model"])
    sharded = isinstance(pl, ShardedExtraction)
    rows = (pl.n_contexts if sharded else min(pl.n_contexts, pl.units * p.unit_contexts)) * p.context_size
    if sharded:
        docs, tokens = pl.plan.total("docs"), pl.plan.total("tokens")
        shards, fresh = len(pl.plan.keys), sum(1 for r in pl.plan.results if not r.get("reused"))
    else:
        lens = getattr(pl.packer.source, "lens", None)
        docs, tokens, shards, fresh = p.scan.docs, int(lens.sum()) if lens is not None else 0, 0, 0
    return DryRun(
        name=spec.name, store=s.uri, plan_kind="sharded" if sharded else "documents", shards=shards, shards_tokenized=fresh, docs=docs,
        corpus_tokens=tokens, contexts=pl.n_contexts, context_size=p.context_size, dropped_tokens=pl.dropped_tokens, units=pl.units,
        unit_contexts=p.unit_contexts, held_back_contexts=pl.held_back_contexts, hook_bytes={h: rows * d * itemsize for h in p.hooks},
        existing_units=p.existing.info.num_units if p.existing is not None else 0,
        recompute_units=len(pl.forget) if sharded else 0, changed_shards=list(pl.changed) if sharded else [],
        seconds=time.perf_counter() - t0, driver_peak_rss=peak_rss_bytes(),
    )
