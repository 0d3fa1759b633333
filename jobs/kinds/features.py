"""The features kind: an SAE's latents over its dataset, as a sparse feature table.

Its plan: the units its SAE's dataset gained are encoded (the job itself is incremental); the table
of an SAE this run retrains under a new name gets the new version's name too.
"""

from __future__ import annotations

import sys
from typing import Any

from strata.jobs.kinds.planning import Job, JobKind, PlanContext, PlanState, Ref, Step, retrained_name
from strata.jobs.kinds.registry import register
from strata.store.features.format import FeatureTableExistsError, load_info, unit_records
from strata.store.features.merge import load_generation
from strata.store.layout import unit_ranges as ranges


class FeaturesKind(JobKind):
    def io(self, spec: Any) -> tuple[set[Ref], set[Ref]]:
        return {("features", spec.table)}, {("sae", spec.sae)}

    def plan(self, state: PlanState, job: Job, ctx: PlanContext) -> Step:
        # lazy: the encoder imports torch; detecting a spec's kind must not pay for it
        from strata.pipeline.encode import check_table  # lazy: torch: CLI start-up

        spec = job.spec
        sv = state.sae(spec.sae)
        table = spec.name or sv.name
        if spec.name and sv.version:
            table = retrained_name(ctx, spec.name, sv.version)
        overrides = {k: v for k, v, old in (("sae", sv.name, spec.sae), ("name", table, spec.name or spec.sae)) if v != old}
        step = Step(job, f"features {table}", overrides=overrides)
        ds = state.dataset(sv.dataset, actual=True)
        units = ds.committed_units(sv.hook)
        s = state.s
        if sv.trains:
            # A table of that name holds the latents of another SAE commit (the SAE was removed, or
            # its name was taken): encoding with the SAE this run trains would meet another identity.
            # Found here, so the dry run says it and the real run stops before training anything.
            old = load_info(s.storage, table) if s is not None else None
            if old is not None:
                raise FeatureTableExistsError(
                    f"{job.entry}: feature table {table!r} already exists, encoded with an earlier commit of SAE {old.sae!r} "
                    f"(fingerprint {old.sae_fingerprint}); SAE {sv.name} is trained in this run, so the table would get another "
                    "identity; choose a new `name` for the table")
            step.units, step.why = units, f"SAE {sv.name} is trained in this run"
        else:
            assert s is not None  # an SAE not trained by this run is one the store holds (PlanState.sae)
            _, _, old = check_table(job.updated(sae=sv.name, name=table), s)
            records = unit_records(s.storage, old)[0] if old is not None else {}
            step.units = sorted(set(units) - set(records))
            if not step.units:
                merged = old is not None and old.merged and set(load_generation(s.storage, old, old.merged).units) == set(records)
                if not merged:
                    step.run, step.missing, step.why = True, "merge", "units encoded but not merged (an earlier run stopped)"
                return step
            gained = set(step.units) & state.gained(ds.name, sv.hook)
            step.why = ("new feature table" if old is None else
                        f"dataset {ds.name} gains unit(s) {ranges(gained)}" if gained else "units not encoded yet (an earlier run stopped)")
        step.run = bool(step.units)
        step.missing = f"encode units {ranges(step.units)}" if step.units else "-"
        if not step.units:
            step.why = f"SAE {sv.name}'s dataset has no committed unit yet"
        return step

    def needs_ray(self, spec: Any) -> bool:
        return spec.compute.executor != "local"

    def run(self, spec: Any) -> None:
        # lazy: the encoder imports torch; detecting a spec's kind must not pay for it
        from strata.pipeline.encode import run_encode  # lazy: torch: CLI start-up

        print(run_encode(spec, progress=sys.stderr.isatty()).message)


KIND = register(FeaturesKind("features", "strata.pipeline.encode:EncodeSpec", "strata.jobs.features_encode", ("store",), ("sae",)))
