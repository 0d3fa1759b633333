"""Diffusion models: the intermediate features of denoisers (UNets, DiTs) over image corpora, at
chosen noise levels.

A context is one (image, timestep) pair: for each image that decodes, one context per timestep
of ``diffusion.timesteps``, image-major (image 0 at every timestep, then image 1, ...). The token
table keeps the image columns of :mod:`pipeline.vision` and adds ``timestep``:

- ``doc_id``: the image id (so one image's rows can be selected at every noise level);
- ``token_id`` / ``doc_position``: the spatial position, row-major (a DiT's latent patch, a
  UNet map's pixel on its grid); ``special``: False; ``timestep``: the context's timestep.

The input of a context is the image, preprocessed (RGB, the shorter side resized to
``image.size`` (bicubic), centre-cropped, scaled to [-1, 1]), encoded by the pipeline's VAE when
it has one (the latent distribution's mean, times ``scaling_factor``), then noised at the
context's timestep: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with the scheduler's
``alphas_cumprod`` (what ``scheduler.add_noise`` computes). ``eps`` comes from a counter-based
seed of ``(noise_seed, image id, timestep)`` (:func:`noise_seed_of`, a CPU ``torch.Generator``),
so a unit recomputed on any worker is identical.

Models: a diffusers pipeline folder (``model_index.json`` naming the denoiser, VAE, scheduler
and any text encoder and tokenizer) or a hub id of one. Denoisers: ``UNet2DModel`` (pixel
space, or latent with a VAE), ``UNet2DConditionModel`` (with its text encoder when
``prompt_field`` is set; an explicit ``prompt`` otherwise, ``""`` for the empty prompt) and
``DiTTransformer2DModel`` (class-conditional: ``class_field``, or the null class) and the SD3
MMDiT ``SD3Transformer2DModel`` (a StableDiffusion3Pipeline folder, kind ``mmdit``).

An MMDiT is flow matching (``FlowMatchEulerDiscreteScheduler``): a timestep ``t`` of the spec is
one of the scheduler's ``num_train_timesteps`` training steps, ``1 .. N`` (``N``: pure noise); it
noises with ``x_t = (1 - sigma) x_0 + sigma eps``, ``sigma = scheduler.sigmas[N - t]`` (shifted
by the scheduler's ``shift``), and the transformer is given ``scheduler.timesteps[N - t]``
(``sigma * N``), which is what ``scheduler.scale_noise`` and the pipeline do. Its prompt
(``prompt_field`` or an explicit ``prompt``; required, as for a text-conditioned UNet) is encoded
by ``StableDiffusion3Pipeline.encode_prompt`` itself (two CLIP encoders and the T5 encoder;
``encoder_hidden_states`` and ``pooled_projections``), without classifier-free guidance.
``blocks.{l}.hook_resid_post`` is the image stream (``hidden_states``) that joint block ``l``
returns, over the latent patch tokens; the context stream (the prompt's tokens) has other rows
and is not a hook.

Hooks: for a DiT, ``blocks.{l}.hook_resid_post`` (the output of transformer block ``l``) over the
latent patch tokens; for a UNet, ``down_blocks.{i}``, ``mid_block`` and ``up_blocks.{i}`` (each
block's output map, ``[C, h, w]``, one row per position). UNet maps differ in size: the hooks of
one spec must share one resolution, or ``diffusion.grid`` names a ``grid x grid`` every map is
resampled to (``torch.nn.functional.interpolate``, bilinear, ``align_corners=False``; recorded).
"""

from __future__ import annotations

import importlib
import io
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image

from strata.pipeline.errors import ModelNotFoundError, SpecError
from strata.pipeline.hooks import match_hooks
from strata.pipeline.modules import is_module_hook, module_hook_name, module_input, module_tensor, parse_module_hook, resolve_module_path
from strata.pipeline.vision import ImageContexts, ImageLayout, ImagePacker

INDEX = "model_index.json"
UNET_KINDS = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet_cond"}
TRANSFORMER_KINDS = {"DiTTransformer2DModel": "dit", "Transformer2DModel": "dit", "SD3Transformer2DModel": "mmdit"}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
MMDIT_TEXT = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
DENOISER_SLOTS = ("transformer", "unet")
MMDIT_MAX_SEQ = 256  # StableDiffusion3Pipeline's default T5 length (capped by tokenizer_3.model_max_length)
RESAMPLE = {"mode": "bilinear", "align_corners": False, "antialias": False, "function": "torch.nn.functional.interpolate"}


def is_pipeline(folder: str) -> bool:
    """A diffusers pipeline folder (it holds ``model_index.json``)."""
    return os.path.isfile(os.path.join(folder, INDEX))


def noise_seed_of(noise_seed: int, doc_id: int, timestep: int) -> int:
    """The seed of one context's noise: a hash of ``(noise_seed, image id, timestep)`` (63 bits)."""
    return xxhash.xxh64_intdigest(f"{int(noise_seed)}:{int(doc_id)}:{int(timestep)}".encode()) & ((1 << 63) - 1)


def context_noise(noise_seed: int, doc_id: int, timestep: int, shape: tuple[int, ...]) -> Any:
    """One context's noise ``eps`` (float32, CPU): the same on every worker."""
    import torch  # lazy: torch imports in ~2 s; only workers and tests draw noise

    g = torch.Generator(device="cpu").manual_seed(noise_seed_of(noise_seed, doc_id, timestep))
    return torch.randn(shape, generator=g, dtype=torch.float32)


# -- the model ------------------------------------------------------------------------------------


def read_index(folder: str, *, model: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {model!r}: cannot read its {INDEX}: {e}") from None


def _component(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    v = index.get(name)
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] and v[1]:
        return str(v[0]), str(v[1])
    return None


def _load_config(folder: str, sub: str, *, model: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, sub, "config.json" if sub != "scheduler" else "scheduler_config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {model!r}: cannot read the config of its {sub!r}: {e}") from None


@dataclass(frozen=True)
class DiffusionPrep:
    """A diffusion extraction, resolved before anything runs (shipped to every worker)."""

    kind: str  # "unet" | "unet_cond" | "dit" | "mmdit"
    denoiser: str  # the pipeline's slot: "unet" | "transformer"
    denoiser_class: str
    components: dict[str, list[str]]  # slot -> [library, class] of what the workers load
    hooks: list[str]
    widths: dict[str, int]
    maps: dict[str, list[int]]  # every hook of the model -> its native [h, w] (a DiT's latent patch grid for every hook)
    grid: tuple[int, int]  # rows of a context: the common native size, or diffusion.grid
    resample: bool
    size: int  # image side in pixels
    latent: bool  # a VAE encodes the images
    scaling_factor: float
    shift_factor: float
    timesteps: list[int]
    noise_seed: int
    num_train_timesteps: int
    prompt: str | None
    prompt_field: str | None
    class_field: str | None
    null_class: int | None
    n_layers: int
    d_model: int
    model_id: str = ""
    module_paths: dict[str, list[str]] = field(default_factory=dict)  # module:PATH hooks -> [resolved path, "input" | "output"]

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout(0, 0, self.grid)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def conditional(self) -> bool:
        return self.kind in ("unet_cond", "mmdit")

    def module_of(self, hook: str) -> str:
        """The module whose output (or input) ``hook`` is, in the pipeline."""
        io = self.module_paths[hook][1] if hook in self.module_paths else "output"
        return f"{self.denoiser}.{_module_path(self, hook)} ({io})"

    def meaning_of(self, hook: str) -> str:
        if hook in self.module_paths:
            h, w = self.maps[hook]
            path, io = self.module_paths[hook]
            return (f"the {io} of module {self.denoiser}.{path} (module:PATH), {h}x{w} positions"
                    + (f", resampled to {self.grid[0]}x{self.grid[1]}, bilinear" if self.resample else ""))
        if self.kind == "dit":
            return f"the residual stream after transformer block {hook.split('.')[1]}, per latent patch"
        if self.kind == "mmdit":
            return f"the image stream (hidden_states) after joint transformer block {hook.split('.')[1]}, per latent patch"
        h, w = self.maps[hook]
        return f"the output map of {hook} ({h}x{w}" + (f", resampled to {self.grid[0]}x{self.grid[1]}, bilinear)" if self.resample else ")")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "denoiser": self.denoiser, "denoiser_class": self.denoiser_class, "components": self.components,
            "timesteps": self.timesteps, "noise_seed": self.noise_seed, "num_train_timesteps": self.num_train_timesteps,
            "noise": "x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps; eps ~ N(0, 1) from "
                     "torch.Generator('cpu').manual_seed(xxh64('{noise_seed}:{doc_id}:{timestep}') & (2**63 - 1))",
            "preprocess": {"convert": "RGB", "resize": "shorter side to size, bicubic", "crop": "center", "size": self.size,
                           "range": [-1, 1]},
            **({"noise": "x_t = (1 - sigma) * x0 + sigma * eps; sigma = scheduler.sigmas[num_train_timesteps - timestep] (flow matching, "
                         "as scheduler.scale_noise); the transformer's timestep: scheduler.timesteps[num_train_timesteps - timestep]; eps "
                         "~ N(0, 1) from torch.Generator('cpu').manual_seed(xxh64('{noise_seed}:{doc_id}:{timestep}') & (2**63 - 1))",
                "text": {"encode": "StableDiffusion3Pipeline.encode_prompt", "classifier_free_guidance": False,
                         "max_sequence_length": MMDIT_MAX_SEQ, "t5": "text_encoder_3" in self.components,
                         "without_t5": "zeros in the T5 rows (what encode_prompt does without text_encoder_3)"}}
               if self.kind == "mmdit" else {}),
            "latent": self.latent, "vae": {"latents": "latent_dist.mean", "scaling_factor": self.scaling_factor,
                                           "shift_factor": self.shift_factor} if self.latent else None,
            "prompt": self.prompt, "prompt_field": self.prompt_field, "class_field": self.class_field, "null_class": self.null_class,
            "grid": list(self.grid), "maps": self.maps, "resample": RESAMPLE if self.resample else None,
            "token_ids": {"positions": f"0..{self.tokens - 1}, row-major on the {self.grid[0]}x{self.grid[1]} grid"},
        }

    @property
    def fingerprint(self) -> str:
        """What the activations depend on beyond the model and corpus (a dataset's identity)."""
        d = self.to_dict()
        d.pop("components")
        d["maps"] = {h: v for h, v in d["maps"].items() if h not in self.module_paths}  # hooks asked for are not the identity
        blob = json.dumps(d, sort_keys=True, default=str)
        return f"diffusion-xxh3_128:{xxhash.xxh3_128_hexdigest(blob.encode())}"


def _unet_maps(cfg: dict[str, Any], side: int) -> dict[str, tuple[int, list[int]]]:
    """Width and ``[h, w]`` of each UNet hook for a ``side x side`` input: down block ``i``
    downsamples unless it is the last one, up block ``i`` upsamples unless it is the last one."""
    ch = list(cfg["block_out_channels"])
    n = len(ch)
    out: dict[str, tuple[int, list[int]]] = {}
    for i in range(n):
        s = side // 2 ** min(i + 1, n - 1)
        out[f"down_blocks.{i}"] = (ch[i], [s, s])
    s = side // 2 ** (n - 1)
    out["mid_block"] = (ch[-1], [s, s])
    for i, c in enumerate(reversed(ch)):
        s = side // 2 ** max(n - 2 - i, 0)
        out[f"up_blocks.{i}"] = (c, [s, s])
    return out


def prepare_diffusion(spec: Any, folder: str, *, model: str) -> DiffusionPrep:
    """Resolve a diffusion extraction and check its input: a one-line :class:`SpecError` for a
    model that is not a denoiser, a timestep outside the scheduler's range, UNet hooks of mixed
    resolutions without ``grid``, a conditional model without a prompt source. Loads no weights."""
    d = spec.diffusion
    if not is_pipeline(folder):
        raise SpecError(f"`diffusion` is for diffusers pipelines; model {model!r} has no {INDEX} (it is not a denoiser): give a "
                        "pipeline folder or hub id with a unet or transformer (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, "
                        "SD3Transformer2DModel)")
    index = read_index(folder, model=model)
    slot = next((s for s in DENOISER_SLOTS if _component(index, s) is not None), None)
    comp = _component(index, slot) if slot else None
    kinds = {**UNET_KINDS, **TRANSFORMER_KINDS}
    if comp is None or comp[1] not in kinds:
        what = f"its {slot} is {comp[1]}" if comp else f"its {INDEX} names no unet or transformer"
        raise SpecError(f"model {model!r} is not a denoiser Strata reads ({what}); valid: {', '.join(kinds)}")
    if d is None:
        raise SpecError(f"model {model!r} is a diffusion pipeline ({comp[1]}): add a `diffusion` section with its `timesteps` "
                        "(e.g. `diffusion: {timesteps: [100, 500], noise_seed: 0}`)")
    if not spec.corpus.is_images:
        raise SpecError(f"model {model!r} is a diffusion model and `corpus` is a text corpus: give an image corpus "
                        "(`corpus.format: images` for a folder, or `corpus.image_field` for parquet / hf)")
    kind = kinds[comp[1]]
    cfg = _load_config(folder, slot, model=model)
    sched_c = _component(index, "scheduler")
    if sched_c is None:
        raise SpecError(f"model {model!r}: its {INDEX} names no scheduler (the noise levels come from it)")
    sched = _load_config(folder, "scheduler", model=model)
    n_train = int(sched.get("num_train_timesteps", 1000))
    flow = sched_c[1] == FLOW_SCHEDULER
    if kind == "mmdit" and not flow:
        raise SpecError(f"model {model!r}: its {comp[1]} has the scheduler {sched_c[1]}; Strata reads an MMDiT with the flow-matching "
                        f"{FLOW_SCHEDULER} only")
    lo, hi = (1, n_train) if flow else (0, n_train - 1)
    bad = [t for t in d.timesteps if not lo <= t <= hi]
    if bad:
        raise SpecError(f"`diffusion.timesteps` {bad} are outside the range of the scheduler of {model!r} ({sched_c[1]}): "
                        f"integers {lo}..{hi}" + (f" (flow matching: training step t has sigma = sigmas[{n_train} - t])" if flow else ""))
    if kind != "mmdit" and (flow or sched.get("prediction_type") == "flow" or "shift" in sched and "beta_schedule" not in sched):
        raise SpecError(f"model {model!r}: its scheduler {sched_c[1]} is flow matching; Strata noises with a DDPM-style "
                        "alphas_cumprod schedule only")
    vae_c = _component(index, "vae")
    vae_cfg = _load_config(folder, "vae", model=model) if vae_c else None
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1) if vae_cfg else 1
    sample = cfg.get("sample_size") or 32
    sample = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    size = spec.image.size or sample * vae_scale
    if size % vae_scale:
        raise SpecError(f"`image.size` {size} does not fit model {model!r}: its VAE downsamples by {vae_scale}, so sizes must be multiples of it")
    side = size // vae_scale
    if kind in ("dit", "mmdit"):
        if kind == "dit" and (cfg.get("cross_attention_dim") or cfg.get("caption_channels")):
            raise SpecError(f"model {model!r}: its {comp[1]} is text-conditioned (PixArt-style); Strata reads class-conditional "
                            "DiTs (DiTTransformer2DModel, or Transformer2DModel without cross-attention)")
        patch = int(cfg.get("patch_size") or 2)
        if side % patch:
            raise SpecError(f"`image.size` {size} does not fit model {model!r}: its latent side {side} is not a multiple of the patch size {patch}")
        n_layers = int(cfg.get("num_layers", 1))
        width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        g = side // patch
        sites = {f"blocks.{i}.hook_resid_post": (width, [g, g]) for i in range(n_layers)}
    else:
        if side % 2 ** (len(cfg["block_out_channels"]) - 1):
            raise SpecError(f"`image.size` {size} does not fit model {model!r}: its UNet input side {side} must divide by "
                            f"{2 ** (len(cfg['block_out_channels']) - 1)}")
        sites = _unet_maps(cfg, side)
        n_layers = len(cfg["block_out_channels"])
        width = int(cfg["block_out_channels"][-1])
    canonical = [h for h in spec.hooks if not is_module_hook(h)]
    hooks = match_hooks(canonical, list(sites), error=lambda p: SpecError(
        f"unknown hook {p!r} for diffusion model {model!r} ({comp[1]}); valid hooks: {', '.join(sites)}")) if canonical else []
    module_paths: dict[str, list[str]] = {}
    if len(canonical) < len(spec.hooks):
        found = probe_modules_meta(folder, slot, comp[1], cfg, kind, side, [h for h in spec.hooks if is_module_hook(h)], model=model)
        for name, (width, hw, path, io) in found.items():
            sites[name] = (width, hw)
            module_paths[name] = [path, io]
            if name not in hooks:
                hooks.append(name)
    maps = {h: sites[h][1] for h in sites}  # every hook's, so that the record (and identity) does not depend on the hooks asked
    sizes = {tuple(maps[h]) for h in hooks}
    if d.grid is not None:
        grid, resample = (int(d.grid), int(d.grid)), True
    elif len(sizes) > 1:
        by = ", ".join(f"{h}: {maps[h][0]}x{maps[h][1]}" for h in hooks)
        raise SpecError(f"hooks of model {model!r} have maps of different sizes ({by}): ask for hooks of one resolution, or set "
                        "`diffusion.grid` (every map is resampled to grid x grid, bilinear)")
    else:
        grid, resample = next(iter(sizes)), False  # type: ignore[assignment]
    null_class = None
    if kind == "dit":
        null_class = int(cfg.get("num_embeds_ada_norm") or 1000)
    if kind not in ("unet_cond", "mmdit") and (d.prompt is not None or d.prompt_field is not None):
        raise SpecError(f"`diffusion.prompt` / `prompt_field` are for text-conditioned models; model {model!r} ({comp[1]}) takes none")
    if kind != "dit" and d.class_field is not None:
        raise SpecError(f"`diffusion.class_field` is for class-conditional DiTs; model {model!r} is a {comp[1]}")
    if kind in ("unet_cond", "mmdit"):
        if d.prompt is None and d.prompt_field is None:
            raise SpecError(f"model {model!r} is text-conditioned ({comp[1]}): set `diffusion.prompt_field` (a corpus field holding "
                            "each image's prompt) or an explicit `diffusion.prompt` (\"\" for the empty prompt)")
        need = MMDIT_TEXT[:4] if kind == "mmdit" else ("text_encoder", "tokenizer")
        missing = [n for n in need if _component(index, n) is None]
        if missing:
            raise SpecError(f"model {model!r} is text-conditioned but its {INDEX} names no {', '.join(missing)}: Strata conditions it "
                            f"with its own text encoders only ({', '.join(need)})")
    c = spec.corpus
    for what, f in (("prompt_field", d.prompt_field), ("class_field", d.class_field)):
        if f is not None and f != c.caption_field and f not in c.keep_fields:
            raise SpecError(f"`diffusion.{what}` {f!r} must be the corpus's `caption_field` or one of its `keep_fields` "
                            f"(they are {[c.caption_field, *c.keep_fields]})")
    comps = {s: list(_component(index, s)) for s in (slot, "vae", "scheduler", "text_encoder", "tokenizer")  # type: ignore[misc, arg-type]
             if _component(index, s) is not None and (s not in ("text_encoder", "tokenizer") or kind == "unet_cond")}
    if kind == "mmdit":
        comps.update({s: list(_component(index, s)) for s in MMDIT_TEXT if _component(index, s) is not None})  # type: ignore[arg-type]
    vcfg = vae_cfg or {}
    return DiffusionPrep(
        kind=kind, denoiser=slot, denoiser_class=comp[1], components=comps, hooks=hooks, widths={h: sites[h][0] for h in hooks},  # type: ignore[arg-type]
        maps=maps, grid=grid, resample=resample, size=size, latent=vae_c is not None,
        scaling_factor=float(vcfg.get("scaling_factor") or 1.0), shift_factor=float(vcfg.get("shift_factor") or 0.0),
        timesteps=[int(t) for t in d.timesteps], noise_seed=int(d.noise_seed), num_train_timesteps=n_train, prompt=d.prompt,
        prompt_field=d.prompt_field, class_field=d.class_field, null_class=null_class, n_layers=n_layers, d_model=width, model_id=model,
        module_paths=module_paths,
    )


def probe_modules_meta(folder: str, slot: str, cls_name: str, cfg: dict[str, Any], kind: str, side: int, names: list[str], *,
                       model: str) -> dict[str, tuple[int, list[int], str, str]]:
    """``module:PATH`` hooks of a denoiser: each path resolved in the denoiser, and the shape of
    what it sees from one forward on PyTorch's ``meta`` device (no weights loaded, no compute).
    Returns ``{hook name: (width, [h, w], resolved path, io)}``: a map ``[B, C, h, w]`` has width
    ``C``; tokens ``[B, N, D]`` must form a square grid (``N = g * g``, row-major)."""
    import diffusers  # lazy: diffusers imports in seconds; only a module:PATH hook of a diffusion model needs it here
    import torch  # lazy: as above

    klass = getattr(diffusers, cls_name)
    with torch.device("meta"):
        net = klass.from_config(cfg)
    wanted: dict[str, tuple[str, str]] = {}
    for name in names:
        path, io = parse_module_hook(name)
        try:
            resolved = resolve_module_path(net, path)
        except Exception as e:
            raise SpecError(f"hook {name!r} of diffusion model {model!r}: {str(e).splitlines()[0]}") from None
        wanted[module_hook_name(resolved, io)] = (resolved, io)
    shapes: dict[str, tuple[int, ...] | None] = {}
    handles = []
    for name, (path, io) in wanted.items():
        mod = net.get_submodule(path)
        if io == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, k, name=name: shapes.__setitem__(name, _shape(module_tensor(module_input(a, k)))), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: shapes.__setitem__(name, _shape(module_tensor(o)))))
    c = int(cfg.get("in_channels", 4))
    x = torch.empty(1, c, side, side, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.inference_mode():
        if kind == "dit":
            net(x, timestep=t, class_labels=torch.zeros(1, dtype=torch.long, device="meta"))
        elif kind == "unet_cond":
            net(x, t, encoder_hidden_states=torch.empty(1, 1, int(cfg["cross_attention_dim"]), device="meta"))
        elif kind == "mmdit":
            net(hidden_states=x, timestep=t.float(), encoder_hidden_states=torch.empty(1, 3, int(cfg["joint_attention_dim"]), device="meta"),
                pooled_projections=torch.empty(1, int(cfg["pooled_projection_dim"]), device="meta"))
        else:
            net(x, t)
    out: dict[str, tuple[int, list[int], str, str]] = {}
    for name, (path, io) in wanted.items():
        shape = shapes.get(name)
        if shape is None:
            raise SpecError(f"hook {name!r} of diffusion model {model!r}: module {path} does not run in the denoiser's forward "
                            "(or passes no tensor)")
        if len(shape) == 4:
            out[name] = (shape[1], [shape[2], shape[3]], path, io)
            continue
        g = int(round(shape[1] ** 0.5)) if len(shape) == 3 else -1
        if kind == "mmdit" and len(shape) == 3 and shape[1] != (side // int(cfg.get("patch_size") or 2)) ** 2:
            raise SpecError(f"hook {name!r} of diffusion model {model!r}: module {path}'s {io} is {list(shape)}, not the image stream's "
                            f"{(side // int(cfg.get('patch_size') or 2)) ** 2} latent patch tokens (a joint block's output leads with the "
                            "context stream, the prompt's tokens; its image stream is blocks.{l}.hook_resid_post)")
        if g < 1 or g * g != shape[1]:
            raise SpecError(f"hook {name!r} of diffusion model {model!r}: module {path}'s {io} is {list(shape)}, neither a map "
                            "[B, C, h, w] nor a square grid of tokens [B, g*g, D]")
        out[name] = (shape[2], [g, g], path, io)
    return out


def _shape(t: Any) -> tuple[int, ...] | None:
    return None if t is None else tuple(int(v) for v in t.shape)


# -- preprocessing ---------------------------------------------------------------------------------


def preprocess_image(data: bytes, size: int) -> np.ndarray:
    """One image as the denoiser's pixels ``[3, size, size]`` float32 in [-1, 1]: RGB, the shorter
    side resized to ``size`` (bicubic), centre-cropped."""
    im = Image.open(io.BytesIO(data))
    im.load()
    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(a.transpose(2, 0, 1))


# -- plan -------------------------------------------------------------------------------------------


@dataclass
class DiffusionContexts(ImageContexts):
    """Contexts of (image, timestep) pairs: the unit's distinct images (``images``, then
    ``pixels``), each context's image (``image_index``) and ``timestep``, and per image its
    prompt and class."""

    image_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    timestep: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prompts: list[str] | None = None
    classes: np.ndarray | None = None

    def slice(self, lo: int, hi: int) -> DiffusionContexts:
        base = ImageContexts.slice(self, lo, hi)
        return DiffusionContexts(*(getattr(base, f) for f in _BASE_FIELDS), images=self.images, pixels=self.pixels,
                                 image_index=self.image_index[lo:hi], timestep=self.timestep[lo:hi], image_ids=self.image_ids,
                                 prompts=self.prompts, classes=self.classes)

    def token_table(self, first_context: int) -> pa.Table:
        t = super().token_table(first_context)
        s = self.token_id.shape[1]
        return t.append_column("timestep", pa.array(np.repeat(self.timestep.astype(np.int32), s), pa.int32()))


_BASE_FIELDS = tuple(f.name for f in fields(ImageContexts) if f.name not in ("images", "pixels"))


class DiffusionPacker(ImagePacker):
    """The plan of a diffusion extraction: context ``c`` is kept image ``c // T`` at timestep
    ``timesteps[c % T]``."""

    packing = "diffusion"

    def __init__(self, source: Any, doc_ids: np.ndarray, kept: np.ndarray, prep: DiffusionPrep,
                 prompts: list[str] | None = None, classes: np.ndarray | None = None) -> None:
        super().__init__(source, doc_ids, kept, prep.layout)
        self.timesteps = np.asarray(prep.timesteps, np.int64)
        self.prompts = prompts  # per corpus image
        self.classes = classes  # per corpus image

    def __len__(self) -> int:
        return len(self.kept) * len(self.timesteps)

    def first_context_of_doc(self, n: int) -> int:
        return int(np.searchsorted(self.kept, n)) * len(self.timesteps)

    def contexts(self, lo: int, hi: int, *, images: bool = True) -> DiffusionContexts:
        T = len(self.timesteps)
        hi = min(hi, len(self))
        n, t = max(0, hi - lo), self.context_size
        c = np.arange(lo, lo + n, dtype=np.int64)
        img = c // T
        first = int(img[0]) if n else 0
        uniq = np.arange(first, int(img[-1]) + 1 if n else first, dtype=np.int64)
        pos = self.kept[uniq]
        ids = self.all_ids[pos]
        neg = np.full((n, t), -1, np.int32)
        return DiffusionContexts(
            token_id=np.tile(self._tid, (n, 1)), doc_id=np.repeat(self.all_ids[self.kept[img]], t).reshape(n, t),
            doc_position=np.tile(self._dpos, (n, 1)), special=np.tile(self._special, (n, 1)), mask=np.ones((n, t), bool),
            char_start=neg, char_end=neg.copy(), images=self.source.read(pos) if images else [],
            image_index=img - first, timestep=self.timesteps[c % T], image_ids=ids,
            prompts=None if self.prompts is None else [self.prompts[int(i)] for i in pos],
            classes=None if self.classes is None else np.asarray(self.classes, np.int64)[pos],
        )

    def document_index(self, fields: dict[str, pa.Array] | None = None) -> tuple[pa.Table, int, int, int]:
        n, t, T = len(self.all_ids), self.context_size, len(self.timesteps)
        start = np.full(n, -1, np.int64)
        start[self.kept] = np.arange(len(self.kept), dtype=np.int64) * t * T
        end = np.where(start >= 0, start + t * T, -1)
        dropped = np.where(start >= 0, 0, t * T).astype(np.int64)
        table = pa.table({"doc_id": self.all_ids, "row_start": start, "row_end": end, "dropped_tokens": dropped})
        for name, values in (fields or {}).items():
            table = table.append_column(name, values)
        return table, int(dropped.sum()), n - len(self.kept), 0


def conditioning(prep: DiffusionPrep, fields: dict[str, pa.Array], *, corpus: str) -> tuple[list[str] | None, np.ndarray | None]:
    """Per corpus image: its prompt (``prompt_field``) and class (``class_field``), checked."""
    prompts = classes = None
    if prep.prompt_field is not None:
        col = fields["caption" if prep.prompt_field not in fields else prep.prompt_field].to_pylist()
        prompts = ["" if v is None else str(v) for v in col]
    if prep.class_field is not None:
        col = fields[prep.class_field].to_pylist()
        assert prep.null_class is not None
        bad = [v for v in col if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < prep.null_class)]
        if bad:
            raise SpecError(f"corpus {corpus!r}: `diffusion.class_field` {prep.class_field!r} holds {bad[0]!r}; classes are integers "
                            f"0..{prep.null_class - 1} (null: the null class {prep.null_class})")
        classes = np.array([prep.null_class if v is None else int(v) for v in col], np.int64)
    return prompts, classes


# -- the worker's side -------------------------------------------------------------------------------


def _load(folder: str, sub: str, lib: str, cls: str, dtype: Any, *, model: str) -> Any:
    try:
        mod = importlib.import_module(lib)
        klass = getattr(mod, cls)
    except (ImportError, AttributeError):
        raise ModelNotFoundError(f"model {model!r}: its {sub} is {lib}.{cls}, which this installation does not have") from None
    kw: dict[str, Any] = {"subfolder": sub}
    if lib in ("diffusers", "transformers") and hasattr(klass, "forward"):
        kw["torch_dtype" if lib == "diffusers" else "dtype"] = dtype
    return klass.from_pretrained(folder, **kw)


class DiffusionRunner:
    """A worker's denoiser (with its VAE and text encoder): computes a unit's activations."""

    def __init__(self, folder: str, prep: DiffusionPrep, device: Any, torch_dtype: str = "float32") -> None:
        import torch  # lazy: torch imports in ~2 s; only workers run models

        self.torch = torch
        self.prep = prep
        self.device = device
        self.dtype = getattr(torch, torch_dtype)
        c = prep.components
        m = prep.model_id or folder
        self.denoiser = _load(folder, prep.denoiser, *c[prep.denoiser], self.dtype, model=m).to(device).eval().requires_grad_(False)
        self.vae = _load(folder, "vae", *c["vae"], self.dtype, model=m).to(device).eval().requires_grad_(False) if prep.latent else None
        sched = _load(folder, "scheduler", *c["scheduler"], None, model=m)
        self.scheduler = sched
        ac = getattr(sched, "alphas_cumprod", None)
        if prep.kind == "mmdit":  # flow matching: sigmas and the transformer's timesteps of the training steps (see the module doc)
            self.sigmas = torch.as_tensor(sched.sigmas, dtype=torch.float32).cpu()
            self.model_timesteps = torch.as_tensor(sched.timesteps, dtype=torch.float32).cpu()
            ac = self.sigmas
        if ac is None:
            raise SpecError(f"model {m!r}: its scheduler {c['scheduler'][1]} has no alphas_cumprod (flow matching is not supported)")
        self.alphas_cumprod = torch.as_tensor(ac, dtype=torch.float32)
        self.text_encoder = self.tokenizer = None
        self.sd3: Any = None
        if prep.kind == "mmdit":
            import diffusers  # lazy: as torch above

            text = {s: _load(folder, s, *c[s], self.dtype if s.startswith("text") else None, model=m) for s in MMDIT_TEXT if s in c}
            text = {s: v.to(device).eval().requires_grad_(False) if s.startswith("text") else v for s, v in text.items()}
            self.sd3 = diffusers.StableDiffusion3Pipeline(transformer=self.denoiser, scheduler=sched, vae=self.vae,
                                                          **{s: text.get(s) for s in MMDIT_TEXT})
        if prep.kind == "unet_cond":
            self.tokenizer = _load(folder, "tokenizer", *c["tokenizer"], None, model=m)
            self.text_encoder = _load(folder, "text_encoder", *c["text_encoder"], self.dtype, model=m).to(device).eval().requires_grad_(False)
        self.modules = {h: self.denoiser.get_submodule(_module_path(prep, h)) for h in prep.hooks}
        self.io = {h: prep.module_paths[h][1] if h in prep.module_paths else "output" for h in prep.hooks}

    # -- inputs ---------------------------------------------------------------------------------

    def prepare(self, contexts: DiffusionContexts) -> DiffusionContexts:
        if contexts.pixels is None:
            if any(b is None for b in contexts.images):
                raise RuntimeError("an image can no longer be read from the corpus (it decoded while planning): did the corpus change?")
            contexts.pixels = np.stack([preprocess_image(b, self.prep.size) for b in contexts.images]) if contexts.images else (
                np.zeros((0, 3, self.prep.size, self.prep.size), np.float32))
            contexts.images = []
        return contexts

    def encode(self, pixels: Any) -> Any:
        """Clean model inputs ``x_0`` of preprocessed images (VAE latents, or the pixels)."""
        if self.vae is None:
            return pixels
        lat = self.vae.encode(pixels).latent_dist.mean
        return (lat - self.prep.shift_factor) * self.prep.scaling_factor

    def noised(self, x0: Any, doc_ids: Any, timesteps: Any) -> Any:
        """``x_t`` of clean inputs ``x0 [n, ...]`` (each with its image id and timestep)."""
        torch = self.torch
        eps = torch.stack([context_noise(self.prep.noise_seed, int(d), int(t), tuple(x0.shape[1:])) for d, t in zip(doc_ids, timesteps)])
        eps = eps.to(x0.device, dtype=x0.dtype)
        if self.prep.kind == "mmdit":
            shape = (-1,) + (1,) * (x0.dim() - 1)
            sigma = self.sigmas[self.prep.num_train_timesteps - torch.as_tensor(np.asarray(timesteps))].to(x0.device, dtype=x0.dtype).reshape(shape)
            return (1.0 - sigma) * x0 + sigma * eps
        ab = self.alphas_cumprod.to(x0.device, dtype=x0.dtype)[torch.as_tensor(np.asarray(timesteps), device=x0.device)]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return ab.sqrt().reshape(shape) * x0 + (1 - ab).sqrt().reshape(shape) * eps

    def prompt_embeds(self, prompts: list[str]) -> Any:
        tok = self.tokenizer
        n = min(int(getattr(tok, "model_max_length", 77) or 77), int(self.text_encoder.config.max_position_embeddings))  # type: ignore[union-attr]
        ids = tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids  # type: ignore[misc]
        return self.text_encoder(ids.to(self.device))[0]  # type: ignore[misc]

    def mmdit_embeds(self, prompts: list[str]) -> tuple[Any, Any]:
        """``(encoder_hidden_states, pooled_projections)`` of prompts, by ``StableDiffusion3Pipeline.encode_prompt``."""
        tok3 = self.sd3.tokenizer_3
        n = min(MMDIT_MAX_SEQ, int(getattr(tok3, "model_max_length", MMDIT_MAX_SEQ) or MMDIT_MAX_SEQ)) if tok3 is not None else MMDIT_MAX_SEQ
        e, _, pooled, _ = self.sd3.encode_prompt(prompts, None, None, device=self.device, do_classifier_free_guidance=False, max_sequence_length=n)
        return e, pooled

    def forward(self, x_t: Any, timesteps: Any, *, classes: Any = None, embeds: Any = None, pooled: Any = None) -> Any:
        """The denoiser's forward on noised inputs (what direct use of diffusers calls)."""
        if self.prep.kind == "mmdit":
            mt = self.model_timesteps[self.prep.num_train_timesteps - self.torch.as_tensor(np.asarray(timesteps))].to(x_t.device, dtype=x_t.dtype)
            return self.denoiser(hidden_states=x_t, timestep=mt, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        t = self.torch.as_tensor(np.asarray(timesteps), device=x_t.device)
        if self.prep.kind == "dit":
            return self.denoiser(x_t, timestep=t, class_labels=classes, return_dict=False)[0]
        if self.prep.kind == "unet_cond":
            return self.denoiser(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]
        return self.denoiser(x_t, t, return_dict=False)[0]

    # -- a unit -----------------------------------------------------------------------------------

    def compute(self, contexts: DiffusionContexts, hooks: list[str], *, batch_tokens: int, out_dtype: Any, pin: bool = False) -> dict[str, Any]:
        """Activations ``{hook: [rows, d]}`` of a unit, on the host, in ``out_dtype``."""
        torch = self.torch
        prep = self.prep
        contexts = self.prepare(contexts)
        n, s = contexts.token_id.shape
        bufs = {h: torch.empty((n * s, prep.widths[h]), dtype=out_dtype, pin_memory=pin) for h in hooks}
        per_batch = max(1, batch_tokens // s)
        state = {"r0": 0, "r1": 0}
        grid = prep.grid

        def store(h: str, x: Any) -> None:
            if x.dim() == 3 and prep.resample:  # square tokens [B, g*g, D] (a module:PATH hook) as a map, to resample
                g = prep.maps[h][0]
                x = x.reshape(x.shape[0], g, g, x.shape[2]).permute(0, 3, 1, 2)
            if x.dim() == 4:  # a UNet map [B, C, h, w]
                if prep.resample:
                    x = torch.nn.functional.interpolate(x, size=grid, mode="bilinear", align_corners=False)
                x = x.permute(0, 2, 3, 1)
            bufs[h][state["r0"] : state["r1"]].copy_(x.reshape(-1, x.shape[-1]))

        def make(h: str) -> Any:
            if self.io[h] == "input":
                return self.modules[h].register_forward_pre_hook(lambda m, a, k: store(h, module_tensor(module_input(a, k))), with_kwargs=True)
            if prep.kind == "mmdit" and h not in prep.module_paths:  # a joint block returns (context stream, image stream)
                return self.modules[h].register_forward_hook(lambda m, a, o: store(h, o[1]))
            return self.modules[h].register_forward_hook(lambda m, a, o: store(h, module_tensor(o)))

        handles = [make(h) for h in hooks]
        try:
            with torch.inference_mode():
                px = torch.from_numpy(contexts.pixels).to(self.device, dtype=self.dtype)  # type: ignore[arg-type]
                x0 = torch.cat([self.encode(px[i : i + per_batch]) for i in range(0, len(px), per_batch)]) if len(px) else px
                emb_all = pooled_all = None
                if prep.conditional:
                    prompts = contexts.prompts if contexts.prompts is not None else [prep.prompt or ""] * len(contexts.image_ids)
                    uniq = sorted(set(prompts))
                    at = [uniq.index(p) for p in prompts]
                    if prep.kind == "mmdit":
                        e, pe = self.mmdit_embeds(uniq)
                        pooled_all = pe[torch.as_tensor(at, device=pe.device)]
                    else:
                        e = self.prompt_embeds(uniq)
                    emb_all = e[torch.as_tensor(at, device=e.device)]
                img = contexts.image_index
                for c0 in range(0, n, per_batch):
                    c1 = min(n, c0 + per_batch)
                    state["r0"], state["r1"] = c0 * s, c1 * s
                    sel = torch.as_tensor(img[c0:c1], device=self.device)
                    x_t = self.noised(x0[sel], contexts.image_ids[img[c0:c1]], contexts.timestep[c0:c1])
                    classes = None
                    if prep.kind == "dit":
                        cl = contexts.classes[img[c0:c1]] if contexts.classes is not None else np.full(c1 - c0, prep.null_class)
                        classes = torch.as_tensor(cl, device=self.device)
                    self.forward(x_t, contexts.timestep[c0:c1], classes=classes, embeds=None if emb_all is None else emb_all[sel],
                                 pooled=None if pooled_all is None else pooled_all[sel])
        finally:
            for hd in handles:
                hd.remove()
        return bufs


def _module_path(prep: DiffusionPrep, hook: str) -> str:
    if hook in prep.module_paths:
        return prep.module_paths[hook][0]
    if hook.startswith("blocks."):
        return f"transformer_blocks.{hook.split('.')[1]}"
    return hook
