"""Artifacts bound to the dataset they were built from (issue 16.4): after a dataset is replaced
under the same name (another identity, another fingerprint), a feature table, an SAE's lineage
and an analysis refuse what would pair them with the new data, with one line naming both
fingerprints; `ls`/`show` mark them stale; the SAE's weights still load. No Ray: the analysis is
computed in-process through the same runner `strata analyze` uses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from strata import store
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset, write_table
from strata.analysis.similarity.runner import prepare
from strata.analysis.similarity.spec import AnalyzeSpec
from strata.jobs.cli import main
from strata.pipeline.executor import Executor
from strata.store.analyses.handles import ANALYSES
from strata.store.commit import artifacts
from strata.store.errors import StaleArtifactError

H = "blocks.0.hook_resid_post"
D, D_SAE, UR = 8, 12, 64


def _entries(unit: int):
    rows = np.arange(unit * UR + 1, unit * UR + 9, dtype=np.int64)
    return rows, (rows % D_SAE).astype(np.int32), np.linspace(1, 2, rows.size, dtype=np.float32), UR - 4


def _build(root):
    s = store.open(root)
    synthetic_dataset(s, "syn", hook=H, d=D, units=2, seed=0)
    put_sae(s, "sae", random_topk_sae(D, D_SAE, k=2, seed=1), dataset="syn", hook=H, units=[0])
    write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 1], entries=_entries, top_k=4)
    spec = AnalyzeSpec(store=str(root), analyses=[{"kind": "compare", "name": "cmp", "a": {"dataset": "syn", "hook": H},
                                                   "b": {"dataset": "syn", "hook": H}, "metrics": ["linear_cka"]}])
    (p,) = prepare(spec, s)
    files, _ = p.compute(Executor())
    with s.artifact_lease(ANALYSES, "cmp") as lease:
        artifacts.put(s.storage, ANALYSES, "cmp", files, meta=p.identity, lease=lease)
    return s


def _replace(s) -> tuple[str, str]:
    old = s.dataset("syn").info.fingerprint
    s.delete_dataset("syn")
    synthetic_dataset(s, "syn", hook=H, d=D, units=2, seed=1)  # another revision: another identity
    new = s.dataset("syn").info.fingerprint
    assert new != old
    return old, new


def test_intact_artifacts_open_and_are_not_stale(tmp_path):
    s = _build(tmp_path / "acts")
    fs = s.features("ft")
    assert fs.stale_inputs is None and fs.top(1, k=1).column("row").to_pylist() == [1]
    h = s.sae("sae")
    assert h.stale_inputs is None and h.unseen_units() == [1]
    a = s.analysis("cmp")
    assert a.stale_inputs is None and a.table().num_rows == 1


def test_a_replaced_dataset_makes_its_table_sae_and_analysis_stale(tmp_path, capsys):
    root = tmp_path / "acts"
    s = _build(root)
    old, new = _replace(s)
    both = rf"fingerprint {old}, but that dataset now has fingerprint {new}"

    # The feature table: refused on open; opened on purpose it still refuses the dataset's tokens.
    with pytest.raises(StaleArtifactError, match=rf"feature table 'ft' was built from dataset 'syn' with {both}"):
        s.features("ft")
    fs = s.features("ft", allow_stale=True)
    assert fs.stale_inputs is not None and old in fs.stale_inputs and new in fs.stale_inputs
    assert fs.stats().num_rows == D_SAE  # the table's own numbers are still its own
    with pytest.raises(StaleArtifactError, match=both):
        fs.top(1, k=1)
    with pytest.raises(StaleArtifactError, match=both):
        fs.windows(np.array([1]))

    # The SAE: its weights load; what reads its dataset through its lineage refuses.
    h = s.sae("sae")
    assert h.load() is not None
    assert h.stale_inputs is not None and f"SAE 'sae' was built from dataset 'syn' with fingerprint {old}" in h.stale_inputs
    with pytest.raises(StaleArtifactError, match=both):
        h.unseen_units()

    # The analysis: refused on open; inspectable on purpose.
    with pytest.raises(StaleArtifactError, match=rf"analysis 'cmp' was built from dataset 'syn' with {both}"):
        s.analysis("cmp")
    assert s.analysis("cmp", allow_stale=True).table().num_rows == 1

    # The command line: reads that pair with the dataset are one line, exit 2; ls/show mark.
    capsys.readouterr()
    assert main(["features", "top", str(root), "ft", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("strata: error: feature table 'ft' was built from dataset 'syn'") and old in err[0] and new in err[0]
    assert main(["features", "ls", str(root)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("ft\t") and "\tSTALE: feature table 'ft' was built" in line and new in line
    assert main(["features", "show", str(root), "ft"]) == 0
    assert new in json.loads(capsys.readouterr().out)["stale_inputs"]
    assert main(["sae", "ls", str(root)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("sae\t") and "\tSTALE: SAE 'sae' was built" in line
    assert main(["sae", "show", str(root), "sae"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["unseen_units"] is None and new in shown["stale_inputs"]
    assert main(["analyze", "ls", str(root)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("cmp\tcompare\t") and "\tSTALE: analysis 'cmp' was built" in line
    assert main(["analyze", "show", str(root), "cmp", "--json"]) == 0
    cap = capsys.readouterr()
    assert new in json.loads(cap.out)["stale_inputs"] and cap.err.startswith("STALE: analysis 'cmp'")


def test_an_analysis_of_an_sae_committed_again_is_stale(tmp_path):
    root = tmp_path / "acts"
    s = store.open(root)
    synthetic_dataset(s, "syn", hook=H, d=D, units=2, seed=0)
    put_sae(s, "sae", random_topk_sae(D, D_SAE, k=2, seed=1), dataset="syn", hook=H, units=[0])
    put_sae(s, "sae2", random_topk_sae(D, D_SAE, k=2, seed=2), dataset="syn", hook=H, units=[0])
    spec = AnalyzeSpec(store=str(root), analyses=[{"kind": "sae_match", "name": "m", "a": {"sae": "sae"}, "b": {"sae": "sae2"},
                                                   "random_pairings": 2}])
    (p,) = prepare(spec, s)
    files, _ = p.compute(Executor())
    with s.artifact_lease(ANALYSES, "m") as lease:
        artifacts.put(s.storage, ANALYSES, "m", files, meta=p.identity, lease=lease)
    assert s.analysis("m").stale_inputs is None
    with s.artifact_lease("saes", "sae2") as lease:
        artifacts.delete(s.storage, "saes", "sae2", lease=lease)
    put_sae(s, "sae2", random_topk_sae(D, D_SAE, k=2, seed=3), dataset="syn", hook=H, units=[0])
    with pytest.raises(StaleArtifactError, match="analysis 'm' read SAE 'sae2' as committed at"):
        s.analysis("m")
    # And a match of an SAE whose dataset was replaced is refused before anything is computed.
    s.delete_dataset("syn")
    synthetic_dataset(s, "syn", hook=H, d=D, units=2, seed=1)
    with pytest.raises(StaleArtifactError, match="SAE 'sae' was built from dataset 'syn'"):
        prepare(spec, s)
