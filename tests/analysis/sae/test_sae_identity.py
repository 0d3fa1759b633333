"""An SAE's ``cfg.json`` names its model so that sae-lens rebuilds it outside Strata: a local
folder by its path (``AutoModelForCausalLM``), a hub id by the id, with the model's
fingerprint beside the name (analysis/sae/identity.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _sae_data import lm_dataset
from safetensors.numpy import load_file

from strata.analysis.sae import SAETrainSpec, save_sae, train
from strata.analysis.sae.identity import ModelIdentity, model_identity
from strata.pipeline.models import folder_revision

HOOK = "blocks.1.hook_resid_post"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    from strata.pipeline.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "gpt2", family="gpt2", layers=2, d_model=32, heads=4,
                      max_positions=64, vocab_size=400, seed=0)


def trained_folder(root: Path, gpt2: Path, out: Path, *, meta: dict) -> Path:
    """A tiny SAE trained on a dataset of the tiny GPT-2 whose meta says ``meta``, saved to ``out``."""
    ds = lm_dataset(root, gpt2, meta=meta).dataset("lm")
    spec = SAETrainSpec.model_validate({
        "store": str(root), "dataset": "lm", "hooks": [HOOK], "name": "ident", "architecture": "topk",
        "sae": {"d_sae": 64, "k": 4},
        "train": {"total_training_samples": 20 * 32, "batch_size": 32, "lr": 1e-3, "seed": 0, "n_batches_for_norm_estimate": 2,
                  "dead_feature_window": 10, "log_every": 5},
        "data": {"shuffle_seed": 0, "skip_special": True, "holdout_units": 1},
        "compute": {"device": "cpu"},
    })
    result, = train(spec, ds=ds)
    return save_sae(result, out)


#: Run in a fresh interpreter with sae-lens and transformers only: load the SAE's folder, rebuild
#: its model the way sae-lens does from the cfg, and print what came back.
_OUTSIDE = """
import json, sys
from sae_lens import SAE
from sae_lens.load_model import load_model
from transformers import AutoModelForCausalLM

sae = SAE.load_from_disk(sys.argv[1], device="cpu")
md = sae.cfg.metadata
out = {"metadata": md.to_dict()}
if md.model_class_name == "AutoModelForCausalLM":
    hf = AutoModelForCausalLM.from_pretrained(md.model_name)
    wrapped = load_model(md.model_class_name, md.model_name, device="cpu")
    out["class"] = type(hf).__name__
    out["wte_sum"] = float(hf.get_input_embeddings().weight.double().sum())
    out["same_weights"] = all(a.equal(b) for a, b in zip(hf.state_dict().values(), wrapped.model.state_dict().values()))
print("RESULT " + json.dumps(out))
"""


def outside(folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _OUTSIDE, str(folder)], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(folder)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_a_local_model_is_named_by_its_folder_and_loads_outside_strata(gpt2, tmp_path):
    # The meta the extraction pipeline records for a local folder (pipeline/extract.py).
    rev = folder_revision(str(gpt2))
    folder = trained_folder(tmp_path / "store", gpt2, tmp_path / "sae",
                            meta={"model": "local", "revision": rev, "model_path": str(gpt2), "family": "gpt2"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == str(gpt2) and cfg["metadata"]["model_class_name"] == "AutoModelForCausalLM"

    got = outside(folder)
    md = got["metadata"]
    assert md["model_name"] == str(gpt2) and md["model_class_name"] == "AutoModelForCausalLM"
    assert md["hook_name"] == HOOK
    # The fingerprint: the dataset's identity and the folder's content hash, recomputed here.
    assert md["model_identity"] == "local" and md["model_revision"] == rev == folder_revision(str(gpt2))
    assert md["model_path"] == str(gpt2) and "model_saved_from" not in md
    # The name is usable: a causal LM with the folder's very weights, also through sae-lens's own loader.
    assert got["class"] == "GPT2LMHeadModel" and got["same_weights"] is True
    weights = load_file(str(gpt2 / "model.safetensors"))
    wte = next(v for k, v in weights.items() if k.endswith("wte.weight"))
    assert got["wte_sum"] == pytest.approx(float(wte.astype("float64").sum()), rel=0, abs=1e-9)
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["model"] == "local" and lineage["revision"] == rev and lineage["model_path"] == str(gpt2)


def test_a_hub_model_keeps_its_hub_id(gpt2, tmp_path):
    folder = trained_folder(tmp_path / "store", gpt2, tmp_path / "sae",
                            meta={"model": "gpt2", "revision": COMMIT, "model_type": "gpt2", "family": "gpt2"})
    md = json.loads((folder / "cfg.json").read_text())["metadata"]
    # TransformerLens knows gpt2, and Strata's hook names are TransformerLens's.
    assert md["model_name"] == "gpt2" and md["model_class_name"] == "HookedTransformer"
    assert md["model_identity"] == "gpt2" and md["model_revision"] == COMMIT
    assert "model_path" not in md and md["hook_name"] == HOOK


def test_model_names_for_each_kind_of_model(gpt2, tmp_path):
    rev = folder_revision(str(gpt2))
    # A hub causal LM TransformerLens does not know: rebuilt by AutoModelForCausalLM from its id.
    assert model_identity({"model": "someone/tiny-llama", "revision": COMMIT, "model_type": "llama"}) == ModelIdentity(
        "someone/tiny-llama", "AutoModelForCausalLM", "someone/tiny-llama", COMMIT)
    # Encoders and image models have no sae-lens loader; the name is still the model's.
    assert model_identity({"model": "bert-base-uncased", "revision": COMMIT, "model_type": "bert"}).class_name is None
    assert model_identity({"model": "local", "revision": rev, "model_path": "/m/vit", "model_type": "vit"}) == ModelIdentity(
        "/m/vit", None, "local", rev, path="/m/vit")
    assert model_identity({"model": "no-such-model", "revision": "r0"}).class_name is None
    # A meta without a model type trusts TransformerLens's list of names.
    assert model_identity({"model": "gpt2", "revision": COMMIT}).class_name == "HookedTransformer"
    # The model type comes from the folder's config when the meta lacks it; datasets written
    # before `model_path` named the folder in `model`.
    assert model_identity({"model": str(gpt2), "revision": rev}) == ModelIdentity(
        str(gpt2), "AutoModelForCausalLM", str(gpt2), rev, path=str(gpt2))

    # A folder saved from a hub model says so in `_name_or_path`: recorded, but the name stays the
    # folder (a fine-tuned checkpoint keeps its base's name there, with other weights).
    tuned = tmp_path / "tuned"
    shutil.copytree(gpt2, tuned)
    cfg = json.loads((tuned / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "openai-community/gpt2"}))
    got = model_identity({"model": "local", "revision": "local-xxh3:1", "model_path": str(tuned), "model_type": "gpt2"})
    assert (got.name, got.class_name, got.saved_from, got.hub_revision) == (str(tuned), "AutoModelForCausalLM", "openai-community/gpt2", None)
    assert got.metadata()["model_saved_from"] == "openai-community/gpt2"
    # A path in `_name_or_path` is no hub id.
    (tuned / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(gpt2)}))
    assert model_identity({"model": "local", "revision": "local-xxh3:1", "model_path": str(tuned)}).saved_from is None

    # A hub cache snapshot is that hub id at that commit.
    snap = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / COMMIT
    shutil.copytree(gpt2, snap)
    got = model_identity({"model": "local", "revision": rev, "model_path": str(snap)})
    assert got == ModelIdentity("someone/tiny-gpt2", "AutoModelForCausalLM", "local", rev, path=str(snap),
                                saved_from="someone/tiny-gpt2", hub_revision=COMMIT)
    assert got.metadata() == {"model_name": "someone/tiny-gpt2", "model_class_name": "AutoModelForCausalLM", "model_identity": "local",
                              "model_revision": rev, "model_path": str(snap), "model_saved_from": "someone/tiny-gpt2",
                              "model_hub_revision": COMMIT}
    gpt2_snap = tmp_path / "hub" / "models--gpt2" / "snapshots" / COMMIT
    shutil.copytree(gpt2, gpt2_snap)
    assert model_identity({"model": "local", "revision": rev, "model_path": str(gpt2_snap)}).class_name == "HookedTransformer"
