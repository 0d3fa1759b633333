"""Strata's per-token TopK transcoder: its documented folder layout and its loader.

sae-lens 6.54 has no TopK transcoder class, so a transcoder trained with ``sae.activation: topk``
is saved in a layout of Strata's own, readable with torch and safetensors alone (no Strata, no
sae-lens). The folder uses sae-lens's file names::

    cfg.json                  {"architecture": "strata_topk_transcoder" | "strata_topk_skip_transcoder",
                               "d_in", "d_out", "d_sae", "k", "dtype", "device", "metadata": {...}}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
                              W_skip [d_out, d_in] (the skip architecture only)

The model, with ``pre = x @ W_enc + b_enc``:

    encode(x)  = the k largest entries of ``pre`` per row, ReLU'd; every other latent 0
    decode(f)  = f @ W_dec + b_dec
    forward(x) = decode(encode(x)) (+ x @ W_skip.T for the skip architecture)

Decoder rows are unit norm as saved (training's decoder-norm rescaling is folded into W_enc and
b_enc), as sae-lens saves its TopK SAEs. ``TopKTranscoder.load_from_disk(folder)`` reads it back.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:
    import torch

#: Architecture names (cfg.json's ``architecture``) this module reads and writes.
TOPK_TRANSCODER = "strata_topk_transcoder"
TOPK_SKIP_TRANSCODER = "strata_topk_skip_transcoder"
ARCHITECTURES = (TOPK_TRANSCODER, TOPK_SKIP_TRANSCODER)
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: Weight dtypes of the layout (what safetensors stores through numpy).
DTYPES = ("float32", "float16", "float64")


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of ``pre`` along the last dimension, ReLU'd, zeros elsewhere
    (ties broken as ``torch.topk`` breaks them)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return pre.new_zeros(pre.shape).scatter(-1, indices, values.relu())


@dataclass
class TopKTranscoderConfig:
    """``cfg.json`` of a TopK transcoder (see the module docstring)."""

    d_in: int
    d_out: int
    d_sae: int
    k: int
    skip: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    metadata: types.SimpleNamespace = field(default_factory=types.SimpleNamespace)
    """Free-form fields (hook names, model, dataset) kept as they are."""

    @property
    def architecture(self) -> str:
        return TOPK_SKIP_TRANSCODER if self.skip else TOPK_TRANSCODER

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "d_in": self.d_in, "d_out": self.d_out, "d_sae": self.d_sae, "k": self.k,
                "dtype": self.dtype, "device": self.device, "metadata": dict(vars(self.metadata))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TopKTranscoderConfig:
        arch = d.get("architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"cfg.json architecture {arch!r} is not a Strata TopK transcoder ({', '.join(ARCHITECTURES)})")
        missing = [k for k in ("d_in", "d_out", "d_sae", "k") if not isinstance(d.get(k), int) or d[k] < 1]
        if missing:
            raise ValueError(f"cfg.json of a {arch}: {', '.join(missing)} must be positive integers")
        dtype = str(d.get("dtype", "float32"))
        if dtype not in DTYPES:
            raise ValueError(f"cfg.json of a {arch}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return cls(d_in=d["d_in"], d_out=d["d_out"], d_sae=d["d_sae"], k=d["k"], skip=arch == TOPK_SKIP_TRANSCODER,
                   dtype=dtype, device=str(d.get("device", "cpu")), metadata=types.SimpleNamespace(**dict(d.get("metadata") or {})))


@cache
def topk_transcoder_class() -> type:
    """The :class:`TopKTranscoder` class (an ``nn.Module``), defined on first use."""
    import torch  # lazy: ~2 s; `import strata.store` (which imports this module) must not pay for it
    from torch import nn  # lazy: as above

    class TopKTranscoder(nn.Module):
        """A per-token TopK transcoder (see the module docstring): ``encode``, ``decode``,
        ``forward``, ``cfg`` (``d_in``, ``d_out``, ``d_sae``, ``k``), ``save_model`` and
        ``load_from_disk``, named as sae-lens names them."""

        W_skip: nn.Parameter | None

        def __init__(self, cfg: TopKTranscoderConfig) -> None:
            super().__init__()
            self.cfg = cfg
            dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
            self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype, device=device))
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
            self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, dtype=dtype, device=device))
            self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype, device=device))
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype, device=device)) if cfg.skip else None

        @property
        def device(self) -> torch.device:
            return self.W_enc.device

        @property
        def dtype(self) -> torch.dtype:
            return self.W_enc.dtype

        def to(self, *args: Any, **kwargs: Any) -> Any:
            out = super().to(*args, **kwargs)
            self.cfg.device = str(self.W_enc.device)  # as sae-lens's `to` keeps cfg.device current
            return out

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            """Latents ``[..., d_sae]`` of inputs ``[..., d_in]``."""
            return topk_relu(x.to(self.dtype) @ self.W_enc + self.b_enc, self.cfg.k)

        def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
            """The output ``[..., d_out]`` the latents write (the skip path left out)."""
            return feature_acts @ self.W_dec + self.b_dec

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """The predicted output ``[..., d_out]`` of inputs ``[..., d_in]``, the skip path included."""
            out = self.decode(self.encode(x))
            if self.W_skip is not None:
                out = out + x.to(self.dtype) @ self.W_skip.T
            return out

        def save_model(self, path: str | Path) -> tuple[Path, Path]:
            """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``path`` (created)."""
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
            if self.cfg.dtype not in DTYPES:
                raise ValueError(f"a TopK transcoder is saved as {', '.join(DTYPES)}, not {self.cfg.dtype}")
            save_file({k: v.detach().cpu().contiguous().numpy() for k, v in self.state_dict().items()}, str(path / WEIGHTS_FILENAME))
            (path / CFG_FILENAME).write_text(json.dumps(self.cfg.to_dict(), default=str), encoding="utf-8")
            return path / WEIGHTS_FILENAME, path / CFG_FILENAME

        @classmethod
        def load_from_disk(cls, path: str | Path, device: str = "cpu") -> TopKTranscoder:
            """Read a folder written by :meth:`save_model`; the weights must match cfg.json's shapes."""
            path = Path(path)
            cfg = TopKTranscoderConfig.from_dict(json.loads((path / CFG_FILENAME).read_text(encoding="utf-8")))
            cfg.device = device
            model = cls(cfg)
            state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in load_file(str(path / WEIGHTS_FILENAME)).items()}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path / WEIGHTS_FILENAME}: weights do not match cfg.json ({str(e).splitlines()[0]})") from None
            return model

    return TopKTranscoder


def __getattr__(name: str) -> Any:
    if name == "TopKTranscoder":
        return topk_transcoder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_topk_transcoder(cfg: dict[str, Any]) -> bool:
    """Whether a cfg.json (as a dict) is one of this module's layouts."""
    return cfg.get("architecture") in ARCHITECTURES


def load(path: str | Path, device: str = "cpu") -> Any:
    """The TopK transcoder of a folder (``TopKTranscoder.load_from_disk``)."""
    return topk_transcoder_class().load_from_disk(path, device=device)
