"""Putting an SAE trained elsewhere into the store, so `strata features encode` can use it.

    from sae_lens import SAE
    from strata.analysis.features.external import put_sae
    sae = SAE.load_from_disk("my-sae/")
    put_sae(s, "my-sae", sae, dataset="gpt2-small-docs", hook="blocks.8.hook_resid_post")

The SAE is saved in sae-lens's layout (``cfg.json``, ``sae_weights.safetensors``) with a
``lineage.json`` naming the dataset, its fingerprint and the hook, and committed as a whole with
the store's artifact protocol under the SAE's lease (the layout `strata sae train` writes).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strata.store.commit import artifacts
from strata.store.saes.handles import SAES

if TYPE_CHECKING:
    from strata.store.core import Store
    from strata.store.saes.handles import SAEHandle


def put_sae(store: Store, name: str, sae: Any, *, dataset: str, hook: str, units: Iterable[int] | None = None,
            holdout_units: Iterable[int] = (), lineage: Mapping[str, Any] | None = None) -> SAEHandle:
    """Commit ``sae`` (a sae-lens SAE, or training SAE) as ``saes/NAME`` with a lineage for ``dataset``/``hook``.
    ``units``: the units it was trained on (default: none recorded). Refused when the dataset
    lacks the hook; an SAE of that name with other contents is refused by the store."""
    ds = store.dataset(dataset)
    ds.check_hook(hook)
    lin = {
        "name": name, "dataset": ds.name, "fingerprint": ds.info.fingerprint, "hook": hook, "d_in": int(sae.cfg.d_in),
        "units": sorted(int(u) for u in units) if units is not None else [], "holdout_units": sorted(int(u) for u in holdout_units),
        "architecture": sae.cfg.architecture() if callable(getattr(sae.cfg, "architecture", None)) else None,
        "source": "external", **dict(lineage or {}),
    }
    with tempfile.TemporaryDirectory(prefix="strata-sae-") as tmp:
        # A training SAE is saved as sae-lens's inference SAE (what `SAE.load_from_disk` reads).
        getattr(sae, "save_inference_model", sae.save_model)(tmp)
        files: dict[str, Any] = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    files["lineage.json"] = json.dumps(lin, indent=2, sort_keys=True, default=str).encode()
    with artifacts.lease(store.storage, SAES, name, owner="put_sae") as lease:
        artifacts.put(store.storage, SAES, name, files, meta={"dataset": ds.name, "hook": hook}, lease=lease)
    return store.sae(name)
