"""`strata extract`: spec validation and bad input, each one clear line before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from strata import store
from strata.jobs.extract import main
from strata.jobs.spec import load_extract_spec
from strata.pipeline.errors import SpecError
from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("m") / "gpt2", family="gpt2", layers=2, d_model=32, max_positions=128, vocab_size=400)


@pytest.fixture
def spec(tmp_path, model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(12, seed=2))
    raw = {
        "store": str(tmp_path / "acts"), "name": "cli", "model": {"id": str(model_dir)}, "corpus": {"path": str(corpus)},
        "tokenize": {"context_size": 16}, "hooks": ["blocks.*.hook_resid_post"], "dtype": "float16",
        "compute": {"executor": "local", "unit_contexts": 8, "batch_tokens": 128},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_spec_defaults_overrides_and_docs():
    s = load_extract_spec(ROOT / "examples" / "quickstart.yaml", ["compute.batch_tokens=4096", "tokenize.prepend_bos=false"])
    assert s.compute.batch_tokens == 4096 and s.tokenize.prepend_bos is False
    assert s.tokenize.packing == "concat" and s.model.trust_remote_code is False
    from strata.pipeline.config import CorpusSpec

    assert "grow" in CorpusSpec.model_fields["growing"].description  # field docstrings become descriptions
    real = load_extract_spec(ROOT / "examples" / "gpt2.yaml")
    assert real.model.id == "gpt2" and real.hooks == ["blocks.*.hook_resid_post"]


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["corpus.text_feild=x"], r"`corpus.text_feild` is not a spec key \(valid keys here: path, format, text_field"),
        (["bogus=1"], r"`bogus` is not a spec key"),
        (["tokenize.packing=zigzag"], r"`tokenize.packing`: Input should be 'concat' or 'truncate'"),
        (["compute.unit_contexts=0"], r"`compute.unit_contexts`: Input should be greater than 0"),
        (["name=../escape"], r"`name`: .*invalid dataset name"),
        (["hooks=[]"], r"`hooks`"),
        (["tokenize=3"], r"`tokenize`"),
    ],
)
def test_bad_specs_name_the_key(spec, overrides, pattern):
    with pytest.raises(SpecError, match=pattern):
        load_extract_spec(spec, overrides)


def test_unreadable_spec_paths_and_bad_set_values(tmp_path, spec):
    with pytest.raises(SpecError, match=r"is a folder; give a YAML spec file"):
        load_extract_spec(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match=r"is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_extract_spec(latin)
    with pytest.raises(SpecError, match=r"--set hooks='\[a': the value is not valid YAML"):
        load_extract_spec(spec, ["hooks=[a"])
    with pytest.raises(SpecError, match=r"--set storage_options.secret=<hidden>: the value is not valid YAML"):
        load_extract_spec(spec, ["storage_options.secret=[x"])
    with pytest.raises(SpecError, match=r"empty part"):
        load_extract_spec(spec, ["compute..batch_tokens=1"])
    with pytest.raises(SpecError) as info:  # a bad secret's value is never echoed
        load_extract_spec(spec, ["storage_options=not-a-mapping-s3cr3t"])
    assert "s3cr3t" not in str(info.value)


def _run(spec, capsys, *sets):
    rc = main([str(spec), "--no-progress", *sum((["--set", s] for s in sets), [])])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    ("sets", "pattern"),
    [
        (["model.id=./no/such/model"], r"unknown model './no/such/model': no such folder"),
        (["model.id=no-such-org/no-such-model-xyz"], r"model 'no-such-org/no-such-model-xyz'"),
        (["model.revision=deadbeef"], r"has revision 'local-xxh3:.*', not 'deadbeef'"),
        (["hooks=[blocks.5.hook_resid_post]"],
         r"unknown hook 'blocks.5.hook_resid_post' .*valid hooks: hook_embed, .*blocks.\{0..1\}.hook_resid_post"),
        (["corpus.text_field=body"], r"`corpus.text_field` 'body' is not a field of .*fields are: text"),
        (["tokenize.context_size=4096"], r"`tokenize.context_size` 4096 is beyond the maximum of model .* \(128\)"),
        (["corpus.id_field=uid"], r"`corpus.id_field` 'uid' is not a field"),
        (["corpus.nope=1"], r"`corpus.nope` is not a spec key"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(spec, capsys, sets, pattern):
    rc, out, err = _run(spec, capsys, *sets)
    assert rc == 2
    assert err.startswith("strata: error: ") and err.count("\n") == 1, err
    import re

    assert re.search(pattern, err), err
    root = Path(yaml.safe_load(spec.read_text())["store"])
    assert not (root / "datasets").exists() or store.open(root).datasets() == []


@pytest.mark.slow
def test_cli_failures_are_one_line_with_exit_2(spec, tmp_path, capsys, monkeypatch):
    # A folder as the spec, a malformed --set value, a corpus that is not UTF-8, a dead address.
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    for argv in ([str(tmp_path)], [str(spec), "--set", "hooks=[a"], [str(spec), "--set", f"corpus.path={latin}"],
                 [str(spec), "--set", "corpus.format=parquet"]):
        rc = main([*argv, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("strata: error: ") and err.count("\n") == 1, (argv, err)
    # A dead cluster address, in a fresh process (a Ray already running in this one is used as is).
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "strata.jobs.cli", "extract", str(spec), "--set", "compute.address=127.0.0.1:1",
                        "--set", "compute.executor=auto", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot reach the Ray cluster at '127.0.0.1:1'" in r.stderr, r.stderr[-2000:]
    # A relative store inside a Ray job would land in Ray's temporary working directory.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    rc = main([str(spec), "--set", "store=./acts", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "relative local path, and this is a Ray job" in err and "$PWD/acts" in err
    assert not (Path.cwd() / "acts" / "datasets" / "cli").exists()


def test_empty_corpus_and_unwritable_store(spec, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": " "}) + "\n")
    rc, _, err = _run(spec, capsys, f"corpus.path={empty}")
    assert rc == 2 and "is empty" in err and "1 empty documents skipped" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = _run(spec, capsys, f"store={blocker}/acts")
    assert rc == 2 and err.count("\n") == 1 and "acts" in err


def test_existing_dataset_with_another_identity_is_refused(spec, tmp_path, capsys):
    s = store.open(tmp_path / "acts")
    s.create_dataset("cli", hooks={"blocks.0.hook_resid_post": 32}, context_size=16, dtype="float16", num_units=1, unit_contexts=8,
                     meta={"model": "something-else"})
    rc, _, err = _run(spec, capsys)
    assert rc == 2 and "already exists" in err and "choose a new `name`" in err


def test_strata_extract_command_end_to_end(spec, capsys):
    from strata.jobs.cli import main as cli_main

    rc = cli_main(["extract", str(spec), "--set", "dtype=bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "computed" in out and "strata.open(" in out
    root = Path(yaml.safe_load(spec.read_text())["store"])
    ds = store.open(root).dataset("cli")
    assert ds.info.dtype == "bfloat16" and ds.is_complete and ds.verify().ok
    assert ds.info.meta["spec"]["dtype"] == "bfloat16"
    rc = cli_main(["extract", str(spec), "--set", "dtype=bfloat16"])
    assert rc == 0 and "nothing to do" in capsys.readouterr().out
    # In this process, a cluster address is a contradiction, said in one line before anything runs.
    rc = cli_main(["extract", str(spec), "--set", "compute.address=127.0.0.1:1", "--set", "name=other"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "`compute.executor` is local but `compute.address` is '127.0.0.1:1'" in err, err
