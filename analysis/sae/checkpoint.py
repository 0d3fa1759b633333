"""Training checkpoints as committed artifacts of the store, without pickles.

A checkpoint of SAE ``NAME`` at step ``N`` is the artifact ``saes/NAME/checkpoints/step-0000000N``
(committed with the SAE's lease, put-if-absent like everything else), holding:

    cfg.json, sae_weights.safetensors   the training SAE, by sae-lens's own ``save_model`` (its
                                        ``load_weights_from_checkpoint`` is the matching load)
    activation_scaler.json (+ activation_whitening.safetensors)   sae-lens's ``ActivationScaler.save``
    trainer_state.json                  the trainer's counters, lr and coefficient schedules,
                                        optimizer hyper-parameters, the batch iterator's
                                        ``state_dict()``, the curves so far, start time
    trainer_state.safetensors           optimizer moments, firing statistics, the torch RNG

sae-lens's own trainer state is a ``torch.save`` pickle, which the store never holds (a pickle
runs code when loaded): :func:`trainer_files` writes the same fields as JSON and safetensors,
and :func:`restore_trainer` reads them back into the trainer, exactly.

Every SAE of one pass is checkpointed at the same steps; all of them are committed before any
older checkpoint is deleted, so the newest step committed for *every* SAE of a pass always
exists. Only that latest step is kept; once the SAE itself is committed, its checkpoints go.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from strata.store.commit import artifacts
from strata.store.saes.handles import SAES

if TYPE_CHECKING:
    from sae_lens.training.sae_trainer import SAETrainer

    from strata.store.commit.lease import Fence, Lease
    from strata.store.storage import Storage

log = logging.getLogger(__name__)

FORMAT = "strata.sae-checkpoint"
VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_STEP = re.compile(r"^step-(\d{9,})$")


def kind(name: str) -> str:
    """The artifact kind holding SAE ``name``'s checkpoints."""
    return f"{SAES}/{name}/checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def committed(storage: Storage, name: str) -> list[tuple[int, dict[str, Any]]]:
    """(step, meta) of SAE ``name``'s committed checkpoints, oldest first."""
    out = []
    for n in artifacts.names(storage, kind(name)):
        m = _STEP.match(n)
        art = artifacts.get(storage, kind(name), n) if m else None
        if art is not None:
            out.append((int(m.group(1)), art.meta))
    return sorted(out, key=lambda x: x[0])


# -- one trainer's state, pickle-free -----------------------------------------------------------


def trainer_files(trainer: SAETrainer, *, steps_done: int, extra: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of one SAE's checkpoint (see the module docstring) after ``steps_done`` steps.
    ``extra`` (plain JSON) is stored in ``trainer_state.json`` under ``extra``."""
    opt = trainer.optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {
        "act_freq_scores": trainer.act_freq_scores,
        "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired,
        "rng.cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.device(trainer.cfg.device).type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(torch.device(trainer.cfg.device))
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    state = {
        "format": FORMAT, "version": VERSION,
        "n_training_samples": trainer.n_training_samples,
        "n_training_steps": steps_done,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "started_fine_tuning": trainer.started_fine_tuning,
        "coefficient_schedulers": {n: s.state_dict() for n, s in trainer.coefficient_schedulers.items()},
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars, "params": sorted(int(i) for i in opt["state"])},
        "extra": dict(extra),
    }
    with tempfile.TemporaryDirectory(prefix="strata-ckpt-") as tmp:
        trainer.sae.save_model(tmp)
        trainer.activation_scaler.save(str(Path(tmp) / "activation_scaler.json"))
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    files[STATE_JSON] = json.dumps(state).encode()  # key order kept: the curves' columns follow it
    files[STATE_TENSORS] = save_tensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    return files


def restore_trainer(trainer: SAETrainer, art: artifacts.Artifact, *, restore_rng: bool) -> dict[str, Any]:
    """Load a checkpoint written by :func:`trainer_files` into ``trainer`` (weights, scaler,
    optimizer, schedules, statistics, and the torch RNG when ``restore_rng``); returns
    ``extra``. Every file is checked against the commit record as it is read."""
    state = art.read_json(STATE_JSON)
    if state.get("format") != FORMAT or int(state.get("version", 0)) > VERSION:
        raise ValueError(f"{art.kind}/{art.name} is not a checkpoint this Strata reads ({state.get('format')} v{state.get('version')})")
    tensors = load_tensors(art.read(STATE_TENSORS))
    device = trainer.cfg.device
    with tempfile.TemporaryDirectory(prefix="strata-ckpt-") as tmp:
        for rel in art.files:
            if rel not in (STATE_JSON, STATE_TENSORS):
                (Path(tmp) / rel).write_bytes(art.read(rel))
        trainer.sae.load_weights_from_checkpoint(tmp)
        trainer.activation_scaler.load(Path(tmp) / "activation_scaler.json")
    opt_state: dict[int, dict[str, Any]] = {i: {} for i in state["optimizer"]["params"]}
    for key, val in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            opt_state[int(idx)][name] = val
    for idx, vals in state["optimizer"]["scalars"].items():
        opt_state[int(idx)].update(vals)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer"]["param_groups"]]
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, sd in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(sd)
    trainer.n_training_samples = int(state["n_training_samples"])
    trainer.n_training_steps = int(state["n_training_steps"])
    trainer.n_frac_active_samples = int(state["n_frac_active_samples"])
    trainer.started_fine_tuning = bool(state["started_fine_tuning"])
    trainer.act_freq_scores = tensors["act_freq_scores"].to(device)
    trainer.n_forward_passes_since_fired = tensors["n_forward_passes_since_fired"].to(device)
    if restore_rng:
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"], torch.device(device))
    return dict(state.get("extra", {}))


# -- committing, cleaning ----------------------------------------------------------------------


def commit(storage: Storage, name: str, step: int, files: Mapping[str, bytes], *, meta: Mapping[str, Any], lease: Lease | Fence) -> None:
    """Commit one SAE's checkpoint at ``step`` (fenced with the SAE's lease)."""
    artifacts.put(storage, kind(name), step_name(step), files, meta={**meta, "step": step}, lease=lease)


def prune(storage: Storage, name: str, *, keep: int | None, lease: Lease | Fence) -> int:
    """Delete SAE ``name``'s checkpoints other than step ``keep`` (all when None); how many."""
    n = 0
    for step, _ in committed(storage, name):
        if step != keep:
            artifacts.delete(storage, kind(name), step_name(step), lease=lease)
            _rmdir(storage, f"{kind(name)}/{step_name(step)}")
            n += 1
    # A crashed commit can leave a folder without a record: remove its files too.
    for d in storage.list_dirs(kind(name)):
        if not (keep is not None and d == step_name(keep)) and artifacts.get(storage, kind(name), d) is None:
            for key in storage.list(f"{kind(name)}/{d}"):
                storage.delete(key)
            _rmdir(storage, f"{kind(name)}/{d}")
    if keep is None:
        _rmdir(storage, kind(name))
    return n


def _rmdir(storage: Storage, prefix: str) -> None:
    """Remove an emptied folder of a local store (deleting files leaves it behind; one per
    checkpoint would pile up over a long run). Object stores have no folders."""
    root = getattr(storage, "root", None)
    if isinstance(root, Path):
        try:
            (root / prefix).rmdir()
        except OSError:
            pass  # not empty, or gone


def load(storage: Storage, name: str, step: int) -> artifacts.Artifact:
    art = artifacts.get(storage, kind(name), step_name(step))
    if art is None:
        raise FileNotFoundError(f"SAE {name!r} has no committed checkpoint at step {step}")
    return art
