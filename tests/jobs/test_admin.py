"""`strata rm` and what was built from what: refused while dependents exist (naming them),
`--cascade` deletes them first, each under its own lease; every kind can be removed; a damaged
record of one artifact never blocks the others."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from strata import store
from strata.analysis.features.synthetic import synthetic_dataset, write_table
from strata.jobs.cli import main
from strata.store.commit import artifacts
from strata.store.features.format import load_info, write_info
from strata.store.features.writer import table_lease
from strata.store.lifecycle import dependents
from strata.store.lifecycle.dependents import Ref

H = "blocks.0.hook_resid_post"


def _sae(s, name: str, dataset: str) -> None:
    lineage = {"name": name, "dataset": dataset, "hook": H, "d_in": 8}
    with s.artifact_lease("saes", name) as lease:
        artifacts.put(s.storage, "saes", name, {"cfg.json": b'{"d_in": 8, "d_sae": 8}', "lineage.json": json.dumps(lineage).encode()},
                      meta={"config_hash": "x"}, lease=lease)


def _table(s, name: str, *, sae: str, dataset: str) -> None:
    ds = s.dataset(dataset)

    def entries(u: int):
        rows = ds.record(H, u).rows
        r = np.arange(rows) + u * ds.info.unit_rows
        return r, np.full(rows, 2, dtype=np.int32), np.ones(rows, dtype=np.float32), rows

    write_table(s, name, dataset=dataset, hook=H, d_sae=8, units=[0, 1], entries=entries, top_k=2, block_features=4)
    with table_lease(s.storage, name, owner="test") as lease:  # record the SAE as an encode of it does
        lease.check()
        write_info(s.storage, load_info(s.storage, name).with_changes(sae=sae))


def _analysis(s, name: str, inputs: list) -> None:
    t = pa.table({"metric": ["cka"], "value": [0.5]})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    with s.artifact_lease("analyses", name) as lease:
        artifacts.put(s.storage, "analyses", name, {"results.parquet": sink.getvalue().to_pybytes()},
                      meta={"kind": "compare", "spec": {}, "inputs": inputs}, lease=lease)


@pytest.fixture
def chain(tmp_path):
    """dataset syn <- SAE tiny-topk <- feature table tiny-topk; analysis cmp reads syn and the SAE;
    dataset other <- analysis solo (unrelated to syn)."""
    s = store.open(tmp_path)
    synthetic_dataset(s, "syn", hook=H, d=8, units=2, unit_contexts=2, context_size=8)
    synthetic_dataset(s, "other", hook=H, d=8, units=1, unit_contexts=2, context_size=8)
    _sae(s, "tiny-topk", "syn")
    _table(s, "tiny-topk", sae="tiny-topk", dataset="syn")
    _analysis(s, "cmp", [{"dataset": "syn", "fingerprint": "f", "hooks": [H], "units": [0, 1]},
                         {"sae": "tiny-topk", "dataset": "syn", "hook": H}])
    _analysis(s, "solo", [{"dataset": "other", "fingerprint": "f", "hooks": [H], "units": [0]}])
    return s, tmp_path


def test_the_graph_is_read_from_records(chain):
    s, _ = chain
    g = dependents.graph(s)
    assert g.damaged == []
    assert g.sources[Ref("sae", "tiny-topk")] == {Ref("dataset", "syn")}
    assert g.sources[Ref("features", "tiny-topk")] == {Ref("sae", "tiny-topk"), Ref("dataset", "syn")}
    assert g.sources[Ref("analysis", "cmp")] == {Ref("dataset", "syn"), Ref("sae", "tiny-topk")}
    deps = g.dependents(Ref("dataset", "syn"))
    assert set(deps) == {Ref("sae", "tiny-topk"), Ref("features", "tiny-topk"), Ref("analysis", "cmp")}
    # Each before what it was built from.
    assert deps.index(Ref("features", "tiny-topk")) < deps.index(Ref("sae", "tiny-topk"))
    assert deps.index(Ref("analysis", "cmp")) < deps.index(Ref("sae", "tiny-topk"))
    assert g.dependents(Ref("dataset", "other")) == [Ref("analysis", "solo")]
    assert g.dependents(Ref("analysis", "cmp")) == []


def test_rm_refuses_while_dependents_exist_and_names_them(chain, capsys):
    s, root = chain
    assert main(["rm", str(root), "tiny-topk", "--kind", "sae", "--yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "feature table 'tiny-topk'" in err and "analysis 'cmp'" in err and "--cascade" in err
    assert main(["rm", str(root), "syn", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "SAE 'tiny-topk'" in err and "feature table 'tiny-topk'" in err and "analysis 'cmp'" in err
    assert s.saes() == ["tiny-topk"] and s.feature_tables() == ["tiny-topk"] and s.datasets() == ["other", "syn"]
    assert s.features("tiny-topk").stats().num_rows == 8


def test_rm_cascade_deletes_dependents_first(chain, capsys):
    s, root = chain
    with s.lease("syn", owner="extract job"):  # the target is being written: nothing at all is deleted
        assert main(["rm", str(root), "syn", "--cascade", "--yes"]) == 2
        assert "extract job" in capsys.readouterr().err
    assert s.saes() == ["tiny-topk"] and s.feature_tables() == ["tiny-topk"] and s.analyses() == ["cmp", "solo"]
    assert main(["rm", str(root), "syn", "--cascade", "--yes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "deleted dataset 'syn'" and len(lines) == 4
    order = [ln.removeprefix("deleted ") for ln in lines]
    assert order.index("feature table 'tiny-topk'") < order.index("SAE 'tiny-topk'")
    assert order.index("analysis 'cmp'") < order.index("SAE 'tiny-topk'")
    assert s.datasets() == ["other"] and s.saes() == [] and s.feature_tables() == [] and s.analyses() == ["solo"]
    assert not s.storage.list("features/tiny-topk/units") and not s.storage.list("features/tiny-topk/merged")
    assert s.analysis("solo").table().num_rows == 1  # unrelated work untouched


def test_rm_every_kind(chain, capsys):
    s, root = chain
    assert main(["rm", str(root), "cmp", "--kind", "analysis", "--yes"]) == 0 and s.analyses() == ["solo"]
    with table_lease(s.storage, "tiny-topk", owner="encode job"):
        assert main(["rm", str(root), "tiny-topk", "--kind", "features", "--yes"]) == 2
        assert "encode job" in capsys.readouterr().err
    assert main(["rm", str(root), "tiny-topk", "--kind", "features", "--yes"]) == 0
    assert s.feature_tables() == [] and [k for k in s.storage.list("features/tiny-topk") if "/lease/" not in k] == []
    assert main(["rm", str(root), "tiny-topk", "--kind", "sae", "--yes"]) == 0 and s.saes() == []
    assert main(["rm", str(root), "nope", "--kind", "features", "--yes"]) == 2
    assert "no feature table 'nope'" in capsys.readouterr().err
    assert main(["rm", str(root), "syn", "--yes"]) == 0 and s.datasets() == ["other"]


def test_a_damaged_record_does_not_block_rm_of_others(chain, capsys):
    s, root = chain
    (root / "saes" / "tiny-topk" / "commit.json").write_bytes(b"{damaged")
    # The SAE's record cannot be read: reported, and it no longer counts as a dependent of syn.
    assert main(["rm", str(root), "other", "--cascade", "--yes"]) == 0
    out, err = capsys.readouterr()
    assert "SAE 'tiny-topk': its record cannot be read" in err
    assert out.splitlines() == ["deleted analysis 'solo'", "deleted dataset 'other'"]
    # The damaged SAE itself can be removed (the feature table built from it goes first).
    assert main(["rm", str(root), "tiny-topk", "--kind", "sae", "--cascade", "--yes"]) == 0
    assert "deleted feature table 'tiny-topk'" in capsys.readouterr().out
    assert not (root / "saes" / "tiny-topk" / "commit.json").exists() and s.feature_tables() == []
