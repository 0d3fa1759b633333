"""Vision encoders: stored activations equal a direct forward pass of each family; image corpora
(folder, Parquet), CLS and register tokens flagged, unreadable images counted and never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
import yaml

from strata import store
from strata.pipeline.config import CorpusSpec, ExtractSpec, ModelSpec
from strata.pipeline.extract import run_extract
from strata.pipeline.images import ImageSource, scan_images
from strata.pipeline.models import load_config, resolve
from strata.pipeline.tiny import VISION_FAMILIES, build_tiny_vision, synthetic_images
from strata.pipeline.vision import CLS_TOKEN, ImagePacker, prepare_images, register_token
from strata.pipeline.worker import UnitWorker, WorkerConfig

D = 32
CLASSES = {"vit": "ViTModel", "clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model",
           "dinov2_reg": "Dinov2WithRegistersModel"}


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_vision(root / family, family=family, layers=2, d_model=D, heads=4, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return synthetic_images(tmp_path_factory.mktemp("imgs") / "shapes", 20, seed=1)


def _reference(folder: Path, family: str, paths: list[Path]) -> tuple[dict[str, torch.Tensor], int]:
    """An independent forward pass: the model's own processor on PIL images, hidden states from
    ``output_hidden_states``, the final norm from ``last_hidden_state``."""
    from PIL import Image
    from transformers import AutoImageProcessor

    model = getattr(transformers, CLASSES[family]).from_pretrained(folder, dtype=torch.float32).eval()
    proc = AutoImageProcessor.from_pretrained(folder, backend="pil")
    px = proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
    hs = out.hidden_states
    ref = {"blocks.0.hook_resid_post": hs[1], "blocks.1.hook_resid_post": hs[2], "blocks.1.hook_resid_pre": hs[1]}
    if family != "clip":  # CLIP's last_hidden_state has no final norm over tokens
        ref["ln_final.hook_normalized"] = out.last_hidden_state
    else:
        ref["blocks.0.hook_resid_pre"] = hs[0]  # CLIP: after pre_layrnorm
    return {h: t.reshape(-1, t.shape[-1]) for h, t in ref.items()}, hs[0].shape[1]


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_stored_activations_equal_a_direct_forward(tmp_path, vision_models, images, family):
    folder = vision_models(family)
    m = resolve(ModelSpec(id=str(folder)))
    config = load_config(m)
    prep = prepare_images(str(folder), config, size=None, model=family)
    src = CorpusSpec(path=str(images), format="images")
    scan = scan_images(src)
    n = 6
    packer = ImagePacker(ImageSource(src, scan.files, scan.locators), scan.doc_ids, np.arange(n), prep.layout)
    contexts = packer.contexts(0, n)
    ref, seq = _reference(folder, family, [Path(scan.files[i]) for i in range(n)])
    assert prep.layout.tokens == seq  # the planned layout is the model's sequence
    hooks = sorted(ref)
    s = store.open(tmp_path / "acts")
    s.create_dataset("v", hooks={h: D for h in hooks}, context_size=seq, dtype="float32", num_units=1, unit_contexts=n, meta={})
    w = UnitWorker(WorkerConfig(str(tmp_path / "acts"), "v", m, config.model_type, 2, D, "float32", batch_tokens=n * seq, image=prep))
    st = w.process(0, contexts, hooks)
    assert all(v == "committed" for v in st["status"].values()) and st["prepare_s"] > 0
    ds = s.dataset("v")
    for h in hooks:
        assert torch.equal(ds.read(h, as_="torch"), ref[h]), h  # exact: the same ops on the same batch
    t = ds.tokens()
    tid = t.column("token_id").to_numpy().reshape(n, seq)
    special = t.column("special").to_numpy().reshape(n, seq)
    regs = 4 if family == "dinov2_reg" else 0
    cls = 0 if family == "siglip" else 1
    want = [CLS_TOKEN] * cls + [register_token(r) for r in range(regs)] + list(range(seq - cls - regs))
    assert (tid == np.array(want)).all() and (special == (np.array(want) < 0)).all()
    assert (t.column("doc_id").to_numpy().reshape(n, seq) == scan.doc_ids[:n, None]).all()
    assert (t.column("doc_position").to_numpy().reshape(n, seq)[:, cls + regs:] == np.arange(seq - cls - regs)).all()


def test_an_image_size_other_than_the_training_size_interpolates(tmp_path, vision_models, images):
    folder = vision_models("vit")
    config = load_config(resolve(ModelSpec(id=str(folder))))
    prep = prepare_images(str(folder), config, size=48, model="vit")
    assert (prep.height, prep.width, prep.layout.tokens, prep.interpolate) == (48, 48, 1 + 36, True)
    assert prep.forward_kwargs() == {"interpolate_pos_encoding": True}
    assert prep.fingerprint != prepare_images(str(folder), config, size=None, model="vit").fingerprint


def _write_parquet(path: Path, folder: Path, *, broken: bytes | None = None) -> Path:
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = [{"id": r["file_name"], "image": {"bytes": (folder / r["file_name"]).read_bytes(), "path": None}, "caption": r["caption"]}
            for r in meta]
    if broken is not None:
        rows.insert(3, {"id": "broken", "image": {"bytes": broken, "path": None}, "caption": None})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    return path


@pytest.mark.slow
def test_image_corpora_end_to_end(ray_session, tmp_path, vision_models, images, caplog):
    # A folder with a damaged file and an empty one: both counted and reported, the job goes on.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    good = (folder / "img_0002.png").read_bytes()
    (folder / "img_0002b.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "zz_empty.jpg").write_bytes(b"")
    model = vision_models("dinov2_reg")
    spec = ExtractSpec(store=str(tmp_path / "acts"), name="shapes", model={"id": str(model)},
                       corpus={"path": str(folder), "format": "images", "caption_field": "caption", "keep_fields": ["label"]},
                       hooks=["blocks.*.hook_resid_post", "ln_final.hook_normalized"], dtype="float32",
                       compute={"unit_contexts": 8, "batch_tokens": 4 * 21})
    r = run_extract(spec, progress=False)
    from strata.pipeline.corpus import stable_id

    bad = {b["doc_id"]: b["error"] for b in r.bad_images}
    assert set(bad) == {stable_id("img_0002b.png"), stable_id("zz_empty.jpg")}
    assert all(e.startswith("does not decode") for e in bad.values())
    assert "2 image(s) could not be read" in r.message and str(stable_id("zz_empty.jpg")) in r.message
    assert r.num_units == 3 and r.tokens == 20 * 21  # 20 good images of 1 CLS + 4 registers + 16 patches
    ds = store.open(tmp_path / "acts").dataset("shapes")
    assert ds.info.context_size == 21 and ds.info.meta["modality"] == "image"
    assert ds.info.meta["unreadable_images"]["count"] == 2 and ds.info.meta["caption_set_hash"].startswith("xxh3_64-sum:")
    docs = ds.docs()
    assert docs.num_rows == 22
    d = {row["doc_id"]: row for row in docs.to_pylist()}
    assert d[stable_id("img_0002b.png")]["row_start"] == -1 and d[stable_id("img_0002b.png")]["error"] is not None
    first = d[stable_id("img_0000.png")]
    assert (first["width"], first["height"], first["label"]) == (48, 48, "red square") and first["caption"].startswith("A ")
    assert first["row_end"] - first["row_start"] == 21 and first["error"] is None
    x = ds.read("blocks.1.hook_resid_post", docs=[stable_id("img_0000.png")])
    assert x.shape == (21, D)
    assert ds.verify().ok
    # A rerun is a no-op.
    assert run_extract(spec, progress=False).noop

    # The same images from a Parquet image column (with the damaged one): identical activations.
    pq_path = _write_parquet(tmp_path / "shapes.parquet", images, broken=b"not an image")
    spec2 = spec.updated(name="shapes-pq", corpus=CorpusSpec(
        path=str(pq_path), format="parquet", image_field="image", id_field="id", caption_field="caption"))
    r2 = run_extract(spec2, progress=False)
    assert [b["doc_id"] for b in r2.bad_images] == [stable_id("broken")]
    ds2 = store.open(tmp_path / "acts").dataset("shapes-pq")
    ids = [stable_id(f"img_{i:04d}.png") for i in (0, 5, 19)]
    for h in ("blocks.0.hook_resid_post", "ln_final.hook_normalized"):
        assert np.array_equal(ds.read(h, docs=ids), ds2.read(h, docs=ids)), h
    # Captions from the same records hash the same, whatever the corpus format.
    assert ds2.info.meta["caption_set_hash"] == ds.info.meta["caption_set_hash"]


@pytest.fixture
def vspec(tmp_path, vision_models, images):
    raw = {"store": str(tmp_path / "acts"), "name": "v", "model": {"id": str(vision_models("vit"))},
           "corpus": {"path": str(images), "format": "images"}, "hooks": ["blocks.*.hook_resid_post"], "dtype": "float16",
           "compute": {"executor": "local", "unit_contexts": 8}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("sets", "pattern"),
    [
        (["corpus.path={empty}"], r"holds no image files \(\.png \.jpg"),
        (["corpus.format=parquet", "corpus.path={parquet}", "corpus.image_field=picture"],
         r"`corpus.image_field` 'picture' is not a field of .*fields are: id, image, caption"),
        (["corpus.format=jsonl", "corpus.path={text}"], r"is an image model and `corpus` is a text corpus"),
        (["model.id={gpt2}"], r"is a text model and `corpus` is an image corpus"),
        (["image.size=50"], r"`image.size` 50 does not fit model .*patch size is 8.*e\.g\. 48 or 56"),
        (["corpus.image_field=image"], r"`image_field` is for parquet and hf corpora"),
    ],
)
def test_bad_image_input_is_one_line_exit_2_nothing_written(vspec, tmp_path, tiny_gpt2, images, capsys, sets, pattern):
    import re

    from strata.jobs.extract import main
    from strata.pipeline.tiny import write_jsonl

    (tmp_path / "empty").mkdir()
    subs = {"empty": tmp_path / "empty", "parquet": _write_parquet(tmp_path / "p.parquet", images),
            "text": write_jsonl(tmp_path / "t.jsonl", ["a red circle"]), "gpt2": tiny_gpt2}
    argv = [str(vspec), "--no-progress"]
    for s in sets:
        argv += ["--set", s.format(**subs)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("strata: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    root = tmp_path / "acts"
    assert not (root / "datasets").exists() or store.open(root).datasets() == []


@pytest.mark.slow
def test_paired_images_and_captions_recover_planted_structure(tmp_path, vision_models, tiny_gpt2):
    """Images through a vision model and their captions through a language model, compared
    per document (``align="docs"``): mutual kNN is higher for captions that match the images
    than for the same captions shuffled among the images."""
    from strata.analysis import similarity
    from strata.pipeline.corpus import stable_id

    n = 48
    matched = synthetic_images(tmp_path / "matched", n, seed=3)
    meta = [json.loads(line) for line in (matched / "metadata.jsonl").read_text().splitlines()]
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    perm = np.random.default_rng(0).permutation(n)
    for p in matched.glob("*.png"):
        (shuffled / p.name).write_bytes(p.read_bytes())
    (shuffled / "metadata.jsonl").write_text("".join(
        json.dumps({**meta[i], "caption": meta[perm[i]]["caption"], "label": meta[perm[i]]["label"]}) + "\n" for i in range(n)))
    acts = str(tmp_path / "acts")
    vit = vision_models("vit")
    for tag, folder in (("matched", matched), ("shuffled", shuffled)):
        run_extract(ExtractSpec(store=acts, name=f"img-{tag}", model={"id": str(vit)},
                                corpus={"path": str(folder), "format": "images", "caption_field": "caption"},
                                hooks=["blocks.1.hook_resid_post"], dtype="float32", compute={"executor": "local", "unit_contexts": 16}),
                    progress=False)
        run_extract(ExtractSpec(store=acts, name=f"cap-{tag}", model={"id": str(tiny_gpt2)},
                                corpus={"path": str(folder / "metadata.jsonl"), "text_field": "caption", "id_field": "file_name"},
                                tokenize={"context_size": 24, "packing": "truncate"}, hooks=["blocks.1.hook_resid_post"],
                                dtype="float32", compute={"executor": "local", "unit_contexts": 16}), progress=False)
    s = store.open(acts)
    res = {}
    for tag in ("matched", "shuffled"):
        img, cap = s.dataset(f"img-{tag}"), s.dataset(f"cap-{tag}")
        assert img.info.meta["caption_set_hash"] == cap.info.meta["doc_set_hash"]  # the pair is recognised
        res[tag] = similarity.compare((img, "blocks.1.hook_resid_post"), (cap, "blocks.1.hook_resid_post"),
                                      metrics=["mutual_knn", "linear_cka"], align="docs", pool="mean", knn_k=4)
        assert res[tag]["n"] == n
    assert res["matched"]["mutual_knn"] > res["shuffled"]["mutual_knn"] + 0.1, res
    assert res["matched"]["linear_cka"] > res["shuffled"]["linear_cka"], res
    # Other pools run on the same pair (CLS of the image, last caption token), and the ids line up.
    other = similarity.compare((s.dataset("img-matched"), "blocks.1.hook_resid_post"), (s.dataset("cap-matched"), "blocks.1.hook_resid_post"),
                               metrics=["mutual_knn"], align="docs", pool=("cls", "last"), knn_k=4)
    assert other["n"] == n and 0.0 <= other["mutual_knn"] <= 1.0
    assert stable_id(meta[0]["file_name"]) in set(s.dataset("cap-matched").docs().column("doc_id").to_pylist())
    # Images and captions never pair token by token.
    with pytest.raises(Exception, match="different corpora"):
        similarity.compare((s.dataset("img-matched"), "blocks.1.hook_resid_post"), (s.dataset("cap-matched"), "blocks.1.hook_resid_post"),
                           metrics=["linear_cka"], align="tokens")


def test_image_sources_read_back_the_scanned_bytes(tmp_path, images):
    """Folder, Parquet (several row groups) and HF datasets: a scan's ids follow the same
    records, and reading any positions back gives exactly the scanned bytes."""
    import datasets

    from strata.pipeline.corpus import stable_id

    files = sorted(images.glob("*.png"))
    want = [p.read_bytes() for p in files]
    names = [p.name for p in files]
    pq_path = _write_parquet(tmp_path / "imgs.parquet", images)
    hf_dir = tmp_path / "hf"
    meta = {json.loads(line)["file_name"]: json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()}
    datasets.Dataset.from_dict({"id": names, "img": [str(p) for p in files], "caption": [meta[n]["caption"] for n in names]},
                               features=datasets.Features({"id": datasets.Value("string"), "img": datasets.Image(),
                                                           "caption": datasets.Value("string")})).save_to_disk(str(hf_dir))
    pick = np.array([13, 0, 6, 7, 19, 6])
    fps = set()
    for spec in (CorpusSpec(path=str(images), format="images", caption_field="caption"),
                 CorpusSpec(path=str(pq_path), format="parquet", image_field="image", id_field="id", caption_field="caption"),
                 CorpusSpec(path=str(hf_dir), format="hf", image_field="img", id_field="id", caption_field="caption")):
        scan = scan_images(spec)
        assert scan.doc_ids.tolist() == [stable_id(n) for n in names], spec.format
        got = ImageSource(spec, scan.files, scan.locators).read(pick)
        assert got == [want[i] for i in pick], spec.format
        fps.add((scan.fingerprint, scan.doc_set_hash, scan.caption_set_hash))
    assert len(fps) == 1  # the same ids, bytes and captions: the same fingerprints, whatever the format
    # The fingerprint covers the bytes: one changed pixel is another corpus.
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in images.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    from PIL import Image

    im = Image.open(changed / names[5]).convert("RGB")
    im.putpixel((0, 0), (0, 0, 0))
    im.save(changed / names[5])
    other = scan_images(CorpusSpec(path=str(changed), format="images", caption_field="caption"))
    assert other.fingerprint != next(iter(fps))[0] and other.caption_set_hash == next(iter(fps))[2]


def test_a_growing_image_folder_extracts_only_new_units(tmp_path, vision_models, images):
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = sorted(images.glob("*.png"))
    for p in files[:12]:
        (folder / p.name).write_bytes(p.read_bytes())
    spec = ExtractSpec(store=str(tmp_path / "acts"), name="grow", model={"id": str(vision_models("siglip"))},
                       corpus={"path": str(folder), "format": "images", "growing": True},
                       hooks=["blocks.1.hook_resid_post"], dtype="float32", compute={"executor": "local", "unit_contexts": 4})
    r1 = run_extract(spec, progress=False)
    assert (r1.units_run, r1.num_units) == (3, 3)
    ds = store.open(tmp_path / "acts").dataset("grow")
    before = ds.read("blocks.1.hook_resid_post")
    for p in files[12:18]:  # names sort after the first 12: appended at the corpus's end
        (folder / p.name).write_bytes(p.read_bytes())
    r2 = run_extract(spec, progress=False)
    assert (r2.units_run, r2.units_skipped, r2.num_units, r2.held_back_contexts) == (1, 3, 4, 2)  # 18 images: 4 full units, 2 held back
    ds.refresh()
    assert np.array_equal(ds.read("blocks.1.hook_resid_post", rows=slice(0, before.shape[0])), before)
    assert ds.info.num_units == 4 and len(ds.committed_units()) == 4
