"""Crosscoders trained from the store: planning over several datasets, the training pass on
aligned batches, and the held-out evaluation (``strata sae train`` with ``architecture:
crosscoder``; :mod:`analysis.sae.job` runs them as it runs SAEs).

**Sources and alignment.** The spec's ``sources`` (``[{dataset, hook}, ...]``, at least two, one
width ``d``) are paired row by row exactly as ``compare`` pairs them
(:func:`strata.store.datasets.aligned.align_tokens`): several hooks of one dataset by row; two
datasets over one corpus by ``(doc_id, doc_position)`` with one tokenizer or by character spans
(``char_end``) across tokenizers. Special rows never pair; datasets of different corpora are
refused. Alignment by documents (one pooled vector per document) gives no token stream to
train on and is not offered.

**Units and held-out pairs.** Source 0's committed units (those that pair) are split as an SAE's
are: the last ``data.holdout_units`` are held out. A pair is held out when its source-0 row is
in a held-out unit; pairs are one-to-one, so no held-out row of any source is trained on. Each
source's training and held-out units (the units its paired rows lie in) are recorded.

**The config hash** covers every source's dataset name, fingerprint, hook, width, training and
held-out units, the alignment method and pair counts, the architecture and its options, and
the ``train``, ``data`` and ``eval`` sections: resume, rerun no-op and refusing a name with
another config work as for SAEs (:mod:`analysis.sae.plan`).

**Training.** One crosscoder per sweep combination, fed by :class:`ConcatBatches`: the aligned
batches of ``store.iter_aligned`` (shuffled, endless, full batches, resumable through its
``state_dict``) concatenated ``[x_1 | ... | x_n]`` for sae-lens's trainer, with Strata's
recording trainer and checkpoints (:mod:`analysis.sae.train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from strata.analysis.sae.config import Run, SAETrainSpec, check_memory, combinations, concrete, run_name, source_label, training_registry
from strata.analysis.sae.curves import RecordingMultiSAETrainer, curves_table
from strata.analysis.sae.diffing import diffing_metrics, latents_table
from strata.analysis.sae.evaluate import ReconstructionSums
from strata.analysis.sae.plan import NOT_CONFIG, Plan, PlannedRun, Task, common_resume_step, config_hash, d_sae_of, set_state
from strata.analysis.sae.train import Checkpointing, Progress, TrainedSAE, checkpoint_saver, resume_pass, utc_now, versions
from strata.pipeline.errors import SpecError
from strata.store.datasets.aligned import AlignedBatches, Alignment, align_tokens, iter_aligned
from strata.store.errors import HookNotFoundError, StrataError
from strata.store.layout import check_name, unit_ranges
from strata.store.saes.crosscoder import CrossCoder

if TYPE_CHECKING:
    from strata.store import ActivationDataset, Store

log = logging.getLogger(__name__)

Side = tuple["ActivationDataset", str]


def source_sides(spec: SAETrainSpec, s: Store) -> list[Side]:
    """``(dataset, hook)`` of each source, checked: the hook exists, every source has one width."""
    sides: list[Side] = []
    for i, src in enumerate(spec.sources or ()):
        ds = s.dataset(src.dataset or spec.dataset or "")
        if src.hook not in ds.hooks:
            raise HookNotFoundError(f"`sources[{i}]`: dataset {ds.name!r} has no hook {src.hook!r}; its hooks: {', '.join(ds.hooks)}")
        sides.append((ds, src.hook))
    widths = {f"{ds.name}:{h}": ds.info.hooks[h].d for ds, h in sides}
    if len(set(widths.values())) > 1:
        raise SpecError("`sources` have different widths (" + ", ".join(f"{k} {v}" for k, v in widths.items())
                        + "): a crosscoder's sources share one width d")
    return sides


@dataclasses.dataclass(frozen=True)
class Split:
    """The aligned pairs, split into training and held-out ones by source 0's units."""

    alignment: Alignment
    train: np.ndarray
    """Indices of the training pairs (sorted)."""
    holdout: np.ndarray
    units: list[list[int]]
    """Per source, the units its training rows lie in."""
    holdout_units: list[list[int]]


def split_pairs(sides: Sequence[Side], holdout_units: int, *, alignment: Alignment | None = None) -> Split:
    """Align ``sides`` and hold out the pairs of source 0's last ``holdout_units`` units."""
    al = alignment if alignment is not None else align_tokens(sides)
    ur0 = sides[0][0].info.unit_rows
    units0 = sorted({int(u) for u in np.unique(al.rows[0] // ur0)})
    if len(units0) <= holdout_units:
        raise SpecError(f"`data.holdout_units` ({holdout_units}) leaves none of the {len(units0)} unit(s) of dataset "
                        f"{sides[0][0].name!r} that pair with the other sources to train on")
    held = np.isin(al.rows[0] // ur0, units0[len(units0) - holdout_units:]) if holdout_units else np.zeros(len(al), bool)
    train, hold = np.flatnonzero(~held), np.flatnonzero(held)

    def units_of(idx: np.ndarray) -> list[list[int]]:
        return [sorted(int(u) for u in np.unique(al.rows[i][idx] // ds.info.unit_rows)) for i, (ds, _) in enumerate(sides)]

    return Split(al, train, hold, units_of(train), units_of(hold))


def resolved_config(spec: SAETrainSpec, sides: Sequence[Side], split: Split) -> dict[str, Any]:
    """What determines a crosscoder (see the module docstring), as plain JSON."""
    d = sides[0][0].info.hooks[sides[0][1]].d
    raw = spec.model_dump(mode="json", exclude=set(NOT_CONFIG) | {"dataset", "sources"})
    raw["train"].pop("checkpoint_every", None)
    sae = {k: v for k, v in raw.pop("sae").items() if k not in ("expansion_factor", "d_in")}
    sae["d_sae"] = d_sae_of(spec.sae, d)
    sources = [{"dataset": ds.name, "fingerprint": ds.info.fingerprint, "hook": h, "d_in": ds.info.hooks[h].d,
                "units": split.units[i], "holdout_units": split.holdout_units[i]} for i, (ds, h) in enumerate(sides)]
    return {"sources": sources, "alignment": split.alignment.method, "pairs": int(split.train.size),
            "holdout_pairs": int(split.holdout.size), **raw, "sae": sae}


def plan_crosscoders(spec: SAETrainSpec, s: Store, *, fresh: bool = False) -> Plan:
    """The job's tasks (one crosscoder per sweep combination) and each one's state (reads only)."""
    sides = source_sides(spec, s)
    split = split_pairs(sides, spec.data.holdout_units)
    d = sides[0][0].info.hooks[sides[0][1]].d
    label = source_label(spec)
    out = Plan(spec, sides[0][0].name, sides[0][0].info.fingerprint, [label])
    for params in combinations(spec):
        name = run_name(spec, hook=label, params=params, several_hooks=False)
        try:
            check_name(name, what="SAE")
        except ValueError as e:
            raise SpecError(f"crosscoder name {name!r} (from `name` and the sweep values): {e}") from None
        one = concrete(spec, params, hook=label, name=name)
        if one.sae.get("d_in") is not None and one.sae["d_in"] != d:
            raise SpecError(f"`sae.d_in` is {one.sae['d_in']} but the sources are {d} wide")
        d_sae = d_sae_of(one.sae, d)
        try:
            check_memory(len(sides) * d, d_sae, what=f"crosscoder {name!r}")
        except ValueError as e:
            raise SpecError(str(e)) from None
        if one.sae.get("k") is not None and one.sae["k"] > d_sae:
            raise SpecError(f"`sae.k` ({one.sae['k']}) is larger than d_sae ({d_sae})")
        if split.train.size < one.train.batch_size:
            raise SpecError(f"`train.batch_size` ({one.train.batch_size}) is larger than the {split.train.size} aligned training "
                            f"rows of {label}; lower it or extract more")
        cfg = resolved_config(one, sides, split)
        pr = PlannedRun(Run(name, label, one, dict(params)), d, cfg, config_hash(cfg))
        out.tasks.append(Task(dict(params), [pr], split.units[0], split.holdout_units[0], int(split.train.size)))
    for t in out.tasks:
        for r in t.runs:
            set_state(s, r, fresh=fresh)
        if not fresh:
            common_resume_step(s, t)
    return out


class ConcatBatches:
    """The trainer's data provider: each aligned batch (a tuple of ``[batch, d]`` tensors)
    concatenated ``[batch, n * d]`` under one key.

    ``prefetch`` batches are gathered ahead in one background thread (numpy's gathers release
    the GIL), so reading the store overlaps the training step, as ``ds.iter_batches``'s loader
    threads do for SAEs. One thread, in order: the batches are those of the aligned iterator
    alone. ``state_dict`` is the position after the last batch handed out (not after those
    prefetched), so a checkpoint resumes with the very next batch; ``load_state_dict`` drops the
    prefetched ones. ``close`` stops the thread."""

    def __init__(self, inner: AlignedBatches, key: str, *, prefetch: int = 2) -> None:
        self.inner = inner
        self.key = key
        self.prefetch = max(0, int(prefetch))
        self._state = inner.state_dict()
        self._ahead: deque[Future[tuple[torch.Tensor, dict[str, Any]]]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def hooks(self) -> list[str]:
        return [self.key]

    @property
    def rows_per_epoch(self) -> int:
        return len(self.inner.alignment)

    def __iter__(self) -> ConcatBatches:
        return self

    def _produce(self) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = torch.cat(next(self.inner), dim=1)
        return batch, self.inner.state_dict()

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.prefetch:
            batch, self._state = self._produce()
            return {self.key: batch}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-aligned")
        while len(self._ahead) <= self.prefetch:
            self._ahead.append(self._pool.submit(self._produce))
        batch, self._state = self._ahead.popleft().result()
        return {self.key: batch}

    def _drop_ahead(self) -> None:
        while self._ahead:
            fut = self._ahead.pop()
            if not fut.cancel():
                with contextlib.suppress(Exception):
                    fut.result()

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._drop_ahead()
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "hooks"})
        self._state = self.inner.state_dict()

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.inner.close()


def build_crosscoder(spec: SAETrainSpec, d_in: int, n_sources: int, *, device: str = "cpu") -> Any:
    """The untrained training crosscoder, initialised on the CPU under ``train.seed`` (the
    global RNG left as it was), then moved to ``device``."""
    sae_cls, cfg_cls = training_registry()[spec.architecture]
    opts = {k: v for k, v in spec.sae.items() if k not in ("expansion_factor", "d_in")}
    opts["d_sae"] = d_sae_of(spec.sae, d_in)
    cfg = cfg_cls(d_in=d_in, n_sources=n_sources, device="cpu", **opts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        sae = sae_cls(cfg)
    return sae.to(device)


def _check_same(pr: PlannedRun, sides: Sequence[Side], split: Split) -> None:
    now = resolved_config(pr.run.spec, sides, split)
    if now != pr.config:
        raise StrataError(f"the sources of crosscoder {pr.name!r} changed since the job was planned; run the job again")


def train_crosscoder(s: Store, pr: PlannedRun, *, device: str, checkpointing: Checkpointing | None = None,
                     lineage_extra: Mapping[str, Any] | None = None) -> TrainedSAE:
    """Train one planned crosscoder (see the module docstring); ``TrainedSAE.sae`` is the
    inference :class:`~strata.store.saes.crosscoder.CrossCoder` on the CPU."""
    spec, run = pr.run.spec, pr.run
    sides = source_sides(spec, s)
    split = split_pairs(sides, spec.data.holdout_units)
    _check_same(pr, sides, split)
    n, d = len(sides), pr.d_in
    sae = build_crosscoder(spec, d, n, device=device)
    data = ConcatBatches(iter_aligned(sides, batch_size=spec.train.batch_size, shuffle=True, seed=spec.data.shuffle_seed, epochs=None,
                                      buffer_rows=spec.data.buffer_rows, drop_last=True, alignment=split.alignment.subset(split.train)),
                         run.hook)
    log.info("training crosscoder %r on %s: %d aligned pairs (%s), %d held out, %d steps of %d on %s", run.name, run.hook,
             split.train.size, split.alignment.method, split.holdout.size, spec.train.steps, spec.train.batch_size, device)
    progress = Progress(utc_now())
    ck = checkpointing
    try:
        trainer = RecordingMultiSAETrainer(
            cfg=spec.train.trainer_config(device), saes={run.name: sae}, hook_names={run.name: run.hook}, data_provider=data,
            log_every=spec.train.log_every, checkpoint_every=ck.every if ck else 0,
            on_checkpoint=checkpoint_saver(data, ck, progress) if ck else None,
        )
        if ck is not None and ck.resume_step:
            resume_pass(trainer, data, ck, progress)
        trained = trainer.fit()[run.name]
    finally:
        data.close()
    t = trainer.trainers[run.name]
    src_meta = [{"dataset": ds.name, "hook": h, "fingerprint": ds.info.fingerprint} for ds, h in sides]
    cc = trained.to_inference({"sources": src_meta})
    sources = [{**pr.config["sources"][i], "model": ds.info.meta.get("model"), "revision": ds.info.meta.get("revision")}
               for i, (ds, _) in enumerate(sides)]
    lineage = {
        "name": run.name, "store": s.uri, "architecture": spec.architecture,
        # Source 0 as an SAE's lineage names its data (its rows index a feature table).
        "dataset": sides[0][0].name, "fingerprint": sides[0][0].info.fingerprint, "hook": sides[0][1], "d_in": d,
        "units": split.units[0], "holdout_units": split.holdout_units[0],
        "sources": sources, "alignment": split.alignment.summary(), "pairs": int(split.train.size),
        "holdout_pairs": int(split.holdout.size), "shuffle_seed": spec.data.shuffle_seed, "seed": spec.train.seed,
        "rows_per_epoch": int(split.train.size), "samples_seen": int(t.n_training_samples), "steps": int(t.n_training_steps),
        "sae_config": trained.cfg.to_dict(), "trainer_config": dataclasses.asdict(trainer.cfg), "sweep_params": dict(run.params),
        "spec": spec.model_dump(mode="json", exclude={"storage_options"}), "device": device, "versions": versions(),
        "started_at": progress.started_at, "resumed": list(progress.resumes), "ended_at": utc_now(), **(lineage_extra or {}),
    }
    sparsity = t.log_feature_sparsity.detach().cpu() if t.n_frac_active_samples > 0 else None
    return TrainedSAE(run.name, run.hook, cc, curves_table(t.records), lineage, spec, sparsity)


@torch.no_grad()
def reconstruction_metrics(cc: CrossCoder, sides: Sequence[Side], alignment: Alignment, *, batch_size: int = 4096,
                           dense_threshold: float = 0.1, device: str = "cpu") -> dict[str, Any]:
    """Per-source and overall FVU and MSE, L0, dead and dense fractions of ``cc`` on the pairs
    of ``alignment`` (float64 sums; each FVU against that source's own held-out mean)."""
    home = cc.device
    cc.to(device)
    sums = ReconstructionSums(cc.n_sources, cc.d_in, cc.d_sae)
    try:
        for batch in iter_aligned(sides, batch_size=batch_size, shuffle=False, epochs=1, alignment=alignment):
            x = torch.stack(batch, dim=1)  # [b, n, d]
            f = cc.encode(x.to(device))
            sums.add(x, cc.decode(f), f)
    finally:
        cc.to(home)
    if sums.rows == 0:
        raise ValueError("no held-out pairs to evaluate on")
    units = sorted({int(u) for u in np.unique(alignment.rows[0] // sides[0][0].info.unit_rows)})
    out = sums.metrics(dead_window=f"fires on none of the {sums.rows:,} held-out aligned tokens (source 0's unit(s) {unit_ranges(units)})",
                       dense_threshold=dense_threshold)
    fvu_s, rows = sums.source_fvu(), sums.rows
    out["sources"] = [{"dataset": ds.name, "hook": h, "fvu": fvu_s[i], "explained_variance": 1.0 - fvu_s[i], "mse": float(sums.sse[i]) / rows}
                      for i, (ds, h) in enumerate(sides)]
    return out


def evaluate_crosscoder(result: TrainedSAE, s: Store, *, device: str = "cpu") -> dict[str, Any]:
    """``metrics.json`` of a trained crosscoder: held-out reconstruction (when pairs are held
    out) and, for two sources, the model-diffing figures (:mod:`analysis.sae.diffing`)."""
    spec = result.spec
    cc: CrossCoder = result.sae
    out: dict[str, Any] = {"ce_skipped": "crosscoders are not spliced into a model (several sources)"}
    sides = source_sides(spec, s)
    split = split_pairs(sides, spec.data.holdout_units)
    if split.holdout.size:
        out.update(reconstruction_metrics(cc, sides, split.alignment.subset(split.holdout), batch_size=spec.eval.batch_size,
                                          dense_threshold=spec.eval.dense_threshold, device=device))
    else:
        out["skipped"] = "no held-out units (`data.holdout_units` is 0)"
    diff = diffing_metrics(latents_table(cc))
    if diff:
        out["diffing"] = diff
    return out
