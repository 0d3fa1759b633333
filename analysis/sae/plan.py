"""Planning an SAE training job against the store, reading only: which SAEs, on which data, in
which passes, and what each one's state in the store is.

Everything that can be wrong with the input is found here, before a lease is taken, Ray starts
or a byte is written: an unknown dataset, a hook pattern matching none of its hooks, a dataset
with no committed unit, ``sae.d_in`` that is not the hook's width, too few units or rows to
train on, an SAE name committed (or checkpointed) with another config.

**The config hash.** Each SAE's *resolved config* is what determines it: the dataset (name and
identity fingerprint), the hook and its width, the units it trains on and those held out, the
architecture and its options (``d_sae`` resolved), and the ``train``, ``data`` and ``eval``
sections. Where and how it runs is left out (``store``, ``storage_options``, ``compute``, the
name, ``train.checkpoint_every``). Its hash is recorded in the commit record's ``meta``, so a
rerun recognises a finished SAE (a no-op) and refuses the same name with another config, naming
what differs. The units are part of it: after the dataset grew, the same spec is another SAE.

**Passes and tasks.** A task is one sweep combination: it trains that combination's SAE of
every hook in one pass over the data (``ds.iter_batches([h1, h2, ...])``). Sweep combinations
are separate tasks (one Ray task each, see :mod:`analysis.sae.job`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from strata.analysis.sae import checkpoint
from strata.analysis.sae.config import Run, SAETrainSpec, check_memory, check_name, combinations, concrete, resolve_hooks, resolve_pairs, run_name
from strata.pipeline.errors import SpecError
from strata.store.commit import artifacts
from strata.store.commit.artifacts import ArtifactExistsError
from strata.store.errors import HookNotFoundError, NotCommittedError
from strata.store.saes.handles import SAES

if TYPE_CHECKING:
    from strata.store import ActivationDataset, Store

log = logging.getLogger(__name__)

Status = Literal["train", "resume", "done"]
# Spec keys that say where and how a job runs, not what it trains.
NOT_CONFIG = ("store", "storage_options", "compute", "name", "sweep", "hooks")


@dataclass
class PlannedRun:
    """One SAE of the job: its run, resolved config, hash and state in the store."""

    run: Run
    d_in: int
    config: dict[str, Any]
    config_hash: str
    status: Status = "train"
    resume_step: int | None = None

    @property
    def name(self) -> str:
        return self.run.name


@dataclass
class Task:
    """One sweep combination: its SAEs (one per hook), trained in one pass over the data."""

    params: dict[str, Any]
    runs: list[PlannedRun]
    units: list[int]
    holdout_units: list[int]
    rows_per_epoch: int

    @property
    def todo(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.status != "done"]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.items()) or "the spec"


@dataclass
class Plan:
    spec: SAETrainSpec
    dataset: str
    fingerprint: str
    hooks: list[str]
    tasks: list[Task] = field(default_factory=list)

    @property
    def runs(self) -> list[PlannedRun]:
        return [r for t in self.tasks for r in t.runs]


def d_sae_of(sae_options: dict[str, Any], d_in: int) -> int:
    """``sae.d_sae``, or ``round(sae.expansion_factor * d_in)``."""
    if sae_options.get("d_sae") is not None:
        return int(sae_options["d_sae"])
    return max(1, round(float(sae_options["expansion_factor"]) * d_in))


def resolved_config(spec: SAETrainSpec, ds: ActivationDataset, *, hook: str, units: list[int], holdout: list[int],
                    hook_out: str | None = None) -> dict[str, Any]:
    """What determines an SAE (see the module docstring), as plain JSON; a transcoder's also
    its out hook and width (``hook`` is its in hook)."""
    d_in = ds.info.hooks[hook].d
    raw = spec.model_dump(mode="json", exclude=set(NOT_CONFIG))
    raw["train"].pop("checkpoint_every", None)
    sae = {k: v for k, v in raw.pop("sae").items() if k not in ("expansion_factor", "d_in")}
    sae["d_sae"] = d_sae_of(spec.sae, d_in)
    return {
        "dataset": ds.name, "fingerprint": ds.info.fingerprint, "hook": hook, "d_in": d_in,
        **({"hook_out": hook_out, "d_out": ds.info.hooks[hook_out].d} if hook_out is not None else {}),
        "units": list(units), "holdout_units": list(holdout), **raw, "sae": sae,
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _short(v: Any) -> str:
    if isinstance(v, list) and len(v) > 4 and all(isinstance(x, int) for x in v):  # units
        return f"{len(v)} units {v[0]}..{v[-1]}" if v == list(range(v[0], v[-1] + 1)) else f"{len(v)} units {v[:4]}..."
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 40 else s[:37] + "..."


def describe_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The differing keys of two resolved configs, as ``key: old -> new`` (at most three)."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(describe_diff(a, b, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    out = [x for x in out if x]
    return ", ".join(out[:3]) + (f" and {len(out) - 3} more" if len(out) > 3 else "")


def heldout_contexts_needed(spec: SAETrainSpec) -> int:
    """Whole contexts the held-out units must hold for the evaluation the spec asks: an
    ``eval.ce_contexts`` the spec sets is a requirement; the default is "up to 64 of what
    ``data.holdout_units`` holds" (0: nothing is held out, or the spliced loss is off)."""
    asked = "ce_contexts" in spec.eval.model_fields_set
    return spec.eval.ce_contexts if spec.data.holdout_units and spec.eval.ce and asked else 0


def _contexts(ds: ActivationDataset, unit: int) -> int:
    return ds.unit_counts(None, unit)[0] // ds.info.context_size


def split_units(ds: ActivationDataset, hooks: list[str], holdout_units: int, *, min_contexts: int = 0) -> tuple[list[int], list[int]]:
    """(training units, held-out units): the units committed for every hook and the token
    table, the last ``holdout_units`` held out; more whole units when those hold fewer than
    ``min_contexts`` contexts (the last unit of a corpus is often short), so the held-out set
    meets what the evaluation asks. One unit is always left to train on: when that cannot be,
    the spec is refused, saying how many contexts there are."""
    units = set(ds.committed_units(None))
    for h in hooks:
        units &= set(ds.committed_units(h))
    ordered = sorted(units)
    if not ordered:
        raise NotCommittedError(f"dataset {ds.name!r} has no unit committed for {', '.join(hooks)}: nothing to train on (extract it first)")
    if len(ordered) <= holdout_units:
        raise SpecError(
            f"`data.holdout_units` ({holdout_units}) leaves none of the {len(ordered)} unit(s) of dataset {ds.name!r} "
            f"committed for {', '.join(hooks)} to train on"
        )
    cut = len(ordered) - holdout_units
    if holdout_units and min_contexts:
        held = sum(_contexts(ds, u) for u in ordered[cut:])
        while held < min_contexts and cut > 1:
            cut -= 1
            held += _contexts(ds, ordered[cut])
        if held < min_contexts:
            most = sum(_contexts(ds, u) for u in ordered[1:])
            raise SpecError(
                f"`eval.ce_contexts` ({min_contexts}) asks for more held-out contexts than dataset {ds.name!r} can give: "
                f"at most {most} context(s) in {len(ordered) - 1} unit(s), leaving one unit to train on; "
                f"lower `eval.ce_contexts` to {most} or less, or extract more"
            )
        if len(ordered) - cut > holdout_units:
            log.info("holding out %d units of dataset %r, not %d: `eval.ce_contexts` asks for %d contexts", len(ordered) - cut,
                     ds.name, holdout_units, min_contexts)
    return ordered[:cut], ordered[cut:]


def _rows(ds: ActivationDataset, units: list[int], skip_special: bool) -> int:
    total = 0
    for u in units:
        rows, special = ds.unit_counts(None, u)
        total += rows - (special if skip_special else 0)
    return total


def plan(spec: SAETrainSpec, s: Store, *, fresh: bool = False) -> Plan:
    """The job's tasks and the state of each SAE (reads only). ``fresh``: checkpoints of another
    config do not block (the job deletes them). Crosscoders: :func:`analysis.sae.crosscoder_run.plan_crosscoders`."""
    if spec.sources:
        raise SpecError("a crosscoder's `sources` are planned by analysis.sae.crosscoder_run.plan_crosscoders (run_job picks it)")
    ds = s.dataset(spec.dataset)
    # (hook, None) per SAE; (in hook, out hook) per transcoder.
    targets: list[tuple[str, str | None]]
    try:
        if any(isinstance(h, dict) for h in spec.hooks):
            targets = list(resolve_pairs(spec, ds.hooks, dataset=f"dataset {ds.name!r}"))
        else:
            targets = [(h, None) for h in resolve_hooks(spec.hooks, ds.hooks, dataset=f"dataset {ds.name!r}")]
    except ValueError as e:
        raise HookNotFoundError(str(e)) from None
    hooks = list(dict.fromkeys(h for t in targets for h in t if h is not None))
    for h, _ in targets:
        if spec.sae.get("d_in") is not None and spec.sae["d_in"] != ds.info.hooks[h].d:
            raise SpecError(f"`sae.d_in` is {spec.sae['d_in']} but hook {h!r} of dataset {ds.name!r} is {ds.info.hooks[h].d} wide")
    units, holdout = split_units(ds, hooks, spec.data.holdout_units, min_contexts=heldout_contexts_needed(spec))
    out = Plan(spec, ds.name, ds.info.fingerprint, hooks)
    names: dict[str, dict[str, Any]] = {}
    for params in combinations(spec):
        runs = []
        for hook, hook_out in targets:
            name = run_name(spec, hook=hook_out or hook, params=params, several_hooks=len(targets) > 1)
            try:
                check_name(name, what="SAE")
            except ValueError as e:
                raise SpecError(f"SAE name {name!r} (from `name`, the hook and the sweep values): {e}") from None
            if name in names:
                raise SpecError(f"`sweep`: runs {names[name]} and {params} both get the name {name!r}; make the sweep values distinct")
            names[name] = params
            one = concrete(spec, params, hook={"in": hook, "out": hook_out} if hook_out else hook, name=name)
            d_in = ds.info.hooks[hook].d
            d_sae = d_sae_of(one.sae, d_in)
            # A transcoder's weights are d_sae x (d_in + d_out): as an SAE of their mean width.
            width = d_in if hook_out is None else (d_in + ds.info.hooks[hook_out].d + 1) // 2
            try:
                check_memory(width, d_sae, what=f"SAE {name!r}")  # before any weight is allocated
            except ValueError as e:
                raise SpecError(str(e)) from None
            if one.sae.get("k") is not None and one.sae["k"] > d_sae:
                raise SpecError(f"`sae.k` ({one.sae['k']}) is larger than d_sae ({d_sae} = expansion_factor x d_in {d_in} of {hook!r})")
            cfg = resolved_config(one, ds, hook=hook, units=units, holdout=holdout, hook_out=hook_out)
            runs.append(PlannedRun(Run(name, hook, one, dict(params), hook_out), d_in, cfg, config_hash(cfg)))
        first = runs[0].run.spec
        rows = _rows(ds, units, first.data.skip_special)
        if rows < first.train.batch_size:
            raise SpecError(
                f"`train.batch_size` ({first.train.batch_size}) is larger than the {rows} training rows of dataset {ds.name!r} "
                f"({len(units)} unit(s)); lower it or extract more"
            )
        out.tasks.append(Task(dict(params), runs, units, holdout, rows))
    for t in out.tasks:
        for r in t.runs:
            set_state(s, r, fresh=fresh)
        if not fresh:
            common_resume_step(s, t)
    return out


def set_state(s: Store, r: PlannedRun, *, fresh: bool) -> None:
    """Set ``r.status``: done when committed with this config; refuse another config."""
    art = artifacts.get(s.storage, SAES, r.name)
    if art is not None:
        if art.meta.get("config_hash") == r.config_hash:
            r.status = "done"
            return
        diff = describe_diff(art.meta.get("config", {}), r.config) or "its config hash differs"
        raise ArtifactExistsError(f"SAE {r.name!r} is committed already with another config ({diff}); choose a new `name`")
    for step, meta in checkpoint.committed(s.storage, r.name):
        if meta.get("config_hash") != r.config_hash and not fresh:
            diff = describe_diff(meta.get("config", {}), r.config) or "its config hash differs"
            raise ArtifactExistsError(
                f"SAE {r.name!r} has a checkpoint (step {step}) of another config ({diff}): rerun with that config to resume it, "
                "or pass --fresh to delete its checkpoints and start over"
            )


def common_resume_step(s: Store, t: Task) -> None:
    """The latest step checkpointed with the right config for every SAE of the task still to
    train (they resume together: one pass, one iterator). A crash between two SAEs' commits of
    one step leaves the step before it common to all (older ones are deleted only after)."""
    todo = t.todo
    if not todo:
        return
    common: set[int] | None = None
    for r in todo:
        steps = {step for step, meta in checkpoint.committed(s.storage, r.name) if meta.get("config_hash") == r.config_hash}
        common = steps if common is None else common & steps
    if common:
        step = max(common)
        for r in todo:
            r.status, r.resume_step = "resume", step
