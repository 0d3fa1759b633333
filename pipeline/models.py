"""Models: a hub id at a revision, or a local folder; the exact revision resolved and recorded.

For a hub id the revision (branch, tag or commit) is resolved to the commit hash of the
snapshot that is loaded. A local folder is identified by its content alone: its identity is
``local`` at the revision ``local-xxh3:...`` (a hash of its weight and config files), so
``./models/x`` and its absolute path are the same model, and a changed checkpoint is a new
dataset; the path is recorded as provenance only. ``trust_remote_code`` stays off unless the
spec sets it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from strata.pipeline.errors import ModelNotFoundError
from strata.pipeline.hooks import model_class_of

if TYPE_CHECKING:
    from strata.pipeline.config import ModelSpec

log = logging.getLogger(__name__)

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
LOCAL_IDENTITY = "local"


@dataclass(frozen=True)
class ResolvedModel:
    """A model pinned to an exact revision, loadable from ``folder`` on this machine."""

    id: str  # as the spec names it (a hub id or a path)
    revision: str
    folder: str
    local: bool
    torch_dtype: str
    trust_remote_code: bool

    @property
    def identity(self) -> str:
        """The model's part of a dataset's identity: the hub id, or ``local`` for a folder
        (whose revision is a hash of its content)."""
        return LOCAL_IDENTITY if self.local else self.id

    def fetch(self) -> str:
        """The local folder of this exact revision, downloading it when absent (workers on other
        nodes call this; a local folder must be visible to them at the same path)."""
        if self.local or os.path.isdir(self.folder):
            return self.folder
        return _snapshot(self.id, self.revision)


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or os.sep in model_id and os.path.exists(model_id.split(os.sep)[0])


def folder_revision(folder: str) -> str:
    """A hash of a local model folder's weight and config files (names and contents)."""
    h = xxhash.xxh3_128()
    root = Path(folder)
    configs = ("config.json", "model_index.json", "scheduler_config.json")
    # A diffusers pipeline folder: its components' files, one level down, count too.
    tree = list(root.iterdir())
    if (root / "model_index.json").is_file():
        tree += [q for d in tree if d.is_dir() for q in d.iterdir()]
    files = sorted((p for p in tree if p.is_file() and (p.suffix in _WEIGHTS or p.name in configs)), key=lambda p: str(p.relative_to(root)))
    if not any(p.suffix in _WEIGHTS for p in files):
        raise ModelNotFoundError(f"model folder {folder!r} holds no weight files ({', '.join(_WEIGHTS)})")
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return f"local-xxh3:{h.hexdigest()}"


def _snapshot(model_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download  # lazy: huggingface_hub's errors import its HTTP stack (~130 ms); only a hub download needs it
    from huggingface_hub.errors import (  # lazy: as above
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(model_id, revision=revision, allow_patterns=_HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(model_id, revision=revision, allow_patterns=[*_HUB_PATTERNS, "*.bin"])
        return folder
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {model_id!r} has no revision {revision!r} on the hub") from None
    except (RepositoryNotFoundError, GatedRepoError, HFValidationError):
        raise ModelNotFoundError(
            f"unknown model {model_id!r}: not a local folder and not a hub model this machine can access"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"model {model_id!r} (revision {revision or 'main'!r}) is not in the local hub cache and the hub is unreachable "
            "(offline); use a local folder or a machine with hub access"
        ) from None
    except Exception as e:  # network errors of many kinds
        raise ModelNotFoundError(f"cannot fetch model {model_id!r} (revision {revision or 'main'!r}): {e}") from None


def resolve(ref: ModelSpec) -> ResolvedModel:
    """Pin a model to its exact revision (before anything runs)."""
    mid = os.path.expanduser(ref.id)
    if os.path.isdir(mid):
        folder = os.path.abspath(mid)
        rev = folder_revision(folder)
        if ref.revision not in (None, "main", rev):
            raise ModelNotFoundError(f"model folder {ref.id!r} has revision {rev!r}, not {ref.revision!r}")
        return ResolvedModel(ref.id, rev, folder, True, ref.torch_dtype, ref.trust_remote_code)
    if _looks_like_path(ref.id):
        raise ModelNotFoundError(f"unknown model {ref.id!r}: no such folder")
    folder = _snapshot(ref.id, ref.revision)
    return ResolvedModel(ref.id, Path(folder).name, folder, False, ref.torch_dtype, ref.trust_remote_code)


def load_config(m: ResolvedModel) -> Any:
    from transformers import AutoConfig  # lazy: transformers imports in seconds; only building or loading a model needs it

    try:
        return AutoConfig.from_pretrained(m.folder, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read the config of model {m.id!r}: {str(e).splitlines()[0]}") from None


def load_tokenizer(m: ResolvedModel) -> Any:
    from transformers import AutoTokenizer  # lazy: transformers imports in seconds; only building or loading a model needs it

    try:
        return AutoTokenizer.from_pretrained(m.folder, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the tokenizer of model {m.id!r}: {str(e).splitlines()[0]}") from None


def max_context(config: Any) -> int | None:
    """The longest context the model takes (position embeddings), or None when unbounded."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n is None:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        n -= 2  # RoBERTa positions start after padding_idx + 1
    return int(n)


def load_model(m: ResolvedModel, *, device: str = "cpu", model_class: str | None = None) -> Any:
    """The base model (``AutoModel``: no LM head, which no hook needs), in eval mode; or the
    ``transformers`` class ``model_class`` (a vision tower: ``CLIPVisionModel`` loads the
    vision half of a CLIP checkpoint). Without ``model_class``, a family that names its own
    (:func:`strata.pipeline.hooks.model_class_of`: ``T5EncoderModel`` loads the encoder of a T5
    checkpoint) gets that one."""
    import torch  # lazy: torch imports in ~2 s; only building or loading a model needs it
    import transformers  # lazy: transformers imports in seconds; only building or loading a model needs it
    from transformers import AutoModel  # lazy: as above

    if model_class is None:
        model_class = model_class_of(getattr(load_config(m), "model_type", ""))
    cls = AutoModel if model_class is None else getattr(transformers, model_class)
    verbosity = transformers.utils.logging.get_verbosity()
    if model_class is not None:  # a two-tower checkpoint (or T5's decoder): the other half's weights are unused, by design
        transformers.utils.logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(m.fetch(), dtype=getattr(torch, m.torch_dtype), trust_remote_code=m.trust_remote_code)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return model.to(device).eval().requires_grad_(False)
