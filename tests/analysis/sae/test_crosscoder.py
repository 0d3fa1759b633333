"""Crosscoders (``architecture: crosscoder``): planted shared and exclusive atoms of two synthetic
"models" are recovered and classified by relative decoder norm; the saved layout loads into a
module built here with dictionary_learning's CrossCoder names and shapes and reproduces
Strata's encode/decode; held-out FVU per source matches a direct computation; a killed run
resumes to the same weights, a rerun is a no-op, another config under the name is refused;
bad input is one line and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _sae_data import HOOKS, planted_dataset, token_table
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file
from torch import nn

from strata import store
from strata.analysis.sae import SAETrainSpec, checkpoint, run_job
from strata.analysis.sae.crosscoder_run import ConcatBatches, plan_crosscoders
from strata.analysis.sae.diffing import THRESHOLDS
from strata.jobs.checks import check_job
from strata.jobs.cli import main
from strata.pipeline.encode import EncodeSpec, run_encode
from strata.store.datasets.aligned import align_tokens, iter_aligned
from strata.store.saes.crosscoder import CrossCoder

D, N_SHARED, N_OWN, SAME = 64, 32, 16, 16  # the first SAME shared atoms have one direction in both models
CTX, UNIT_CONTEXTS, UNITS = 16, 32, 6
HOOK = "blocks.0.hook_resid_post"


def _unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def two_models(root, *, seed: int = 0) -> tuple[store.Store, dict[str, np.ndarray]]:
    """Datasets ``model-a`` and ``model-b`` over the same documents (one tokenizer, one corpus
    fingerprint: they align by (doc_id, doc_position)): 32 shared atoms (a code fires in both
    models at once, along each model's own direction; the first 16 directions are the same in
    both) and 16 atoms of each model's own, with sparse exponential codes. Also ``other-corpus``
    (another corpus fingerprint) and ``wide`` (twice the width) for the bad-input cases."""
    rng = np.random.default_rng(seed)
    atoms = {"shared_a": _unit(rng, N_SHARED), "own_a": _unit(rng, N_OWN), "own_b": _unit(rng, N_OWN)}
    atoms["shared_b"] = np.concatenate([atoms["shared_a"][:SAME], _unit(rng, N_SHARED - SAME)])
    s = store.open(root)
    def meta(m: str) -> dict[str, str]:
        return {"tokenizer": "tok", "corpus_fingerprint": ("d" if m == "other-corpus" else "c") * 64, "model": m}

    ws = {m: s.create_dataset(m, hooks={HOOK: D * (2 if m == "wide" else 1)}, context_size=CTX, dtype="float32", num_units=UNITS,
                              unit_contexts=UNIT_CONTEXTS, meta=meta(m))
          for m in ("model-a", "model-b", "other-corpus", "wide")}
    rows = UNIT_CONTEXTS * CTX
    bos = (np.arange(rows) % CTX) == 0
    for u in range(UNITS):
        def codes(n: int) -> np.ndarray:
            return (rng.exponential(1.0, (rows, n)) * (rng.random((rows, n)) < 0.06)).astype(np.float32)

        cs, ca, cb = codes(N_SHARED), codes(N_OWN), codes(N_OWN)
        acts = {"model-a": cs @ atoms["shared_a"] + ca @ atoms["own_a"], "model-b": cs @ atoms["shared_b"] + cb @ atoms["own_b"]}
        acts["other-corpus"] = acts["model-a"]
        acts["wide"] = np.concatenate([acts["model-a"], acts["model-a"]], 1)
        for m, w in ws.items():
            a = acts[m].copy()
            a[bos] = 50.0  # BOS: large and constant, special, never paired
            w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS, context_size=CTX, unit_contexts=UNIT_CONTEXTS), acts={HOOK: a})
    return s, atoms


def spec_of(root, name: str, *, sources=("model-a", "model-b"), sae=None, **train) -> SAETrainSpec:
    return SAETrainSpec.model_validate({
        "store": str(root), "name": name, "architecture": "crosscoder",
        "sources": [{"dataset": ds, "hook": HOOK} for ds in sources],
        "sae": sae or {"d_sae": 64, "k": 4},
        "train": {"total_training_samples": 1200 * 256, "batch_size": 256, "lr": 3e-3, "checkpoint_every": 0, "log_every": 50, **train},
        "compute": {"device": "cpu"},
    })


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("crosscoder")
    s, atoms = two_models(root)
    return root, s, atoms


def test_planted_shared_and_exclusive_atoms_are_recovered_and_classified(models):
    root, s, atoms = models
    result = run_job(spec_of(root, "diff"))
    assert [o.status for o in result.outcomes] == ["trained"]
    h = s.sae("diff")
    cc = h.load()
    assert isinstance(cc, CrossCoder) and cc.n_sources == 2 and cc.d_sae == 64
    w = cc.decoder.weight.detach().numpy()  # [2, d_sae, D]
    # Each planted atom as the crosscoder would write it: both models' directions, or one of them.
    zero = np.zeros((N_OWN, D), np.float32)
    planted = np.concatenate([np.concatenate([atoms["shared_a"], atoms["shared_b"]], 1),
                              np.concatenate([atoms["own_a"], zero], 1), np.concatenate([zero, atoms["own_b"]], 1)])
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    learned = np.concatenate([w[0], w[1]], 1)
    learned /= np.linalg.norm(learned, axis=1, keepdims=True)
    cos = planted @ learned.T
    best, match = cos.max(1), cos.argmax(1)
    groups = {"shared": slice(0, N_SHARED), "a_only": slice(N_SHARED, N_SHARED + N_OWN), "b_only": slice(N_SHARED + N_OWN, None)}
    for cls, sl in groups.items():
        assert (best[sl] >= 0.9).mean() >= 0.9, (cls, np.sort(best[sl])[:4])

    # The latents table against the weights, computed here.
    lat = pq.read_table(h.path / "latents.parquet")
    norms = np.linalg.norm(w, axis=-1)
    r = norms[1] / (norms[0] + norms[1])
    np.testing.assert_allclose(np.stack(lat.column("decoder_norms").to_pylist()).T, norms, rtol=1e-6)
    np.testing.assert_allclose(lat.column("relative_norm").to_numpy(), r, rtol=1e-5)
    classes = np.asarray(lat.column("class").to_pylist())
    expected = np.where(r < 0.1, "a_only", np.where(r > 0.9, "b_only", np.where((r >= 0.3) & (r <= 0.7), "shared", "mixed")))
    assert (classes == expected).all()
    for cls, sl in groups.items():  # the recovered atoms are classified by their relative norm
        good = best[sl] >= 0.9
        assert (classes[match[sl][good]] == cls).all(), cls
    cosine = lat.column("cosine").to_numpy()
    same = match[:SAME][best[:SAME] >= 0.9]
    assert (cosine[same] > 0.9).all()  # one direction in both models
    wc = (w[0] * w[1]).sum(1) / (norms[0] * norms[1])
    np.testing.assert_allclose(cosine, wc, rtol=1e-4, atol=1e-6)

    m = h.metrics
    diff = m["diffing"]
    assert diff["thresholds"] == THRESHOLDS
    assert diff["counts"] == {c: int((classes == c).sum()) for c in ("a_only", "b_only", "shared", "mixed", "none")}
    assert diff["shared_cosine_median"] == pytest.approx(float(np.median(wc[classes == "shared"])), rel=1e-5)
    assert [x["dataset"] for x in m["sources"]] == ["model-a", "model-b"] and all(x["fvu"] < 0.1 for x in m["sources"])
    assert m["l0"] == pytest.approx(4.0) and 0 <= m["dead_fraction"] < 0.1
    assert (h.path / "relative_norms.png").read_bytes().startswith(b"\x89PNG")

    cfg = h.cfg
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "n_sources", "activation", "k")} == {
        "architecture": "crosscoder", "d_in": D, "d_sae": 64, "n_sources": 2, "activation": "topk", "k": 4}
    fps = {n: s.dataset(n).info.fingerprint for n in ("model-a", "model-b")}
    assert cfg["sources"] == [{"dataset": n, "hook": HOOK, "fingerprint": fps[n]} for n in ("model-a", "model-b")]
    lin = h.lineage
    assert [(x["dataset"], x["fingerprint"], x["units"], x["holdout_units"]) for x in lin["sources"]] == [
        (n, fps[n], list(range(UNITS - 1)), [UNITS - 1]) for n in ("model-a", "model-b")]
    assert lin["alignment"]["method"] == "doc_position" and lin["pairs"] + lin["holdout_pairs"] == UNITS * UNIT_CONTEXTS * (CTX - 1)


def test_features_encode_takes_crosscoder_latents_with_per_source_decoder_norms(models):
    root, s, _ = models
    if "diff" not in s.saes():
        run_job(spec_of(root, "diff"))
    r = run_encode(EncodeSpec(store=str(root), sae="diff", top_k=4, compute={"executor": "local", "batch_rows": 100, "num_workers": 1}),
                   progress=False)
    assert r.units_run == UNITS
    fs = s.features("diff")
    cc = s.sae("diff").load()
    a, b = s.dataset("model-a"), s.dataset("model-b")
    # Both datasets hold the same documents in the same rows: source 0's row r pairs with B's row r.
    special = np.concatenate([a.special_mask(u) for u in range(UNITS)])
    rows = np.flatnonzero(~special)[::37]
    x = torch.stack([torch.from_numpy(np.concatenate([ds.unit_array(HOOK, u) for u in range(UNITS)])[rows]) for ds in (a, b)], 1)
    with torch.no_grad():
        want = cc.encode(x)
    torch.testing.assert_close(fs.latents(rows, dense=True), want, rtol=1e-5, atol=1e-5)
    assert fs.encoded_rows == int((~special).sum())  # special rows never pair: not encoded
    assert fs.latents(np.flatnonzero(special)[:5], dense=True).abs().sum() == 0
    st = fs.stats(full=True)
    norms = np.stack(st.column("decoder_norms").to_pylist())
    np.testing.assert_allclose(norms, cc.decoder.weight.detach().norm(dim=-1).numpy().T, rtol=1e-6)
    assert st.schema.field("decoder_norms").type == pa.list_(pa.float32())


# -- dictionary_learning's CrossCoder, as its GitHub class lays it out ------------------------------


class CrossCoderEncoder(nn.Module):
    def __init__(self, activation_dim: int, dict_size: int, num_layers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, activation_dim, dict_size))
        self.bias = nn.Parameter(torch.zeros(dict_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, n_layers, activation_dim)
        return torch.relu(torch.einsum("bld, ldD -> blD", x, self.weight).sum(dim=1) + self.bias)


class CrossCoderDecoder(nn.Module):
    def __init__(self, activation_dim: int, dict_size: int, num_layers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, dict_size, activation_dim))
        self.bias = nn.Parameter(torch.zeros(num_layers, activation_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bD, lDd -> bld", f, self.weight) + self.bias


class DictionaryLearningCrossCoder(nn.Module):
    def __init__(self, activation_dim: int, dict_size: int, num_layers: int) -> None:
        super().__init__()
        self.encoder = CrossCoderEncoder(activation_dim, dict_size, num_layers)
        self.decoder = CrossCoderDecoder(activation_dim, dict_size, num_layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f)


def test_layers_of_one_dataset_in_dictionary_learnings_layout(tmp_path):
    s, _ = planted_dataset(tmp_path, units=4)
    spec = SAETrainSpec.model_validate({
        "store": str(tmp_path), "dataset": "planted", "name": "layers", "architecture": "crosscoder",
        "sources": [{"hook": h} for h in HOOKS], "sae": {"d_sae": 24, "activation": "relu", "sparsity": "decoder_norm", "l1_coefficient": 0.3},
        "train": {"total_training_samples": 60 * 128, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 0}, "compute": {"device": "cpu"},
    })
    run_job(spec)
    h = s.sae("layers")
    state = load_file(h.path / "crosscoder.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "encoder.weight": (2, 16, 24), "encoder.bias": (24,), "decoder.weight": (2, 24, 16), "decoder.bias": (2, 16)}
    dl = DictionaryLearningCrossCoder(16, 24, 2)
    dl.load_state_dict(state, strict=True)
    cc = h.load()
    ds = s.dataset("planted")
    units = h.lineage["holdout_units"]
    assert units == [3] and h.lineage["alignment"]["method"] == "rows"
    tok = ds.tokens(units=units)
    keep = ~tok.column("special").to_numpy(zero_copy_only=False)
    x = torch.stack([torch.from_numpy(np.concatenate([ds.unit_array(hk, u) for u in units])[keep].copy()) for hk in HOOKS], 1)
    with torch.no_grad():
        f, f_dl = cc.encode(x), dl.encode(x)
        torch.testing.assert_close(f, f_dl, rtol=1e-6, atol=1e-6)
        assert torch.equal(cc.decode(f_dl), dl.decode(f_dl))
        x_hat = dl.decode(f_dl).double()
    # Held-out FVU per source and L0, computed here with dictionary_learning's module.
    x64 = x.double()
    for i, got in enumerate(h.metrics["sources"]):
        fvu = float((x_hat[:, i] - x64[:, i]).pow(2).sum() / (x64[:, i] - x64[:, i].mean(0)).pow(2).sum())
        assert got["hook"] == HOOKS[i] and got["fvu"] == pytest.approx(fvu, rel=1e-6)
    assert h.metrics["l0"] == pytest.approx(float((f_dl != 0).double().sum(1).mean()), rel=1e-9)
    assert h.metrics["tokens"] == x.shape[0]


# -- resume, rerun, refuse ----------------------------------------------------------------------------

STEPS, EVERY = 60, 20


class Killed(Exception):
    """Stands for a SIGKILL after a checkpoint."""


def resume_spec(root, name: str, **train) -> SAETrainSpec:
    return spec_of(root, name, sae={"d_sae": 32, "k": 3.0, "activation": "batchtopk"},
                   total_training_samples=STEPS * 64, batch_size=64, checkpoint_every=EVERY, log_every=7, **train)


def test_a_killed_run_resumes_to_the_same_weights_a_rerun_is_a_noop_another_config_is_refused(models, monkeypatch):
    root, s, _ = models
    run_job(resume_spec(root, "ref"))
    prune = checkpoint.prune

    def dying_prune(storage, name, *, keep, lease):
        if keep == 2 * EVERY:
            raise Killed(name)
        return prune(storage, name, keep=keep, lease=lease)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "prune", dying_prune)
        with pytest.raises(Killed):
            run_job(resume_spec(root, "killed"))
    assert "killed" not in s.saes() and [st for st, _ in checkpoint.committed(s.storage, "killed")] == [EVERY, 2 * EVERY]
    result = run_job(resume_spec(root, "killed"))
    assert [(o.status, o.resumed_from) for o in result.outcomes] == [("resumed", 2 * EVERY)]
    a, b = s.sae("ref"), s.sae("killed")
    for f in ("crosscoder.safetensors", "sparsity.safetensors"):
        ta, tb = load_tensors(a.artifact.read(f)), load_tensors(b.artifact.read(f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert a.cfg["threshold"] == b.cfg["threshold"] > 0 and a.metrics == b.metrics and a.curves().equals(b.curves())
    assert run_job(resume_spec(root, "killed")).noop
    with pytest.raises(store.ArtifactExistsError, match=r"committed already with another config \(train.lr: 0.003 -> 0.001\)"):
        run_job(resume_spec(root, "killed", lr=1e-3))
    with pytest.raises(store.ArtifactExistsError, match="another config"):  # `strata submit`'s check refuses it too
        check_job("sae", resume_spec(root, "killed", lr=1e-3), s)


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, error, pattern", [
    ({"sources": ("model-a", "wide")}, "SpecError", r"different widths \(model-a:blocks.0.hook_resid_post 64, wide:blocks.0.hook_resid_post 128\)"),
    ({"sources": ("model-a", "other-corpus")}, "AlignmentError", r"different corpora"),
    ({"sources": ("model-a", "no-such")}, "DatasetNotFoundError", r"no-such"),
])
def test_sources_that_cannot_be_paired_are_refused_before_anything_is_written(models, case, error, pattern):
    root, s, _ = models
    before = s.storage.list("saes")
    with pytest.raises(Exception, match=pattern) as e:
        run_job(spec_of(root, "bad", **case))
    assert type(e.value).__name__ == error and "\n" not in str(e.value)
    assert s.storage.list("saes") == before


@pytest.mark.parametrize("change, pattern", [
    ({"sources": [{"dataset": "model-a", "hook": HOOK}]}, r"`sources` has 1 source\(s\): a crosscoder needs at least two"),
    ({"architecture": "topk", "sae": {"d_sae": 8, "k": 2}}, r"`sources` is for `architecture: crosscoder`, not 'topk'"),
    ({"sources": None, "dataset": "model-a", "hooks": [HOOK]}, r"`architecture: crosscoder` needs `sources`"),
    ({"sae": {"d_sae": 8, "activation": "relu"}}, r"`sae.activation: relu` needs `sae.sparsity: decoder_norm`"),
    ({"sae": {"d_sae": 8, "k": 2, "normalize_activations": "expected_average_only_in"}}, r"`sae.normalize_activations`"),
    ({"sae": {"d_sae": 8, "k": 2, "n_sources": 3}}, r"`sae.n_sources` is not an option"),
    ({"sae": {"d_sae": 8}}, r"`sae.k` is required with `sae.activation: topk`"),
])
def test_bad_crosscoder_specs_are_one_line(change, pattern):
    raw = json.loads(spec_of("/nowhere", "bad").model_dump_json())
    raw.update(change)
    with pytest.raises(ValueError, match=pattern):
        SAETrainSpec.model_validate(raw)


def test_a_sweep_plans_one_crosscoder_per_combination_and_the_hash_covers_every_source(models):
    root, s, _ = models
    raw = json.loads(spec_of(root, "sw").model_dump_json())
    p = plan_crosscoders(SAETrainSpec.model_validate({**raw, "sweep": {"sae.k": [2, 4]}}), s)
    assert [(r.name, r.run.hook, r.status) for r in p.runs] == [
        ("sw.k=2", f"model-a:{HOOK}+model-b:{HOOK}", "train"), ("sw.k=4", f"model-a:{HOOK}+model-b:{HOOK}", "train")]
    a, b = (r.config for r in p.runs)
    assert a["sae"]["k"] == 2 and b["sae"]["k"] == 4 and p.runs[0].config_hash != p.runs[1].config_hash
    assert [(x["dataset"], x["fingerprint"], x["hook"]) for x in a["sources"]] == [
        (n, s.dataset(n).info.fingerprint, HOOK) for n in ("model-a", "model-b")]
    # The same spec over the sources the other way round is another crosscoder.
    swapped = plan_crosscoders(spec_of(root, "sw", sources=("model-b", "model-a")), s).runs[0]
    assert swapped.config_hash != plan_crosscoders(spec_of(root, "sw"), s).runs[0].config_hash


def test_strata_sae_train_on_a_crosscoder_spec(models, tmp_path, capsys):
    root, s, _ = models
    if "diff" not in s.saes():
        run_job(spec_of(root, "diff"))
    spec = tmp_path / "cc.yaml"

    def write(second: str) -> None:
        spec.write_text(f"""
store: {root}
name: diff
architecture: crosscoder
sources: [{{dataset: model-a, hook: {HOOK}}}, {{dataset: {second}, hook: {HOOK}}}]
sae: {{d_sae: 64, k: 4}}
train: {{total_training_samples: {1200 * 256}, batch_size: 256, lr: 3.0e-3, checkpoint_every: 0, log_every: 50}}
compute: {{device: cpu}}
""")

    write("model-b")
    assert main(["sae", "train", str(spec)]) == 0
    out = capsys.readouterr().out
    assert f"diff\tmodel-a:{HOOK}+model-b:{HOOK}\tunchanged" in out
    write("wide")
    before = s.storage.list("saes")
    assert main(["sae", "train", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("strata: error: `sources` have different widths") and "\n" not in err
    assert s.storage.list("saes") == before


def test_the_prefetching_feed_gives_the_aligned_batches_and_resumes_after_the_last_one_handed_out(models):
    root, s, _ = models
    sides = [(s.dataset(n), HOOK) for n in ("model-a", "model-b")]
    al = align_tokens(sides)

    def feed(prefetch: int) -> ConcatBatches:
        return ConcatBatches(iter_aligned(sides, batch_size=100, seed=3, epochs=None, drop_last=True, alignment=al), "k", prefetch=prefetch)

    plain, ahead = feed(0), feed(3)
    first = [next(plain)["k"] for _ in range(7)]
    got = [next(ahead)["k"] for _ in range(4)]
    state = ahead.state_dict()  # three more batches are gathered already
    assert state["batch"] == 4 and all(torch.equal(a, b) for a, b in zip(first, got))
    ahead.close()
    again = feed(2)
    again.load_state_dict({**state, "hooks": ["k"]})
    assert all(torch.equal(next(again)["k"], b) for b in first[4:])
    x = first[0]
    pairs = al.rows[0].size
    assert x.shape == (100, 2 * D) and pairs == UNITS * UNIT_CONTEXTS * (CTX - 1)
    plain.close()
    again.close()
