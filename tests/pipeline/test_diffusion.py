"""Diffusion extraction: stored activations equal a direct diffusers forward on the same noised
input (pixel UNet, latent text-conditioned UNet, class-conditional DiT; two timesteps), the
token table's ``timestep`` column, UNet maps resampled to a grid exactly as
``F.interpolate`` does, the noise a function of (seed, image, timestep) alone, unreadable images
counted, and bad input refused in one line before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.diffusion import context_noise, noise_seed_of
from strata.pipeline.errors import SpecError
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import build_tiny_diffusion, synthetic_images

TIMESTEPS = [50, 700]
HOOKS = {"dit": ["blocks.*.hook_resid_post"], "unet": ["down_blocks.*", "mid_block", "up_blocks.*"], "unet_cond": ["down_blocks.1", "mid_block"]}
EXTRA = {"dit": {"class_field": "cls"}, "unet": {"grid": 8}, "unet_cond": {"prompt_field": "caption"}}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    return {k: build_tiny_diffusion(root / k, kind=k, seed=0) for k in ("dit", "unet", "unet_cond")}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Five 24x24 images (with a class per image, one of them null) and a file that is not an image."""
    folder = synthetic_images(tmp_path_factory.mktemp("imgs") / "shapes", 5, seed=1, size=24)
    recs = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for i, r in enumerate(recs):
        r["cls"] = None if i == 2 else i % 10
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "zz_broken.png").write_bytes(b"not a png at all")
    return folder


def _spec(tmp_path: Path, folder: Path, shapes: Path, kind: str, **over) -> ExtractSpec:
    raw = dict(store=str(tmp_path / "acts"), name=f"d-{kind}", model={"id": str(folder)},
               corpus={"path": str(shapes), "format": "images", "caption_field": "caption", "keep_fields": ["label", "cls"]},
               hooks=HOOKS[kind], dtype="float32", diffusion={"timesteps": TIMESTEPS, "noise_seed": 7, **EXTRA[kind]},
               compute={"executor": "local", "unit_contexts": 3, "batch_tokens": 64})
    for k, v in over.items():
        raw[k] = v
    return ExtractSpec(**raw)


def _pixels(path: Path) -> torch.Tensor:
    """An independent preprocessing: the 24x24 square image resized to 16 (bicubic), in [-1, 1]."""
    im = Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def _direct(kind: str, folder: Path, path: Path, doc_id: int, t: int, rec: dict) -> dict[str, torch.Tensor]:
    """One context by diffusers alone: encode, ``DDPMScheduler.add_noise``, forward with hooks."""
    sched = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    x0 = _pixels(path)
    if kind != "unet":
        vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        with torch.no_grad():
            x0 = vae.encode(x0).latent_dist.mean * vae.config.scaling_factor
    g = torch.Generator().manual_seed(noise_seed_of(7, doc_id, t))
    eps = torch.randn(x0.shape[1:], generator=g)[None]
    tt = torch.tensor([t])
    x_t = sched.add_noise(x0, eps, tt)
    out: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, args, o):
            out[name] = (o[0] if isinstance(o, tuple) else o).detach()
        return hook

    with torch.no_grad():
        if kind == "dit":
            m = diffusers.DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
            for i, b in enumerate(m.transformer_blocks):
                b.register_forward_hook(keep(f"blocks.{i}.hook_resid_post"))
            m(x_t, timestep=tt, class_labels=torch.tensor([10 if rec["cls"] is None else rec["cls"]]))
            return {h: v[0] for h, v in out.items()}
        cls = diffusers.UNet2DModel if kind == "unet" else diffusers.UNet2DConditionModel
        m = cls.from_pretrained(folder, subfolder="unet").eval()
        for name in ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"):
            try:
                m.get_submodule(name).register_forward_hook(keep(name))
            except AttributeError:
                pass
        if kind == "unet":
            m(x_t, tt)
        else:
            tok = transformers.AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
            te = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
            ids = tok([rec["caption"]], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
            m(x_t, tt, encoder_hidden_states=te(ids)[0])
    res = {}
    for h, v in out.items():
        if kind == "unet":
            v = torch.nn.functional.interpolate(v, size=(8, 8), mode="bilinear", align_corners=False)
        res[h] = v[0].permute(1, 2, 0).reshape(-1, v.shape[1])
    return res


@pytest.mark.parametrize("kind", ["dit", "unet", "unet_cond"])
def test_stored_activations_equal_a_direct_diffusers_forward(tmp_path, pipes, shapes, kind):
    r = run_extract(_spec(tmp_path, pipes[kind], shapes, kind), progress=False)
    assert len(r.bad_images) == 1 and "zz_broken.png" in r.bad_images[0]["where"] and "1 image(s) could not be read" in r.message
    ds = store.open(tmp_path / "acts").dataset(f"d-{kind}")
    meta = ds.info.meta
    assert meta["modality"] == "diffusion" and meta["diffusion"]["timesteps"] == TIMESTEPS
    assert meta["unreadable_images"]["count"] == 1
    docs = ds.docs().to_pylist()
    recs = {json.loads(line)["file_name"]: json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()}
    good = [d for d in docs if d["error"] is None]
    assert len(good) == 5 and ds.tokens().num_rows == 5 * len(TIMESTEPS) * ds.info.context_size
    tok = ds.tokens()
    cs = ds.info.context_size
    ts = tok.column("timestep").to_numpy().reshape(-1, cs)
    did = tok.column("doc_id").to_numpy().reshape(-1, cs)
    assert (ts == ts[:, :1]).all() and (did == did[:, :1]).all()
    assert ts[:, 0].tolist() == TIMESTEPS * 5  # image-major: each image at every timestep
    assert np.array_equal(tok.column("token_id").to_numpy().reshape(-1, cs), np.tile(np.arange(cs), (len(ts), 1)))
    hooks = list(ds.info.hooks)
    acts = {h: ds.read(h, as_="torch") for h in hooks}
    checked = 0
    for ci in (0, 1, 4, 5):  # images 0 and 2 (the null class), both timesteps
        d = next(x for x in good if x["doc_id"] == int(did[ci, 0]))
        path = Path(d["source"])
        ref = _direct(kind, pipes[kind], path, int(did[ci, 0]), int(ts[ci, 0]), recs[path.name])
        for h in hooks:
            got = acts[h][ci * cs : (ci + 1) * cs]
            assert got.shape == ref[h].shape, (h, got.shape, ref[h].shape)
            torch.testing.assert_close(got, ref[h], rtol=1e-5, atol=1e-5, msg=f"{kind} {h} context {ci}")
            checked += 1
    assert checked == 4 * len(hooks)
    # every unit recomputed by a fresh worker (a new dataset) is identical: the noise depends on nothing else
    again = run_extract(_spec(tmp_path, pipes[kind], shapes, kind, name=f"again-{kind}"), progress=False)
    assert again.units_run == ds.info.num_units
    ds2 = store.open(tmp_path / "acts").dataset(f"again-{kind}")
    for h in hooks:
        assert torch.equal(ds2.read(h, as_="torch"), acts[h]), h


def test_noise_is_a_function_of_seed_image_and_timestep():
    a = context_noise(7, 123, 50, (4, 8, 8))
    assert torch.equal(a, context_noise(7, 123, 50, (4, 8, 8)))
    for other in ((8, 123, 50), (7, 124, 50), (7, 123, 51)):
        assert not torch.equal(a, context_noise(*other, (4, 8, 8)))


def test_a_grid_is_the_native_map_where_sizes_agree(tmp_path, pipes, shapes):
    """Hooks of one resolution need no grid; resampling a map to its own size changes nothing."""
    s1 = _spec(tmp_path, pipes["unet"], shapes, "unet", name="native", hooks=["up_blocks.0"], diffusion={"timesteps": [10]})
    s2 = _spec(tmp_path, pipes["unet"], shapes, "unet", name="grid8", hooks=["up_blocks.0"], diffusion={"timesteps": [10], "grid": 8})
    run_extract(s1, progress=False)
    run_extract(s2, progress=False)
    st = store.open(tmp_path / "acts")
    a, b = st.dataset("native"), st.dataset("grid8")
    assert a.info.context_size == b.info.context_size == 64 and a.info.meta["diffusion"]["resample"] is None
    assert b.info.meta["diffusion"]["resample"]["mode"] == "bilinear" and b.info.meta["diffusion"]["resample"]["align_corners"] is False
    assert np.array_equal(a.read("up_blocks.0"), b.read("up_blocks.0"))


@pytest.mark.parametrize(
    ("kind", "over", "pattern"),
    [
        ("dit", {"diffusion": {"timesteps": [50, 1000]}}, r"timesteps` \[1000\] are outside the range .*0\.\.999"),
        ("unet", {"diffusion": {"timesteps": [5]}}, r"maps of different sizes \(down_blocks\.0: 8x8, down_blocks\.1: 4x4.*`diffusion\.grid`"),
        ("unet_cond", {"diffusion": {"timesteps": [5]}}, r"text-conditioned .*`diffusion\.prompt_field`.*explicit `diffusion\.prompt`"),
        ("dit", {"diffusion": None}, r"is a diffusion pipeline \(DiTTransformer2DModel\): add a `diffusion` section"),
        ("dit", {"hooks": ["mid_block"]}, r"unknown hook 'mid_block' for diffusion model .*valid hooks: blocks\.0\.hook_resid_post"),
        ("dit", {"diffusion": {"timesteps": [5], "prompt": ""}}, r"`diffusion\.prompt` / `prompt_field` are for text-conditioned models"),
    ],
)
def test_bad_diffusion_input_is_one_line_and_nothing_written(tmp_path, pipes, shapes, kind, over, pattern):
    with pytest.raises(SpecError) as e:
        run_extract(_spec(tmp_path, pipes[kind], shapes, kind, **over), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    root = tmp_path / "acts"
    assert not (root / "datasets").exists() or store.open(root).datasets() == []


def test_a_model_that_is_not_a_denoiser_is_refused(tmp_path, pipes, shapes):
    vae_only = tmp_path / "vae_only"
    vae_only.mkdir()
    (vae_only / "vae").symlink_to(pipes["dit"] / "vae")
    (vae_only / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(SpecError, match=r"is not a denoiser Strata reads \(its model_index.json names no unet or transformer\)"):
        run_extract(_spec(tmp_path, vae_only, shapes, "dit"), progress=False)
    assert not (tmp_path / "acts" / "datasets").exists() or store.open(tmp_path / "acts").datasets() == []


def test_an_explicit_empty_prompt_conditions_every_image(tmp_path, pipes, shapes):
    spec = _spec(tmp_path, pipes["unet_cond"], shapes, "unet_cond", name="empty", diffusion={"timesteps": [300], "prompt": ""})
    run_extract(spec, progress=False)
    ds = store.open(tmp_path / "acts").dataset("empty")
    assert ds.info.meta["diffusion"]["prompt"] == "" and ds.tokens().num_rows == 5 * 16


def test_the_cli_refuses_a_timestep_out_of_range_in_one_line(tmp_path, pipes, shapes, capsys):
    import yaml

    from strata.jobs.extract import main

    spec = tmp_path / "d.yaml"
    spec.write_text(yaml.safe_dump({"store": str(tmp_path / "acts"), "name": "cli", "model": {"id": str(pipes["unet"])},
                                    "corpus": {"path": str(shapes), "format": "images"}, "hooks": ["mid_block"],
                                    "diffusion": {"timesteps": [-1, 10]}}))
    rc = main([str(spec), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("strata: error: ") and err.count("\n") == 1, err
    assert "`diffusion.timesteps` [-1] are outside the range" in err and "integers 0..999" in err, err
    assert not (tmp_path / "acts" / "datasets").exists() or store.open(tmp_path / "acts").datasets() == []


def test_hooks_added_later_are_computed_alone(tmp_path, pipes, shapes):
    one = _spec(tmp_path, pipes["dit"], shapes, "dit", name="grow", hooks=["blocks.0.hook_resid_post"], diffusion={"timesteps": [20]})
    run_extract(one, progress=False)
    before = store.open(tmp_path / "acts").dataset("grow").read("blocks.0.hook_resid_post")
    r = run_extract(one.updated(hooks=["blocks.*.hook_resid_post"]), progress=False)
    assert r.hooks_new == ["blocks.1.hook_resid_post"] and r.hooks_committed == ["blocks.0.hook_resid_post"], r.message
    ds = store.open(tmp_path / "acts").dataset("grow")
    assert np.array_equal(ds.read("blocks.0.hook_resid_post"), before)
    assert set(ds.info.hooks) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert run_extract(one, progress=False).noop


def test_module_path_hooks_read_what_the_module_sees(tmp_path, pipes, shapes):
    """``module:PATH`` hooks, shaped by a forward on the meta device: a block's input is the
    previous block's output, row for row (a DiT's tokens; a UNet's maps, resampled alike)."""
    dit = _spec(tmp_path, pipes["dit"], shapes, "dit", name="mod-dit", diffusion={"timesteps": [30, 600]},
                hooks=["blocks.0.hook_resid_post", "module:transformer_blocks.1:input", "module:transformer_blocks.0.attn1"])
    run_extract(dit, progress=False)
    ds = store.open(tmp_path / "acts").dataset("mod-dit")
    assert torch.equal(ds.read("module:transformer_blocks.1:input", as_="torch"), ds.read("blocks.0.hook_resid_post", as_="torch"))
    assert ds.info.hooks["module:transformer_blocks.0.attn1"].d == 32
    assert ds.info.meta["hook_modules"]["module:transformer_blocks.1:input"] == "transformer.transformer_blocks.1 (input)"
    unet = _spec(tmp_path, pipes["unet"], shapes, "unet", name="mod-unet", diffusion={"timesteps": [30], "grid": 8},
                 hooks=["down_blocks.2", "module:mid_block:input", "module:down_blocks.1.attentions.0"])
    run_extract(unet, progress=False)
    du = store.open(tmp_path / "acts").dataset("mod-unet")
    assert torch.equal(du.read("module:mid_block:input", as_="torch"), du.read("down_blocks.2", as_="torch"))
    assert du.info.hooks["module:down_blocks.1.attentions.0"].d == 16
    with pytest.raises(SpecError, match=r"module:nope.*names no module|'module:nope'"):
        run_extract(_spec(tmp_path, pipes["dit"], shapes, "dit", name="bad", hooks=["module:nope"]), progress=False)
