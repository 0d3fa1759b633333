"""Training SAEs from the store through sae-lens.

A *pass* trains several SAEs that share the ``train`` and ``data`` sections (the SAEs of every
hook of one sweep combination) in one pass over the data: sae-lens's ``MultiSAETrainer`` fed by
``ds.iter_batches([hooks...])`` (dicts of row-aligned batches), also for a single SAE: it drives
one ``SAETrainer`` per SAE through sae-lens's own ``step`` seam, so an SAE trains the same
whether alone or with others.

The data: the given training units (the dataset's units committed for every hook, less the
held-out ones; see :func:`analysis.sae.plan.split_units`), shuffled by the store's iterator
with ``data.shuffle_seed``, endless, full batches only (sae-lens counts samples per step as
``batch_size``). Each SAE is initialised on the CPU under ``torch.manual_seed(train.seed)``
(the global RNG is left as it was), then moved to the device, so the same spec gives the same
weights. wandb stays off: sae-lens's ``log_to_wandb`` is false and nothing calls wandb.

With :class:`Checkpointing`, the pass commits a checkpoint of every SAE each
``train.checkpoint_every`` steps (:mod:`analysis.sae.checkpoint`) and, given a ``resume_step``,
starts from that checkpoint: weights, trainer state, curves so far, the torch RNG and the
iterator's ``state_dict`` (an endless iterator counts batches globally, so it continues with
the very next batch). On the CPU the result equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from sae_lens import SAE

from strata import store
from strata.analysis.sae import checkpoint
from strata.analysis.sae.config import Run, SAETrainSpec, combinations, expand_runs, training_registry
from strata.analysis.sae.curves import RecordingMultiSAETrainer, curves_table
from strata.analysis.sae.identity import model_identity
from strata.analysis.sae.plan import d_sae_of, heldout_contexts_needed, split_units
from strata.store.saes.handles import load_folder

if TYPE_CHECKING:
    from sae_lens import TrainingSAE

    from strata.store import ActivationDataset
    from strata.store.commit.lease import Fence, Lease
    from strata.store.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class TrainedSAE:
    """One trained SAE: sae-lens's inference form (as saved), its curves and its lineage."""

    name: str
    hook: str
    sae: SAE
    """The inference SAE (what ``SAE.load_from_disk`` returns for the saved folder), on the CPU."""
    curves: pa.Table
    """Per logged step: step, samples, loss, mse, l0, explained_variance, inactive_fraction, lr, ...
    (see :mod:`analysis.sae.curves`)."""
    lineage: dict[str, Any]
    """Where the SAE came from: dataset, fingerprint, hook, units, holdout units, seeds,
    samples seen, architecture, sae and trainer configs, versions, start and end times."""
    spec: SAETrainSpec
    """The concrete spec of this SAE (one hook, no sweep)."""
    log_feature_sparsity: torch.Tensor | None = None
    """log10 firing frequency per latent over sae-lens's last sparsity window."""
    hook_out: str | None = None
    """A transcoder's out hook (``hook`` is its in hook); None for an SAE."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def versions() -> dict[str, str]:
    """Versions of strata, sae-lens and torch."""
    out = {}
    for dist in ("strata", "sae-lens", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def build_sae(spec: SAETrainSpec, d_in: int, *, device: str = "cpu", metadata: dict[str, Any] | None = None,
              d_out: int | None = None) -> TrainingSAE:
    """The untrained sae-lens training SAE of a concrete spec, initialised on the CPU under
    ``torch.manual_seed(spec.train.seed)`` (without touching the global RNG's state), then
    moved to ``device``. ``metadata`` goes into sae-lens's ``cfg.metadata``; ``d_out``: a
    transcoder's output width (its out hook's)."""
    sae_cls, cfg_cls = training_registry()[spec.architecture]
    opts = {k: v for k, v in spec.sae.items() if k not in ("expansion_factor", "d_in")}
    if d_out is not None:
        opts["d_out"] = d_out
    opts["d_sae"] = d_sae_of(spec.sae, d_in)
    if opts.get("k") is not None and opts["k"] > opts["d_sae"]:
        raise ValueError(f"`sae.k` ({opts['k']}) is larger than d_sae ({opts['d_sae']} = expansion_factor x d_in {d_in})")
    cfg = cfg_cls(d_in=d_in, device="cpu", **opts)
    for key, value in (metadata or {}).items():
        setattr(cfg.metadata, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        sae = sae_cls(cfg)
    return sae.to(device)


def to_inference(sae: TrainingSAE) -> SAE:
    """sae-lens's inference SAE of a training SAE, through its own save/load (the only
    conversion it offers): exactly what loading the saved folder gives. On the CPU. (A layout
    of Strata's own, such as the TopK transcoder's, loads through its loader in ``store/saes/``.)"""

    with tempfile.TemporaryDirectory(prefix="strata-sae-") as tmp:
        sae.save_inference_model(tmp)
        return load_folder(tmp, device="cpu")


def _sae_metadata(ds: ActivationDataset, run: Run) -> dict[str, Any]:
    """sae-lens metadata fields (what Neuronpedia and HookedSAETransformer read). The model is
    named so that sae-lens's loaders take it, with its fingerprint (:mod:`analysis.sae.identity`)."""
    meta = ds.info.meta
    return {
        **model_identity(meta).metadata(),
        "hook_name": run.hook,
        **({"hook_name_out": run.hook_out} if run.hook_out is not None else {}),
        "context_size": ds.info.context_size,
        "prepend_bos": meta.get("prepend_bos"),
        "exclude_special_tokens": run.spec.data.skip_special,
        "dataset_path": f"strata:{ds.name}@{ds.info.fingerprint}",
    }




class JoinedBatches:
    """A batch iterator's dicts with more keys: each ``key`` of ``joins`` holds its hooks' rows
    side by side (a transcoder's ``[in | out]``). Everything else (``state_dict``,
    ``load_state_dict``, ``close``, ``hooks``, ``rows_per_epoch``) is the wrapped iterator's, so
    a checkpoint resumes with the very next batch."""

    def __init__(self, inner: Any, joins: Mapping[str, Sequence[str]]) -> None:
        self.inner = inner
        self.joins = {k: tuple(v) for k, v in joins.items()}

    def __iter__(self) -> JoinedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = dict(next(self.inner))
        for key, hooks in self.joins.items():
            batch[key] = torch.cat([batch[h] for h in hooks], dim=-1)
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Checkpointing:
    """How a pass checkpoints and resumes: where, under whose leases, with which config."""

    storage: Storage
    fences: Mapping[str, Lease | Fence]
    """SAE name -> the lease (or its fence) its checkpoints are committed with."""
    meta: Mapping[str, dict[str, Any]]
    """SAE name -> the checkpoints' ``meta`` (``config_hash`` and ``config``)."""
    every: int
    """Steps between checkpoints (0: none)."""
    resume_step: int | None = None
    """Resume from this step's checkpoints (committed for every SAE of the pass)."""


@dataclass
class Progress:
    """When a pass started and the steps it resumed at (its lineage's ``started_at``, ``resumed``)."""

    started_at: str
    resumes: list[dict[str, Any]] = field(default_factory=list)


def _lineage(ds: ActivationDataset, r: Run, runs: Sequence[Run], trainer: Any, trained: Any, *, units: list[int],
             holdout: list[int], rows: int, device: str, progress: Progress, extra: Mapping[str, Any]) -> dict[str, Any]:
    t = trainer.trainers[r.name]
    return {
        "name": r.name,
        "store": ds.store.uri,
        "dataset": ds.name,
        "fingerprint": ds.info.fingerprint,
        "model": ds.info.meta.get("model"),
        "revision": ds.info.meta.get("revision"),
        "model_path": ds.info.meta.get("model_path"),
        "hook": r.hook,
        "d_in": ds.info.hooks[r.hook].d,
        # A transcoder's both hooks (`hook` is its in hook: what `strata features encode` reads).
        **({"hook_in": r.hook, "hook_out": r.hook_out, "d_out": ds.info.hooks[r.hook_out].d} if r.hook_out is not None else {}),
        "units": list(units),
        "holdout_units": list(holdout),
        "skip_special": r.spec.data.skip_special,
        "shuffle_seed": r.spec.data.shuffle_seed,
        "seed": r.spec.train.seed,
        "rows_per_epoch": rows,
        "samples_seen": int(t.n_training_samples),
        "steps": int(t.n_training_steps),
        "architecture": r.spec.architecture,
        "sae_config": trained[r.name].cfg.to_dict(),
        "trainer_config": dataclasses.asdict(trainer.cfg),
        "sweep_params": dict(r.params),
        "trained_with": [x.name for x in runs if x is not r],
        # The concrete spec, less anything that may hold credentials.
        "spec": r.spec.model_dump(mode="json", exclude={"storage_options"}),
        "device": device,
        "versions": versions(),
        "started_at": progress.started_at,
        "resumed": list(progress.resumes),
        "ended_at": utc_now(),
        **extra,
    }


def resume_pass(trainer: RecordingMultiSAETrainer, data: Any, ck: Checkpointing, progress: Progress) -> None:
    """Restore every trainer of a pass, and its data provider's position, from the checkpoints of
    ``ck.resume_step`` (``data``: anything with ``hooks`` and ``load_state_dict``)."""
    step = ck.resume_step
    assert step is not None
    extra: dict[str, Any] = {}
    for i, (name, t) in enumerate(trainer.trainers.items()):
        extra = checkpoint.restore_trainer(t, checkpoint.load(ck.storage, name, step), restore_rng=i == 0)
        t.records = list(extra.get("records", []))
    trainer.resume_at(step)
    state = dict(extra["data"])
    # The row order is a function of the seed, the epoch and the units, not of the hooks read:
    # a pass resumed with fewer SAEs (some committed before a crash) continues the same stream.
    state["hooks"] = data.hooks
    data.load_state_dict(state)
    progress.started_at = extra.get("started_at", progress.started_at)
    progress.resumes = [*extra.get("resumes", []), {"step": step, "at": utc_now()}]
    log.info("resumed %s at step %d (%d samples)", ", ".join(trainer.trainers), step, trainer.n_training_samples)


def checkpoint_saver(data: Any, ck: Checkpointing, progress: Progress) -> Any:
    """The ``on_checkpoint`` callback of a pass: commit every SAE's checkpoint with the data
    provider's ``state_dict``, then drop older steps."""
    def save(trainer: RecordingMultiSAETrainer, done: int) -> None:
        state = data.state_dict()
        for name, t in trainer.trainers.items():
            files = checkpoint.trainer_files(t, steps_done=done, extra={
                "records": t.records, "data": state, "started_at": progress.started_at, "resumes": progress.resumes})
            checkpoint.commit(ck.storage, name, done, files, meta=ck.meta[name], lease=ck.fences[name])
        # Only once every SAE of the pass has this step: drop the older ones.
        for name in trainer.trainers:
            checkpoint.prune(ck.storage, name, keep=done, lease=ck.fences[name])
        log.info("checkpoint at step %d of %s", done, ", ".join(trainer.trainers))

    return save


def train_pass(
    ds: ActivationDataset, runs: Sequence[Run], *, device: str, units: Sequence[int], holdout: Sequence[int],
    checkpointing: Checkpointing | None = None, lineage_extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[TrainedSAE]:
    """Train ``runs`` (sharing ``train`` and ``data``) in one pass over ``units`` of ``ds``.
    ``lineage_extra``: name -> more lineage fields (the config hash, say)."""
    first = runs[0].spec
    for r in runs[1:]:
        if r.spec.train != first.train or r.spec.data != first.data:
            raise ValueError(f"runs {runs[0].name!r} and {r.name!r} differ in `train` or `data`; train them in separate passes")
    hooks = list(dict.fromkeys(h for r in runs for h in r.hooks))
    units, holdout = list(units), list(holdout)
    saes = {r.name: build_sae(r.spec, ds.info.hooks[r.hook].d, device=device, metadata=_sae_metadata(ds, r),
                              d_out=ds.info.hooks[r.hook_out].d if r.hook_out is not None else None) for r in runs}
    trainer_cfg = first.train.trainer_config(device)
    data = ds.iter_batches(
        hooks, batch_size=first.train.batch_size, shuffle=True, seed=first.data.shuffle_seed, epochs=None,
        skip_special=first.data.skip_special, buffer_rows=first.data.buffer_rows, drop_last=True, units=units,
    )
    joins = {r.data_key: r.hooks for r in runs if len(r.hooks) > 1}
    if joins:
        data = JoinedBatches(data, joins)
    rows = data.rows_per_epoch
    log.info(
        "training %d SAE(s) on %s of dataset %r: %d units (%s rows per epoch), %d held out, %d steps of %d on %s",
        len(runs), ", ".join(hooks), ds.name, len(units), rows, len(holdout), first.train.steps, first.train.batch_size, device,
    )
    progress = Progress(utc_now())
    ck = checkpointing
    try:
        trainer = RecordingMultiSAETrainer(
            cfg=trainer_cfg, saes=saes, hook_names={r.name: r.data_key for r in runs}, data_provider=data, log_every=first.train.log_every,
            checkpoint_every=ck.every if ck else 0, on_checkpoint=checkpoint_saver(data, ck, progress) if ck else None,
        )
        if ck is not None and ck.resume_step:
            resume_pass(trainer, data, ck, progress)
        trained = trainer.fit()
    finally:
        data.close()
    out = []
    for r in runs:
        t = trainer.trainers[r.name]
        lineage = _lineage(ds, r, runs, trainer, trained, units=units, holdout=holdout, rows=rows, device=device, progress=progress,
                           extra=(lineage_extra or {}).get(r.name, {}))
        sparsity = t.log_feature_sparsity if t.n_frac_active_samples > 0 else None
        out.append(TrainedSAE(r.name, r.hook, to_inference(trained[r.name]), curves_table(t.records), lineage, r.spec, sparsity,
                              hook_out=r.hook_out))
    return out


def train(spec: SAETrainSpec, *, ds: ActivationDataset | None = None) -> list[TrainedSAE]:
    """Train every SAE of a spec in memory (nothing is committed; ``strata sae train`` and
    :func:`analysis.sae.job.run_job` commit them): one pass per sweep combination, each over
    every hook. ``ds`` defaults to ``spec.dataset`` of ``spec.store``."""
    if spec.sources:
        raise ValueError("crosscoders (`sources`) train through analysis.sae.run_job (`strata sae train`), not train()")
    if ds is None:

        ds = store.open(spec.store, storage_options=spec.storage_options, create=False).dataset(spec.dataset)
    runs = expand_runs(spec, ds.hooks, dataset=f"dataset {ds.name!r}")
    device = resolve_device(spec.compute.device)
    results: dict[str, TrainedSAE] = {}
    for params in combinations(spec):
        group = [r for r in runs if r.params == params]
        hooks = list(dict.fromkeys(h for r in group for h in r.hooks))
        units, holdout = split_units(ds, hooks, spec.data.holdout_units, min_contexts=heldout_contexts_needed(spec))
        for res in train_pass(ds, group, device=device, units=units, holdout=holdout):
            results[res.name] = res
    return [results[r.name] for r in runs]
