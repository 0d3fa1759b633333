"""Transcoders trained through sae-lens's trainer: the MLP's input predicts its output.

Registered in sae-lens's training registry (importing this module does it; ``analysis.sae.config``
imports it) as ``transcoder`` and ``skip_transcoder``, so ``architecture: transcoder`` in a spec
trains with the very machinery of SAEs (sweeps, config hash, checkpoints, resume, leases).

The trainer sees one tensor per step: the in hook's rows and the out hook's rows side by side,
``[x | y]`` (``d_in + d_out`` wide; :mod:`analysis.sae.train` builds it). The training class
splits it in ``training_forward_pass`` and returns ``sae_in = y`` (the target) and ``sae_out``
(the prediction), so sae-lens's curves (mse, explained variance) measure the prediction of y.

Activations (``sae.activation``; left out it is ``relu`` without ``sae.k`` and ``batchtopk`` with it):

- ``relu``: ReLU latents with sae-lens's ``standard`` sparsity penalty, ``l1_coefficient`` times
  the ``lp_norm``-norm of the latents weighted by their decoder rows' norms (warm-up
  ``l1_warm_up_steps``). Saved as sae-lens's ``transcoder`` / ``skip_transcoder``.
- ``batchtopk``: the ``k * batch`` largest ReLU'd pre-activations of the batch are kept, and a
  threshold is learnt as sae-lens's ``BatchTopKTrainingSAE`` learns it (a running average, rate
  ``topk_threshold_lr``, of the smallest kept activation), with the TopK auxiliary loss of dead
  latents (``aux_loss_coefficient``). Saved as sae-lens's ``jumprelu_transcoder`` /
  ``jumprelu_skip_transcoder`` with that threshold, as sae-lens saves BatchTopK SAEs as JumpReLU.
- ``topk``: the ``k`` largest per token (``k`` an integer), the same auxiliary loss. Saved in
  Strata's own layout (:mod:`store.saes.topk_transcoder`), as sae-lens has no such class.

With ``rescale_acts_by_decoder_norm`` (the default for the TopK kinds, as in sae-lens) latents
are selected as if the decoder rows were unit norm; the norms are folded into the encoder when
saved. The skip architecture adds ``x @ W_skip.T`` (``W_skip`` ``[d_out, d_in]``, zero at
initialisation, as sae-lens's ``SkipTranscoder``). ``d_out`` is the out hook's width, set by
Strata; ``normalize_activations`` other than ``none`` and ``apply_b_dec_to_input`` are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import SAEConfig, TrainCoefficientConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import act_times_W_dec, calculate_topk_aux_acts
from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig, JumpReLUTranscoderConfig, SkipTranscoderConfig, TranscoderConfig
from torch import nn

from strata.store.saes.topk_transcoder import DTYPES as TOPK_DTYPES
from strata.store.saes.topk_transcoder import TopKTranscoder, TopKTranscoderConfig, topk_relu

#: Spec architecture names of transcoders.
ARCHITECTURES = ("transcoder", "skip_transcoder")
Activation = Literal["relu", "batchtopk", "topk"]
#: Options Strata sets (from the out hook's width).
DERIVED_FIELDS = ("d_out",)


@dataclass(kw_only=True)
class TranscoderTrainingSAEConfig(TrainingSAEConfig):
    """Options of ``architecture: transcoder`` (``sae:`` in a spec); see the module docstring."""

    d_out: int = 0
    """The out hook's width (set by Strata)."""
    activation: Activation | None = None
    """``relu``, ``batchtopk`` or ``topk``; left out: ``relu`` without ``k``, ``batchtopk`` with it."""
    k: float | None = None
    """Latents kept per token (``batchtopk``: on average over the batch; ``topk``: an integer)."""
    l1_coefficient: float = 1.0
    """``relu``: weight of the sparsity penalty."""
    lp_norm: float = 1.0
    """``relu``: the norm of the sparsity penalty."""
    l1_warm_up_steps: int = 0
    """``relu``: steps over which the penalty's weight rises linearly from 0."""
    topk_threshold_lr: float = 0.01
    """``batchtopk``: rate of the threshold's running average."""
    aux_loss_coefficient: float = 1.0
    """``batchtopk``/``topk``: weight of the auxiliary loss of dead latents."""
    rescale_acts_by_decoder_norm: bool = True
    """``batchtopk``/``topk``: select latents as if the decoder rows were unit norm."""
    apply_b_dec_to_input: bool = False
    """Not supported by transcoders (b_dec is d_out wide); must stay false."""

    @classmethod
    def architecture(cls) -> str:
        return "transcoder"

    @classmethod
    def skip(cls) -> bool:
        return False

    @property
    def kind(self) -> Activation:
        """The activation in use (``activation``, or what ``k`` implies)."""
        return self.activation or ("relu" if self.k is None else "batchtopk")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """One-line ValueError for combinations the spec must not make (called when a spec loads)."""
        act, k = options.get("activation"), options.get("k")
        if act == "relu" and k is not None:
            raise ValueError("`sae.k` is given but `sae.activation` is relu: k is for `batchtopk` or `topk` (or leave `activation` out)")
        if act in ("batchtopk", "topk") and k is None:
            raise ValueError(f"`sae.activation` {act} needs `sae.k` (latents kept per token)")
        if act == "topk" and k is not None and float(k) != int(k):
            raise ValueError(f"`sae.k` of a per-token topk transcoder must be an integer, got {k}")
        if act == "topk" and options.get("dtype", "float32") not in TOPK_DTYPES:
            raise ValueError(f"`sae.dtype` of a per-token topk transcoder (saved in Strata's layout) is one of {', '.join(TOPK_DTYPES)}")
        norm = options.get("normalize_activations", "none")
        if norm != "none":
            raise ValueError(f"`sae.normalize_activations` must be none for a transcoder, got {norm!r}")
        if options.get("apply_b_dec_to_input"):
            raise ValueError("`sae.apply_b_dec_to_input` must be false for a transcoder (its b_dec is the output's bias)")

    def get_inference_config_class(self) -> type[SAEConfig]:
        # The sae-lens class a saved transcoder loads as (topk: Strata's own layout, whose
        # fields are those of TranscoderConfig).
        if self.kind == "batchtopk":
            return JumpReLUSkipTranscoderConfig if self.skip() else JumpReLUTranscoderConfig
        return SkipTranscoderConfig if self.skip() else TranscoderConfig


@dataclass(kw_only=True)
class SkipTranscoderTrainingSAEConfig(TranscoderTrainingSAEConfig):
    """Options of ``architecture: skip_transcoder`` (those of ``transcoder``)."""

    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder"

    @classmethod
    def skip(cls) -> bool:
        return True


class _TopK(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk_relu(x, self.k)


class TranscoderTrainingSAE(TrainingSAE[TranscoderTrainingSAEConfig]):
    """The training form of a transcoder (see the module docstring). ``encode`` takes the in
    hook's rows ``[n, d_in]``; ``training_forward_pass`` takes ``[x | y]``."""

    b_enc: nn.Parameter
    W_skip: nn.Parameter | None

    def __init__(self, cfg: TranscoderTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=self.dtype, device=self.device)) if cfg.skip() else None
        if cfg.kind == "batchtopk":
            # Double precision, as sae-lens keeps it: the running average is fine-grained.
            self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.double, device=self.W_dec.device))

    def initialize_weights(self) -> None:
        cfg = self.cfg
        w_dec = torch.empty(cfg.d_sae, cfg.d_out, dtype=self.dtype, device=self.device)
        nn.init.kaiming_uniform_(w_dec)
        w_enc = torch.empty(cfg.d_in, cfg.d_sae, dtype=self.dtype, device=self.device)
        nn.init.kaiming_uniform_(w_enc)
        if cfg.decoder_init_norm is not None:
            # sae-lens's heuristic: decoder rows of this norm; the encoder (not tied: other
            # widths) gets columns of the same norm.
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
            w_enc = w_enc / w_enc.norm(dim=0, keepdim=True) * cfg.decoder_init_norm
        self.W_dec = nn.Parameter(w_dec.contiguous())
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=self.dtype, device=self.device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype, device=self.device))

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        kind, k = self.cfg.kind, self.cfg.k
        if kind == "batchtopk":
            return BatchTopK(float(k))  # type: ignore[arg-type]
        if kind == "topk":
            return _TopK(int(k))  # type: ignore[arg-type]
        return nn.ReLU()

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        if self.cfg.kind == "relu":
            return {"l1": TrainCoefficientConfig(value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps)}
        return {}

    @property
    def _rescale(self) -> bool:
        return self.cfg.kind != "relu" and self.cfg.rescale_acts_by_decoder_norm

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        # No b_dec subtraction (it is the output's bias) and no normalisation (refused).
        return self.hook_sae_input(sae_in.to(self.dtype))

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        if self._rescale:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_recons(act_times_W_dec(feature_acts, self.W_dec, self._rescale) + self.b_dec)

    def predict(self, x: torch.Tensor, feature_acts: torch.Tensor) -> torch.Tensor:
        """The predicted output of inputs ``x`` with latents ``feature_acts`` (the skip path included)."""
        out = self.decode(feature_acts)
        if self.W_skip is not None:
            out = out + x.to(self.dtype) @ self.W_skip.T
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x, self.encode(x))

    def split(self, joined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[x | y]`` -> (x, y)."""
        d_in, d_out = self.cfg.d_in, self.cfg.d_out
        if joined.shape[-1] != d_in + d_out:
            raise ValueError(f"a transcoder batch is [in | out] = {d_in} + {d_out} wide, got {joined.shape[-1]}")
        return joined[..., :d_in], joined[..., d_in:]

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor, hidden_pre: torch.Tensor,
                           sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sparsity penalty (relu) or the auxiliary loss of dead latents (TopK kinds);
        ``step_input.sae_in`` is the target ``y`` here."""
        if self.cfg.kind == "relu":
            weighted = feature_acts * self.W_dec.norm(dim=1)
            return {"l1_loss": (step_input.coefficients["l1"] * weighted.norm(p=self.cfg.lp_norm, dim=-1)).mean()}
        return {"auxiliary_reconstruction_loss": self._topk_aux_loss(step_input.sae_in, sae_out, hidden_pre, step_input.dead_neuron_mask)}

    def _topk_aux_loss(self, y: torch.Tensor, sae_out: torch.Tensor, hidden_pre: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        # sae-lens's TopK auxiliary loss (Gao et al. 2024, appendix B.1) with the output's residual.
        if dead is None or (num_dead := int(dead.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = (y - sae_out).detach()
        k_aux = max(1, y.shape[-1] // 2)
        scale = min(num_dead / k_aux, 1.0)
        acts = calculate_topk_aux_acts(k_aux=min(k_aux, num_dead), hidden_pre=hidden_pre, dead_neuron_mask=dead)
        recons = act_times_W_dec(acts, self.W_dec, self._rescale)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x, y = self.split(step_input.sae_in)
        feature_acts, hidden_pre = self.encode_with_hidden_pre(x)
        sae_out = self.predict(x, feature_acts)
        mse = self.mse_loss_fn(sae_out, y.to(sae_out.dtype)).sum(dim=-1).mean()
        target = TrainStepInput(sae_in=y, coefficients=step_input.coefficients, dead_neuron_mask=step_input.dead_neuron_mask,
                                n_training_steps=step_input.n_training_steps, is_logging_step=step_input.is_logging_step)
        losses = {"mse_loss": mse, **self.calculate_aux_loss(target, feature_acts, hidden_pre, sae_out)}
        metrics: dict[str, Any] = {}
        if self.cfg.kind == "batchtopk":
            self._update_threshold(feature_acts)
            metrics["topk_threshold"] = self.topk_threshold
        return TrainStepOutput(sae_in=y, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=hidden_pre,
                               loss=sum(losses.values()), losses=losses, metrics=metrics)

    @torch.no_grad()
    def _update_threshold(self, acts: torch.Tensor) -> None:
        # As sae-lens's BatchTopKTrainingSAE.update_topk_threshold.
        positive = acts > 0
        lr = self.cfg.topk_threshold_lr
        with torch.autocast(self.topk_threshold.device.type, enabled=False):
            if positive.any():
                self.topk_threshold = (1 - lr) * self.topk_threshold + lr * acts[positive].min().to(self.topk_threshold.dtype)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        if self.W_skip is None:
            state_dict.pop("W_skip", None)
        if self._rescale:
            # Unit decoder rows; the norms go into the encoder (the selected latents are unchanged).
            norms = self.get_W_dec_norm()
            state_dict["W_enc"] = state_dict["W_enc"] * norms
            state_dict["b_enc"] = state_dict["b_enc"] * norms
            state_dict["W_dec"] = state_dict["W_dec"] / norms[:, None]
        if self.cfg.kind == "batchtopk":
            state_dict["threshold"] = torch.ones_like(self.b_enc) * state_dict.pop("topk_threshold").item()

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        if self.cfg.kind != "topk":
            return super().save_inference_model(path)
        return self.inference_topk().save_model(path)

    @torch.no_grad()
    def inference_topk(self) -> TopKTranscoder:
        """The per-token TopK transcoder (Strata's layout) of this training transcoder, on the CPU."""
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        self.process_state_dict_for_saving_inference(state)
        cfg = self.cfg
        meta = cfg.metadata.to_dict() if hasattr(cfg.metadata, "to_dict") else dict(cfg.metadata)
        model = TopKTranscoder(TopKTranscoderConfig(d_in=cfg.d_in, d_out=cfg.d_out, d_sae=cfg.d_sae, k=int(cfg.k), skip=cfg.skip(),  # type: ignore[arg-type]
                                                    dtype=cfg.dtype, device="cpu"))
        for key, value in meta.items():
            setattr(model.cfg.metadata, key, value)
        model.load_state_dict(state, strict=True)
        return model


for _name, _cfg_cls in (("transcoder", TranscoderTrainingSAEConfig), ("skip_transcoder", SkipTranscoderTrainingSAEConfig)):
    if _name not in SAE_TRAINING_CLASS_REGISTRY:  # registering twice is an error in sae-lens
        register_sae_training_class(_name, TranscoderTrainingSAE, _cfg_cls)
