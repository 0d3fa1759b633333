"""Diffusion extraction of an SD3-style MMDiT (``SD3Transformer2DModel`` in a
StableDiffusion3Pipeline folder, flow matching): stored image-stream activations equal a direct
diffusers forward (``FlowMatchEulerDiscreteScheduler.scale_noise``, ``encode_prompt``) at two
timesteps, and bad input is refused in one line before anything is written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.diffusion import noise_seed_of
from strata.pipeline.errors import SpecError
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import build_tiny_diffusion, synthetic_images

TIMESTEPS = [40, 900]


@pytest.fixture(scope="module")
def mmdit(tmp_path_factory) -> Path:
    return build_tiny_diffusion(tmp_path_factory.mktemp("mmdit") / "sd3", kind="mmdit", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return synthetic_images(tmp_path_factory.mktemp("imgs") / "shapes", 3, seed=1, size=24)


def _spec(tmp_path: Path, folder: Path, shapes: Path, **over) -> ExtractSpec:
    raw = dict(store=str(tmp_path / "acts"), name="mm", model={"id": str(folder)},
               corpus={"path": str(shapes), "format": "images", "caption_field": "caption"}, hooks=["blocks.*.hook_resid_post"],
               dtype="float32", diffusion={"timesteps": TIMESTEPS, "noise_seed": 3, "prompt_field": "caption"},
               compute={"executor": "local", "unit_contexts": 4, "batch_tokens": 48})
    raw.update(over)
    return ExtractSpec(**raw)


def _direct(pipe, path: Path, doc_id: int, t: int, caption: str) -> dict[str, torch.Tensor]:
    """One context by diffusers alone: VAE mean, ``scale_noise`` at the scheduler's timestep of
    training step ``t``, ``encode_prompt``, the transformer's forward with hooks on its blocks."""
    im = Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
    px = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = pipe.vae
    with torch.no_grad():
        x0 = (vae.encode(px).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(noise_seed_of(3, doc_id, t)))[None]
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        ts = sched.timesteps[[sched.config.num_train_timesteps - t]]
        x_t = sched.scale_noise(x0, ts, eps)
        pe, _, pooled, _ = pipe.encode_prompt([caption], None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=32)
        out: dict[str, torch.Tensor] = {}
        hs = [b.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f"blocks.{i}.hook_resid_post", o[1][0].detach()))
              for i, b in enumerate(pipe.transformer.transformer_blocks)]
        pipe.transformer(hidden_states=x_t, timestep=ts, encoder_hidden_states=pe, pooled_projections=pooled)
        for h in hs:
            h.remove()
    return out


def test_mmdit_activations_equal_a_direct_diffusers_forward(tmp_path, mmdit, shapes):
    run_extract(_spec(tmp_path, mmdit, shapes), progress=False)
    ds = store.open(tmp_path / "acts").dataset("mm")
    meta = ds.info.meta
    assert meta["family"] == "mmdit" and meta["model_type"] == "SD3Transformer2DModel"
    assert meta["diffusion"]["noise"].startswith("x_t = (1 - sigma) * x0 + sigma * eps")
    cs = ds.info.context_size
    assert cs == 16 and ds.tokens().num_rows == 3 * len(TIMESTEPS) * cs
    tok = ds.tokens()
    ts = tok.column("timestep").to_numpy().reshape(-1, cs)[:, 0]
    did = tok.column("doc_id").to_numpy().reshape(-1, cs)[:, 0]
    assert ts.tolist() == TIMESTEPS * 3
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(mmdit)
    docs = {d["doc_id"]: d for d in ds.docs().to_pylist()}
    caps = {json.loads(line)["file_name"]: json.loads(line)["caption"] for line in (shapes / "metadata.jsonl").read_text().splitlines()}
    acts = {h: ds.read(h, as_="torch") for h in ds.info.hooks}
    assert sorted(acts) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for ci in (0, 1, 4, 5):  # images 0 and 2, both timesteps
        path = Path(docs[int(did[ci])]["source"])
        ref = _direct(pipe, path, int(did[ci]), int(ts[ci]), caps[path.name])
        for h, a in acts.items():
            torch.testing.assert_close(a[ci * cs : (ci + 1) * cs], ref[h], rtol=1e-5, atol=1e-5, msg=f"{h} context {ci}")
    # the two timesteps give different inputs, and so different activations
    assert not torch.allclose(acts["blocks.0.hook_resid_post"][:cs], acts["blocks.0.hook_resid_post"][cs : 2 * cs])


@pytest.mark.parametrize(
    ("over", "pattern"),
    [
        ({"diffusion": {"timesteps": [0, 5], "prompt": ""}}, r"timesteps` \[0\] are outside the range .*integers 1\.\.1000 \(flow matching"),
        ({"diffusion": {"timesteps": [5]}}, r"text-conditioned \(SD3Transformer2DModel\).*`diffusion\.prompt_field`.*explicit `diffusion\.prompt`"),
        ({"diffusion": {"timesteps": [5], "prompt": "", "class_field": "caption"}}, r"`diffusion\.class_field` is for class-conditional DiTs"),
        ({"hooks": ["mid_block"], "diffusion": {"timesteps": [5], "prompt": ""}}, r"unknown hook 'mid_block' .*blocks\.0\.hook_resid_post"),
    ],
)
def test_bad_mmdit_input_is_one_line_and_nothing_written(tmp_path, mmdit, shapes, over, pattern):
    with pytest.raises(SpecError) as e:
        run_extract(_spec(tmp_path, mmdit, shapes, **over), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert not (tmp_path / "acts" / "datasets").exists() or store.open(tmp_path / "acts").datasets() == []


def test_an_mmdit_without_text_encoders_or_flow_scheduler_is_refused(tmp_path, mmdit, shapes):
    bare = tmp_path / "bare"
    bare.mkdir()
    for sub in ("transformer", "vae", "scheduler"):
        (bare / sub).symlink_to(mmdit / sub)
    index = {k: v for k, v in json.loads((mmdit / "model_index.json").read_text()).items() if k in ("_class_name", "transformer", "vae", "scheduler")}
    (bare / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SpecError, match=r"^model .* is text-conditioned but its model_index.json names no text_encoder, tokenizer, "
                                        r"text_encoder_2, tokenizer_2"):
        run_extract(_spec(tmp_path, bare, shapes, diffusion={"timesteps": [5], "prompt": ""}), progress=False)
    ddpm = tmp_path / "ddpm"
    shutil.copytree(mmdit, ddpm)
    shutil.rmtree(ddpm / "scheduler")
    diffusers.DDPMScheduler().save_pretrained(ddpm / "scheduler")
    index = json.loads((ddpm / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (ddpm / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SpecError, match=r"scheduler DDPMScheduler; Strata reads an MMDiT with the flow-matching FlowMatchEulerDiscreteScheduler"):
        run_extract(_spec(tmp_path, ddpm, shapes, diffusion={"timesteps": [5], "prompt": ""}), progress=False)
    assert not (tmp_path / "acts" / "datasets").exists() or store.open(tmp_path / "acts").datasets() == []


def test_mmdit_module_path_hooks(tmp_path, mmdit, shapes):
    """``module:PATH`` on an MMDiT: a joint block's input (its ``hidden_states``) is the previous
    block's image stream, row for row; a block's own output leads with the context stream (the
    prompt's tokens, not the latent patches) and is refused in one line."""
    spec = _spec(tmp_path, mmdit, shapes, name="mm-mod", diffusion={"timesteps": [500], "prompt": "a red circle"},
                 hooks=["blocks.0.hook_resid_post", "module:transformer_blocks.1:input"])
    run_extract(spec, progress=False)
    ds = store.open(tmp_path / "acts").dataset("mm-mod")
    assert torch.equal(ds.read("module:transformer_blocks.1:input", as_="torch"), ds.read("blocks.0.hook_resid_post", as_="torch"))
    with pytest.raises(SpecError, match=r"^hook .module:transformer_blocks\.0. .*is \[1, 3, 32\], not the image stream.s 16 latent patch tokens"):
        run_extract(_spec(tmp_path, mmdit, shapes, name="mm-bad", hooks=["module:transformer_blocks.0"]), progress=False)


def test_an_mmdit_without_t5_is_encoded_as_diffusers_does(tmp_path, mmdit, shapes):
    """Without ``text_encoder_3`` SD3's ``encode_prompt`` fills the T5 rows with zeros (256 of
    them); the extraction records that and matches the pipeline loaded without T5."""
    f = tmp_path / "no_t5"
    shutil.copytree(mmdit, f)
    shutil.rmtree(f / "text_encoder_3")
    shutil.rmtree(f / "tokenizer_3")
    index = json.loads((f / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (f / "model_index.json").write_text(json.dumps(index))
    run_extract(_spec(tmp_path, f, shapes, name="no-t5", diffusion={"timesteps": [300], "noise_seed": 3, "prompt_field": "caption"}),
                progress=False)
    ds = store.open(tmp_path / "acts").dataset("no-t5")
    assert ds.info.meta["diffusion"]["text"]["t5"] is False and ds.info.meta["diffusion"]["text"]["max_sequence_length"] == 256
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(f, text_encoder_3=None, tokenizer_3=None)
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: encode(*a, **{**k, "max_sequence_length": 256})
    cs = ds.info.context_size
    did = int(ds.tokens().column("doc_id").to_numpy()[cs])  # the second context's image
    d = next(x for x in ds.docs().to_pylist() if x["doc_id"] == did)
    path = Path(d["source"])
    caption = next(json.loads(line)["caption"] for line in (shapes / "metadata.jsonl").read_text().splitlines()
                   if json.loads(line)["file_name"] == path.name)
    ref = _direct(pipe, path, did, 300, caption)
    for h in ds.info.hooks:
        torch.testing.assert_close(ds.read(h, as_="torch")[cs : 2 * cs], ref[h], rtol=1e-5, atol=1e-5)
