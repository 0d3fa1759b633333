"""No command follows a symbolic link out of the store root: listings leave links out and
`links()` names them, `gc` lists them as foreign and deletes nothing through them, `rm` refuses
them (one line, exit 2) before writing anything."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from strata import store
from strata.jobs.cli import main
from strata.store.commit import artifacts
from strata.store.errors import StorageError
from strata.store.lifecycle import gc


def _snapshot(root) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.fixture
def linked(tmp_path):
    """A store with a committed SAE, and outside it a folder that looks like an SAE folder (a
    commit record, files, old enough for gc) and a lone file, linked into the store."""
    root, outside = tmp_path / "store", tmp_path / "outside"
    s = store.open(root)
    with s.artifact_lease("saes", "real") as lease:
        artifacts.put(s.storage, "saes", "real", {"cfg.json": b"{}"}, lease=lease)
    other = store.open(tmp_path / "other")  # a real SAE folder, made elsewhere
    with other.artifact_lease("saes", "evil") as lease:
        artifacts.put(other.storage, "saes", "evil", {"cfg.json": b"{}"}, lease=lease)
    os.rename(tmp_path / "other" / "saes" / "evil", outside)
    shutil.rmtree(outside / "lease")  # so that a lease written through the link would show
    (outside / "junk.bin").write_bytes(b"never committed")
    (tmp_path / "secret.txt").write_bytes(b"not the store's")
    t = time.time() - 7200
    for p in [*outside.rglob("*"), tmp_path / "secret.txt"]:
        os.utime(p, (t, t))
    os.symlink(outside, root / "saes" / "evil")
    os.symlink(tmp_path / "secret.txt", root / "saes" / "real" / "notes.txt")
    os.symlink(tmp_path / "secret.txt", root / "stray.partial")
    return s, root, outside, tmp_path / "secret.txt"


def test_listings_leave_links_out_and_links_names_them(linked):
    s, root, outside, secret = linked
    assert gc.links(s.storage) == ["saes/evil", "saes/real/notes.txt", "stray.partial"]
    assert s.storage.list_dirs("saes") == ["real"]
    assert s.storage.list("saes/evil") == [] and s.storage.links("saes/evil/lease") == ["saes/evil"]
    assert "saes/real/notes.txt" not in s.storage.list("saes")
    assert s.storage.list_temporary("") == []
    with pytest.raises(StorageError, match="symbolic link"):
        s.storage.delete("saes/evil/junk.bin")
    assert (outside / "junk.bin").exists()


def test_gc_lists_links_as_foreign_and_deletes_nothing_outside(linked, capsys):
    s, root, outside, secret = linked
    before_out, before_secret = _snapshot(outside), secret.read_bytes()
    assert main(["gc", str(root), "--grace", "0s", "--apply"]) == 0
    out = capsys.readouterr().out
    for key in ("saes/evil", "saes/real/notes.txt", "stray.partial"):
        assert f"foreign {key}\t" in out
    assert "deleted 0 file(s)" in out
    assert _snapshot(outside) == before_out and secret.read_bytes() == before_secret
    assert os.path.islink(root / "saes" / "evil") and os.path.islink(root / "saes" / "real" / "notes.txt")


@pytest.mark.parametrize("name", ["evil", "real"])
def test_rm_refuses_a_link_and_writes_nothing_through_it(linked, capsys, name):
    s, root, outside, secret = linked
    before_out, before_store = _snapshot(outside), _snapshot(root)
    assert main(["rm", str(root), name, "--kind", "sae", "--yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "symbolic link" in err and ("saes/evil" if name == "evil" else "saes/real/notes.txt") in err
    assert _snapshot(outside) == before_out and not (outside / "lease").exists()
    assert _snapshot(root) == before_store and secret.exists()
    assert s.saes() == ["real"] and (root / "saes" / "real" / "commit.json").exists()  # nothing deleted
