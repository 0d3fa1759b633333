"""`features encode` checks the SAE on the driver before any work is dispatched (issue 16.9): a
damaged weights file is one line naming the SAE and the file, exit 2, no Ray started, nothing
written. No Ray here: the check must fire before the cluster is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata import store
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset
from strata.jobs.features_encode import main as encode_main
from strata.pipeline.encode import EncodeSpec, prepare, run_encode
from strata.store.errors import CorruptionError
from strata.store.features.format import FEATURES

H = "blocks.0.hook_resid_post"
D, D_SAE = 16, 32


def _store(tmp_path: Path) -> store.Store:
    s = store.open(tmp_path / "acts")
    synthetic_dataset(s, "syn", hook=H, d=D, units=2, unit_contexts=2, context_size=8)
    put_sae(s, "sae", random_topk_sae(D, D_SAE, k=4, seed=1), dataset="syn", hook=H, units=[0])
    return s


def _flip(path: Path, at: int) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def test_damaged_weights_refused_on_the_driver_before_dispatch(tmp_path, capsys):
    import ray

    s = _store(tmp_path)
    spec = EncodeSpec(store=str(tmp_path / "acts"), sae="sae", top_k=4, block_features=16)
    assert prepare(spec, s)[1] == [0, 1]  # intact: accepted
    weights = tmp_path / "acts" / "saes" / "sae" / "sae_weights.safetensors"
    _flip(weights, weights.stat().st_size - 3)  # a weight's bits; the header still parses
    ray_before = ray.is_initialized()

    with pytest.raises(CorruptionError, match=r"SAE 'sae' .*saes/sae/sae_weights\.safetensors: checksum mismatch"):
        prepare(spec, s)
    with pytest.raises(CorruptionError):
        run_encode(spec, progress=False)
    assert ray.is_initialized() == ray_before  # no cluster was started for it
    assert not (tmp_path / "acts" / FEATURES / "sae").exists()  # no lease, no manifest, nothing written

    spec_file = tmp_path / "encode.yaml"
    spec_file.write_text(f"store: {tmp_path / 'acts'}\nsae: sae\ntop_k: 4\nblock_features: 16\n")
    capsys.readouterr()
    assert encode_main([str(spec_file), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("strata: error: SAE 'sae'") and "sae_weights.safetensors" in err[0]
    assert ray.is_initialized() == ray_before


def test_lineage_or_cfg_damage_names_its_file(tmp_path):
    s = _store(tmp_path)
    _flip(tmp_path / "acts" / "saes" / "sae" / "cfg.json", 2)
    with pytest.raises(CorruptionError, match=r"cfg\.json"):
        prepare(EncodeSpec(store=str(tmp_path / "acts"), sae="sae", top_k=4, block_features=16), s)
