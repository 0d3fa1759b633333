"""A pipeline's plan (what `strata reprocess` would run) shows itself in Jupyter (issue 24): each
job's output, what is missing, whether it runs and why, escaped; its repr is one short line."""

from __future__ import annotations

from html.parser import HTMLParser

import yaml
from _small_store import FEATURES, SAE, small_store

from strata.jobs.reprocess import load_pipeline, plan_pipeline


class Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):  # noqa: ANN001, ANN201 - HTMLParser's own signature
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):  # noqa: ANN001, ANN201
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):  # noqa: ANN001, ANN201
        if self._cell is not None:
            self._cell.append(data)


def test_a_plan_shows_each_job_and_why_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small_store(tmp_path / "acts", sae=None)
    for name, spec in (("sae", SAE), ("features", FEATURES), ("pipeline", {"store": "./acts", "jobs": ["sae.yaml", "features.yaml"]})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    plan = plan_pipeline(load_pipeline("pipeline.yaml"))
    assert "\n" not in repr(plan) and repr(plan).endswith(f"jobs=2, to run={len(plan.todo)})")
    p = Cells()
    p.feed(plan._repr_html_())
    body = [r for r in p.rows if r and r[0] != "job"]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in body] == [
        (st.job.entry, st.output, st.missing, "runs" if st.run else "up to date", st.why) for st in plan.steps]
    assert [r[3] for r in body] == ["runs", "runs"]
