"""Transcoders (`architecture: transcoder | skip_transcoder`) on a synthetic sparse map from an
input hook to an output hook: the planted output atoms are recovered; what Strata saves loads in
a fresh process without Strata (sae-lens's classes, and the TopK layout through its own loader
file) and reproduces Strata's outputs exactly; a killed run resumes to the very weights; reruns
are no-ops; bad input is one line with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _sae_data import token_table
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from strata import store
from strata.analysis.sae import SAETrainSpec, checkpoint, run_job
from strata.analysis.sae.config import expand_runs
from strata.analysis.sae.save import save_sae
from strata.analysis.sae.train import train
from strata.analysis.sae.transcoder_eval import transcoder_metrics
from strata.store.commit.artifacts import ArtifactExistsError
from strata.store.errors import HookNotFoundError

D_IN, D_OUT, N_ATOMS, CTX, UC, UNITS = 32, 24, 48, 16, 32, 8
HIN, HOUT = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"
DS = "planted_tc"


def planted(root: Path, seed: int = 0) -> tuple[store.Store, np.ndarray]:
    """x = codes @ A_in (d 32), y = codes @ A_out (d 24): sparse codes (about 3 of 48 atoms per
    token) through planted unit-norm atoms; BOS rows constant and large (skipped). Returns the
    store and A_out."""
    rng = np.random.default_rng(seed)
    a_in = rng.standard_normal((N_ATOMS, D_IN)).astype(np.float32)
    a_in /= np.linalg.norm(a_in, axis=1, keepdims=True)
    a_out = rng.standard_normal((N_ATOMS, D_OUT)).astype(np.float32)
    a_out /= np.linalg.norm(a_out, axis=1, keepdims=True)
    s = store.open(root)
    w = s.create_dataset(DS, hooks={HIN: D_IN, HOUT: D_OUT, "blocks.0.hook_resid_post": D_OUT}, context_size=CTX, dtype="float32",
                         num_units=UNITS, unit_contexts=UC, meta={"model": "no-such-model", "revision": "r0"})
    rows = UC * CTX
    bos = (np.arange(rows) % CTX) == 0
    for u in range(UNITS):
        codes = (rng.exponential(1.0, (rows, N_ATOMS)) + 0.5).astype(np.float32) * (rng.random((rows, N_ATOMS)) < 3 / N_ATOMS)
        x, y = codes @ a_in, codes @ a_out
        x[bos], y[bos] = 40.0, -40.0
        w.write_unit(u, tokens=token_table(u, UC), acts={HIN: x, HOUT: y, "blocks.0.hook_resid_post": y})
    return s, a_out


def raw_spec(root: Path, name: str, *, architecture: str = "transcoder", sae: dict | None = None, steps: int = 60, batch: int = 64,
             **train) -> dict:
    return {
        "store": str(root), "dataset": DS, "hooks": {"in": HIN, "out": HOUT}, "name": name, "architecture": architecture,
        "sae": sae or {"d_sae": 64}, "train": {"total_training_samples": steps * batch, "batch_size": batch, "lr": 3e-3, **train},
        "eval": {"ce": False}, "compute": {"device": "cpu", "ray": "never"},
    }


def make_spec(root: Path, name: str, **kw) -> SAETrainSpec:
    return SAETrainSpec.model_validate(raw_spec(root, name, **kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    s, a_out = planted(root)
    return root, s, a_out


def heldout(s: store.Store, units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ds = s.dataset(DS)
    it = ds.iter_batches([HIN, HOUT], batch_size=1 << 20, shuffle=False, epochs=1, skip_special=True, units=units)
    try:
        parts = list(it)
    finally:
        it.close()
    return torch.cat([p[HIN] for p in parts]), torch.cat([p[HOUT] for p in parts])


# -- (a) planted recovery ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "sae", "steps", "cls"), [
    ("planted", {"d_sae": 64, "l1_coefficient": 0.3}, 800, "Transcoder"),  # ReLU + L1
    ("planted-btk", {"d_sae": 64, "k": 3}, 1500, "JumpReLUTranscoder"),  # BatchTopK, saved as JumpReLU
])
def test_a_transcoder_recovers_the_planted_output_atoms(data, name, sae, steps, cls):
    root, s, a_out = data
    res = run_job(make_spec(root, name, sae=sae, steps=steps, batch=256))
    m = res.outcomes[0].metrics
    h = s.sae(name)
    tc = h.load()
    assert type(tc).__name__ == cls and h.cfg["architecture"] == {"Transcoder": "transcoder", "JumpReLUTranscoder": "jumprelu_transcoder"}[cls]
    assert (h.cfg["d_in"], h.cfg["d_out"], h.cfg["d_sae"]) == (D_IN, D_OUT, 64)
    w = tc.W_dec.detach().numpy()
    cos = a_out @ (w / np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)).T  # atoms x latents
    r, c = linear_sum_assignment(-cos)  # one latent per atom
    assert (cos[r, c] >= 0.9).mean() >= 0.9, np.sort(cos[r, c])[:8]
    # metrics.json: FVU of the OUT hook against its own mean, L0 and dead latents, checked
    # against an independent computation over the held-out rows.
    units = h.lineage["holdout_units"]
    x, y = heldout(s, units)
    with torch.no_grad():
        f = tc.encode(x)
        y_hat = tc.forward(x)
    y64, e64 = y.double(), (y_hat.double() - y.double())
    fvu = float(e64.pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-9) and m["fvu"] < 0.2
    assert m["l0"] == pytest.approx(float((f != 0).double().sum(1).mean()), rel=1e-12)
    assert m["dead_features"] == int(((f != 0).sum(0) == 0).sum()) and m["tokens"] == x.shape[0]
    assert m["hook_in"] == HIN and m["hook_out"] == HOUT
    lin = h.lineage
    assert (lin["hook"], lin["hook_in"], lin["hook_out"], lin["d_in"], lin["d_out"]) == (HIN, HIN, HOUT, D_IN, D_OUT)
    assert tc.cfg.metadata.hook_name == HIN and tc.cfg.metadata.hook_name_out == HOUT
    curves = h.curves()
    assert curves.column("explained_variance").to_pylist()[-1] > 0.7  # sae-lens's own curve measures y's prediction


# -- (b) loading in a fresh process without Strata ----------------------------------------------

_LOAD_SAE_LENS = """
import sys
from safetensors.torch import load_file, save_file
from sae_lens import SAE
folder, xs, out = sys.argv[1:4]
sae = SAE.load_from_disk(folder)
x = load_file(xs)["x"]
f = sae.encode(x)
save_file({"f": f.contiguous(), "y": sae.decode(f).contiguous(), "fwd": sae.forward(x).contiguous()}, out)
assert not any(m == "strata" or m.startswith("strata.") for m in sys.modules), "strata was imported"
print(type(sae).__name__)
"""

_LOAD_TOPK = """
import importlib.util, sys
from safetensors.torch import load_file, save_file
loader, folder, xs, out = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("topk_transcoder", loader)
mod = importlib.util.module_from_spec(spec)
sys.modules["topk_transcoder"] = mod
spec.loader.exec_module(mod)
tc = mod.TopKTranscoder.load_from_disk(folder)
x = load_file(xs)["x"]
f = tc.encode(x)
save_file({"f": f.contiguous(), "y": tc.decode(f).contiguous(), "fwd": tc.forward(x).contiguous()}, out)
assert not any(m == "strata" or m.startswith("strata.") or m.startswith("sae_lens") for m in sys.modules), "strata or sae-lens imported"
print(type(tc).__name__, tc.cfg.d_in, tc.cfg.d_out, tc.cfg.d_sae, tc.cfg.k)
"""


@pytest.mark.parametrize(("architecture", "sae", "cls"), [
    ("transcoder", {"d_sae": 64, "l1_coefficient": 0.3}, "Transcoder"),
    ("skip_transcoder", {"d_sae": 64, "l1_coefficient": 0.3}, "SkipTranscoder"),
    ("transcoder", {"d_sae": 64, "k": 3}, "JumpReLUTranscoder"),
    ("skip_transcoder", {"d_sae": 64, "k": 3}, "JumpReLUSkipTranscoder"),
    ("skip_transcoder", {"d_sae": 64, "k": 3, "activation": "topk"}, "TopKTranscoder"),
])
def test_a_saved_transcoder_loads_without_strata_and_reproduces_its_outputs(data, tmp_path, architecture, sae, cls):
    root, s, _ = data
    spec = make_spec(root, "load", architecture=architecture, sae=sae, steps=40)
    [res] = train(spec, ds=s.dataset(DS))
    tc = res.sae
    assert type(tc).__name__ == cls
    folder = save_sae(res, tmp_path / "tc", metrics={"dead_features": 0, "l0": 1.0})
    cfg = json.loads((folder / "cfg.json").read_text())
    want_arch = {"Transcoder": "transcoder", "SkipTranscoder": "skip_transcoder", "JumpReLUTranscoder": "jumprelu_transcoder",
                 "JumpReLUSkipTranscoder": "jumprelu_skip_transcoder", "TopKTranscoder": "strata_topk_skip_transcoder"}[cls]
    assert cfg["architecture"] == want_arch and (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (D_IN, D_OUT, 64)
    x, _ = heldout(s, [UNITS - 1])
    x = x[:200].contiguous()
    save_file({"x": x}, tmp_path / "x.safetensors")
    out = tmp_path / "out.safetensors"
    if cls == "TopKTranscoder":
        from strata.store.saes import topk_transcoder

        args = ["-c", _LOAD_TOPK, topk_transcoder.__file__, str(folder), str(tmp_path / "x.safetensors"), str(out)]
    else:
        args = ["-c", _LOAD_SAE_LENS, str(folder), str(tmp_path / "x.safetensors"), str(out)]
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[0] == cls
    got = load_file(out)
    with torch.no_grad():
        f = tc.encode(x)
        want = {"f": f, "y": tc.decode(f), "fwd": tc.forward(x)}
    for key in want:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key
    assert (want["f"] != 0).any() and (want["f"] == 0).any()
    if "Skip" in cls or cls == "TopKTranscoder":  # the skip path is trained (zero at initialisation) and in forward, not decode
        assert tc.W_skip.abs().sum() > 0 and not torch.equal(want["fwd"], want["y"])
    if cls.startswith("JumpReLU"):  # the learnt BatchTopK threshold, one value for every latent
        th = tc.threshold.detach()
        assert float(th[0]) > 0 and torch.equal(th, th[0].expand_as(th))
    if cls == "TopKTranscoder":
        assert int((want["f"] != 0).sum(1).max()) <= 3
        assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # the decoder norms folded into the encoder
    # Strata's evaluation object is what it saved: the prediction metrics agree with it.
    m = transcoder_metrics(tc, s.dataset(DS), HIN, HOUT, [UNITS - 1])
    xs, ys = heldout(s, [UNITS - 1])
    with torch.no_grad():
        err = (tc.forward(xs).double() - ys.double()).pow(2).sum()
    assert m["mse"] == pytest.approx(float(err) / xs.shape[0], rel=1e-9)


# -- (c) resume, rerun, refusal ------------------------------------------------------------------

STEPS, BATCH, EVERY = 60, 64, 20


class Killed(Exception):
    """Stands for a SIGKILL after a checkpoint."""


def ckpt_spec(root: Path, name: str, **train) -> SAETrainSpec:
    return make_spec(root, name, architecture="skip_transcoder", sae={"d_sae": 48, "k": 4}, steps=STEPS, batch=BATCH,
                     checkpoint_every=EVERY, log_every=7, dead_feature_window=15, feature_sampling_window=30, **train)


def test_a_killed_transcoder_run_resumes_to_the_uninterrupted_weights(data, monkeypatch):
    root, s, _ = data
    run_job(ckpt_spec(root, "ref"))
    prune = checkpoint.prune

    def dying_prune(storage, name, *, keep, lease):
        if keep == 2 * EVERY:
            raise Killed(f"killed after step {keep}")
        return prune(storage, name, keep=keep, lease=lease)

    monkeypatch.setattr(checkpoint, "prune", dying_prune)
    with pytest.raises(Killed):
        run_job(ckpt_spec(root, "resumed"))
    monkeypatch.setattr(checkpoint, "prune", prune)
    assert [step for step, _ in checkpoint.committed(s.storage, "resumed")] == [EVERY, 2 * EVERY]
    res = run_job(ckpt_spec(root, "resumed"))
    assert res.outcomes[0].status == "resumed" and res.outcomes[0].resumed_from == 2 * EVERY
    a, b = s.sae("ref"), s.sae("resumed")
    for f in ("sae_weights.safetensors", "sparsity.safetensors"):
        ta, tb = load_file(a.path / f), load_file(b.path / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert {"W_skip", "threshold"} <= set(load_file(a.path / "sae_weights.safetensors"))
    assert a.curves().equals(b.curves()) and a.metrics == b.metrics
    assert checkpoint.committed(s.storage, "resumed") == []
    # A rerun is a no-op; the same name with another config is refused, naming what differs.
    again = run_job(ckpt_spec(root, "resumed"))
    assert again.noop and again.outcomes[0].status == "unchanged"
    with pytest.raises(ArtifactExistsError, match=r"train.lr: 0.003 -> 0.001"):
        run_job(ckpt_spec(root, "resumed", lr=1e-3))


# -- (d) bad input: one line, nothing written ----------------------------------------------------


def error_of(raw: dict) -> str:
    with pytest.raises(ValidationError) as e:
        SAETrainSpec.model_validate(raw)
    msgs = [err["msg"] for err in e.value.errors()]
    assert all("\n" not in m for m in msgs)
    return "; ".join(msgs)


@pytest.mark.parametrize(("change", "expect"), [
    ({"hooks": {"in": {"dataset": "other_ds", "hook": HIN}, "out": HOUT}}, "names dataset 'other_ds', but a transcoder's in and out hooks"),
    ({"hooks": {"in": HIN, "out": {"dataset": "other_ds", "hook": HOUT}}}, "come from one dataset"),
    ({"sae": {"d_sae": 0}}, "`sae.d_sae` must be positive, got 0"),
    ({"architecture": "transcoderr"}, "valid: "),
    ({"sae": {"d_sae": 64, "normalize_activations": "expected_average_only_in"}}, "`sae.normalize_activations` must be none for a transcoder"),
    ({"sae": {"d_sae": 64, "d_out": 8}}, "`d_out` is set by Strata"),
    ({"sae": {"d_sae": 64, "k": 4, "activation": "relu"}}, "activation` is relu"),
    ({"sae": {"d_sae": 64, "activation": "topk"}}, "needs `sae.k`"),
    ({"sae": {"d_sae": 64, "k": 2.5, "activation": "topk"}}, "must be an integer"),
    ({"hooks": [HIN]}, "takes `hooks: {in: HOOK, out: HOOK}`"),
    ({"hooks": {"in": HIN}}, "a transcoder's hooks are {in: HOOK, out: HOOK}"),
    ({"hooks": {"out": "blocks.0.hook_resid_post"}}, ".in is required"),
    ({"architecture": "topk", "sae": {"d_sae": 64, "k": 4}}, "pairs are for `architecture: transcoder`"),
])
def test_bad_specs_are_refused_in_one_line(tmp_path, change, expect):
    msg = error_of({**raw_spec(tmp_path, "bad"), **change})
    assert expect in msg, msg
    if change.get("architecture") == "transcoderr":
        assert "transcoder" in msg.split("valid: ")[1].split(", ") and "skip_transcoder" in msg


def test_in_defaults_to_the_mlp_input_and_names_follow_the_out_hooks(tmp_path):
    s = SAETrainSpec.model_validate({**raw_spec(tmp_path, "tc"), "hooks": [{"out": "blocks.3.hook_mlp_out"},
                                                                           {"in": "blocks.2.ln2.hook_normalized", "out": "blocks.2.hook_mlp_out"}]})
    runs = expand_runs(s, ["blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out"])
    assert [(r.name, r.hook, r.hook_out) for r in runs] == [
        ("tc.blocks.3.hook_mlp_out", "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out"),
        ("tc.blocks.2.hook_mlp_out", "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"),
    ]
    assert runs[0].spec.hooks == ({"in": "blocks.3.mlp.hook_in", "out": "blocks.3.hook_mlp_out"},)


def test_a_hook_missing_from_the_dataset_is_one_line_and_writes_nothing(data):
    root, s, _ = data
    before = sorted(p.relative_to(root) for p in Path(root).rglob("*"))
    for hooks in ({"in": "blocks.0.mlp.hook_inn", "out": HOUT}, {"out": "blocks.5.hook_mlp_out"}):
        with pytest.raises(HookNotFoundError) as e:
            run_job(SAETrainSpec.model_validate({**raw_spec(root, "missing"), "hooks": hooks}))
        msg = str(e.value)
        assert "\n" not in msg and "is not a hook of dataset 'planted_tc'" in msg and HIN in msg, msg
    assert sorted(p.relative_to(root) for p in Path(root).rglob("*")) == before
    assert "missing" not in s.saes()


def test_reprocess_plans_a_transcoder_spec_like_an_sae(data, tmp_path, monkeypatch):
    import yaml

    from strata.jobs.reprocess import load_pipeline, plan_pipeline

    root, s, _ = data
    monkeypatch.chdir(tmp_path)
    spec = raw_spec(root, "tc-plan", architecture="skip_transcoder", sae={"d_sae": 32, "k": 4}, steps=20)
    spec["hooks"] = {"out": HOUT, "in": HIN}
    (tmp_path / "tc.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"store": str(root), "jobs": ["tc.yaml"]}))
    [step] = plan_pipeline(load_pipeline("pipeline.yaml")).steps
    assert step.run and step.names == ["tc-plan"]
    run_job(SAETrainSpec.model_validate(spec))
    [step] = plan_pipeline(load_pipeline("pipeline.yaml")).steps  # the same resolved config as the job's: up to date
    assert not step.run and step.why.startswith("up to date"), step.why


def test_a_sweep_over_pairs_names_each_transcoder_by_its_out_hook_and_values(tmp_path):
    s = SAETrainSpec.model_validate({**raw_spec(tmp_path, "tc", sae={"d_sae": 64, "k": 4}),
                                     "hooks": [{"out": "blocks.0.hook_mlp_out"}, {"out": "blocks.1.hook_mlp_out"}],
                                     "sweep": {"sae.k": [2, 4]}})
    runs = expand_runs(s, [f"blocks.{i}.{h}" for i in (0, 1) for h in ("mlp.hook_in", "hook_mlp_out")])
    assert [r.name for r in runs] == ["tc.blocks.0.hook_mlp_out.k=2", "tc.blocks.0.hook_mlp_out.k=4",
                                      "tc.blocks.1.hook_mlp_out.k=2", "tc.blocks.1.hook_mlp_out.k=4"]
    assert [(r.hook, r.hook_out, r.spec.sae["k"]) for r in runs][1] == ("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", 4.0)
    assert runs[3].data_key == "blocks.1.mlp.hook_in->blocks.1.hook_mlp_out" and runs[3].hooks == ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
