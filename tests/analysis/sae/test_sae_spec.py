"""The SAE training spec: validation messages name the key; sweeps expand to the right names."""

from __future__ import annotations

import dataclasses
import re

import pytest
from pydantic import ValidationError

from strata.analysis.sae.config import SAETrainSpec, TrainSpec, architectures, expand_runs, sae_options
from strata.store.layout import check_name

BASE = {
    "store": "./acts",
    "dataset": "tiny-gpt2-quickstart",
    "hooks": ["blocks.3.hook_resid_post"],
    "name": "tiny-topk",
    "architecture": "topk",
    "sae": {"d_sae": 4096, "k": 32},
    "train": {"total_training_samples": 20_000_000, "batch_size": 4096, "lr": 3.0e-4, "seed": 0},
    "data": {"shuffle_seed": 0, "skip_special": True, "holdout_units": 1},
    "sweep": None,
    "compute": {"address": None, "device": "auto"},
}
HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(4)] + ["blocks.3.hook_mlp_out"]


def spec(**changes) -> SAETrainSpec:
    return SAETrainSpec.model_validate({**BASE, **changes})


def error_of(**changes) -> str:
    with pytest.raises(ValidationError) as e:
        spec(**changes)
    return "; ".join(err["msg"] for err in e.value.errors())


def test_the_documented_example_validates():
    s = spec()
    assert s.sae == {"d_sae": 4096, "k": 32}
    assert s.train.trainer_config("cpu").train_batch_size_samples == 4096
    runs = expand_runs(s, HOOKS)
    assert [r.name for r in runs] == ["tiny-topk"]
    assert runs[0].hook == "blocks.3.hook_resid_post"


def test_unknown_architecture_lists_the_valid_ones():
    msg = error_of(architecture="topkk")
    assert "`architecture`" in msg and "'topkk'" in msg
    for name in ("standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"):
        assert name in msg
    assert set(architectures()) >= {"standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"}


def test_unknown_sae_option_lists_the_valid_ones():
    msg = error_of(sae={"d_sae": 64, "kk": 4})
    assert "`sae.kk`" in msg and "'topk'" in msg
    valid = msg.split("valid: ", 1)[1]
    assert {"k", "d_sae", "expansion_factor", "aux_loss_coefficient"} <= set(valid.split(", "))
    # Options are per architecture: `k` is not an option of the standard (L1) SAE.
    msg = error_of(architecture="standard", sae={"d_sae": 64, "k": 4})
    assert "`sae.k`" in msg and "l1_coefficient" in msg
    # Derived fields are not options; `d_in` may be given (checked against the hook's width when planning).
    assert "`sae.device`" in error_of(sae={"d_sae": 64, "device": "cpu"})
    assert spec(sae={"d_sae": 64, "d_in": "8"}).sae["d_in"] == 8
    assert "`sae.d_in`" in error_of(sae={"d_sae": 64, "d_in": 0})


def test_sae_options_are_the_sae_lens_config_fields():
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    for arch in architectures():
        fields = {f.name for f in dataclasses.fields(SAE_TRAINING_CLASS_REGISTRY[arch][1])}
        derived = {"n_sources", "d_out"}  # set by Strata: from a crosscoder's `sources`, a transcoder's out hook
        assert set(sae_options(arch)) == fields - {"device", "metadata"} - derived | {"expansion_factor"}


def test_sae_option_values_are_checked():
    assert "`sae.k`" in error_of(sae={"d_sae": 64, "k": "many"})
    assert "`sae.normalize_activations`" in error_of(sae={"d_sae": 64, "normalize_activations": "sometimes"})
    assert "`sae.k`" in error_of(sae={"d_sae": 8, "k": 16})
    assert spec(sae={"d_sae": 64, "k": "16"}).sae["k"] == 16  # converted to the field's type


def test_d_sae_and_expansion_factor_are_exclusive_and_one_is_required():
    msg = error_of(sae={"d_sae": 64, "expansion_factor": 4, "k": 4})
    assert "`sae.d_sae`" in msg and "`sae.expansion_factor`" in msg and "both" in msg
    assert "required" in error_of(sae={"k": 4})
    assert spec(sae={"expansion_factor": 4, "k": 4}).sae == {"expansion_factor": 4.0, "k": 4}


def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(ValidationError) as e:
        spec(train={**BASE["train"], "learning_rate": 1e-3})
    assert e.value.errors()[0]["loc"] == ("train", "learning_rate")
    assert "`train.total_training_samples`" in error_of(train={"total_training_samples": 100, "batch_size": 4096})
    assert "`name`" in error_of(name="../escape")
    assert "`name`" in error_of(name="a/b")
    with pytest.raises(ValidationError) as e:
        spec(compute={"device": "tpu"})
    assert e.value.errors()[0]["loc"] == ("compute", "device")


def test_train_section_maps_onto_sae_lens_trainer_options():
    from sae_lens.config import SAETrainerConfig

    trainer_fields = {f.name for f in dataclasses.fields(SAETrainerConfig)}
    ours = set(TrainSpec.model_fields) - {"batch_size", "seed", "log_every", "checkpoint_every"}
    assert ours <= trainer_fields, ours - trainer_fields
    cfg = spec(train={**BASE["train"], "lr_end": None, "dead_feature_window": 77}).train.trainer_config("cpu")
    assert (cfg.lr_end, cfg.dead_feature_window, cfg.logger.log_to_wandb, cfg.device) == (3e-4 / 10, 77, False, "cpu")


def test_sweep_key_must_be_a_spec_path_with_values():
    msg = error_of(sweep={"sae.kk": [1, 2]})
    assert "`sweep.sae.kk`" in msg and "aux_loss_coefficient" in msg
    msg = error_of(sweep={"learning_rate": [1e-3]})
    assert "`sweep.learning_rate`" in msg and "train.lr" in msg
    assert "`sweep.name`" in error_of(sweep={"name": ["a", "b"]})
    assert "`sweep.hooks`" in error_of(sweep={"hooks": [["blocks.0.hook_resid_post"]]})
    msg = error_of(sweep={"sae.k": []})
    assert "`sweep.sae.k`" in msg and "empty" in msg
    assert "`sweep`" in error_of(sweep={})


def test_a_nested_sweep_means_its_dotted_paths():
    assert spec(sweep={"sae": {"k": [16, 32]}, "train.lr": [1e-3]}).sweep == {"sae.k": [16, 32], "train.lr": [1e-3]}


def test_every_sweep_combination_is_validated_at_load():
    msg = error_of(sweep={"sae.k": [16, 8192]})
    assert "`sweep`" in msg and "8192" in msg and "`sae.k`" in msg
    msg = error_of(sweep={"architecture": ["topk", "standard"]})
    assert "'standard'" in msg and "`sae.k`" in msg
    assert "`train.lr`" in error_of(sweep={"train.lr": [1e-3, -1.0]})
    msg = error_of(sweep={"architecture": ["nope"], "sae.k": [4]})
    assert "'nope'" in msg and "topk" in msg


def test_one_hook_without_sweep_is_named_exactly_name():
    assert [r.name for r in expand_runs(spec(hooks=["blocks.*.hook_resid_post"]), HOOKS[3:])] == ["tiny-topk"]


def test_several_hooks_are_named_by_hook():
    runs = expand_runs(spec(hooks=["blocks.*.hook_resid_post"]), HOOKS)
    assert [r.name for r in runs] == [f"tiny-topk.blocks.{i}.hook_resid_post" for i in range(4)]
    assert [r.hook for r in runs] == HOOKS[:4]
    assert all(r.spec.hooks == (r.hook,) and r.spec.name == r.name and r.spec.sweep is None for r in runs)


def test_sweep_expands_to_one_run_per_combination():
    s = spec(sweep={"sae.k": [16, 32, 64]})
    runs = expand_runs(s, HOOKS)
    assert [r.name for r in runs] == ["tiny-topk.k=16", "tiny-topk.k=32", "tiny-topk.k=64"]
    assert [r.spec.sae["k"] for r in runs] == [16, 32, 64]
    assert [r.params for r in runs] == [{"sae.k": 16}, {"sae.k": 32}, {"sae.k": 64}]

    s = spec(hooks=["blocks.0.hook_resid_post", "blocks.3.hook_mlp_out"], sweep={"sae.k": [8, 16], "train.lr": [1e-3, 3e-5]})
    names = [r.name for r in expand_runs(s, HOOKS)]
    assert names == [
        f"tiny-topk.{h}.k={k}.lr={lr}"
        for h in ("blocks.0.hook_resid_post", "blocks.3.hook_mlp_out") for k in (8, 16) for lr in ("0.001", "3e-05")
    ]
    assert names == [r.name for r in expand_runs(s, HOOKS)]  # deterministic
    for n in names:
        assert check_name(n, what="SAE") == n and ".." not in n and "/" not in n  # the store's one name check


def test_sweep_names_are_filesystem_safe_and_unambiguous():
    s = spec(architecture="matryoshka_batchtopk", sae={"d_sae": 4096, "k": 32, "matryoshka_widths": [128, 4096]},
             sweep={"sae.matryoshka_widths": [[128, 4096], [512, 4096]], "sae.use_matryoshka_aux_loss": [True, False]})
    names = [r.name for r in expand_runs(s, HOOKS)]
    assert names[0] == "tiny-topk.matryoshka_widths=128+4096.use_matryoshka_aux_loss=true"
    s = spec(sweep={"train.seed": [0, 1], "data.shuffle_seed": [5]})
    assert [r.name for r in expand_runs(s, HOOKS)] == ["tiny-topk.seed=0.shuffle_seed=5", "tiny-topk.seed=1.shuffle_seed=5"]
    s = spec(sweep={"train.lr": [1e-3], "sae.aux_loss_coefficient": [0.5, 1.0]})
    assert [r.name for r in expand_runs(s, HOOKS)] == ["tiny-topk.lr=0.001.aux_loss_coefficient=0.5", "tiny-topk.lr=0.001.aux_loss_coefficient=1.0"]


def test_colliding_names_are_refused():
    s = spec(sweep={"sae.k": [16, 16]})
    with pytest.raises(ValueError, match="both get the name 'tiny-topk.k=16'"):
        expand_runs(s, HOOKS)


def test_a_hook_pattern_matching_nothing_lists_the_hooks():
    with pytest.raises(ValueError, match=re.escape("`hooks`: 'blocks.9.*'") + ".*blocks.0.hook_resid_post"):
        expand_runs(spec(hooks=["blocks.9.*"]), HOOKS)
