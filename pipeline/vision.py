"""Vision encoders: ViT, CLIP and SigLIP vision towers, DINOv2 (with or without registers).

A context is one image. Its tokens are the model's sequence, in the model's order: the CLS token
(ViT, CLIP, DINOv2; SigLIP has none), then register tokens (DINOv2 with registers), then the
patches in row-major order. The token table keeps the text columns so that every reader,
iterator, SAE and analysis works unchanged:

- ``doc_id``: the image id; ``position``: the token's index in the sequence;
- ``token_id``: the patch index ``0..P-1`` for a patch, ``-1`` for CLS, ``-2 - r`` for register
  ``r`` (:data:`CLS_TOKEN`, :func:`register_token`);
- ``doc_position``: the patch index for a patch, ``-1`` for CLS and registers (as for a BOS);
- ``special``: True for CLS and registers; ``char_start`` / ``char_end``: -1.

Preprocessing is the model's own image processor (``transformers``' Pillow backend: no
torchvision), with ``image.size`` overriding its resize / crop size; the resolved settings are
recorded in the manifest and their fingerprint is part of the dataset's identity (where a text
dataset has its tokenizer's). Every image is converted to RGB first. A size other than the
model's training size interpolates the position embeddings (``interpolate_pos_encoding``; DINOv2
always does).

Decoding is checked once while planning (:func:`check_images`, CPU tasks): images that do not
decode are counted and reported with their ids, and left out of the plan. Workers decode and
preprocess a unit's images before taking the model (:func:`preprocess`), so that work overlaps
the previous unit's forward pass.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image, UnidentifiedImageError

from strata.pipeline.errors import ModelNotFoundError, SpecError
from strata.pipeline.packing import Contexts

CLS_TOKEN = -1

# model_type -> (vision model class, CLS tokens); registers come from the config
VISION_TYPES: dict[str, tuple[str, int]] = {
    "vit": ("ViTModel", 1),
    "clip": ("CLIPVisionModel", 1),
    "clip_vision_model": ("CLIPVisionModel", 1),
    "siglip": ("SiglipVisionModel", 0),
    "siglip_vision_model": ("SiglipVisionModel", 0),
    "dinov2": ("Dinov2Model", 1),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", 1),
}
_INTERPOLATE_KWARG = {"vit", "clip", "clip_vision_model", "siglip", "siglip_vision_model"}  # DINOv2 always interpolates


def register_token(r: int) -> int:
    return -2 - r


def is_vision(config: Any) -> bool:
    return getattr(config, "model_type", None) in VISION_TYPES


def vision_config(config: Any) -> Any:
    """The vision tower's config (a CLIP or SigLIP checkpoint holds both towers)."""
    return getattr(config, "vision_config", None) or config


@dataclass(frozen=True)
class ImageLayout:
    """Where a model's tokens are in its sequence for one image."""

    cls: int
    registers: int
    grid: tuple[int, int]  # patches per column, per row

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.cls + self.registers + self.patches

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``token_id``, ``doc_position`` and ``special`` of one image's tokens."""
        tid = np.concatenate([np.full(self.cls, CLS_TOKEN), [register_token(r) for r in range(self.registers)],
                              np.arange(self.patches)]).astype(np.int32)
        special = tid < 0
        return tid, np.where(special, -1, tid).astype(np.int32), special

    def to_dict(self) -> dict[str, Any]:
        return {"cls": self.cls, "registers": self.registers, "grid": list(self.grid), "patches": self.patches, "tokens": self.tokens,
                "token_ids": {"cls": CLS_TOKEN, "registers": f"-2 - r (r = 0..{self.registers - 1})" if self.registers else None,
                              "patches": f"0..{self.patches - 1}, row-major"}}


@dataclass(frozen=True)
class ImagePrep:
    """An image model's preprocessing, resolved before anything runs."""

    model_type: str
    model_class: str
    processor_overrides: dict[str, Any]
    processor: dict[str, Any]  # the processor's settings, as recorded
    height: int
    width: int
    patch: int
    layout: ImageLayout
    interpolate: bool  # pass interpolate_pos_encoding=True

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"processor": self.processor, "convert": "RGB", "size": [self.height, self.width]}, sort_keys=True)
        return f"image-processor-xxh3_128:{xxhash.xxh3_128_hexdigest(blob.encode())}"

    def forward_kwargs(self) -> dict[str, Any]:
        return {"interpolate_pos_encoding": True} if self.interpolate and self.model_type in _INTERPOLATE_KWARG else {}

    def to_dict(self) -> dict[str, Any]:
        return {"processor": self.processor, "overrides": self.processor_overrides, "convert": "RGB", "height": self.height,
                "width": self.width, "patch_size": self.patch, "interpolate_pos_encoding": self.interpolate, "layout": self.layout.to_dict(),
                "model_class": self.model_class}


def load_processor(folder: str, overrides: dict[str, Any], *, model: str = "the model", trust_remote_code: bool = False) -> Any:
    from transformers import AutoImageProcessor  # lazy: transformers imports in seconds; only building or loading a model needs it
    from transformers.utils import logging as hf_logging  # lazy: as above

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoImageProcessor.from_pretrained(folder, backend="pil", trust_remote_code=trust_remote_code, **overrides)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the image processor of model {model!r} (preprocessor_config.json): {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _overrides(proc: Any, size: int | None) -> dict[str, Any]:
    """Processor settings that make its output ``size x size``."""
    if size is None:
        return {}
    if getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None):
        crop = proc.crop_size
        ch = crop.get("height") if isinstance(crop, dict) else crop
        short = (proc.size or {}).get("shortest_edge") if isinstance(proc.size, dict) else None
        resize = {"shortest_edge": int(round(size * short / ch))} if short and ch else {"shortest_edge": size}
        return {"size": resize, "crop_size": {"height": size, "width": size}}
    return {"size": {"height": size, "width": size}}


def _processor_record(proc: Any) -> dict[str, Any]:
    d = {k: v for k, v in proc.to_dict().items() if not k.startswith("_") and k not in ("processor_class", "auto_map")}
    return json.loads(json.dumps(d, default=str))


def prepare_images(folder: str, config: Any, *, size: int | None, model: str, trust_remote_code: bool = False) -> ImagePrep:
    """Resolve an image model's preprocessing and check that its output fits the model: a
    one-line :class:`SpecError` when it does not (before anything runs)."""
    mtype = config.model_type
    cls_name, n_cls = VISION_TYPES[mtype]
    vc = vision_config(config)
    patch = int(vc.patch_size if not isinstance(vc.patch_size, (list, tuple)) else vc.patch_size[0])
    trained = vc.image_size if not isinstance(vc.image_size, (list, tuple)) else vc.image_size[0]
    if size is not None and size % patch:
        lo = max(patch, size // patch * patch)
        raise SpecError(f"`image.size` {size} does not fit model {model!r}: its patch size is {patch}, so sizes must be multiples of it "
                        f"(e.g. {lo} or {lo + patch}; it was trained at {trained})")
    base = load_processor(folder, {}, model=model, trust_remote_code=trust_remote_code)
    over = _overrides(base, size)
    proc = load_processor(folder, over, model=model, trust_remote_code=trust_remote_code) if over else base
    probe = _probe_image((53, 37))
    px = proc(images=[probe], return_tensors="np")["pixel_values"]
    _, _, h, w = px.shape
    if h % patch or w % patch:
        raise SpecError(f"model {model!r}: its image processor makes {h}x{w} images, not a multiple of the patch size {patch}; "
                        f"set `image.size` to a multiple of {patch} (it was trained at {trained})")
    regs = int(getattr(vc, "num_register_tokens", 0) or 0) if mtype == "dinov2_with_registers" else 0
    layout = ImageLayout(n_cls, regs, (h // patch, w // patch))
    return ImagePrep(mtype, cls_name, over, _processor_record(proc), int(h), int(w), patch, layout, (h, w) != (trained, trained))


def _probe_image(size: tuple[int, int]) -> Any:
    """A small non-square image: what the processor makes of it shows its output size."""
    return Image.new("RGB", size, (127, 64, 200))


# -- decoding and preprocessing ------------------------------------------------------------------


def _open(data: bytes) -> Any:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def check_images(payloads: list[bytes | None], errors: list[str | None]) -> list[tuple[int, int, str | None]]:
    """(width, height, None) per image that decodes, (-1, -1, why) per one that does not (a
    CPU task while planning)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for data, err in zip(payloads, errors):
            if data is None:
                out.append((-1, -1, err or "no image"))
                continue
            try:
                im = _open(data)
                out.append((int(im.width), int(im.height), None))
            except UnidentifiedImageError:
                out.append((-1, -1, "does not decode: not an image format Pillow reads" if data else "does not decode: empty file"))
            except Exception as e:  # PIL raises many types for damaged files
                out.append((-1, -1, f"does not decode: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")))
    return out


def preprocess(processor: Any, payloads: list[bytes | None], *, ids: np.ndarray | None = None) -> np.ndarray:
    """Pixel values ``[n, 3, H, W]`` float32 of encoded images (decoded, RGB, the processor)."""
    images = []
    for i, data in enumerate(payloads):
        if data is None:
            what = f"image {int(ids[i])}" if ids is not None else f"image {i}"
            raise RuntimeError(f"{what} can no longer be read from the corpus (it decoded while planning): did the corpus change?")
        images.append(_open(data).convert("RGB"))
    return np.ascontiguousarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)


# -- plan ----------------------------------------------------------------------------------------


@dataclass
class ImageContexts(Contexts):
    """Contexts of images: the token arrays, plus each image's encoded bytes (or, once a worker
    has preprocessed them, its pixel values)."""

    images: list[bytes | None] = field(default_factory=list)
    pixels: np.ndarray | None = None

    def slice(self, lo: int, hi: int) -> ImageContexts:
        base = super().slice(lo, hi)
        return ImageContexts(*(getattr(base, f) for f in _CONTEXT_FIELDS), images=self.images[lo:hi],
                             pixels=None if self.pixels is None else self.pixels[lo:hi])


_CONTEXT_FIELDS = tuple(f.name for f in fields(Contexts))


class ImagePacker:
    """The plan of an image corpus: context ``i`` is the ``i``-th image that decodes."""

    packing = "image"

    def __init__(self, source: Any, doc_ids: np.ndarray, kept: np.ndarray, layout: ImageLayout) -> None:
        self.source = source  # an ImageSource over every image of the corpus, in corpus order
        self.all_ids = np.asarray(doc_ids, np.int64)
        self.kept = np.asarray(kept, np.int64)  # corpus positions of the images that decode
        self.layout = layout
        self.context_size = layout.tokens
        self._tid, self._dpos, self._special = layout.arrays()

    def __len__(self) -> int:
        return len(self.kept)

    def first_context_of_doc(self, n: int) -> int:
        """The context of the first image at corpus position ``n`` or later."""
        return int(np.searchsorted(self.kept, n))

    def contexts(self, lo: int, hi: int, *, images: bool = True) -> ImageContexts:
        hi = min(hi, len(self.kept))
        n, t = max(0, hi - lo), self.context_size
        ids = self.all_ids[self.kept[lo:hi]]
        neg = np.full((n, t), -1, np.int32)
        return ImageContexts(
            token_id=np.tile(self._tid, (n, 1)), doc_id=np.repeat(ids, t).reshape(n, t), doc_position=np.tile(self._dpos, (n, 1)),
            special=np.tile(self._special, (n, 1)), mask=np.ones((n, t), bool), char_start=neg, char_end=neg.copy(),
            images=self.source.read(self.kept[lo:hi]) if images else [],
        )

    def document_index(self, fields: dict[str, pa.Array] | None = None) -> tuple[pa.Table, int, int, int]:
        """One row per image of the corpus: images that decode span their context's rows; the
        others have no rows (``-1, -1``) and say why in ``error``."""
        n, t = len(self.all_ids), self.context_size
        start = np.full(n, -1, np.int64)
        start[self.kept] = np.arange(len(self.kept), dtype=np.int64) * t
        end = np.where(start >= 0, start + t, -1)
        dropped = np.where(start >= 0, 0, t).astype(np.int64)
        table = pa.table({"doc_id": self.all_ids, "row_start": start, "row_end": end, "dropped_tokens": dropped})
        for name, values in (fields or {}).items():
            table = table.append_column(name, values)
        bad = n - len(self.kept)
        return table, int(dropped.sum()), bad, 0
