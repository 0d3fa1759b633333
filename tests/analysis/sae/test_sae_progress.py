"""The training bar of a resumed pass (issue 15, finding 8): it counts the samples the pass has
done, the checkpoint's included, so it goes on from the checkpoint (not from 0) and a finished
pass reads its total. Read from the bar's own output on stderr."""

from __future__ import annotations

import re

import pytest
from _sae_data import planted_dataset

from strata import store
from strata.analysis.sae import SAETrainSpec, checkpoint, run_job

STEPS, BATCH, EVERY = 60, 64, 20


class Killed(Exception):
    """Stands for a SIGKILL after a checkpoint."""


def spec(root) -> SAETrainSpec:
    return SAETrainSpec.model_validate({
        "store": str(root), "dataset": "planted", "hooks": ["blocks.0.hook_resid_post"], "name": "bar",
        "sae": {"d_sae": 32, "k": 4},
        "train": {"total_training_samples": STEPS * BATCH, "batch_size": BATCH, "lr": 3e-3, "n_batches_for_norm_estimate": 2,
                  "checkpoint_every": EVERY, "log_every": 10},
        "data": {"holdout_units": 1}, "eval": {"ce": False}, "compute": {"device": "cpu"},
    })


def positions(err: str) -> list[tuple[int, int]]:
    """(n, total) of every display of sae-lens's training bar, in order."""
    return [(int(n), int(t)) for n, t in re.findall(r"(\d+)/(\d+) \[", err)]


def test_a_resumed_pass_bar_goes_on_from_its_checkpoint_and_ends_at_its_total(tmp_path, monkeypatch, capsys):
    planted_dataset(tmp_path)
    prune = checkpoint.prune

    def dying_prune(storage, name, *, keep, lease):
        if keep == 2 * EVERY:
            raise Killed(f"killed after step {keep}")
        return prune(storage, name, keep=keep, lease=lease)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "prune", dying_prune)
        with pytest.raises(Killed):
            run_job(spec(tmp_path))
    capsys.readouterr()
    result = run_job(spec(tmp_path))
    assert [(o.status, o.resumed_from) for o in result.outcomes] == [("resumed", 2 * EVERY)]
    bar = positions(capsys.readouterr().err)
    total = STEPS * BATCH
    assert bar and all(t == total for _, t in bar), bar
    # The bar's first display is sae-lens's, made before the pass restores its state; from the
    # first step on it counts the checkpoint's samples too.
    shown = [n for n, _ in bar[1:]]
    assert shown and shown[0] == (2 * EVERY + 1) * BATCH, bar
    assert shown == sorted(shown) and shown[-1] == total, bar
    assert store.open(tmp_path).saes() == ["bar"]
