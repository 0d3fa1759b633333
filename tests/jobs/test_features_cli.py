"""`strata features ...`: encode, ls, show, top, html; bad input is one line and exit code 2, with
nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from strata import store
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset
from strata.jobs.cli import main
from strata.jobs.features import parse_features
from strata.jobs.features_encode import main as encode_main
from strata.jobs.spec import load_spec
from strata.pipeline.encode import EncodeSpec
from strata.pipeline.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]
H = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def encoded(ray_session, tmp_path_factory):
    """A store with a synthetic dataset, an SAE, and its feature table made by `strata features encode`."""
    tmp = tmp_path_factory.mktemp("fcli")
    s = store.open(tmp / "acts")
    synthetic_dataset(s, "syn", hook=H, d=16, units=3, unit_contexts=4, context_size=16, step=0.25)
    put_sae(s, "sae", random_topk_sae(16, 40, k=4, seed=2, dyadic=True), dataset="syn", hook=H)
    put_sae(s, "wide", random_topk_sae(17, 8), dataset="syn", hook=H)
    synthetic_dataset(s, "empty", hook=H, d=16, units=2, write_units=0)
    put_sae(s, "on-empty", random_topk_sae(16, 8), dataset="empty", hook=H)
    spec = tmp / "features.yaml"
    spec.write_text(yaml.safe_dump({"store": str(tmp / "acts"), "sae": "sae", "name": "ft", "top_k": 10, "compute": {"batch_rows": 64}}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["features", "encode", str(spec), "--no-progress"])
    assert code == 0, err.getvalue()
    return tmp, spec, out.getvalue()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_encode_then_ls_show_top(encoded, capsys):
    tmp, spec, out = encoded
    acts = str(tmp / "acts")
    assert "feature table 'ft': encoded 3 unit(s)" in out and "fs = strata.open(" in out
    code, out, _ = _run(capsys, "features", "encode", str(spec), "--no-progress")
    assert code == 0 and "nothing to do" in out
    code, out, _ = _run(capsys, "features", "ls", acts)
    assert code == 0 and out.startswith("ft\tsae=sae\tsyn:blocks.0.hook_resid_post\td_sae=40\tunits=3\tmerged=3")
    code, out, _ = _run(capsys, "features", "show", acts, "ft")
    shown = json.loads(out)
    assert code == 0 and shown["merged_units"] == [0, 1, 2] and shown["d_sae"] == 40 and shown["stale"] is False

    fs = store.open(acts).features("ft")
    f = int(fs.stats().sort_by([("count", "descending")]).column("feature")[0].as_py())
    code, out, _ = _run(capsys, "features", "top", acts, "ft", str(f), "-k", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"feature {f} of 'ft'") and len(lines) == 2 + 3
    top = fs.top(f, k=3).to_pylist()
    for line, r in zip(lines[2:], top):
        cols = line.split()
        assert int(cols[2]) == r["row"] and float(cols[1]) == pytest.approx(r["activation"], rel=1e-3) and r["context"] in line
    code, out, _ = _run(capsys, "features", "top", acts, "ft", str(f), "-k", "2", "--json")
    assert code == 0 and json.loads(out) == [{k: pytest.approx(v) if isinstance(v, float) else v for k, v in r.items()} for r in top[:2]]

    code, out, _ = _run(capsys, "features", "html", acts, "ft", "--out", str(tmp / "pages"), "--features", "0-2,5", str(f))
    assert code == 0 and sorted(p.name for p in (tmp / "pages").iterdir()) == ["data", "index.html"]
    live = {i for i in {0, 1, 2, 5, f} if fs.stats().column("count")[i].as_py()}
    chunks = [json.loads(p.read_text().removeprefix("StrataView.put(").removesuffix(");\n")) for p in (tmp / "pages" / "data").glob("f*.js")]
    assert sorted(int(k) for c in chunks for k in c) == sorted(live)  # data for the features asked for, every other one in the index


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["features", "top", "{acts}", "nope", "1"], r"no feature table 'nope' in store .*; it holds: ft"),
        (["features", "top", "{acts}", "ft", "40"], r"feature 40 is out of range: feature table 'ft' has features 0\.\.39 \(d_sae=40\)"),
        (["features", "top", "{tmp}/missing", "ft", "1"], r"no store at"),
        (["features", "html", "{acts}", "ft", "--out", "{tmp}/bad-pages", "--features", "1", "99"], r"feature 99 is out of range"),
        (["features", "show", "{acts}", "../x"], r"invalid feature table name"),
    ],
)
def test_bad_queries_are_one_line_and_exit_2(encoded, capsys, argv, pattern):
    tmp, _, _ = encoded
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    code, out, err = _run(capsys, *[a.format(acts=tmp / "acts", tmp=tmp) for a in argv])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("strata: error: ")
    assert re.search(pattern, err), err
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing written, no store created


@pytest.mark.slow
def test_bad_encode_specs_exit_2_naming_the_problem(encoded, capsys, tmp_path):
    tmp, spec, _ = encoded
    cases = [
        (["--set", "sae=unknown-sae"], r"no SAE 'unknown-sae' in store .*; it holds: on-empty, sae, wide"),
        (["--set", "sae=wide", "--set", "name=w"], r"SAE 'wide' takes d_in=17, but hook 'blocks.0.hook_resid_post' of dataset 'syn' is 16 wide"),
        (["--set", "sae=on-empty", "--set", "name=e"], r"dataset 'empty' has no committed unit of hook 'blocks.0.hook_resid_post'"),
        (["--set", "store={tmp}/nowhere"], r"no store at"),
        (["--set", "topk=3"], r"`topk` is not a spec key \(valid keys here: store, sae, name, top_k"),
        (["--set", "compute.device=tpu"], r"`compute.device`: Input should be 'auto', 'cpu' or 'cuda'"),
        (["--set", "top_k=0"], r"`top_k`: Input should be greater than 0"),
        (["--set", "name=a/b"], r"`name`: .*invalid SAE or feature table name"),
    ]
    for extra, pattern in cases:
        before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
        assert encode_main([str(spec), "--no-progress", *(a.format(tmp=tmp) for a in extra)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
        assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before


def test_example_spec_and_feature_lists():
    spec = load_spec(EncodeSpec, ROOT / "examples" / "features.yaml", ["store=/tmp/x"])
    assert spec.sae == "tiny-topk" and spec.table == "tiny-topk" and spec.top_k == 64 and spec.compute.device == "auto"
    assert "seed" in EncodeSpec.model_fields["sample"].annotation.model_fields
    assert parse_features(["3", "10-12,40"]) == [3, 10, 11, 12, 40] and parse_features(None) is None
    with pytest.raises(SpecError, match="--features takes indices"):
        parse_features(["x-3"])
    with pytest.raises(SpecError, match="`sample.quantiles`"):
        load_spec(EncodeSpec, ROOT / "examples" / "features.yaml", ["sample.quantiles=0"])
