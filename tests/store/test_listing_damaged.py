"""One damaged artifact never blocks commands on the others: listings mark it DAMAGED and go on
(exit 1), gc skips it, and an SAE of another name still trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from _full_store import H, build

from strata.jobs.cli import main

LISTINGS = {"sae": "sae1", "features": "ft", "analyze": "cmp"}
RECORD = {"sae": "saes/sae1/commit.json", "features": "features/ft/manifest.json", "analyze": "analyses/cmp/commit.json"}


def _flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    build(tmp_path / "st")
    return tmp_path / "st"


@pytest.mark.parametrize("command", sorted(LISTINGS))
def test_a_listing_marks_a_damaged_artifact_and_lists_the_rest(root: Path, command: str, capsys) -> None:
    for other in LISTINGS:
        if other != command:
            _flip(root / RECORD[other])  # the others' damage must not change this listing
    assert main([command, "ls", str(root)]) == 0
    intact = capsys.readouterr().out
    assert intact.startswith(LISTINGS[command] + "\t") and "DAMAGED" not in intact

    _flip(root / RECORD[command])
    assert main([command, "ls", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{LISTINGS[command]}\tDAMAGED: ") and RECORD[command].rsplit("/", 1)[-1] in out[0]
    assert main(["gc", str(root)]) == 0  # gc skips what it cannot read and goes on
    assert "skipped" in capsys.readouterr().out


def test_a_damaged_sae_does_not_block_training_another(root: Path, tmp_path: Path, capsys) -> None:
    _flip(root / RECORD["sae"])
    spec = tmp_path / "sae.yaml"
    spec.write_text(f"""
store: {root}
dataset: ds
hooks: ["{H}"]
name: other
architecture: topk
sae: {{d_sae: 16, k: 2}}
train: {{total_training_samples: 640, batch_size: 32, lr: 3.0e-3, n_batches_for_norm_estimate: 2}}
data: {{holdout_units: 1}}
eval: {{ce: false}}
compute: {{device: cpu, threads: 1}}
""")
    assert main(["sae", "train", str(spec), "--no-progress"]) == 0
    assert main(["sae", "ls", str(root)]) == 1
    out = capsys.readouterr().out
    assert "\nother\tdataset=ds" in out and "sae1\tDAMAGED: " in out
