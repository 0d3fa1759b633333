"""`strata analyze`: every kind of analysis committed to the store with provenance and plots, a
rerun is a no-op, a changed spec is refused; bad input is one line on stderr, exit 2, and nothing
is written; `ls` and `show`; the Ray job entrypoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from strata import store
from strata.analysis import similarity as sim
from strata.jobs.cli import main
from strata.store.commit import artifacts

CTX, UC = 16, 4
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
REPO = Path(__file__).resolve().parents[2]


def _dataset(s: store.Store, name: str, *, n_docs: int = 60, seed: int = 0, meta: dict | None = None, spans: bool = True) -> None:
    """Documents of 3-9 tokens packed with BOS; two related hooks; a `topic` field per document."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 10, n_docs)
    topic = rng.integers(0, 2, n_docs)
    doc = np.concatenate([np.full(n, d) for d, n in enumerate(lens)])
    pos = np.concatenate([np.arange(n) for n in lens])
    per = CTX - 1
    pad = -doc.size % per
    doc, pos = np.r_[doc, np.full(pad, -1)], np.r_[pos, np.full(pad, -1)]
    n_ctx = doc.size // per
    doc = np.concatenate([np.r_[doc[c * per], doc[c * per : (c + 1) * per]] for c in range(n_ctx)])
    pos = np.concatenate([np.r_[-1, pos[c * per : (c + 1) * per]] for c in range(n_ctx)])
    special = pos < 0
    x = rng.standard_normal((doc.size, 8)) + 2.0 * np.eye(8)[topic[np.maximum(doc, 0)]]
    y = np.tanh(x @ rng.standard_normal((8, 8))) + 0.3 * rng.standard_normal((doc.size, 8))
    ur = UC * CTX
    units = -(-doc.size // ur)
    w = s.create_dataset(name, hooks={H0: 8, H1: 8}, context_size=CTX, dtype="float32", num_units=units, unit_contexts=UC,
                         meta=meta or {"model": "synthetic", "revision": "r0", "tokenizer": "t", "corpus_fingerprint": "c"})
    for u in range(units):
        r = np.arange(u * ur, min(doc.size, (u + 1) * ur))
        cols = {"context_id": r // CTX, "position": (r % CTX).astype(np.int32), "doc_id": doc[r], "doc_position": pos[r].astype(np.int32),
                "token_id": np.zeros(r.size, np.int32), "special": special[r]}
        if spans:
            cols |= {"char_start": (2 * pos[r]).astype(np.int32), "char_end": np.where(special[r], -1, 2 * pos[r] + 1).astype(np.int32)}
        w.write_unit(u, tokens=pa.table(cols), acts={H0: x[r].astype(np.float32), H1: y[r].astype(np.float32)})
    rows = np.arange(doc.size)
    w.write_documents(pa.table({"doc_id": np.arange(n_docs), "row_start": [int(rows[(doc == d) & ~special].min()) for d in range(n_docs)],
                                "row_end": [int(rows[(doc == d) & ~special].max()) + 1 for d in range(n_docs)],
                                "dropped_tokens": np.zeros(n_docs, np.int64), "topic": [f"t{t}" for t in topic]}))


def _commit_sae(s: store.Store, name: str, hook: str, tmp: Path, seed: int) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=24))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-0.5)
        sae.W_dec.normal_()
    folder = tmp / name
    sae.save_model(folder)
    (folder / "lineage.json").write_text(json.dumps({"dataset": "d", "hook": hook}))
    files = {p.name: p for p in folder.iterdir()}
    with s.artifact_lease("saes", name) as lease:
        artifacts.put(s.storage, "saes", name, files, lease=lease)


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "acts"
    s = store.open(root)
    _dataset(s, "d")
    _dataset(s, "other", seed=1, meta={"model": "synthetic", "revision": "r1", "tokenizer": "t", "corpus_fingerprint": "another"})
    _dataset(s, "nospans", meta={"model": "synthetic", "revision": "r2", "tokenizer": "t2", "corpus_fingerprint": "c"}, spans=False)
    _commit_sae(s, "sae0", H0, tmp_path, 0)
    _commit_sae(s, "sae1", H1, tmp_path, 1)
    return root


ANALYSES = [
    {"kind": "compare", "name": "cmp", "a": {"dataset": "d", "hook": H0}, "b": {"dataset": "d", "hook": H1},
     "metrics": ["linear_cka", "debiased_cka", "svcca", "procrustes", "r2", "rbf_cka"], "sample_rows": 100},
    {"kind": "heatmap", "name": "hm", "a": {"dataset": "d", "hooks": ["blocks.*"]}, "metric": "linear_cka"},
    {"kind": "layers", "name": "geo", "dataset": "d", "metrics": ["norm", "anisotropy", "cos_next", "linearity_next", "curvature"]},
    {"kind": "probe", "name": "topic", "dataset": "d", "label": "topic"},
    {"kind": "sae_match", "name": "match", "a": {"sae": "sae0"}, "b": {"sae": "sae1"}, "random_pairings": 5},
]


def _spec(tmp_path: Path, root: Path, analyses: list[dict], name: str = "spec.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"store": str(root), "compute": {"tasks": 2}, "analyses": analyses}))
    return str(p)


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.ray
@pytest.mark.slow
def test_analyze_commits_every_kind_and_a_rerun_is_a_no_op(tmp_path, root, ray_session, capsys):
    spec = _spec(tmp_path, root, ANALYSES)
    assert main(["analyze", spec]) == 0
    out = capsys.readouterr().out
    assert out.count(": written:") == 5
    s = store.open(root, create=False)
    assert s.analyses() == sorted(a["name"] for a in ANALYSES)
    ds = s.dataset("d")
    cmp = {r["metric"]: r for r in s.analysis("cmp").table().to_pylist()}
    want = sim.compare((ds, H0), (ds, H1), ["linear_cka", "debiased_cka", "svcca", "procrustes", "r2", "rbf_cka"], use_ray=False, sample_rows=100)
    for k in ("linear_cka", "debiased_cka", "svcca", "procrustes", "r2_a_to_b", "r2_b_to_a", "rbf_cka"):
        assert cmp[k]["value"] == pytest.approx(want[k], rel=1e-10), k
    assert cmp["rbf_cka"]["n"] == 100 and cmp["linear_cka"]["n"] == want["n"]
    meta = s.analysis("cmp").meta
    assert meta["inputs"][0]["fingerprint"] == ds.info.fingerprint and meta["inputs"][0]["units"] == ds.committed_units(H0)
    assert meta["provenance"]["alignment"]["method"] == "rows" and meta["versions"]["numpy"] == np.__version__
    hm = s.analysis("hm")
    assert hm.read("heatmap.png")[:8] == b"\x89PNG\r\n\x1a\n" and hm.table().num_rows == 4
    assert {"norm.png", "curvature.png", "results.parquet", "provenance.json"} <= set(s.analysis("geo").files)
    probe = s.analysis("topic").table().to_pylist()
    assert probe[0]["score"] > probe[0]["control"] and "probe.png" in s.analysis("topic").files
    summary = s.analysis("match").table("summary.parquet").to_pylist()[0]
    assert summary["live_a"] > 0 and 0 < summary["p_value"] <= 1
    before = _listing(root)
    assert main(["analyze", spec]) == 0
    assert capsys.readouterr().out.count("unchanged (committed with the same inputs)") == 5
    assert _listing(root) == before  # nothing rewritten, no lease taken
    # The same name with another spec is refused before anything runs.
    changed = _spec(tmp_path, root, [{**ANALYSES[0], "metrics": ["linear_cka"]}], "changed.yaml")
    assert main(["analyze", changed]) == 2
    assert "analysis 'cmp' is committed already with another spec; choose a new `name`" in capsys.readouterr().err
    assert _listing(root) == before
    # ls and show
    assert main(["analyze", "ls", str(root)]) == 0
    listed = capsys.readouterr().out
    assert "cmp\tcompare\tinputs=d" in listed and "match\tsae_match" in listed
    assert main(["analyze", "show", str(root), "hm", "--rows", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "heatmap" and len(shown["results"]["head"]) == 2 and shown["provenance"]["method"] == "exact"


BAD = [
    ([{**ANALYSES[0], "metrics": ["cka"]}], "`analyses.0.compare.metrics.0`: Input should be 'linear_cka', 'debiased_cka'"),
    ([{**ANALYSES[0], "b": {"dataset": "d", "hook": "blocks.7.hook_mlp_out"}}], "dataset 'd' has no hook 'blocks.7.hook_mlp_out'; it has: "),
    ([{**ANALYSES[0], "metrics": ["debiased_cka"], "max_rows": 3}], "debiased_cka needs at least 4 aligned rows"),
    ([{**ANALYSES[0], "b": {"dataset": "other", "hook": H1}}], "extracted from different corpora"),
    ([{**ANALYSES[0], "b": {"dataset": "nospans", "hook": H1}}], "dataset 'nospans' has no character spans"),
    ([{**ANALYSES[0], "b": {"dataset": "nope", "hook": H1}}], "no dataset 'nope'"),
    ([{**ANALYSES[3], "label": "lang"}], "has no document-level label 'lang'; labels it has: topic"),
    ([{**ANALYSES[4], "a": {"sae": "missing"}}], "no SAE 'missing'"),
    ([{**ANALYSES[2], "metrics": ["logit_lens"]}], "needs its causal LM on this machine"),
    ([{**ANALYSES[1], "metric": "pwcca", "method": "exact"}, {**ANALYSES[1], "name": "hm"}], "analysis name\\(s\\) \\['hm'\\] are used twice"),
    ([{**ANALYSES[0], "name": "../escape"}], "invalid analysis name '../escape'"),
]


@pytest.mark.parametrize("analyses,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, root, capsys, analyses, message):
    import re

    spec = _spec(tmp_path, root, [*ANALYSES[:1], *analyses] if analyses[0]["name"] != "cmp" else analyses)
    before = _listing(root)
    assert main(["analyze", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("strata: error: ") and "\n" not in err and re.search(message, err), err
    assert _listing(root) == before


def test_usage_errors(tmp_path, root, capsys):
    assert main(["analyze", "ls"]) == 2
    assert "usage: strata analyze ls STORE" in capsys.readouterr().err
    assert main(["analyze", "show", str(root), "nope"]) == 2
    assert "no analysis 'nope'" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", "ls", str(tmp_path / "nostore")]) == 2


def _run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entrypoint_refuses_bad_input_before_starting_ray(tmp_path, root):
    spec = _spec(tmp_path, root, [{**ANALYSES[0], "metrics": ["debiased_cka"], "max_rows": 2}])
    res = _run_module("strata.jobs.analyze", spec, cwd=tmp_path)
    assert res.returncode == 2 and "debiased_cka needs at least 4 aligned rows" in res.stderr


@pytest.mark.slow
def test_ray_job_entrypoint_runs_a_spec(tmp_path, root):
    spec = _spec(tmp_path, root, ANALYSES[:2])
    res = _run_module("strata.jobs.analyze_run", spec, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert store.open(root, create=False).analyses() == ["cmp", "hm"]


def test_analyses_run_in_this_process_with_the_local_executor(tmp_path, root, capsys):
    """`compute.executor: local`: no Ray at all; the committed values are the in-memory ones."""
    spec = _spec(tmp_path, root, ANALYSES[:1])
    assert main(["analyze", spec, "--set", "compute.executor=local"]) == 0
    assert capsys.readouterr().out.count(": written:") == 1
    s = store.open(root, create=False)
    ds = s.dataset("d")
    got = {r["metric"]: r["value"] for r in s.analysis("cmp").table().to_pylist()}
    want = sim.compare((ds, H0), (ds, H1), ["linear_cka", "debiased_cka", "svcca", "procrustes", "r2", "rbf_cka"], use_ray=False, sample_rows=100)
    for k in ("linear_cka", "debiased_cka", "svcca", "procrustes", "r2_a_to_b", "r2_b_to_a", "rbf_cka"):
        assert got[k] == pytest.approx(want[k], rel=1e-10), k
