"""examples/explore.ipynb runs on a real Jupyter kernel (nbclient + ipykernel) over the quickstart's
store, as its first cell says to make it: `bash examples/quickstart.sh` (here: the same spec on the
same tiny model, in this process) and the layer heatmap of `strata analyze examples/analyze.yaml`.
No cell may error, and the rich outputs must hold the store's own names and values: summaries
(HTML), the feature page, coloured tokens, the comparison (against numpy) and the stored plot (the
PNG's own bytes), with a progress widget while the dataset is encoded."""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from strata import store
from strata.jobs.cli import main
from strata.pipeline.tiny import build_tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "explore.ipynb"
HOOK = "blocks.3.hook_resid_post"
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder holding ./acts: the quickstart's dataset and the layer-CKA heatmap of examples/analyze.yaml."""
    work = tmp_path_factory.mktemp("explore")
    corpus = ROOT / "examples" / "corpus.jsonl"
    texts = [json.loads(ln)["text"] for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    model = build_tiny(work / "models" / "tiny-gpt2", family="gpt2", layers=4, d_model=128, heads=4, max_positions=512,
                       vocab_size=1024, seed=0, texts=texts)
    acts = work / "acts"
    assert main(["extract", str(ROOT / "examples" / "quickstart.yaml"), "--set", f"store={acts}", "--set", f"model.id={model}",
                 "--set", f"corpus.path={corpus}", "--set", "compute.executor=local", "--no-progress"]) == 0
    spec = yaml.safe_load((ROOT / "examples" / "analyze.yaml").read_text())
    heatmap = [a for a in spec["analyses"] if a["name"] == "quickstart-layer-cka"]
    assert len(heatmap) == 1  # the analysis the notebook plots is the example's
    spec.update(store=str(acts), analyses=heatmap, compute={"executor": "local"})
    (work / "heatmap.yaml").write_text(yaml.safe_dump(spec))
    assert main(["analyze", str(work / "heatmap.yaml")]) == 0
    return work


def _cell(nb, starts: str):
    found = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts)]
    assert len(found) == 1, starts
    return found[0]


def _html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_the_example_notebook_runs_on_a_real_kernel(work):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")  # committed clean
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()  # raises on a cell error

    s = store.open(work / "acts", create=False)
    ds = s.dataset("tiny-gpt2-quickstart")
    page = _html(_cell(nb, "import strata"))
    assert "tiny-gpt2-quickstart" in page and "quickstart-layer-cka" in page
    page = _html(_cell(nb, 'ds = s.dataset("tiny-gpt2-quickstart")'))
    assert all(h in page for h in ds.hooks) and f"{ds.num_rows(HOOK):,}" in page and "complete" in page
    assert ds.info.meta["corpus_fingerprint"] in _html(_cell(nb, "ds.info"))

    # The SAE the notebook trained is stored with its lineage; its table's summary and feature page name it.
    h = s.sae("explore-topk")
    assert h.lineage["source"] == "examples/explore.ipynb" and h.cfg["d_sae"] == 8 * 128
    assert h.lineage["units"] == ds.committed_units(HOOK)
    enc = _cell(nb, "from strata.analysis.features.external import put_sae")
    assert any(WIDGET in o.get("data", {}) for o in enc.outputs), "encoding showed no progress widget"
    assert "explore-topk" in _html(enc)
    fs = s.features("explore-topk")
    assert "d_sae 1,024" in _html(_cell(nb, "fs = s.features(name)"))
    st = fs.stats().to_pandas()
    f = int(st[st["count"] > 0].sort_values("max_activation", ascending=False)["feature"].iloc[0])
    page = _html(_cell(nb, "fs.show(f)"))
    assert f'"feature":{f},' in page and '"table":"explore-topk"' in page
    doc = int(fs.top(f, k=5).column("doc_id")[0].as_py())
    assert f"document {doc} · feature {f} of explore-topk" in _html(_cell(nb, "doc = int("))
    assert f"document {doc} · {HOOK} neuron 0" in _html(_cell(nb, "ds.show_tokens(doc, hook=hook, neuron=0)"))

    # The comparison it printed, against numpy's CKA over the same (non-special) rows.
    result = [o for o in _cell(nb, "similarity.compare(").outputs if o.output_type == "execute_result"]  # after a progress widget, when slow
    shown = ast.literal_eval(result[0]["data"]["text/plain"])
    keep = ~ds.tokens(HOOK).column("special").to_numpy(zero_copy_only=False)
    x = ds.read("blocks.0.hook_resid_post").astype(np.float64)[keep]
    y = ds.read(HOOK).astype(np.float64)[keep]
    assert shown["n"] == keep.sum() and abs(shown["linear_cka"] - _linear_cka(x, y)) < 1e-6, shown

    # The plot is the stored PNG itself.
    a = s.analysis("quickstart-layer-cka")
    assert "linear_cka" in _html(_cell(nb, 'a = s.analysis("quickstart-layer-cka")'))
    pngs = [o["data"]["image/png"] for o in _cell(nb, "a.plot()").outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]) == a.read("heatmap.png")
