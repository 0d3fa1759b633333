"""The sae kind: sparse autoencoders (transcoders, crosscoders) trained on a dataset's hooks.

Its plan (``on_change``, default ``keep``): an SAE whose inputs changed (its dataset grew or is a
new version) or whose spec changed is ``kept (policy)``, or with ``retrain``/``recompute`` trained
again under a new name, the pipeline's ``retrain_pattern`` with ``version`` = 8 hex digits of a hash
of what the new SAEs are (dataset, its fingerprint and units, and the training config): a committed
SAE is never overwritten.
"""

from __future__ import annotations

from typing import Any

from strata.jobs.kinds.planning import Job, JobKind, PlanContext, PlanState, Ref, SAERef, Step, names, retrained_name, version_hash
from strata.jobs.kinds.registry import register
from strata.pipeline.errors import SpecError
from strata.store.commit.artifacts import ArtifactExistsError
from strata.store.saes.handles import SAES

Run = tuple[str, str, dict[str, Any], str]  # (name as the spec makes it, hook, resolved config, its hash)


class SAEKind(JobKind):
    def provides(self, written: Ref, need: Ref) -> bool:
        """An SAE job writes the stem of its SAEs' names: ``name`` provides ``name``, ``name.HOOK``
        and ``name.HOOK.k=32``."""
        return written[0] == need[0] == "sae" and (need[1] == written[1] or need[1].startswith(written[1] + "."))

    def io(self, spec: Any) -> tuple[set[Ref], set[Ref]]:
        # The stem of its SAEs' names: ``name``, ``name.HOOK``, ``name.HOOK.k=32``, ...
        return {("sae", spec.name)}, {("dataset", spec.dataset)}

    def plan(self, state: PlanState, job: Job, ctx: PlanContext) -> Step:
        # lazy: the SAE code imports torch and sae_lens; detecting a spec's kind must not pay for it
        from strata.analysis.sae.config import (  # lazy: torch, sae_lens: CLI start-up
            combinations,
            concrete,
            resolve_hooks,
            resolve_pairs,
            run_name,
        )
        from strata.analysis.sae.plan import (  # lazy: torch, sae_lens: CLI start-up
            config_hash,
            describe_diff,
            heldout_contexts_needed,
            resolved_config,
            split_units,
        )

        spec = job.spec
        ds = state.dataset(spec.dataset)
        try:  # (hook, None) per SAE; (in hook, out hook) per transcoder
            targets: list[tuple[str, str | None]] = (
                list(resolve_pairs(spec, ds.hooks, dataset=f"dataset {ds.name!r}")) if any(isinstance(h, dict) for h in spec.hooks)
                else [(h, None) for h in resolve_hooks(spec.hooks, ds.hooks, dataset=f"dataset {ds.name!r}")])
        except ValueError as e:
            raise SpecError(f"{job.entry}: {e}") from None
        hooks = list(dict.fromkeys(h for t in targets for h in t if h is not None))
        units, holdout = split_units(ds, hooks, spec.data.holdout_units, min_contexts=heldout_contexts_needed(spec))
        runs: list[Run] = []
        current = job.updated(dataset=ds.name)  # the config records the dataset's (version) name
        for params in combinations(spec):
            for hook, hook_out in targets:
                name = run_name(spec, hook=hook_out or hook, params=params, several_hooks=len(targets) > 1)
                one = concrete(current, params, hook={"in": hook, "out": hook_out} if hook_out else hook, name=name)
                cfg = resolved_config(one, ds, hook=hook, units=units, holdout=holdout, hook_out=hook_out)
                runs.append((name, hook, cfg, config_hash(cfg)))

        def status(name: str, cfg: dict[str, Any], h: str) -> tuple[str, str]:
            art = state.artifact(SAES, name)
            if art is None:
                return "new", ""
            if art.meta.get("config_hash") == h:
                return "same", ""
            return "changed", describe_diff(art.meta.get("config", {}), cfg) or "its config differs"

        states = [status(n, cfg, h) for n, _, cfg, h in runs]
        changed = [(n, why) for (n, *_), (s, why) in zip(runs, states) if s == "changed"]
        step = Step(job, f"SAE {spec.name}" + (f" ({len(runs)})" if len(runs) > 1 else ""))
        overrides: dict[str, Any] = {"dataset": ds.name} if ds.name != spec.dataset else {}
        stem, version = spec.name, None
        if changed and job.policy == "keep":
            step.kept = [n for n, _ in changed]
            new = [n for (n, *_), (s, _) in zip(runs, states) if s == "new"]
            step.why = f"kept (policy): inputs changed ({changed[0][1]})" + (
                f"; {names(new)} not trained: the job's other SAEs are kept" if new else "")
            for n, hook, _, _ in runs:
                state.add_sae(n, SAERef(n, _lineage_dataset(state, n, ds.name), hook))
            return step
        if changed:  # retrain / recompute: a new name, never an overwrite
            version = version_hash(sorted(h for *_, h in runs))
            stem = retrained_name(ctx, spec.name, version)
            step.output = f"SAE {stem}" + (f" ({len(runs)})" if len(runs) > 1 else "")
            overrides["name"] = stem
            states = [status(stem + n[len(spec.name):], cfg, h) for n, _, cfg, h in runs]
            if any(s == "changed" for s, _ in states):
                raise SpecError(f"{job.entry}: SAE {stem!r} is committed already with another config; change `retrain_pattern`")
        todo = [stem + n[len(spec.name):] for (n, *_), (s, _) in zip(runs, states) if s != "same"]
        _check_checkpoints(job, state, [(stem + n[len(spec.name):], cfg, h) for n, _, cfg, h in runs if stem + n[len(spec.name):] in todo])
        for n, hook, _, _ in runs:
            actual = stem + n[len(spec.name):]
            state.add_sae(n, SAERef(actual, ds.name, hook, trains=actual in todo, version=version))
        step.overrides, step.names = overrides, todo
        if not todo:
            step.why = "up to date" + (f" (retrained as {stem} when its inputs changed)" if changed else "")
            return step
        step.run = True
        step.missing = f"train {names(todo)}"
        step.why = (f"inputs changed ({changed[0][1]}); `{job.policy}` trains new SAEs: committed ones are never overwritten"
                    if changed else "new SAE(s)" + ("" if ds.exists else f" on dataset {ds.name}"))
        return step

    def run(self, spec: Any) -> None:
        # lazy: the SAE code imports torch and sae_lens; detecting a spec's kind must not pay for it
        from strata.analysis.sae.job import run_job  # lazy: torch, sae_lens: CLI start-up

        for o in run_job(spec).outcomes:
            print(f"SAE {o.name}: {o.status}" + (f" in {o.seconds:.1f}s" if o.status != "unchanged" else ""))

    def needs_ray(self, spec: Any) -> bool:
        return bool(spec.sweep)  # one SAE trains in this process; a sweep runs as Ray tasks


def _check_checkpoints(job: Job, state: PlanState, runs: list[tuple[str, dict[str, Any], str]]) -> None:
    """An SAE this run trains must not have checkpoints of another config: the job refuses to
    resume them (:func:`analysis.sae.plan.plan`), so the plan refuses first, before any work."""
    # lazy: the SAE code imports torch and sae_lens; detecting a spec's kind must not pay for it
    from strata.analysis.sae import checkpoint  # lazy: torch, sae_lens: CLI start-up
    from strata.analysis.sae.plan import describe_diff  # lazy: torch, sae_lens: CLI start-up

    if state.s is None:
        return
    for name, cfg, h in runs:
        for at, meta in checkpoint.committed(state.s.storage, name):
            if meta.get("config_hash") != h:
                diff = describe_diff(meta.get("config", {}), cfg) or "its config hash differs"
                raise ArtifactExistsError(
                    f"{job.entry}: SAE {name!r} has a checkpoint (step {at}) of another config ({diff}), which its job would refuse "
                    f"to resume: run the spec with that config to finish it, or `strata sae train {job.entry} --fresh` to start over")


def _lineage_dataset(state: PlanState, name: str, default: str) -> str:
    art = state.artifact(SAES, name)
    return str(art.read_json("lineage.json").get("dataset", default)) if art is not None else default


KIND = register(SAEKind("sae", "strata.analysis.sae.config:SAETrainSpec", "strata.jobs.sae_train", ("store",), ("architecture",),
                        policy="keep"))
