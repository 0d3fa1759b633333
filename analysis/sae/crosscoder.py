"""The crosscoder as a sae-lens training architecture (``architecture: crosscoder``).

One dictionary over ``n_sources`` aligned activation sources (layers of one model, or one hook
of several models over one corpus): per-source encoder and decoder weights, shared latents::

    f     = act(sum_s x_s @ W_enc[s] + b_enc)      W_enc (n_sources, d_in, d_sae), b_enc (d_sae,)
    x̂_s   = f @ W_dec[s] + b_dec[s]                W_dec (n_sources, d_sae, d_in), b_dec (n_sources, d_in)

(the shapes of dictionary_learning's ``CrossCoder``). The trainer sees one tensor per step, the
sources concatenated ``[x_1 | ... | x_n]`` (``n_sources * d_in`` wide), which
:meth:`CrossCoderTrainingSAE.training_forward_pass` splits; the loss is the squared error summed
over every source's dimensions, averaged over the batch (sae-lens's ``mse_loss`` convention), plus:

- ``activation: topk`` (``k`` latents per token) or ``batchtopk`` (``k`` per token on average over
  the batch; the threshold used at inference is learned as sae-lens's BatchTopK learns it): with
  sae-lens's TopK auxiliary loss on dead latents (``aux_loss_coefficient``);
- ``activation: relu`` with ``sparsity: decoder_norm``: Lindsey et al. (2024)'s L1 weighted by
  the decoder norms, ``l1_coefficient * sum_i f_i * sum_s ||W_dec[s, i]||``.

Registered in sae-lens's training registry under ``crosscoder`` when this module is imported
(:mod:`strata.analysis.sae.config` does). It imports nothing of the SAE job (no cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.sae import SAEConfig, TrainCoefficientConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from torch import nn

from strata.store.saes.crosscoder import CrossCoder

ARCHITECTURE = "crosscoder"


@dataclass
class CrossCoderTrainingSAEConfig(TrainingSAEConfig):
    """Options of ``architecture: crosscoder`` (``sae:`` in the spec). ``d_in`` is one source's
    width, ``n_sources`` the number of sources (both set by Strata from ``sources``)."""

    n_sources: int = 2
    activation: Literal["topk", "batchtopk", "relu"] = "topk"
    k: float | None = None
    """Latents per token (``topk``: an integer) or per token on average over a batch (``batchtopk``)."""
    sparsity: Literal["none", "decoder_norm"] = "none"
    """``decoder_norm``: add Lindsey et al.'s decoder-norm-weighted L1 (required with ``relu``)."""
    l1_coefficient: float = 0.0
    l1_warm_up_steps: int = 0
    aux_loss_coefficient: float = 1.0 / 32
    """Weight of sae-lens's TopK auxiliary loss (dead latents predict the residual); topk/batchtopk only."""
    topk_threshold_lr: float = 0.01
    """``batchtopk``: the rate of the threshold's moving average of the smallest kept activation."""
    apply_b_dec_to_input: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def get_inference_config_class(self) -> type[SAEConfig]:
        # No sae-lens inference class: Strata's own (store.saes.crosscoder) reads the saved folder.
        return type(self)


def check_options(opts: dict[str, Any]) -> None:
    """Refuse option combinations that make no crosscoder (ValueError, one line naming the key)."""
    act = opts.get("activation", "topk")
    if act in ("topk", "batchtopk"):
        k = opts.get("k")
        if k is None:
            raise ValueError(f"`sae.k` is required with `sae.activation: {act}` (latents per token)")
        if act == "topk" and float(k) != int(k):
            raise ValueError(f"`sae.k` must be a whole number with `sae.activation: topk`, got {k}")
    elif opts.get("k") is not None:
        raise ValueError("`sae.k` is given but `sae.activation` is relu: use `topk` or `batchtopk`, or leave `k` out")
    if act == "relu" and opts.get("sparsity", "none") != "decoder_norm":
        raise ValueError("`sae.activation: relu` needs `sae.sparsity: decoder_norm` and a positive `sae.l1_coefficient`")
    if opts.get("sparsity") == "decoder_norm" and not opts.get("l1_coefficient", 0) > 0:
        raise ValueError("`sae.sparsity: decoder_norm` needs a positive `sae.l1_coefficient`")
    if opts.get("normalize_activations", "none") != "none":
        raise ValueError(f"`sae.normalize_activations` {opts['normalize_activations']!r} is not supported for crosscoders: use `none`")
    if opts.get("apply_b_dec_to_input"):
        raise ValueError("`sae.apply_b_dec_to_input` is not a crosscoder option (its decoder biases are per source): leave it out")
    if opts.get("reshape_activations", "none") != "none":
        raise ValueError("`sae.reshape_activations` must be `none` for crosscoders")


class CrossCoderTrainingSAE(TrainingSAE[CrossCoderTrainingSAEConfig]):
    """The training crosscoder (see the module docstring); its input is ``[batch, n_sources * d_in]``."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    topk_threshold: torch.Tensor

    def __init__(self, cfg: CrossCoderTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.double, device=self.W_dec.device))

    def initialize_weights(self) -> None:
        n, d, m = self.cfg.n_sources, self.cfg.d_in, self.cfg.d_sae
        w_dec = torch.empty(n, m, d, dtype=self.dtype, device=self.device)
        for s in range(n):
            nn.init.kaiming_uniform_(w_dec[s])
        if self.cfg.decoder_init_norm is not None:
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * self.cfg.decoder_init_norm
        self.W_dec = nn.Parameter(w_dec)
        # Encoder as the decoder's transpose (dictionary_learning's init_with_transpose).
        self.W_enc = nn.Parameter(w_dec.transpose(1, 2).clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=self.dtype, device=self.device))
        self.b_dec = nn.Parameter(torch.zeros(n, d, dtype=self.dtype, device=self.device))

    def get_activation_fn(self) -> Any:
        return nn.Identity()  # the activation is applied in encode_with_hidden_pre

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        if self.cfg.sparsity == "decoder_norm":
            return {"l1": TrainCoefficientConfig(value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps)}
        return {}

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_s x_s @ W_enc[s] + b_enc`` of concatenated ``x`` ``[batch, n_sources * d_in]``."""
        return x.to(self.dtype) @ self.W_enc.reshape(-1, self.cfg.d_sae) + self.b_enc

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.hidden_pre(x)
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre), pre
        if act == "topk":
            top = pre.topk(int(self.cfg.k), dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values)), pre
        relu = torch.relu(pre)
        flat = relu.flatten()
        top = flat.topk(int(float(self.cfg.k) * pre.shape[0]))
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(pre.shape), pre

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Concatenated reconstruction ``[batch, n_sources * d_in]``."""
        out = torch.einsum("bm,smd->bsd", feature_acts, self.W_dec) + self.b_dec
        return out.reshape(feature_acts.shape[0], -1)

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor, hidden_pre: torch.Tensor,
                           sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if self.cfg.sparsity == "decoder_norm":
            weights = self.W_dec.norm(dim=-1).sum(0)  # sum_s ||W_dec[s, i]||
            losses["l1_loss"] = step_input.coefficients["l1"] * (feature_acts * weights).sum(-1).mean()
        if self.cfg.activation != "relu":
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_loss_coefficient * self._topk_aux_loss(
                step_input.sae_in, sae_out, hidden_pre, step_input.dead_neuron_mask)
        return losses

    def _topk_aux_loss(self, sae_in: torch.Tensor, sae_out: torch.Tensor, hidden_pre: torch.Tensor,
                       dead: torch.Tensor | None) -> torch.Tensor:
        """sae-lens's TopK auxiliary loss (after EleutherAI's sparsify): the top ``k_aux`` dead
        latents reconstruct the residual, ``k_aux`` = half the (concatenated) width."""
        if dead is None or (num_dead := int(dead.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        masked = torch.where(dead[None], hidden_pre, hidden_pre.new_tensor(-torch.inf))
        top = masked.topk(k_aux, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
        recons = torch.einsum("bm,smd->bsd", acts, self.W_dec).reshape(acts.shape[0], -1)
        loss = (recons - residual).pow(2).sum(-1).mean()
        return scale * torch.nan_to_num(loss, nan=0.0)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        out = super().training_forward_pass(step_input)
        if self.cfg.activation == "batchtopk":
            self._update_threshold(out.feature_acts)
            out.metrics["topk_threshold"] = self.topk_threshold
        with torch.no_grad():
            n, d = self.cfg.n_sources, self.cfg.d_in
            err = (out.sae_out - out.sae_in).pow(2).reshape(-1, n, d).sum(-1).mean(0)
            for s in range(n):
                out.metrics[f"mse_source_{s}"] = err[s]
        return out

    @torch.no_grad()
    def _update_threshold(self, acts: torch.Tensor) -> None:
        positive = acts > 0
        if positive.any():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * acts[positive].min().to(self.topk_threshold.dtype)

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        return {"weights/W_dec_norms": self.W_dec.detach().float().norm(dim=-1).sum(0).cpu().numpy()}

    @torch.no_grad()
    def to_inference(self, extra_cfg: dict[str, Any] | None = None) -> CrossCoder:
        """The inference crosscoder (``store.saes.crosscoder.CrossCoder``) on the CPU, with
        ``extra_cfg`` (sources, ...) in its cfg."""
        cfg: dict[str, Any] = {
            "architecture": ARCHITECTURE, "d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae, "n_sources": self.cfg.n_sources,
            "activation": self.cfg.activation, "k": None if self.cfg.k is None else float(self.cfg.k),
            "dtype": "float32", "layout": "dictionary_learning CrossCoder (encoder/decoder weight and bias)",
            **(extra_cfg or {}),
        }
        if self.cfg.activation == "topk":
            cfg["k"] = int(self.cfg.k)  # type: ignore[arg-type]
        if self.cfg.activation == "batchtopk":
            cfg["threshold"] = float(self.topk_threshold.item())
        state = {"encoder.weight": self.W_enc, "encoder.bias": self.b_enc, "decoder.weight": self.W_dec, "decoder.bias": self.b_dec}
        return CrossCoder(cfg, {k: v.detach().float().cpu().clone() for k, v in state.items()}).eval()


if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:  # a module reloaded in one process registers once
    register_sae_training_class(ARCHITECTURE, CrossCoderTrainingSAE, CrossCoderTrainingSAEConfig)
