"""The extract kind: a dataset of activations from a model over a corpus.

Its plan: new documents of a growing corpus are new units; new hooks are computed for every unit;
units an earlier run left unfinished are computed. A model whose revision now resolves to another
commit (for a local folder: other weights or config) is a new dataset version named by the
pipeline's ``version_pattern``; the old dataset is left as it is, and later jobs read the new one.
"""

from __future__ import annotations

import sys
from typing import Any

from strata.jobs.kinds.planning import Job, JobKind, NoStore, PlanContext, PlanState, Ref, Step, revision_value
from strata.jobs.kinds.registry import register
from strata.pipeline import models
from strata.pipeline.errors import SpecError
from strata.store.datasets.manifest import fingerprint
from strata.store.datasets.state import DatasetState
from strata.store.layout import check_name
from strata.store.layout import unit_ranges as ranges


class ExtractKind(JobKind):
    def io(self, spec: Any) -> tuple[set[Ref], set[Ref]]:
        return {("dataset", spec.name)}, set()

    def plan(self, state: PlanState, job: Job, ctx: PlanContext) -> Step:
        # lazy: the extraction code imports torch; detecting a spec's kind must not pay for it
        from strata.pipeline.extract import check_committed, plan_sharded, prepare  # lazy: torch: CLI start-up
        from strata.pipeline.extract import plan as plan_units  # lazy: torch: CLI start-up

        spec = job.spec
        base, target, moved = spec.name, spec.name, ""
        m = models.resolve(spec.model)
        st = state.s
        if st is not None and base in st.datasets():
            old = st.manifest(base).meta
            if old.get("model") != m.identity:
                raise SpecError(f"{job.entry}: dataset {base!r} holds model {old.get('model')!r}, but the spec names {m.identity!r}: "
                                "another model is another dataset; choose a new `name`")
            if old.get("revision") != m.revision:
                target = check_name(ctx.version_pattern.format(name=base, revision=revision_value(m.revision)))
                moved = f"{revision_value(str(old.get('revision')))[:12]} -> {revision_value(m.revision)[:12]}"
        pr = prepare(job.updated(name=target), st if st is not None else NoStore())
        ds = pr.existing
        recompute: list[int] = []
        if pr.shards is not None:  # sharded: the listing says whether anything changed
            old_keys = ds.shards().column("key").to_pylist() if ds is not None and ds.shards() is not None else None
            if old_keys is not None and old_keys == [pr.settings.key_for(r) for r in pr.shards]:  # type: ignore[union-attr]
                n = ds.info.num_units  # type: ignore[union-attr]
            else:  # new or changed shards: counted here (tokenized, nothing written)
                sp = plan_sharded(pr, None, write=False)
                n, recompute = sp.units, sp.forget
        elif ds is not None and pr.scan.docs == pr.corpus_docs:
            n = ds.info.num_units  # the corpus is the one the dataset was made of: its units are known
        else:
            pl = plan_units(pr)  # tokenizes in this process (no executor) to count the units
            try:
                check_committed(pr, pl)
                n = pl.units
            finally:
                pl.packer.source.remove()
        old_hooks = set(ds.hooks) if ds is not None else set()
        have: dict[str | None, set[int]] = {h: set(ds.committed_units(h)) if h in old_hooks else set() for h in pr.hooks}
        have[None] = set(ds.committed_units(None)) if ds is not None else set()
        planned = set(range(n))
        for h in have:  # units a changed shard invalidates are computed again
            have[h] -= set(recompute)
        for h in pr.rehook:  # a hook stored with another meaning is captured again
            have[h] = set()
        missing = {h: sorted(planned - have[h]) for h in pr.hooks if planned - have[h]}
        units = sorted(set().union(*missing.values(), planned - have[None]))

        if ds is not None:
            now = DatasetState.read(ds)
        else:  # the identity the extraction will give it: the same function of the same fields
            fp = fingerprint(context_size=spec.tokenize.context_size, dtype=spec.dtype, meta=pr.meta)
            now = DatasetState.planned(target, fingerprint=fp, context_size=spec.tokenize.context_size,
                                       unit_contexts=spec.compute.unit_contexts, meta=pr.meta)
        gained = {h: planned - have[h] for h in [*pr.hooks, None]}
        after = now.extended({h: planned for h in [*pr.hooks, None]},
                             widths={h: int(pr.meta["hook_widths"].get(h) or pr.config.hidden_size) for h in pr.hooks})
        state.add_dataset(base, after, gained)

        step = Step(job, f"dataset {target}", lease=target, units=units, hooks=missing,
                    overrides={"name": target, "version_of": base} if target != base else {})
        if n == 0:
            step.why = "the corpus fills no unit yet"
            return step
        if not units:
            step.why = f"up to date (the current version of {base}, whose model revision moved: {moved})" if moved else "up to date"
            return step
        step.run = True
        if ds is None:
            step.missing = f"units {ranges(units)} x {len(pr.hooks)} hook(s)"
            step.why = f"model revision moved ({moved}): a new version; {base} is left as it is" if moved else "new dataset"
            return step
        step.missing = _missing(missing, units, len(pr.hooks))
        new_units = [u for u in units if u >= ds.info.num_units]
        new_hooks = [h for h in pr.hooks if h not in old_hooks]
        old_missing = [u for h, us in missing.items() if h in old_hooks and h not in pr.rehook for u in us if u < ds.info.num_units]
        why = []
        if new_units:
            why.append(f"the corpus grew: {len(new_units)} new unit(s)")
        if new_hooks:
            why.append(f"new hook(s) {', '.join(new_hooks)}")
        old_missing = [u for u in old_missing if u not in set(recompute)]
        if recompute:
            why.append(f"corpus shard(s) changed: unit(s) {ranges(set(recompute))} recomputed")
        if pr.rehook:
            why.append(f"hook(s) {', '.join(pr.rehook)} stored with an older meaning: captured again")
        if old_missing:
            why.append(f"unit(s) {ranges(set(old_missing))} unfinished (an earlier run stopped)")
        step.why = "; ".join(why)
        return step

    def needs_ray(self, spec: Any) -> bool:
        return spec.compute.executor != "local"

    def run(self, spec: Any) -> None:
        # lazy: the extraction code imports torch; detecting a spec's kind must not pay for it
        from strata.pipeline.extract import run_extract  # lazy: torch: CLI start-up

        print(run_extract(spec, progress=sys.stderr.isatty()).message)


def _missing(missing: dict[str, list[int]], units: list[int], n_hooks: int) -> str:
    """``units 3-5 (2 hooks); units 0-5 of blocks.2.hook_resid_post``: what is missing, grouped by units."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for h, us in missing.items():
        groups.setdefault(tuple(us), []).append(h)
    parts = [f"units {ranges(us)}" + (f" ({len(hs)} hooks)" if len(hs) == n_hooks and len(hs) > 1 else
                                      "" if len(hs) == n_hooks else f" of {', '.join(hs)}") for us, hs in groups.items()]
    return "; ".join(parts) if parts else f"units {ranges(units)} (token table)"


KIND = register(ExtractKind("extract", "strata.pipeline.config:ExtractSpec", "strata.jobs.extract",
                            ("store", "corpus.path", "model.id"), ("model", "corpus")))
