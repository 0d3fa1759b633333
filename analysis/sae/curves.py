"""Training curves from sae-lens's own per-step metrics, without wandb.

sae-lens computes its per-step metrics in ``SAETrainer.build_train_step_log_dict`` (loss, each
loss term, L0, explained variance, dead latents, learning rate, ...) but only calls it, and
asks the SAE for its logging-step extras, when wandb logging is on. :class:`RecordingSAETrainer`
overrides the public ``step`` seam to build that same dict every ``log_every`` steps (and at the
last step) and keep it, and ``_is_logging_step`` so the SAE's forward pass knows it is a logging
step as it would under wandb. :class:`RecordingMultiSAETrainer` gives ``MultiSAETrainer`` such
per-SAE trainers. ``log_to_wandb`` stays false, so nothing here or in sae-lens calls wandb.

Columns of a curves table: ``step`` (optimizer steps done), ``samples`` (rows trained on), then
``loss``, ``mse`` (sae-lens's ``mse_loss``: squared error summed over d_in, averaged over the
batch, on the scaled input when ``normalize_activations`` scales it), ``l0``,
``explained_variance``, ``inactive_features``, ``inactive_fraction`` (sae-lens's
``sparsity/dead_features``: latents that have not fired in the last ``train.dead_feature_window``
training steps, and that fraction of d_sae; *not* Strata's "dead", which is a latent that fires on no
held-out token: ``metrics.json``'s ``dead_fraction``), ``lr``, then every other scalar sae-lens logs,
named by its log key with ``/`` as ``.`` (``losses.auxiliary_reconstruction_loss``, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer

log = logging.getLogger(__name__)

_RENAMES = {
    "losses/overall_loss": "loss",
    "losses/mse_loss": "mse",
    "metrics/l0": "l0",
    "metrics/explained_variance": "explained_variance",
    "sparsity/dead_features": "inactive_features",
    "details/current_learning_rate": "lr",
}
_INT_COLUMNS = ("step", "samples")
PLOTTED = ("loss", "mse", "l0", "explained_variance", "inactive_fraction")
# Curves of checkpoints written before the rename read under the new names.
_LEGACY = {"dead_features": "inactive_features", "dead_fraction": "inactive_fraction"}


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.item()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class RecordingSAETrainer(SAETrainer):
    """An ``SAETrainer`` that keeps sae-lens's per-step log dict every ``log_every`` steps."""

    def __init__(self, *args: Any, log_every: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_every = log_every
        self.records: list[dict[str, float]] = []

    def _is_logging_step(self) -> bool:
        # sae-lens gates this on wandb; called during the step, after the step's samples count.
        return (self.n_training_steps + 1) % self.log_every == 0 or self.n_training_samples >= self.cfg.total_training_samples

    def step(self, batch: torch.Tensor) -> Any:
        out = super().step(batch)
        if self._is_logging_step():
            d = self.build_train_step_log_dict(output=out, n_training_samples=self.n_training_samples)
            row: dict[str, float] = {"step": self.n_training_steps + 1, "samples": self.n_training_samples}
            for key, value in d.items():
                x = _scalar(value)
                if x is not None and key != "details/n_training_samples":
                    row[_RENAMES.get(key, key.replace("/", "."))] = x
            if "inactive_features" in row:
                row["inactive_fraction"] = row["inactive_features"] / self.sae.cfg.d_sae
            self.records.append(row)
        return out


class RecordingMultiSAETrainer(MultiSAETrainer):
    """``MultiSAETrainer`` whose per-SAE trainers are :class:`RecordingSAETrainer`s (built with
    the very per-SAE config sae-lens derives), so one pass records every SAE's curves.

    Checkpoints: sae-lens places its own at fractions of the run and writes pickles; here
    ``on_checkpoint(self, steps_done)`` is called after every ``checkpoint_every``-th step but
    the last (through sae-lens's ``_checkpoint_if_needed`` seam, where the step's optimizer
    update and statistics are done), and :meth:`resume_at` sets the counters of a restored
    pass."""

    def __init__(self, *args: Any, log_every: int, checkpoint_every: int = 0,
                 on_checkpoint: Callable[[RecordingMultiSAETrainer, int], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainers = {
            name: RecordingSAETrainer(cfg=t.cfg, sae=self.saes[name], data_provider=iter(()), log_every=log_every)
            for name, t in self.trainers.items()
        }
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint

    def _checkpoint_if_needed(self) -> None:
        # Called inside the step, before sae-lens advances `n_training_steps`: this step is done.
        done = self.n_training_steps + 1
        if (self.on_checkpoint is not None and self.checkpoint_every and done % self.checkpoint_every == 0
                and self.n_training_samples < self.cfg.total_training_samples):
            self.on_checkpoint(self, done)

    def _update_pbar(self, step_outputs: dict[str, Any], pbar: Any, update_interval: int = 100) -> None:
        # sae-lens's bar counts fixed increments from 0: a resumed pass would restart at 0 and end
        # short of its total. Here it shows the samples the pass has done, a checkpoint's
        # included: set at the first step (whose earlier samples are the bar's `initial`, so the
        # rate counts only this run's), every `update_interval` steps, and at the last step.
        samples = self.n_training_samples
        first = not getattr(self, "_bar_started", False)
        last = samples >= self.cfg.total_training_samples
        if first:
            self._bar_started = True
            pbar.initial = pbar.last_print_n = samples - self.cfg.train_batch_size_samples
        if first or last or self.n_training_steps % update_interval == 0:
            losses = " | ".join(f"{name}: {out.loss.item():.4f}" for name, out in step_outputs.items())
            pbar.set_description(f"{self.n_training_steps}| {losses}", refresh=False)
            pbar.update(samples - pbar.n)
            if first:
                pbar.refresh()  # now, whatever tqdm's print interval: a resumed pass shows where it resumed

    def resume_at(self, steps_done: int) -> None:
        """After every per-SAE trainer was restored to ``steps_done`` steps: the pass's counters."""
        for t in self.trainers.values():
            t.n_training_steps = steps_done
        self.n_training_steps = steps_done
        self.n_training_samples = next(iter(self.trainers.values())).n_training_samples


def curves_table(records: list[dict[str, float]]) -> pa.Table:
    """Records as a table: ``step``/``samples`` int64, every other column float64 (null where a
    record lacks it)."""
    records = [{_LEGACY.get(k, k): v for k, v in r.items()} for r in records]
    columns: list[str] = []
    for r in records:
        columns.extend(k for k in r if k not in columns)
    first = [c for c in ("step", "samples", "loss", "mse", "l0", "explained_variance", "inactive_features", "inactive_fraction", "lr")
             if c in columns]
    columns = first + [c for c in columns if c not in first]
    arrays = {}
    for c in columns:
        typ = pa.int64() if c in _INT_COLUMNS else pa.float64()
        vals = [r.get(c) for r in records]
        arrays[c] = pa.array([None if v is None else (int(v) if c in _INT_COLUMNS else float(v)) for v in vals], type=typ)
    if not arrays:
        return pa.table({"step": pa.array([], pa.int64()), "samples": pa.array([], pa.int64())})
    return pa.table(arrays)


def plot_curves(curves: pa.Table, path: str | Path, *, title: str = "", window: int | None = None) -> Path | None:
    """Render the main curves against samples seen into a PNG. Returns ``path``, or None (and
    logs a warning) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib (~0.5 s) only for the PNG
        from matplotlib.figure import Figure  # lazy: as above
    except ImportError:
        log.warning("matplotlib is not installed: %s not written", path)
        return None
    path = Path(path)
    cols = [c for c in PLOTTED if c in curves.column_names]
    x = curves.column("samples").to_pylist() if curves.num_rows else []
    n = max(1, len(cols))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    # The object API (no pyplot): no global figure state, safe in threads and workers.
    # Fixed margins: constrained layout measures every tick label and costs seconds per plot.
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.88 if title else 0.93, wspace=0.28, hspace=0.5)
    FigureCanvasAgg(fig)
    for i, c in enumerate(cols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        y = curves.column(c).to_pylist()
        pts = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
            if c in ("loss", "mse") and all(p[1] > 0 for p in pts):
                ax.set_yscale("log")
        label = c
        if c == "inactive_fraction":  # not "dead": that is the held-out figure of metrics.json
            label = f"inactive (no fire in last {window} steps)" if window else "inactive (no fire in the last window)"
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("samples", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, format="png")
    return path
