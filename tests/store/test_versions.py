"""Dataset versions (issue 15, finding 5): ``s.versions(name)`` lists a dataset and the versions
made from it when its model's revision moved, oldest first; ``s.dataset(name)`` is exactly the
dataset of that name, ``version="latest"`` the newest version, ``version=REV`` the one of that
revision; an unknown revision is a one-line error listing the versions; ``strata ls`` shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strata import store
from strata.jobs.cli import main
from strata.store.datasets.manifest import load_manifest, write_manifest
from strata.store.errors import DatasetNotFoundError
from tests.store.helpers import CONTEXT_SIZE, HOOK, UNIT_CONTEXTS, D, token_table

REV_A = "a" * 8 + "1" * 32
REV_B = "b" * 8 + "2" * 32
REV_C = "local-xxh3:" + "c" * 8 + "3" * 24


def _make(s: store.Store, name: str, *, revision: str, created_at: str, version_of: str | None = None, value: float = 0.0,
          model: str = "tiny-model") -> None:
    """A one-unit dataset whose activations are all ``value``, created at ``created_at``."""
    meta = {"model": model, "revision": revision, **({"version_of": version_of} if version_of else {})}
    w = s.create_dataset(name, hooks={HOOK: D}, context_size=CONTEXT_SIZE, dtype="float32", num_units=1,
                         unit_contexts=UNIT_CONTEXTS, meta=meta)
    w.write_unit(0, tokens=token_table(0), acts={HOOK: np.full((CONTEXT_SIZE * UNIT_CONTEXTS, D), value, np.float32)})
    # The creation time decides the order; set it so the test does not depend on the clock.
    write_manifest(s.storage, load_manifest(s.storage, name).with_changes(created_at=created_at))


@pytest.fixture
def s(tmp_path: Path) -> store.Store:
    s = store.open(tmp_path / "acts")
    # Created out of name order on purpose: versions are ordered by creation time, not by name.
    _make(s, "tiny", revision=REV_B, created_at="2026-01-01T00:00:00.000+00:00", value=1.0)
    _make(s, "tiny@cccccccc", revision=REV_C, created_at="2026-03-01T00:00:00.000+00:00", version_of="tiny", value=3.0)
    _make(s, "tiny@aaaaaaaa", revision=REV_A, created_at="2026-02-01T00:00:00.000+00:00", version_of="tiny", value=2.0)
    _make(s, "tiny-other", revision=REV_A, created_at="2026-04-01T00:00:00.000+00:00", value=9.0)  # a prefix, not a version
    _make(s, "other", revision=REV_A, created_at="2026-05-01T00:00:00.000+00:00", model="other-model", value=8.0)
    return s


def test_versions_lists_the_dataset_and_its_versions_oldest_first(s: store.Store) -> None:
    vs = s.versions("tiny")
    assert [v.name for v in vs] == ["tiny", "tiny@aaaaaaaa", "tiny@cccccccc"]
    assert [v.revision for v in vs] == [REV_B, REV_A, REV_C]
    assert [v.short for v in vs] == ["bbbbbbbb", "aaaaaaaa", "cccccccc"]
    assert [v.created_at[:10] for v in vs] == ["2026-01-01", "2026-02-01", "2026-03-01"]
    assert {v.base for v in vs} == {"tiny"} and {v.model for v in vs} == {"tiny-model"}
    # Asked by a version's own name, the family is the same: a version is one of its base's.
    assert s.versions("tiny@aaaaaaaa") == vs
    assert [v.name for v in s.versions("other")] == ["other"]


def test_a_bare_name_is_that_dataset_latest_the_newest_and_a_revision_its_version(s: store.Store) -> None:
    def value(ds) -> float:
        return float(ds.read(HOOK, rows=slice(0, 1))[0, 0])

    assert s.dataset("tiny").name == "tiny" and value(s.dataset("tiny")) == 1.0  # a bare name never moves
    latest = s.dataset("tiny", version="latest")
    assert latest.name == "tiny@cccccccc" and value(latest) == 3.0
    assert s.dataset("tiny", version="aaaa").name == "tiny@aaaaaaaa"  # a revision prefix
    assert s.dataset("tiny", version=REV_A).name == "tiny@aaaaaaaa"  # the whole revision
    assert s.dataset("tiny", version=REV_C).name == "tiny@cccccccc"  # a local folder's revision, prefix and all
    assert s.dataset("tiny", version="cccc").name == "tiny@cccccccc"
    assert s.dataset("tiny", version="BBBBBBBB").name == "tiny"  # hex is case-insensitive
    assert s.dataset("tiny-other", version="latest").name == "tiny-other"  # a dataset without versions is its own latest


def test_an_unknown_revision_is_one_line_listing_the_versions(s: store.Store) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        s.dataset("tiny", version="deadbeef")
    msg = str(e.value)
    assert "\n" not in msg and "no version of revision 'deadbeef'" in msg
    assert "tiny (revision bbbbbbbb" in msg and "tiny@aaaaaaaa (revision aaaaaaaa" in msg and "tiny@cccccccc (revision cccccccc" in msg
    assert msg.index("tiny (revision") < msg.index("tiny@aaaaaaaa") < msg.index("tiny@cccccccc")  # oldest first
    with pytest.raises(DatasetNotFoundError, match=r"no dataset 'nope' and no version of it .* it holds: other, tiny"):
        s.versions("nope")
    with pytest.raises(DatasetNotFoundError, match="no dataset 'nope'"):
        s.dataset("nope", version="latest")
    with pytest.raises(ValueError, match="`version` must be 'latest' or a revision"):
        s.dataset("tiny", version="")


def test_an_ambiguous_revision_prefix_is_refused(tmp_path: Path) -> None:
    s = store.open(tmp_path / "acts")
    _make(s, "m", revision="ab" + "0" * 38, created_at="2026-01-01T00:00:00.000+00:00")
    _make(s, "m@ab111111", revision="ab1" + "1" * 37, created_at="2026-01-02T00:00:00.000+00:00", version_of="m")
    with pytest.raises(DatasetNotFoundError, match="revision 'ab' matches several versions of dataset 'm'"):
        s.dataset("m", version="ab")
    assert s.dataset("m", version="ab1").name == "m@ab111111"


def test_versions_made_before_the_manifest_recorded_them_are_found_by_their_name(tmp_path: Path) -> None:
    s = store.open(tmp_path / "acts")
    _make(s, "old", revision=REV_A, created_at="2026-01-01T00:00:00.000+00:00")
    _make(s, "old@bbbbbbbb", revision=REV_B, created_at="2026-01-02T00:00:00.000+00:00")  # no `version_of`
    _make(s, "old@x", revision=REV_C, created_at="2026-01-03T00:00:00.000+00:00", model="another")  # another model: not a version
    assert [v.name for v in s.versions("old")] == ["old", "old@bbbbbbbb"]
    assert s.dataset("old", version="latest").name == "old@bbbbbbbb"


def test_strata_ls_shows_the_versions_under_the_base_and_keeps_its_columns(s: store.Store, capsys) -> None:
    assert main(["ls", str(s.uri)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if not ln.startswith("  ")]
    assert [ln.split("\t")[0] for ln in rows] == ["other", "tiny", "tiny-other", "tiny@aaaaaaaa", "tiny@cccccccc"]
    assert all(dict(f.split("=", 1) for f in ln.split("\t") if "=" in f)["units"] == "1/1" for ln in rows)
    extra = [ln for ln in lines if ln.startswith("  ")]
    assert len(extra) == 1 and lines[lines.index(extra[0]) - 1].startswith("tiny\t")  # right under the base's row
    assert extra[0].startswith("  versions of tiny, oldest first: tiny (revision bbbbbbbb, 2026-01-01")
    assert extra[0].index("tiny@aaaaaaaa (revision aaaaaaaa") < extra[0].index("tiny@cccccccc (revision cccccccc")
    assert extra[0].endswith(", latest)") and extra[0].count("latest") == 1
