"""Progress of long calls (issue 24): tqdm.auto bars, shown with ``progress=True``, and by default
(``progress=None``) only where someone watches: a widget in Jupyter (checked by the example
notebook's test), text on a terminal, nothing when stderr is neither (as under pytest)."""

from __future__ import annotations

import re

from strata import store
from strata.analysis import similarity
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset
from strata.pipeline.encode import EncodeSpec, run_encode
from strata.store.datasets.batches import PROGRESS_UNITS

H = "blocks.0.hook_resid_post"


def _last(err: str, desc: str) -> tuple[str, str] | None:
    """(n, total) of the last display of the bar named ``desc`` in ``err``."""
    found = re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\| ([\d.]+k?)/([\d.]+k?) \[", err)
    return found[-1] if found else None


def test_a_first_pass_over_many_units_shows_its_units(tmp_path, capsys):
    s = store.open(tmp_path / "acts")
    synthetic_dataset(s, "many", hook=H, d=8, units=PROGRESS_UNITS, unit_contexts=1, context_size=16)
    ds = s.dataset("many")
    capsys.readouterr()
    with ds.iter_batches(H, batch_size=64, progress=True) as it:
        n = sum(b.shape[0] for b in it)
    assert n == ds.num_rows(H) - PROGRESS_UNITS  # every row but each context's BOS
    assert _last(capsys.readouterr().err, "many: first pass") == (str(PROGRESS_UNITS), str(PROGRESS_UNITS))
    with s.dataset("many").iter_batches(H, batch_size=64) as it:  # progress=None, stderr not a terminal: silent
        list(it)
    with s.dataset("many").iter_batches(H, batch_size=64, progress=True, units=[0, 1]) as it:  # few units: only when asked
        list(it)
    err = capsys.readouterr().err
    assert "first pass" in err and _last(err, "many: first pass") == ("2", "2")
    assert f"/{PROGRESS_UNITS}" not in err  # the default iterator's first pass said nothing


def test_encode_and_compare_are_silent_off_a_terminal_and_show_a_bar_when_asked(tmp_path, capsys):
    s = store.open(tmp_path / "acts")
    synthetic_dataset(s, "syn", hook=H, d=16, units=3)
    put_sae(s, "sae", random_topk_sae(16, 32, k=4, seed=1), dataset="syn", hook=H)
    capsys.readouterr()
    spec = EncodeSpec(store=str(tmp_path / "acts"), sae="sae", top_k=4, compute={"executor": "local", "batch_rows": 64, "num_workers": 1})
    run_encode(spec)
    ds = s.dataset("syn")
    rows = int((~ds.tokens(H).column("special").to_numpy(zero_copy_only=False)).sum())  # aligned pairs leave BOS rows out
    similarity.compare((ds, H), (ds, H), ["linear_cka"])
    assert not re.search(r"\d+%\|", capsys.readouterr().err)  # no bar (log lines may be there: a CLI test's handler stays)
    value = similarity.compare((ds, H), (ds, H), ["linear_cka"], progress=True)
    assert abs(value["linear_cka"] - 1.0) < 1e-9
    assert _last(capsys.readouterr().err, "compare syn:blocks.0.hook_resid_post vs syn:blocks.0.hook_resid_post") == (str(rows), str(rows))
