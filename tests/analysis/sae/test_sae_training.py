"""Training from the store through sae-lens: learning, one pass for several hooks, the saved
folder, lineage, curves and determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _sae_data import CTX, HOOKS, UNIT_CONTEXTS, D, planted_dataset

from strata.analysis.sae import SAETrainSpec, build_sae, evaluate, load_sae, save_sae, train
from strata.analysis.sae.config import EvalSpec

STEPS, BATCH, K, D_SAE = 200, 64, 4, 32
NO_CE = EvalSpec(ce=False)


def make_spec(root, **changes) -> SAETrainSpec:
    raw = {
        "store": str(root),
        "dataset": "planted",
        "hooks": ["blocks.*.hook_resid_post"],
        "name": "planted-topk",
        "architecture": "topk",
        "sae": {"d_sae": D_SAE, "k": K},
        "train": {"total_training_samples": STEPS * BATCH, "batch_size": BATCH, "lr": 3e-3, "seed": 0,
                  "n_batches_for_norm_estimate": 5, "dead_feature_window": 50, "log_every": 10},
        "data": {"shuffle_seed": 0, "skip_special": True, "holdout_units": 1},
        "compute": {"device": "cpu"},
    }
    raw.update(changes)
    return SAETrainSpec.model_validate(raw)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    s, _ = planted_dataset(root)
    return root, s.dataset("planted")


@pytest.fixture(scope="module")
def two_hooks(planted):
    """Both hooks trained in one pass."""
    root, ds = planted
    return train(make_spec(root), ds=ds)


def state(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def same_weights(a, b) -> bool:
    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_topk_learns_the_planted_structure(planted, two_hooks):
    root, ds = planted
    r = two_hooks[0]
    held = r.lineage["holdout_units"]
    trained = evaluate(r.sae, ds, r.hook, held, spec=NO_CE)
    untrained = evaluate(build_sae(r.spec, D), ds, r.hook, held, spec=NO_CE)
    assert trained["fvu"] < 0.15 * untrained["fvu"], (trained["fvu"], untrained["fvu"])
    assert trained["mse"] < 0.15 * untrained["mse"], (trained["mse"], untrained["mse"])
    assert trained["explained_variance"] > 0.85
    assert trained["l0"] == K  # TopK: exactly k latents per token
    assert 0.0 <= trained["dead_fraction"] < 0.5 and 0.0 <= trained["dense_fraction"] <= 1.0
    assert trained["tokens"] == UNIT_CONTEXTS * (CTX - 1)  # BOS rows left out


def test_held_out_metrics_match_an_independent_computation(planted, two_hooks):
    _, ds = planted
    r = two_hooks[1]
    (unit,) = r.lineage["holdout_units"]
    rows = np.arange(unit * UNIT_CONTEXTS * CTX, (unit + 1) * UNIT_CONTEXTS * CTX)
    x = ds.read(r.hook, rows=rows[rows % CTX != 0]).astype(np.float64)
    with torch.no_grad():
        f = r.sae.encode(torch.from_numpy(x).float())
        x_hat = r.sae.decode(f).double().numpy()
    f = f.numpy()
    m = evaluate(r.sae, ds, r.hook, [unit], spec=NO_CE)
    err = ((x_hat - x) ** 2).sum()
    assert m["mse"] == pytest.approx(err / len(x), rel=1e-9)
    assert m["fvu"] == pytest.approx(err / ((x - x.mean(0)) ** 2).sum(), rel=1e-9)
    assert m["l0"] == pytest.approx((f != 0).sum(1).mean())
    freq = (f != 0).mean(0)
    assert m["dead_fraction"] == pytest.approx((freq == 0).mean())
    assert m["dense_fraction"] == pytest.approx((freq > 0.1).mean()) and m["dense_threshold"] == 0.1


def test_two_hooks_in_one_pass_give_two_loadable_saes(planted, two_hooks, tmp_path):
    from sae_lens import SAE

    _, ds = planted
    assert [r.name for r in two_hooks] == [f"planted-topk.{h}" for h in HOOKS]
    assert [r.hook for r in two_hooks] == list(HOOKS)
    a, b = two_hooks
    assert not torch.equal(a.sae.W_dec, b.sae.W_dec)
    assert a.lineage["trained_with"] == [b.name] and b.lineage["trained_with"] == [a.name]
    x = ds.read(HOOKS[0], rows=slice(0, 256), as_="torch")
    for r in two_hooks:
        folder = save_sae(r, tmp_path / r.name, metrics={"fvu": 0.1, "ce_zero_ablated": math.inf})
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["cfg.json", "curves.parquet", "curves.png", "lineage.json", "metrics.json", "sae_weights.safetensors",
                         "sparsity.safetensors"]
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        loaded = SAE.load_from_disk(folder)
        assert type(loaded) is type(r.sae) and same_weights(loaded, r.sae)
        with torch.no_grad():
            assert torch.equal(loaded(x), r.sae(x))
            assert torch.equal(loaded.encode(x), r.sae.encode(x))
        back = load_sae(folder)
        assert back.lineage == json.loads(json.dumps(r.lineage, default=str))
        assert back.metrics == {"fvu": 0.1, "ce_zero_ablated": None}  # strict JSON: no Infinity
        assert back.curves.equals(r.curves)
    with pytest.raises(FileExistsError):
        save_sae(two_hooks[0], tmp_path / two_hooks[0].name)


def test_lineage_records_where_the_sae_came_from(planted, two_hooks):
    import importlib.metadata

    _, ds = planted
    r = two_hooks[0]
    lin = r.lineage
    assert lin["dataset"] == "planted" and lin["fingerprint"] == ds.info.fingerprint and lin["hook"] == HOOKS[0]
    committed = ds.committed_units(HOOKS[0])
    assert lin["units"] == committed[:-1] and lin["holdout_units"] == committed[-1:]
    assert not set(lin["units"]) & set(lin["holdout_units"])
    assert lin["shuffle_seed"] == 0 and lin["seed"] == 0 and lin["skip_special"] is True
    assert lin["samples_seen"] == STEPS * BATCH and lin["steps"] == STEPS
    assert lin["architecture"] == "topk" and lin["sae_config"]["k"] == K and lin["sae_config"]["d_sae"] == D_SAE
    assert lin["trainer_config"]["train_batch_size_samples"] == BATCH and lin["trainer_config"]["logger"]["log_to_wandb"] is False
    assert lin["versions"] == {d: importlib.metadata.version(d) for d in ("strata", "sae-lens", "torch")}
    assert lin["started_at"].endswith("Z") and lin["started_at"] <= lin["ended_at"]
    assert lin["spec"]["hooks"] == [HOOKS[0]] and lin["spec"]["name"] == r.name
    json.dumps(lin)  # plain JSON
    assert r.sae.cfg.metadata.hook_name == HOOKS[0]


def test_curves_follow_training(two_hooks):
    c = two_hooks[0].curves
    cols = c.column_names
    assert cols[:9] == ["step", "samples", "loss", "mse", "l0", "explained_variance", "inactive_features", "inactive_fraction", "lr"]
    steps = c.column("step").to_pylist()
    assert steps == list(range(10, STEPS + 1, 10))
    assert c.column("samples").to_pylist() == [s * BATCH for s in steps]
    mse = c.column("mse").to_pylist()
    assert mse[-1] < 0.2 * mse[0]
    assert set(c.column("l0").to_pylist()) == {float(K)}
    assert all(0.0 <= v <= 1.0 for v in c.column("inactive_fraction").to_pylist())


def test_same_seed_gives_bit_identical_weights(planted, two_hooks):
    root, ds = planted
    one = make_spec(root, hooks=[HOOKS[0]], name="alone")
    a, = train(one, ds=ds)
    b, = train(one, ds=ds)
    assert same_weights(a.sae, b.sae)
    assert a.curves.equals(b.curves)
    # Alone or in a pass with another hook: the same SAE.
    assert same_weights(a.sae, two_hooks[0].sae)
    c, = train(make_spec(root, hooks=[HOOKS[0]], name="alone", train={**one.train.model_dump(), "seed": 1}), ds=ds)
    assert not same_weights(a.sae, c.sae)
