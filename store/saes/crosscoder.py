"""A crosscoder folder's model, read with torch, safetensors and json alone.

Layout (written by :mod:`strata.analysis.sae.crosscoder_run`)::

    cfg.json                 {"architecture": "crosscoder", "d_in", "d_sae", "n_sources", "activation",
                              "k", "threshold" (batchtopk), "sources": [{dataset, hook, fingerprint}], ...}
    crosscoder.safetensors   encoder.weight (n_sources, d_in, d_sae)   encoder.bias (d_sae,)
                             decoder.weight (n_sources, d_sae, d_in)   decoder.bias (n_sources, d_in)

The tensor names and shapes are those of dictionary_learning's ``CrossCoder`` (GitHub,
saprmarks/dictionary_learning, ``dictionary.py``: its ``encoder``/``decoder`` submodules, with
``num_layers`` = ``n_sources`` and ``activation_dim`` = ``d_in``), so its ``load_state_dict``
takes the file as is. Latents: ``f = act(sum_s x_s @ W_enc[s] + b_enc)``; reconstruction of
source ``s``: ``f @ W_dec[s] + b_dec[s]``. ``act`` is ``relu`` (dictionary_learning's own), ``topk``
(the ``k`` largest pre-activations per token, then relu) or ``batchtopk`` (trained with a batch-wide
top-k, applied as ``pre * (pre > threshold)`` with the threshold learned in training, as sae-lens
saves its BatchTopK SAEs).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:
    import torch

CFG = "cfg.json"
WEIGHTS = "crosscoder.safetensors"
ACTIVATIONS = ("topk", "batchtopk", "relu")


@cache
def crosscoder_class() -> type:
    """The :class:`CrossCoder` class (an ``nn.Module``), defined on first use: this module is
    imported by ``store.saes.handles``, and listing SAEs must not wait for torch."""
    import torch  # lazy: ~2 s; `import strata.store` (which imports this module) must not pay for it
    from torch import nn  # lazy: as above

    class _Linear(nn.Module):
        """Holds ``weight`` and ``bias`` under dictionary_learning's names."""

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
            super().__init__()
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias)

    class CrossCoder(nn.Module):
        """An inference crosscoder: ``encode([batch, n_sources, d_in]) -> [batch, d_sae]``,
        ``decode([batch, d_sae]) -> [batch, n_sources, d_in]``, ``forward`` both."""

        def __init__(self, cfg: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> None:
            super().__init__()
            n, d, m = int(cfg["n_sources"]), int(cfg["d_in"]), int(cfg["d_sae"])
            if cfg.get("activation") not in ACTIVATIONS:
                raise ValueError(f"crosscoder `activation` {cfg.get('activation')!r} is not one of {', '.join(ACTIVATIONS)}")
            self.cfg = dict(cfg)
            self.encoder = _Linear(torch.zeros(n, d, m), torch.zeros(m))
            self.decoder = _Linear(torch.zeros(n, m, d), torch.zeros(n, d))
            if state is not None:
                self.load_state_dict(state)

        @property
        def n_sources(self) -> int:
            return int(self.cfg["n_sources"])

        @property
        def d_in(self) -> int:
            return int(self.cfg["d_in"])

        @property
        def d_sae(self) -> int:
            return int(self.cfg["d_sae"])

        @property
        def W_dec(self) -> torch.Tensor:  # noqa: N802 - sae-lens's name, which the dashboards read
            """The decoder ``[n_sources, d_sae, d_in]`` (``decoder.weight``)."""
            return self.decoder.weight

        @property
        def device(self) -> torch.device:
            return self.encoder.weight.device

        def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
            """``sum_s x[:, s] @ W_enc[s] + b_enc`` of ``x`` ``[batch, n_sources, d_in]``."""
            w = self.encoder.weight
            return x.to(w.dtype).reshape(x.shape[0], -1) @ w.reshape(-1, w.shape[-1]) + self.encoder.bias

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            """Latents ``[batch, d_sae]`` of ``x`` ``[batch, n_sources, d_in]``."""
            pre = self.pre_acts(x)
            act = self.cfg["activation"]
            if act == "relu":
                return torch.relu(pre)
            if act == "topk":
                top = pre.topk(int(self.cfg["k"]), dim=-1)
                return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            return pre * (pre > float(self.cfg["threshold"]))

        def decode(self, f: torch.Tensor) -> torch.Tensor:
            """Reconstruction ``[batch, n_sources, d_in]`` of latents ``f`` ``[batch, d_sae]``."""
            return torch.einsum("bm,smd->bsd", f.to(self.decoder.weight.dtype), self.decoder.weight) + self.decoder.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decode(self.encode(x))

        def decoder_norms(self) -> torch.Tensor:
            """``||W_dec[s, i]||`` as ``[n_sources, d_sae]``."""
            return self.decoder.weight.detach().norm(dim=-1)

        def save(self, folder: str | Path) -> None:
            """Write ``cfg.json`` and ``crosscoder.safetensors`` into ``folder``."""
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().float().contiguous().numpy() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))
            (folder / CFG).write_text(json.dumps(self.cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    CrossCoder.__module__, CrossCoder.__qualname__ = __name__, "CrossCoder"  # pickled by reference, found by __getattr__
    return CrossCoder


def __getattr__(name: str) -> Any:
    if name == "CrossCoder":
        return crosscoder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_crosscoder(folder: str | Path, *, device: str = "cpu") -> Any:
    """The crosscoder of a folder (see the module docstring), on ``device``, in eval mode."""
    import torch  # lazy: as in crosscoder_class

    folder = Path(folder)
    cfg = json.loads((folder / CFG).read_text(encoding="utf-8"))
    if cfg.get("architecture") != "crosscoder":
        raise ValueError(f"{folder / CFG}: architecture is {cfg.get('architecture')!r}, not 'crosscoder'")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_file(str(folder / WEIGHTS)).items()}
    return crosscoder_class()(cfg, state).to(device).eval()
