"""An SAE's folder: sae-lens's own layout plus Strata's lineage, metrics and curves.

    cfg.json, sae_weights.safetensors   sae-lens (``SAE.save_model``; ``SAE.load_from_disk`` reads it)
    sparsity.safetensors                sae-lens's log10 feature sparsity of the last training window
    lineage.json                        where the SAE came from (see ``analysis.sae.train``)
    metrics.json                        held-out evaluation (see ``analysis.sae.evaluate``)
    curves.parquet, curves.png          training curves (see ``analysis.sae.curves``)

Nothing is a pickle. The folder is plain files: :func:`commit_sae` commits them as the store
artifact ``saes/NAME`` (visible only once whole; ``s.sae(NAME)`` reads it back).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from sae_lens import SAE
from sae_lens.constants import SPARSITY_FILENAME
from safetensors.torch import save_file

from strata.analysis.sae.curves import plot_curves
from strata.analysis.sae.diffing import write_crosscoder
from strata.store.commit import artifacts, parquet
from strata.store.saes.crosscoder import CrossCoder
from strata.store.saes.handles import SAES, load_folder

if TYPE_CHECKING:
    from strata.analysis.sae.train import TrainedSAE
    from strata.store.commit.artifacts import Artifact
    from strata.store.commit.lease import Fence, Lease
    from strata.store.storage import Storage

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
METRICS = "metrics.json"
CURVES = "curves.parquet"
CURVES_PNG = "curves.png"


def _json_safe(x: Any) -> Any:
    """NaN and infinities as null (strict JSON), containers recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n", encoding="utf-8")


def _held_out_metadata(sae: SAE, metrics: Mapping[str, Any] | None) -> None:
    """cfg.json's figures, as metrics.json gives them: sae-lens sets ``metadata.l0`` and
    ``metadata.num_dead_features`` from its last training window (a latent silent for
    ``dead_feature_window`` steps), which contradicted the held-out evaluation. Strata has one
    meaning of dead (no held-out token fires it): with a held-out evaluation both fields are
    its figures, and ``dead_window`` says which tokens; without one they are left out."""
    md = sae.cfg.metadata
    if metrics and "dead_features" in metrics:
        md.num_dead_features = int(metrics["dead_features"])
        md.l0 = float(metrics["l0"])
        md.dead_window = str(metrics.get("dead_window", "held-out tokens"))
    else:
        for key in ("num_dead_features", "l0", "dead_window"):
            md.__dict__.pop(key, None)


def save_sae(result: TrainedSAE, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``result`` (and its held-out ``metrics``) into ``folder``, which must be absent or
    empty. Returns the folder."""

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"SAE folder {str(folder)!r} is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(result.sae, CrossCoder):  # Strata's own layout (store.saes.crosscoder) and the model-diffing outputs
        write_crosscoder(result.sae, folder, title=result.name)
    else:
        _held_out_metadata(result.sae, metrics)
        result.sae.save_model(folder)
    if result.log_feature_sparsity is not None:
        save_file({"sparsity": result.log_feature_sparsity.detach().cpu().contiguous()}, folder / SPARSITY_FILENAME)
    _write_json(folder / LINEAGE, result.lineage)
    _write_json(folder / METRICS, metrics if metrics is not None else {})
    pq.write_table(result.curves, folder / CURVES)
    hooks = result.hook if getattr(result, "hook_out", None) is None else f"{result.hook} -> {result.hook_out}"
    plot_curves(result.curves, folder / CURVES_PNG, title=f"{result.name} ({hooks})",
                window=result.spec.train.dead_feature_window)
    log.info("saved SAE %r to %s", result.name, folder)
    return folder


def commit_sae(storage: Storage, result: TrainedSAE, *, metrics: dict[str, Any] | None, meta: Mapping[str, Any],
               lease: Lease | Fence) -> Artifact:
    """Write ``result``'s folder and commit it as the artifact ``saes/NAME`` with ``meta`` (the
    config hash), fenced with the SAE's lease."""

    with tempfile.TemporaryDirectory(prefix="strata-sae-") as tmp:
        folder = save_sae(result, Path(tmp) / "sae", metrics=metrics)
        files = {p.name: p for p in sorted(folder.iterdir())}
        art = artifacts.put(storage, SAES, result.name, files, meta=dict(meta), lease=lease)
    log.info("committed SAE %r to %s/%s", result.name, storage.uri, art.prefix)
    return art


@dataclass
class SavedSAE:
    """An SAE folder read back."""

    sae: SAE
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    curves: pa.Table


def load_sae(folder: str | Path, *, device: str = "cpu") -> SavedSAE:
    """Read a folder written by :func:`save_sae` (the SAE through ``SAE.load_from_disk``, or
    Strata's loader for its own layouts: :func:`store.saes.handles.load_folder`)."""

    folder = Path(folder)
    sae = load_folder(folder, device=device)
    lineage = json.loads((folder / LINEAGE).read_text(encoding="utf-8"))
    metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    return SavedSAE(sae, lineage, metrics, parquet.read(folder / CURVES))
