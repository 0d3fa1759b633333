"""`strata verify` for every artifact kind, `--repair` per kind, and checked records (issue 16,
findings 5, 7, 8). Store-level: no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import _full_store as F
import pytest
import zarr
from _full_store import H

from strata import store
from strata.analysis.features.synthetic import word_tokenizer_json
from strata.jobs.cli import main
from strata.store import layout
from strata.store.errors import CorruptionError, NotCommittedError


@pytest.fixture
def full(tmp_path):
    root = tmp_path / "acts"
    F.build(root)
    return root


def _flip(path: Path, at: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(raw))


def _edit_json(path: Path, change) -> None:  # noqa: ANN001
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2, sort_keys=True))


def _verify(root: Path, *args: str, capsys) -> tuple[int, str]:  # noqa: ANN001
    code = main(["verify", str(root), *args])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _snapshot(root: Path, kinds: set[str]) -> dict[str, bytes]:
    return {k: (root / k).read_bytes() for kind, keys in F.artifact_files(root).items() if kind in kinds for k in keys}


# -- 16.5: every record a read depends on is checked ---------------------------------------


def test_feature_manifest_values_are_checked(full):
    key = full / "features/ft/manifest.json"
    good = key.read_bytes()
    _edit_json(key, lambda d: d.update(unit_rows=d["unit_rows"] + 1))  # was read silently: wrong rows for every latent
    with pytest.raises(CorruptionError, match="manifest.json: damaged feature-table manifest \\(its checksum"):
        store.open(full).features("ft")
    key.write_bytes(good)
    _edit_json(key, lambda d: d["hist"].update(lo=d["hist"]["lo"] * 2))  # was read silently: wrong histogram bins
    with pytest.raises(CorruptionError, match="checksum"):
        store.open(full).features("ft").histogram(0)
    key.write_bytes(good)
    assert store.open(full).features("ft").info.unit_rows == F.UR


def test_feature_manifest_without_checksum(full, capsys):
    key = full / "features/ft/manifest.json"
    want = store.open(full).features("ft").stats().to_pydict()
    # Written by the previous format: no checksum, version 1. Still read (tables written before
    # keep working); verify says so without failing.
    _edit_json(key, lambda d: (d.pop("checksum"), d.update(format_version=1)))
    assert store.open(full).features("ft").stats().to_pydict() == want
    code, out = _verify(full, "--kind", "features", capsys=capsys)
    assert code == 0 and "has no checksum (written by an older Strata)" in out
    # A version-2 manifest without its checksum is damaged (e.g. the key's name was hit).
    _edit_json(key, lambda d: d.update(format_version=2))
    with pytest.raises(CorruptionError, match="its checksum is missing"):
        store.open(full).features("ft")


def test_dataset_manifest_and_commit_records_are_checked(full):
    mkey = full / layout.manifest_key("ds")
    good = mkey.read_bytes()
    _edit_json(mkey, lambda d: d.update(num_units=d["num_units"] + 1))  # was accepted: a unit that never existed
    with pytest.raises(CorruptionError, match="damaged manifest \\(its checksum"):
        store.open(full).dataset("ds")
    mkey.write_bytes(good)
    # A record's special-row count (what training skips) was trusted as written.
    rkey = full / layout.commit_key("ds", None, 1)
    _edit_json(rkey, lambda d: d.update(special=d["special"] + 1))
    ds = store.open(full).dataset("ds")
    report = ds.verify()
    assert [(p.unit, p.hook, p.file) for p in report.problems] == [(1, None, layout.commit_key("ds", None, 1))]
    assert "checksum does not match" in report.problems[0].message
    # A record written before checksums existed still reads; one whose key name was hit does not.
    _edit_json(rkey, lambda d: (d.pop("checksum"), d.update(special=d["special"] - 1)))
    assert store.open(full).dataset("ds").verify().ok
    _edit_json(rkey, lambda d: d.update(spexial=d.pop("special")))
    assert [p.unit for p in store.open(full).dataset("ds").verify().problems] == [1]


# -- 16.7: every kind, --kind and a name, --repair per kind --------------------------------------


def test_verify_checks_every_kind_and_narrows(full, capsys):
    code, out = _verify(full, capsys=capsys)
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["dataset ds", "sae sae1", "features ft", "analysis cmp"]
    _flip(full / "saes/sae1/sae_weights.safetensors")
    code, out = _verify(full, capsys=capsys)
    assert code == 1 and "sae sae1: 1 problem(s)" in out and "saes/sae1/sae_weights.safetensors: checksum mismatch" in out
    assert "dataset ds: OK" in out and "features ft: OK" in out and "analysis cmp: OK" in out  # one damaged artifact blocks nothing
    assert "--repair` to remove what is damaged" in out
    assert _verify(full, "--kind", "dataset", capsys=capsys)[0] == 0
    assert _verify(full, "--kind", "features", capsys=capsys)[0] == 0
    code, out = _verify(full, "sae1", capsys=capsys)
    assert code == 1 and out.startswith("sae sae1: 1 problem(s)") and "dataset" not in out
    code, out = _verify(full, "nope", capsys=capsys)
    assert code == 2 and "strata: error: no dataset or sae or features or analysis called 'nope'" in out and "sae: sae1" in out
    code, out = _verify(full, "ds", "--kind", "sae", capsys=capsys)
    assert code == 2 and "no sae called 'ds'" in out
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(full), "--kind", "bogus"])
    assert exit_.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def _damage_and_repair(root: Path, key: str, capsys) -> str:  # noqa: ANN001
    kind = F.kind_of(key)
    others = _snapshot(root, set(F.NAMES) - {kind})
    _flip(root / key)
    code, out = _verify(root, capsys=capsys)
    assert code == 1 and key in out
    code, out = _verify(root, "--repair", capsys=capsys)
    assert code == 1 and "rerun" in out.split("--repair")[-1] or "recomputes" in out
    assert _snapshot(root, set(F.NAMES) - {kind}) == others  # nothing else touched
    return out


def test_repair_sae_and_analysis(full, capsys):
    out = _damage_and_repair(full, "saes/sae1/cfg.json", capsys)
    assert "saes/sae1: removed (its commit record and files)" in out and "rerun its training (`strata sae train SPEC`" in out
    s = store.open(full)
    assert s.saes() == [] and not (full / "saes/sae1/cfg.json").exists()
    out = _damage_and_repair(full, "analyses/cmp/commit.json", capsys)
    assert "analyses/cmp: removed (its commit record)" in out and "rerun the analysis job" in out
    assert s.analyses() == []
    assert _verify(full, capsys=capsys)[0] == 0


def test_repair_feature_table_unit_and_generation(full, capsys):
    fs = store.open(full).features("ft")
    unit_file = fs._records[1].file.key
    gen = fs.info.merged
    out = _damage_and_repair(full, unit_file, capsys)
    assert "features ft: removed unit 1" in out and "rerun its encode job (`strata features encode SPEC`)" in out
    fs = store.open(full).features("ft")
    assert fs.units == [0] and fs.stale
    with pytest.raises(NotCommittedError, match="unit 1"):
        fs.latents(rows=[F.UR + 1])
    assert _verify(full, capsys=capsys)[0] == 0

    out = _damage_and_repair(full, f"features/ft/merged/{gen}/fm/block-00001.parquet", capsys)
    assert f"removed merged generation {gen}" in out
    fs = store.open(full).features("ft")
    assert fs.info.merged is None and not any(p.is_file() for p in (full / f"features/ft/merged/{gen}").rglob("*"))
    with pytest.raises(NotCommittedError, match="run `strata features encode` again"):
        fs.stats()
    assert _verify(full, capsys=capsys)[0] == 0

    out = _damage_and_repair(full, "features/ft/manifest.json", capsys)
    assert "removed its damaged manifest" in out and store.open(full).feature_tables() == []
    assert _verify(full, capsys=capsys)[0] == 0


def test_repair_dataset_unit(full, capsys):
    shard = layout.shard_key("ds", H, 1)
    out = _damage_and_repair(full, shard, capsys)
    assert "removed the commit records of 1 damaged part(s) of unit(s) [1]" in out and "recomputes exactly those" in out
    assert store.open(full).dataset("ds").committed_units(H) == [0]
    code, out = _verify(full, capsys=capsys)
    assert code == 1 and "not every unit is committed" in out  # nothing damaged; the extraction finishes it
    assert _verify(full, "--committed-only", capsys=capsys)[0] == 0


def test_damaged_dataset_manifest_is_not_removed(full, capsys):
    _flip(full / layout.manifest_key("ds"), 40)
    code, out = _verify(full, "--repair", capsys=capsys)
    assert code == 1 and "dataset ds: DAMAGED" in out and "not repaired: its manifest is damaged" in out
    assert (full / layout.manifest_key("ds")).exists() and (full / layout.shard_key("ds", H, 0)).exists()


def test_a_symlink_inside_the_store_is_reported_and_removed(full, tmp_path, capsys):
    target = tmp_path / "outside.bin"
    target.write_bytes(b"x" * 10)
    (full / "saes/sae1/extra.bin").symlink_to(target)
    code, out = _verify(full, capsys=capsys)
    assert code == 1 and "saes/sae1/extra.bin: a symbolic link inside the store" in out
    code, out = _verify(full, "--repair", capsys=capsys)
    assert "saes/sae1/extra.bin: removed the symbolic link" in out
    assert not (full / "saes/sae1/extra.bin").is_symlink() and target.read_bytes() == b"x" * 10
    assert store.open(full).saes() == ["sae1"] and _verify(full, capsys=capsys)[0] == 0


# -- 16.8: records behind the index, driver-written files -------------------------------------


def test_a_damaged_record_does_not_hide_behind_the_commit_index(full, capsys):
    rec = layout.commit_key("ds", H, 1)
    _flip(full / rec)
    ds = store.open(full).dataset("ds")
    assert ds.committed_units(H) == [0, 1]  # readers see the index's checked copy
    report = ds.verify()
    assert [(p.unit, p.hook, p.file) for p in report.problems] == [(1, H, rec)]  # was: OK
    code, out = _verify(full, "--repair", capsys=capsys)
    assert "unit(s) [1]" in out
    ds = store.open(full).dataset("ds")
    assert ds.committed_units(H) == [0] and ds.verify(committed_only=True).ok  # the index was rebuilt without it


def test_commit_index_damaged_or_stale_is_rebuilt(full, capsys):
    index = store.open(full).manifest("ds").aux["commit_index"]["key"]
    _flip(full / index)
    code, out = _verify(full, capsys=capsys)
    assert code == 1 and f"{index}: checksum mismatch" in out
    code, out = _verify(full, "--repair", capsys=capsys)
    assert f"ds: rebuilt {index}" in out  # the same content: the damaged file is replaced at its key
    assert _verify(full, capsys=capsys)[0] == 0
    # An index naming a record that is gone (removed by hand) is stale: reported, rebuilt.
    (full / layout.commit_key("ds", None, 1)).unlink()
    code, out = _verify(full, "--committed-only", capsys=capsys)
    assert code == 1 and "the commit index names a record that is not there (unit 1 tokens;" in out
    _verify(full, "--repair", "--committed-only", capsys=capsys)
    assert store.open(full).dataset("ds").committed_units() == [0]
    assert _verify(full, "--committed-only", capsys=capsys)[0] == 0


def test_a_damaged_tokenizer_is_replaced_by_the_next_driver_write(full, capsys):
    s = store.open(full)
    key = s.manifest("ds").aux["tokenizer"]["key"]
    _flip(full / key)
    with pytest.raises(CorruptionError, match="tokenizer"):
        s.dataset("ds").tokenizer()
    s.writer("ds").write_tokenizer(word_tokenizer_json(64))  # what the extraction's driver does on a rerun
    assert s.dataset("ds").tokenizer().decode([5]) == "w5" and _verify(full, capsys=capsys)[0] == 0


def test_repair_removes_a_damaged_documents_file_and_says_rerun(full, capsys):
    s = store.open(full)
    key = s.manifest("ds").aux["documents"]["key"]
    want = s.dataset("ds").docs()
    _flip(full / key)
    code, out = _verify(full, "--repair", capsys=capsys)
    assert f"ds: removed the damaged {key}" in out and "rerun the extraction job of dataset 'ds'" in out
    assert not (full / key).exists()
    with pytest.raises(CorruptionError, match="file is missing"):
        s.dataset("ds").docs()
    s.writer("ds").write_documents(want)
    assert s.dataset("ds").docs().equals(want) and _verify(full, capsys=capsys)[0] == 0


def test_damaged_zarr_metadata_is_rebuilt_from_the_manifest(full, capsys):
    key = f"{layout.array_path('ds', H)}/zarr.json"
    _edit_json(full / key, lambda d: d.update(shape=[d["shape"][0] * 2, d["shape"][1]]))
    code, out = _verify(full, capsys=capsys)
    assert code == 1 and f"{key}: Zarr metadata differs from what the manifest implies (shape)" in out
    code, out = _verify(full, "--repair", capsys=capsys)
    assert f"ds: rebuilt {key}" in out and _verify(full, capsys=capsys)[0] == 0
    s = store.open(full)
    arr = zarr.open_array(store=s.zarr_store, path=layout.array_path("ds", H), mode="r")
    assert arr.shape == (F.UNITS * F.UR, F.D)
    assert (arr[: F.UR] == s.dataset("ds").read(H, rows=slice(0, F.UR))).all()


def test_sealed_records_round_trip():
    from strata.store.commit import sealed

    body = {"b": [1, 2.5, None], "a": "x"}
    sealed_body = sealed.seal(body)
    assert sealed.unseal(json.loads(json.dumps(sealed_body, indent=4)), where="k", what="r") == (body, True)
    assert sealed.unseal(body, where="k", what="r") == (body, False)
    with pytest.raises(CorruptionError, match="k: damaged r"):
        sealed.unseal({**sealed_body, "a": "y"}, where="k", what="r")
