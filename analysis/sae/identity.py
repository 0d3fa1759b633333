"""The model an SAE's ``cfg.json`` names, so that tools outside Strata can rebuild it.

sae-lens reads ``metadata.model_name`` and ``metadata.model_class_name`` from an SAE's
``cfg.json`` and passes them to ``sae_lens.load_model``: ``HookedTransformer`` loads a
TransformerLens official name, ``AutoModelForCausalLM`` anything ``from_pretrained`` takes (a hub
id or a folder). A dataset's meta names a hub model by its id, but a local folder by the
identity ``local`` (its revision is a hash of the folder's content; see
:mod:`strata.pipeline.models`), which no loader takes. So:

- a hub id stays the name; its class is ``HookedTransformer`` when TransformerLens knows the id as a decoder
  (Strata's canonical hook names are TransformerLens's, so the SAE's ``hook_name`` resolves
  there), else ``AutoModelForCausalLM`` for a causal LM;
- a local folder that is a hub cache snapshot (``.../models--org--name/snapshots/<commit>``) is
  that hub id: the snapshot holds exactly that commit's files;
- any other local folder is named by its path with ``AutoModelForCausalLM``. The hub id in its
  ``config.json``'s ``_name_or_path`` (older transformers wrote it) is recorded as
  ``model_saved_from`` only: a fine-tuned checkpoint keeps its base model's name there, so that
  id need not hold these weights;
- an encoder (BERT-style) or an image model has no sae-lens loader: ``model_class_name`` is
  None, the name is still the hub id or the folder.

The fingerprint goes beside the name: ``model_identity`` (the dataset's ``model``) and
``model_revision`` (the hub commit, or the folder's ``local-xxh3:`` hash), so a reader can check
that the folder still holds the weights the SAE was trained on
(:func:`strata.pipeline.models.folder_revision`). No revision goes into
``model_from_pretrained_kwargs``: sae-lens warns on every load of an SAE whose kwargs are not
empty. ``hook_name`` stays Strata's (TransformerLens's) name; sae-lens's ``HookedProxyLM`` (what
``AutoModelForCausalLM`` gives) names hooks by module path, which the dataset's meta
``hook_modules`` gives for each hook.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# TransformerLens comes with sae-lens (its load_model imports it), so this costs nothing here.
from transformer_lens.loading_from_pretrained import get_official_model_name

from strata.pipeline.hooks import FAMILIES
from strata.pipeline.models import LOCAL_IDENTITY

log = logging.getLogger(__name__)

#: A hub cache snapshot folder: ``models--{org}--{name}/snapshots/{commit}`` (huggingface_hub
#: writes the repo id with ``/`` as ``--``).
_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")
#: What a hub id looks like (``name`` or ``org/name``), as opposed to a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelIdentity:
    """How an SAE's ``cfg.json`` names the model of its dataset."""

    name: str | None
    """sae-lens's ``model_name``: a hub id, or the local folder's path."""
    class_name: str | None
    """sae-lens's ``model_class_name``: ``HookedTransformer``, ``AutoModelForCausalLM``, or None
    when no sae-lens loader fits (an encoder, an image model, an unknown model type)."""
    identity: str | None
    """The dataset's ``model``: the hub id, or ``local``."""
    revision: str | None
    """The dataset's ``revision``: the hub commit, or ``local-xxh3:...`` for a folder."""
    path: str | None = None
    """The local folder the dataset was extracted from (None for a hub model)."""
    saved_from: str | None = None
    """The hub id a local folder was saved from, when that is known: the repo of a hub cache
    snapshot, or the ``_name_or_path`` of its ``config.json``."""
    hub_revision: str | None = None
    """The hub commit of a snapshot folder."""

    def metadata(self) -> dict[str, Any]:
        """The fields for sae-lens's ``cfg.metadata`` (None-valued provenance left out)."""
        out: dict[str, Any] = {"model_name": self.name, "model_class_name": self.class_name,
                               "model_identity": self.identity, "model_revision": self.revision}
        if self.path is not None:
            out["model_path"] = self.path
        if self.saved_from is not None:
            out["model_saved_from"] = self.saved_from
        if self.hub_revision is not None:
            out["model_hub_revision"] = self.hub_revision
        return out


def transformer_lens_knows(name: str) -> bool:
    """Whether ``HookedTransformer.from_pretrained`` takes ``name`` (an official name or alias)."""
    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


def is_causal_lm(model_type: str | None) -> bool:
    """Whether ``AutoModelForCausalLM`` builds this model type as the model Strata captured:
    transformers has a causal-LM class for it, and it is not an encoder (BERT-style models have
    one, but it is a different, decoder-configured model) nor an image model."""
    from transformers.models.auto.modeling_auto import (  # lazy: seconds to import; only naming a model needs it
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    if not model_type or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return not any(model_type in f.model_types for f in FAMILIES if f.name == "bert" or f.modality == "image")


def _config_of(folder: str) -> dict[str, Any]:
    try:
        with open(Path(folder) / "config.json", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return {}  # the folder moved or is not on this machine: the meta's fields stand
    return cfg if isinstance(cfg, dict) else {}


def _hub_id_in(cfg: Mapping[str, Any]) -> str | None:
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def _class_for(name: str, model_type: str | None, *, hub: bool) -> str | None:
    causal = is_causal_lm(model_type)
    # TransformerLens also knows encoders (BERT, for its HookedEncoder), which sae-lens's
    # HookedTransformer loading does not take; a meta without a model type trusts the name.
    if hub and (causal or model_type is None) and transformer_lens_knows(name):
        return "HookedTransformer"
    return "AutoModelForCausalLM" if causal else None


def model_identity(meta: Mapping[str, Any]) -> ModelIdentity:
    """The model of a dataset (its ``info.meta``) as an SAE's ``cfg.json`` names it."""
    ident = meta.get("model")
    revision = meta.get("revision")
    model_type = meta.get("model_type")
    local = ident == LOCAL_IDENTITY or (isinstance(revision, str) and revision.startswith("local-"))
    if not local:
        name = None if ident is None else str(ident)
        cls = None if name is None else _class_for(name, model_type, hub=True)
        return ModelIdentity(name, cls, name, revision)
    # Datasets written before ``model_path`` was recorded named the folder in ``model``.
    path = meta.get("model_path") or (ident if ident != LOCAL_IDENTITY else None)
    if path is None:
        log.warning("the dataset's local model records no folder: the SAE's model_name stays %r", ident)
        return ModelIdentity(ident, None, ident, revision)
    path = str(path)
    cfg = _config_of(path)
    model_type = model_type or cfg.get("model_type")
    snap = _SNAPSHOT.search(path.rstrip("/") + "/")
    if snap is not None:
        hub_id = snap["repo"].replace("--", "/")
        return ModelIdentity(hub_id, _class_for(hub_id, model_type, hub=True), ident, revision, path=path, saved_from=hub_id,
                             hub_revision=snap["commit"])
    return ModelIdentity(path, _class_for(path, model_type, hub=False), ident, revision, path=path, saved_from=_hub_id_in(cfg))
