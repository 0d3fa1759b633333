"""What a person waits on says what is done (issue 15, finding 8), through the real jobs (in this
process: the bar and the log are the driver's either way): the encode bar of a finished job reads
100% of its rows (the last unit of a dataset is short), and adding hooks to a dataset says it
computes the new hooks, not every hook."""

from __future__ import annotations

import logging
import re

from strata import store
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset
from strata.pipeline.config import ExtractSpec
from strata.pipeline.encode import EncodeSpec, run_encode
from strata.pipeline.extract import run_extract

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def bar_positions(err: str) -> list[tuple[str, str, str]]:
    """(percent, n, total) of every display of a tqdm bar in ``err``."""
    return re.findall(r"(\d+)%\|[^|]*\| ([\d.]+k?)/([\d.]+k?) \[", err)


def test_a_finished_encode_bar_reads_all_its_rows(tmp_path, capsys):
    s = store.open(tmp_path / "acts")
    # 5 units of 4 x 16 rows, the last with one context: 272 rows, not 5 x 64.
    synthetic_dataset(s, "syn", hook=H0, d=16, units=5, unit_contexts=4, context_size=16, last_contexts=1)
    put_sae(s, "sae", random_topk_sae(16, 32, k=4, seed=1), dataset="syn", hook=H0)
    rows = sum(s.dataset("syn").unit_counts(H0, u)[0] for u in range(5))
    assert rows == 4 * 64 + 16
    capsys.readouterr()
    r = run_encode(EncodeSpec(store=str(tmp_path / "acts"), sae="sae", top_k=4, compute={"executor": "local", "batch_rows": 64, "num_workers": 1}),
                   progress=True)
    assert r.units_run == 5 and r.rows == rows
    bar = bar_positions(capsys.readouterr().err)
    assert bar and bar[-1] == ("100", str(rows), str(rows)), bar


def test_added_hooks_are_said_to_be_what_is_computed(tmp_path, tiny_gpt2, corpus_file, caplog):
    def spec(hooks: list[str]) -> ExtractSpec:
        return ExtractSpec(store=str(tmp_path / "acts"), name="tiny", model={"id": str(tiny_gpt2)}, corpus={"path": str(corpus_file)},
                           tokenize={"context_size": 16}, hooks=hooks, dtype="float32",
                           compute={"executor": "local", "unit_contexts": 8, "batch_tokens": 128, "num_workers": 1})

    first = run_extract(spec([H0]), progress=False)
    units = first.num_units
    assert first.units_run == units and first.hooks_computed == [H0] and first.hooks_new == [H0]
    new = [H1, "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    caplog.clear()  # the first run's lines are captured too when an earlier test set INFO on this logger
    with caplog.at_level(logging.INFO, logger="strata.pipeline.extract"):
        r = run_extract(spec([H0, *new]), progress=False)
    assert r.units_run == units and r.units_skipped == 0  # every unit runs: each lacks the new hooks
    assert sorted(r.hooks_computed) == sorted(new) and sorted(r.hooks_new) == sorted(new) and r.hooks_committed == [H0]
    assert f"computed {units} unit(s) of 3 new hook(s) (" in r.message, r.message
    assert "1 hook(s) were already committed for every unit" in r.message and "0 unit(s)" not in r.message, r.message
    said = [rec.getMessage() for rec in caplog.records if "units to compute" in rec.getMessage()]
    assert len(said) == 1 and f"{units} of {units} units to compute for 3 new hook(s)" in said[0], said
    assert "1 hook(s) were already committed" in said[0] and H0 not in said[0].split("(")[1].split(")")[0], said
    ds = store.open(tmp_path / "acts").dataset("tiny")
    assert all(ds.committed_units(h) == list(range(units)) for h in [H0, *new])
