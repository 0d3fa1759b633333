"""The `strata` command line on a local store: ls, show, verify, unknown names; and the
catalog, queried with DuckDB and rebuilt when lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from strata import store
from strata.jobs.cli import main

HOOK = "blocks.0.hook_resid_post"
HOOK2 = "blocks.1.hook_mlp_out"


def token_table(unit: int, *, context_size: int, unit_contexts: int) -> pa.Table:
    """Unit ``unit``'s tokens: row r is position r % context_size of GLOBAL context
    unit * unit_contexts + r // context_size; one document per context, BOS first."""
    r = np.arange(unit_contexts * context_size)
    ctx = unit * unit_contexts + r // context_size
    return pa.table(
        {
            "context_id": ctx,
            "position": r % context_size,
            "doc_id": ctx,
            "doc_position": r % context_size,
            "token_id": (ctx * 13 + r) % 500,
            "special": r % context_size == 0,
        }
    )


def acts(unit: int, rows: int, d: int) -> np.ndarray:
    return np.random.default_rng(unit).standard_normal((rows, d)).astype(np.float32)


@pytest.fixture
def root(tmp_path: Path) -> str:
    """Two datasets: `alpha` (float16, context 8, units 0-2 of 4 committed for HOOK, 0-1 for
    HOOK2) and `beta` (float32, context 4, both units committed)."""
    root = str(tmp_path / "acts")
    s = store.open(root)
    w = s.create_dataset("alpha", hooks={HOOK: 16, HOOK2: 8}, context_size=8, dtype="float16", num_units=4, unit_contexts=2, meta={"model": "tiny"})
    for k in range(3):
        a = {HOOK: acts(k, 16, 16)} | ({HOOK2: acts(k + 10, 16, 8)} if k < 2 else {})
        w.write_unit(k, tokens=token_table(k, context_size=8, unit_contexts=2), acts=a)
    w = s.create_dataset("beta", hooks={HOOK: 4}, context_size=4, dtype="float32", num_units=2, unit_contexts=3, meta={"model": "tiny-b"})
    for k in range(2):
        w.write_unit(k, tokens=token_table(k, context_size=4, unit_contexts=3), acts={HOOK: acts(k, 12, 4)})
    return root


def _corrupt_value(root: str, name: str, hook: str, unit: int) -> str:
    """Flip one bit of one stored value of a shard (its index stays valid); returns the key."""
    key = f"datasets/{name}/acts/{hook}/c/{unit}/0"
    path = Path(root) / key
    b = bytearray(path.read_bytes())
    b[3] ^= 0x10
    path.write_bytes(bytes(b))
    return key


def test_ls_lists_datasets_with_units_and_rows(root: str, capsys) -> None:
    assert main(["ls", root]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["alpha", "beta"]
    alpha, beta = (dict(f.split("=", 1) for f in ln.split("\t") if "=" in f) for ln in lines)
    # units committed for every hook (and the token table): alpha's second hook has 2 of 4
    assert alpha["units"] == "2/4" and alpha["rows"] == "32" and alpha["ctx"] == "8" and alpha["hooks"] == "2"
    assert beta["units"] == "2/2" and beta["rows"] == "24" and beta["ctx"] == "4" and beta["hooks"] == "1"
    assert "tiny" in lines[0] and "float16" in lines[0] and "float32" in lines[1]


def test_ls_empty_store(tmp_path: Path, capsys) -> None:
    store.open(tmp_path / "empty")
    assert main(["ls", str(tmp_path / "empty")]) == 0
    assert "no datasets" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["ls"], ["show", "x"], ["verify"], ["verify", "x"]])
def test_readers_on_a_missing_store_fail_and_create_nothing(tmp_path: Path, capsys, cmd: list[str]) -> None:
    missing = tmp_path / "nope"
    assert main([cmd[0], str(missing), *cmd[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata: error: no store at") and err.count("\n") == 1
    assert not missing.exists()


def test_show_prints_json_with_hooks_and_counts(root: str, capsys) -> None:
    assert main(["show", root, "alpha"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "alpha" and info["model"] == "tiny" and info["dtype"] == "float16"
    assert info["context_size"] == 8 and info["unit_contexts"] == 2 and info["unit_rows"] == 16
    assert info["num_units"] == 4 and info["committed_units"] == 3 and info["token_rows"] == 48
    assert info["hooks"] == {HOOK: {"d": 16, "rows": 48, "units": 3}, HOOK2: {"d": 8, "rows": 32, "units": 2}}
    assert info["meta"] == {"model": "tiny"}
    assert info["fingerprint"] == store.open(root).dataset("alpha").info.fingerprint


def test_verify_counts_units_and_fails_an_incomplete_dataset(root: str, capsys) -> None:
    # alpha has 3 of 4 units of one hook and 2 of 4 of the other: incomplete, so not OK.
    assert main(["verify", root]) == 1
    out = capsys.readouterr().out
    assert "alpha: INCOMPLETE: 2 of 4 units committed" in out and "beta: OK: 2 of 2 units committed" in out
    assert "not every unit is committed" in out
    assert main(["verify", root, "--committed-only"]) == 0
    out = capsys.readouterr().out
    assert "alpha: OK so far (committed units only)" in out
    assert main(["verify", root, "beta"]) == 0
    out = capsys.readouterr().out
    assert "beta: OK" in out and "alpha" not in out


def test_verify_of_a_dataset_with_nothing_committed_fails(tmp_path: Path, capsys) -> None:
    s = store.open(tmp_path / "s")
    s.create_dataset("empty", hooks={HOOK: 4}, context_size=4, num_units=5, unit_contexts=1)
    assert main(["verify", str(tmp_path / "s")]) == 1
    assert "empty: INCOMPLETE: 0 of 5 units committed" in capsys.readouterr().out


def test_verify_repair_then_the_units_are_missing_not_damaged(root: str, capsys) -> None:
    key = _corrupt_value(root, "beta", HOOK, 1)
    assert main(["verify", root, "beta"]) == 1
    assert "--repair" in capsys.readouterr().out
    assert main(["verify", root, "beta", "--repair"]) == 1
    out = capsys.readouterr().out
    assert "removed the commit records of 1 damaged part(s) of unit(s) [1]" in out and key in out
    assert not (Path(root) / key).exists()
    assert main(["verify", root, "beta"]) == 1  # incomplete now, and nothing damaged
    out = capsys.readouterr().out
    assert "beta: INCOMPLETE: 1 of 2 units committed" in out and "problem" not in out


def test_damaged_manifest_and_record_are_reported_not_tracebacks(root: str, capsys) -> None:
    (Path(root) / "datasets/alpha/manifest.json").write_text('{"format": "strata.act')
    rec = Path(root) / f"datasets/beta/commits/acts/{HOOK}/000000/00000001.json"
    rec.write_bytes(rec.read_bytes()[:50])
    assert main(["ls", root]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("alpha\tDAMAGED: ") and "damaged manifest" in out[0]
    assert out[1].startswith("beta\t") and "damaged records=1" in out[1]
    assert main(["verify", root]) == 1
    out = capsys.readouterr().out
    assert "alpha: DAMAGED:" in out and f"unit 1 {HOOK} (datasets/beta/commits/acts/{HOOK}/000000/00000001.json): damaged commit record" in out
    assert main(["show", root, "alpha"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged manifest" in err and "Traceback" not in err


def test_verify_corrupt_shard_exits_1(root: str, capsys) -> None:
    _corrupt_value(root, "alpha", HOOK, 1)
    assert main(["verify", root]) == 1
    out = capsys.readouterr().out
    assert "beta: OK" in out
    bad = [ln for ln in out.splitlines() if ln.startswith("  unit ")]
    assert len(bad) == 1 and "unit 1" in bad[0] and HOOK in bad[0] and "checksum" in bad[0]
    assert main(["verify", root, "beta"]) == 0  # the other dataset alone is clean


def test_verify_names_corrupt_file(root: str, capsys) -> None:
    key = _corrupt_value(root, "alpha", HOOK, 1)
    assert main(["verify", root, "alpha"]) == 1
    assert key in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["show", "{root}", "nope"], ["verify", "{root}", "nope"]], ids=["show", "verify"])
def test_unknown_dataset_exits_2_listing_what_exists(root: str, capsys, argv: list[str]) -> None:
    assert main([a.format(root=root) for a in argv]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert "'nope'" in lines[0] and "alpha, beta" in lines[0]


def test_name_escaping_the_store_exits_2(root: str, capsys) -> None:
    assert main(["show", root, "../alpha"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata: error: ") and "'../alpha'" in err


@pytest.mark.s3
def test_ls_and_show_on_s3(s3_bucket: str, capsys) -> None:
    uri = f"{s3_bucket}/acts"
    w = store.open(uri).create_dataset("gamma", hooks={HOOK: 4}, context_size=4, dtype="bfloat16", num_units=3, unit_contexts=3)
    w.write_unit(2, tokens=token_table(2, context_size=4, unit_contexts=3), acts={HOOK: acts(2, 12, 4)})
    assert main(["ls", uri]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("gamma\t") and "units=1/3" in line and "rows=12" in line and "bfloat16" in line
    assert main(["show", uri, "gamma"]) == 0
    assert json.loads(capsys.readouterr().out)["hooks"] == {HOOK: {"d": 4, "rows": 12, "units": 1}}
    assert main(["verify", uri, "--committed-only"]) == 0
    assert main(["ls", f"{s3_bucket}/no-store-here"]) == 2


def test_real_processes(root: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    r = subprocess.run([sys.executable, "-m", "strata.jobs.cli", "show", root, "beta"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["hooks"] == {HOOK: {"d": 4, "rows": 24, "units": 2}} and info["committed_units"] == 2

    script = Path(sys.executable).parent / "strata"
    assert script.exists(), "the `strata` console script is not installed"
    r = subprocess.run([str(script), "show", root, "gamma"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "alpha, beta" in r.stderr


# -- the catalog ---------------------------------------------------------------------------------


def test_duckdb_reads_the_catalog(root: str) -> None:
    rows = duckdb.sql(f"SELECT name, context_size, dtype, num_units FROM '{root}/catalog/*.parquet' ORDER BY name").fetchall()
    assert rows == [("alpha", 8, "float16", 4), ("beta", 4, "float32", 2)]
    hooks = duckdb.sql(f"SELECT hooks FROM '{root}/catalog/*.parquet' WHERE model = 'tiny'").fetchall()
    assert hooks == [([HOOK, HOOK2],)]


def test_catalog_read_without_its_files_and_rewritten_by_drivers(root: str) -> None:
    shutil.rmtree(Path(root) / "catalog")
    s = store.open(root)
    cat = {r["name"]: r for r in s.catalog().to_pylist()}  # counted from the commit records ...
    assert cat["alpha"]["committed_units"] == 2 and cat["beta"]["complete"] is True
    assert not (Path(root) / "catalog").exists()  # ... and nothing written
    for name in ("alpha", "beta"):
        s.update_catalog(name)
    rows = duckdb.sql(f"SELECT name, context_size, committed_units FROM '{root}/catalog/*.parquet' ORDER BY name").fetchall()
    assert rows == [("alpha", 8, 2), ("beta", 4, 2)]


def test_catalog_entry_stale_or_garbled_is_rewritten(root: str) -> None:
    s = store.open(root)
    (Path(root) / "catalog" / "beta.parquet").write_bytes(b"not parquet")
    # Grow alpha behind the catalog's back: the manifest says 6 units, the entry 4.
    old = (Path(root) / "catalog" / "alpha.parquet").read_bytes()
    s.create_dataset("alpha", hooks={HOOK: 16}, context_size=8, dtype="float16", num_units=6, unit_contexts=2, meta={"model": "tiny"}, exist_ok=True)
    (Path(root) / "catalog" / "alpha.parquet").write_bytes(old)
    cat = {r["name"]: r for r in s.catalog().to_pylist()}
    assert cat["alpha"]["num_units"] == 6 and cat["beta"]["num_units"] == 2  # counted, not trusted
    assert (Path(root) / "catalog" / "alpha.parquet").read_bytes() == old  # and never rewritten by a read
