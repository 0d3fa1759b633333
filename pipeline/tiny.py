"""Tiny, seeded models of each supported family, with a tokenizer trained locally.

Tests, the quickstart and the benchmarks use these so that nothing is downloaded:

    python -m strata.pipeline.tiny ./models/tiny-gpt2 --family gpt2
    python -m strata.pipeline.tiny ./models/bench --family gpt2 --layers 4 --d-model 384
    python -m strata.pipeline.tiny ./models/tiny-vit --family vit           # a vision encoder (32x32 images)
    python -m strata.pipeline.tiny ./data/shapes --images 48                  # captioned synthetic images
    python -m strata.pipeline.tiny ./models/tiny-dit --family dit              # a diffusers pipeline (also unet, unet_cond, mmdit)

The same arguments always give the same weights and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "bert", "mamba", "t5", "mixtral")
VISION_FAMILIES = ("vit", "clip", "siglip", "dinov2", "dinov2_reg")
DIFFUSION_FAMILIES = ("dit", "unet", "unet_cond", "mmdit")

_SUBJECTS = ("the river|a small robot|my neighbour|the old library|every student|the committee|a red fox|the server|our team|"
             "the orchestra|a quiet village|the telescope").split("|")
_VERBS = "watched|built|described|painted|measured|ignored|discovered|repaired|counted|remembered|followed|questioned".split("|")
_OBJECTS = ("the northern lights|a broken bridge|seven green bottles|the last train|an ancient map|the morning news|a strange signal|"
            "the price of bread|a paper boat|the winter storm|two hundred birds|the first chapter").split("|")
_TAILS = ("before dawn|after the rain|without a word|with great care|in the cold|for the third time|near the harbour|during the festival|"
          "at midnight|under the bridge").split("|")


def synthetic_docs(n: int, *, seed: int = 0) -> list[str]:
    """``n`` short documents of simple English sentences, the same for the same seed."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(1, 6)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            if rng.random() < 0.3:
                s += f", and counted {rng.randint(2, 999)} of them"
            sents.append(s[0].upper() + s[1:] + ".")
        docs.append(" ".join(sents))
    return docs


def write_jsonl(path: str | Path, docs: Iterable[str]) -> Path:
    """Write documents as JSON lines with a ``text`` field."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return path


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, family: str = "gpt2"):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast  # lazy: transformers imports in seconds; only building or loading a model needs it

    specials = ["<|endoftext|>", "<|pad|>", "<|bos|>"] if family != "bert" else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(list(texts), trainer=trainer)
    if family == "bert":
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    if family == "gpt2":  # GPT-2 style: one token is BOS, EOS and separator
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_config(family: str, *, layers: int, d_model: int, heads: int, max_positions: int, vocab_size: int):
    import transformers as tf  # lazy: transformers imports in seconds; only building or loading a model needs it

    common = dict(vocab_size=vocab_size)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, n_positions=max_positions, bos_token_id=0, eos_token_id=0, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads, intermediate_size=4 * d_model,
            max_position_embeddings=max_positions, rotary_pct=0.25, **common,
        )
    if family in ("llama", "qwen2"):
        cls = tf.LlamaConfig if family == "llama" else tf.Qwen2Config
        return cls(
            num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            intermediate_size=3 * d_model, max_position_embeddings=max_positions, **common,
        )
    if family == "gemma2":
        return tf.Gemma2Config(
            num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            head_dim=d_model // heads, intermediate_size=3 * d_model, max_position_embeddings=max_positions,
            sliding_window=max_positions, **common,
        )
    if family == "bert":
        return tf.BertConfig(
            num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads, intermediate_size=4 * d_model,
            max_position_embeddings=max_positions, **common,
        )
    if family == "mamba":  # no positions: max_positions is unused
        return tf.MambaConfig(num_hidden_layers=layers, hidden_size=d_model, state_size=8, expand=2, conv_kernel=4, **common)
    if family == "t5":  # T5 v1.1 / Flan-T5 style: gated-GELU MLP, relative position biases (max_positions is unused)
        return tf.T5Config(
            num_layers=layers, num_decoder_layers=layers, d_model=d_model, num_heads=heads, d_kv=d_model // heads, d_ff=3 * d_model,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, **common,
        )
    if family == "mixtral":
        return tf.MixtralConfig(
            num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            intermediate_size=2 * d_model, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=max_positions,
            sliding_window=None, **common,
        )
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def build_tiny(
    folder: str | Path,
    *,
    family: str = "gpt2",
    layers: int = 2,
    d_model: int = 32,
    heads: int = 4,
    max_positions: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
    texts: Iterable[str] | None = None,
) -> Path:
    """Build a seeded model of ``family`` and a tokenizer trained on ``texts`` (synthetic
    documents by default); save both to ``folder`` (Hugging Face layout) and return it."""
    import torch  # lazy: torch imports in ~2 s; only building or loading a model needs it
    import transformers as tf  # lazy: transformers imports in seconds; only building or loading a model needs it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts if texts is not None else synthetic_docs(2000, seed=seed), vocab_size=vocab_size, family=family)
    cfg = tiny_config(family, layers=layers, d_model=d_model, heads=heads, max_positions=max_positions, vocab_size=len(tok))
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    if family == "bert":
        model = tf.BertModel(cfg)
    elif family == "t5":  # the whole encoder-decoder, as T5 checkpoints are published; capture loads its encoder
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "strata_tiny.json").write_text(json.dumps({"family": family, "layers": layers, "d_model": d_model, "seed": seed}))
    return folder


# -- vision -----------------------------------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def synthetic_images(folder: str | Path, n: int, *, seed: int = 0, size: int = 48) -> Path:
    """``n`` PNG images of one coloured shape each (4 colours x 3 shapes, cycling, at a random
    place and size on a noisy grey background), with a ``metadata.jsonl`` holding each image's
    ``file_name``, ``caption`` ("a red circle ...") and ``label`` ("red circle"): a paired
    image-caption corpus whose structure is known. The same arguments give the same bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    lines = []
    for i in range(n):
        color, shape = classes[i % len(classes)]
        bg = np.clip(rng.normal(128, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(bg)
        d = ImageDraw.Draw(im)
        r = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[color])
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "square":
            d.rectangle(box, fill=fill)
        elif shape == "circle":
            d.ellipse(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        name = f"img_{i:04d}.png"
        im.save(folder / name, format="PNG")
        big = "large" if r > size // 4 else "small"
        lines.append({"file_name": name, "caption": f"A {big} {color} {shape} on a grey background.", "label": f"{color} {shape}"})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as fh:
        for rec in lines:
            fh.write(json.dumps(rec) + "\n")
    return folder


def build_tiny_vision(folder: str | Path, *, family: str = "vit", layers: int = 2, d_model: int = 32, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, registers: int = 4, seed: int = 0) -> Path:
    """Build a seeded vision encoder of ``family`` (``vit``, ``clip`` and ``siglip`` vision
    towers, ``dinov2``, ``dinov2_reg``: DINOv2 with ``registers`` register tokens) for
    ``image_size`` images, with its image processor; save both to ``folder``."""
    import torch  # lazy: torch imports in ~2 s; only building or loading a model needs it
    import transformers as tf  # lazy: transformers imports in seconds; only building or loading a model needs it

    common = dict(image_size=image_size, patch_size=patch_size, hidden_size=d_model, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=4 * d_model)
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    square = {"height": image_size, "width": image_size}
    if family == "vit":
        cfg, cls = tf.ViTConfig(**common), tf.ViTModel
        proc = tf.ViTImageProcessorPil(size=square, **half)
    elif family == "clip":
        cfg, cls = tf.CLIPVisionConfig(**common), tf.CLIPVisionModel
        proc = tf.CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square, **half)
    elif family == "siglip":
        cfg, cls = tf.SiglipVisionConfig(**common), tf.SiglipVisionModel
        proc = tf.SiglipImageProcessorPil(size=square, **half)
    elif family in ("dinov2", "dinov2_reg"):
        del common["intermediate_size"]
        if family == "dinov2":
            cfg, cls = tf.Dinov2Config(**common), tf.Dinov2Model
        else:
            cfg, cls = tf.Dinov2WithRegistersConfig(num_register_tokens=registers, **common), tf.Dinov2WithRegistersModel
        proc = tf.BitImageProcessorPil(size={"shortest_edge": image_size * 8 // 7}, crop_size=square, do_center_crop=True,
                                       do_convert_rgb=True, **half)
    else:
        raise ValueError(f"unknown vision family {family!r}; valid: {', '.join(VISION_FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    (folder / "strata_tiny.json").write_text(json.dumps({"family": family, "layers": layers, "d_model": d_model, "seed": seed,
                                                         "image_size": image_size, "patch_size": patch_size}))
    return folder


def build_tiny_diffusion(folder: str | Path, *, kind: str = "dit", image_size: int = 16, seed: int = 0, layers: int = 2,
                         width: int = 32) -> Path:
    """A seeded diffusers pipeline folder: ``dit`` (a latent DiTTransformer2DModel with a VAE,
    10 classes), ``unet`` (a pixel-space UNet2DModel) or ``unet_cond`` (a latent
    UNet2DConditionModel with a VAE, a CLIP text encoder and a locally trained tokenizer),
    each with a DDPM scheduler, or ``mmdit`` (a StableDiffusion3Pipeline folder: an
    SD3Transformer2DModel, a 16-channel VAE with SD3's ``shift_factor`` / ``scaling_factor``, a
    FlowMatchEulerDiscreteScheduler (``shift`` 3) and SD3's three text encoders, two
    CLIPTextModelWithProjection and a T5EncoderModel, with locally trained tokenizers), saved with
    ``save_pretrained`` and a ``model_index.json``."""
    import diffusers  # lazy: diffusers imports in seconds; only building or loading a diffusion model needs it
    import torch  # lazy: as above

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind not in DIFFUSION_FAMILIES:
        raise ValueError(f"unknown diffusion kind {kind!r}; valid: {', '.join(DIFFUSION_FAMILIES)}")
    index: dict[str, Any] = {"_class_name": {"dit": "DiTPipeline", "unet": "DDPMPipeline", "unet_cond": "StableDiffusionPipeline",
                                             "mmdit": "StableDiffusion3Pipeline"}[kind], "_diffusers_version": diffusers.__version__}
    if kind == "mmdit":
        return _tiny_mmdit(folder, index, image_size=image_size, seed=seed, layers=layers, width=width)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    if kind in ("dit", "unet_cond"):
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                                      norm_num_groups=4, sample_size=image_size)
        vae.save_pretrained(folder / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    latent = image_size // 2
    if kind == "dit":
        heads = max(1, width // 16)
        dit = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=8,
                                              num_layers=layers, sample_size=latent, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
        dit.save_pretrained(folder / "transformer")
        index["transformer"] = ["diffusers", "DiTTransformer2DModel"]
    elif kind == "unet":
        unet = diffusers.UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
                                     attention_head_dim=8)
        unet.save_pretrained(folder / "unet")
        index["unet"] = ["diffusers", "UNet2DModel"]
    elif kind == "unet_cond":
        import transformers as tf  # lazy: as above

        unet = diffusers.UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
                                              cross_attention_dim=16, attention_head_dim=4)
        unet.save_pretrained(folder / "unet")
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        tok = train_tokenizer(synthetic_docs(200, seed=seed) + ["A large red circle on a grey background."], vocab_size=300)
        tok.model_max_length = 16
        tok.save_pretrained(folder / "tokenizer")
        index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        te = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
        te.eval().save_pretrained(folder / "text_encoder")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _tiny_mmdit(folder: Path, index: dict[str, Any], *, image_size: int, seed: int, layers: int, width: int) -> Path:
    """The ``mmdit`` pipeline of :func:`build_tiny_diffusion` (torch is seeded by the caller)."""
    import diffusers  # lazy: diffusers imports in seconds; only building or loading a diffusion model needs it
    import transformers as tf  # lazy: as above

    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=16,
                                  norm_num_groups=4, sample_size=image_size, scaling_factor=1.5305, shift_factor=0.0609,
                                  use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(folder / "vae")
    index["vae"] = ["diffusers", "AutoencoderKL"]
    latent = image_size // 2
    heads = max(1, width // 8)
    t5_dim, clip_dims, proj = 32, (16, 16), 8
    mm = diffusers.SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                                         attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=t5_dim,
                                         caption_projection_dim=width // heads * heads, pooled_projection_dim=proj * len(clip_dims),
                                         pos_embed_max_size=max(8, latent // 2))
    mm.save_pretrained(folder / "transformer")
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    texts = synthetic_docs(200, seed=seed) + ["A large red circle on a grey background."]
    for sub, d in zip(("", "_2"), clip_dims):
        tok = train_tokenizer(texts, vocab_size=300)
        tok.model_max_length = 16
        tok.save_pretrained(folder / f"tokenizer{sub}")
        index[f"tokenizer{sub}"] = ["transformers", "PreTrainedTokenizerFast"]
        te = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(
            vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=proj, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id))
        te.eval().save_pretrained(folder / f"text_encoder{sub}")
        index[f"text_encoder{sub}"] = ["transformers", "CLIPTextModelWithProjection"]
    tok3 = train_tokenizer(texts, vocab_size=300)
    tok3.model_max_length = 32
    tok3.save_pretrained(folder / "tokenizer_3")
    index["tokenizer_3"] = ["transformers", "PreTrainedTokenizerFast"]
    t5 = tf.T5EncoderModel(tf.T5Config(vocab_size=len(tok3), d_model=t5_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                       pad_token_id=tok3.pad_token_id, eos_token_id=tok3.eos_token_id, decoder_start_token_id=tok3.pad_token_id))
    t5.eval().save_pretrained(folder / "text_encoder_3")
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.tiny", description="Build a tiny seeded model with a locally trained tokenizer.")
    p.add_argument("folder")
    p.add_argument("--family", default="gpt2", choices=FAMILIES + VISION_FAMILIES + DIFFUSION_FAMILIES)
    p.add_argument("--images", type=int, metavar="N", help="write N captioned synthetic images (and metadata.jsonl) to FOLDER instead of a model")
    p.add_argument("--image-size", type=int, help="vision models: input image side in pixels (default 32; diffusion pipelines: 16)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, help="model width (default 64; diffusion pipelines: the DiT's width, 32)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", help="a JSON-lines file whose `text` fields train the tokenizer (default: synthetic text)")
    a = p.parse_args(argv)
    if a.images:
        print(f"wrote {a.images} images to {synthetic_images(a.folder, a.images, seed=a.seed)}")
        return 0
    if a.family in VISION_FAMILIES:
        out = build_tiny_vision(a.folder, family=a.family, layers=a.layers, d_model=a.d_model or 64, heads=a.heads,
                                image_size=a.image_size or 32, seed=a.seed)
        print(f"built a tiny {a.family} vision model in {out}")
        return 0
    if a.family in DIFFUSION_FAMILIES:
        out = build_tiny_diffusion(a.folder, kind=a.family, image_size=a.image_size or 16, seed=a.seed, layers=a.layers,
                                   width=a.d_model or 32)
        print(f"built a tiny {a.family} diffusion pipeline in {out}")
        return 0
    texts = None
    if a.corpus:
        with open(a.corpus, encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh if line.strip()]
    out = build_tiny(
        a.folder, family=a.family, layers=a.layers, d_model=a.d_model or 64, heads=a.heads, max_positions=a.max_positions,
        vocab_size=a.vocab_size, seed=a.seed, texts=texts,
    )
    print(f"built a tiny {a.family} model in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
