"""End to end on the quickstart's shape: extract, train an SAE with sae-lens from the store,
`strata features encode` with the shipped example spec, top contexts, HTML pages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pagesparse import parse

from strata import store
from strata.analysis.features.external import put_sae
from strata.jobs.cli import main
from strata.pipeline.config import ExtractSpec
from strata.pipeline.extract import run_extract

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
HOOK = "blocks.3.hook_resid_post"


def _train_sae(ds, units: list[int]):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=128, d_sae=512, k=16, dtype="float32", device="cpu"))
    batch, steps = 256, 150
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-3, lr_end=3e-3, device="cpu",
                           n_batches_for_norm_estimate=5, dead_feature_window=50, feature_sampling_window=50)
    with ds.iter_batches(HOOK, batch_size=batch, seed=0, epochs=None, units=units) as data:
        return SAETrainer(cfg=cfg, sae=sae, data_provider=data).fit()


def test_extract_train_encode_top_html(quickstart_model, tmp_path, capsys):
    acts = tmp_path / "acts"
    spec = ExtractSpec(store=str(acts), name="tiny-gpt2-quickstart", model={"id": str(quickstart_model)},
                       corpus={"path": str(ROOT / "examples" / "corpus.jsonl")}, tokenize={"context_size": 128}, hooks=[HOOK],
                       dtype="float16", compute={"executor": "local", "unit_contexts": 32, "batch_tokens": 4096})
    r = run_extract(spec, progress=False)
    s = store.open(acts)
    ds = s.dataset("tiny-gpt2-quickstart")
    units = ds.committed_units(HOOK)
    assert r.num_units == len(units) >= 3
    trained = _train_sae(ds, units[:-1])
    put_sae(s, "tiny-topk", trained, dataset=ds.name, hook=HOOK, units=units[:-1], holdout_units=units[-1:])
    sae = s.sae("tiny-topk").load()

    assert main(["features", "encode", str(ROOT / "examples" / "features.yaml"), "--set", f"store={acts}",
                 "--set", "compute.executor=local", "--no-progress"]) == 0
    assert "feature table 'tiny-topk'" in capsys.readouterr().out
    fs = s.features("tiny-topk")
    assert fs.merged_units == units and fs.info.sae_lineage["holdout_units"] == units[-1:]
    st = fs.stats().to_pydict()
    special = ds.tokens(HOOK).column("special").to_numpy()
    assert fs.encoded_rows == int((~special).sum())
    with torch.inference_mode():
        dense = sae.encode(ds.read(HOOK, as_="torch").float()).numpy()
    dense[special] = 0
    # Counts agree with a dense encode up to latents tied at the top-k boundary (batching changes float rounding).
    assert abs(sum(st["count"]) - int((dense != 0).sum())) <= 1e-3 * (dense != 0).sum()

    f = int(np.argsort(-np.asarray(st["density"]), kind="stable")[len(st["density"]) // 10])  # a dense-ish live feature
    top = fs.top(f, k=10).to_pylist()
    tok = ds.tokenizer()
    toks = ds.tokens(HOOK)
    assert [t["activation"] for t in top] == sorted((t["activation"] for t in top), reverse=True)
    for t in top:
        assert t["token"] == tok.decode([toks.column("token_id")[t["row"]].as_py()], skip_special_tokens=False)
        assert f"[[{t['token']}]]" in t["context"] and t["doc_id"] == toks.column("doc_id")[t["row"]].as_py()
        assert not toks.column("special")[t["row"]].as_py()
        assert t["activation"] == pytest.approx(float(dense[t["row"], f]), rel=1e-4, abs=1e-5)

    code = main(["features", "top", str(acts), "tiny-topk", str(f), "-k", "5"])
    out = capsys.readouterr().out
    assert code == 0 and all(t["context"].replace("\n", "\\n") in out for t in top[:5])

    pages = tmp_path / "pages"
    assert main(["features", "html", str(acts), "tiny-topk", "--out", str(pages), "--max-pages", "5"]) == 0
    index = parse((pages / "index.html").read_text())
    linked = [lnk for lnk in index.links if lnk.startswith("feature-")]
    assert len(linked) == 5 and all((pages / lnk).exists() for lnk in linked)
    page = parse((pages / linked[0]).read_text())
    assert len([r for r in page.rows if r.cls == "top"]) == 20 and len(page.bars) == fs.info.hist["bins"] + 2
