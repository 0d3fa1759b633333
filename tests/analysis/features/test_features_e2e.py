"""End to end on the quickstart's shape: extract, train an SAE with sae-lens from the store,
`strata features encode` with the shipped example spec, top contexts, logit effects from the model, the static export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from strata import store
from strata.analysis.features.external import put_sae
from strata.jobs.cli import main
from strata.pipeline.config import ExtractSpec
from strata.pipeline.extract import run_extract
from strata.store.features.view import feature_data

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

    # Logit effects from the dataset's own model: W_dec[f] @ W_U', W_U' = diag(ln_f.weight) W_U with rows centred.
    assert main(["features", "derive", str(acts), "tiny-topk"]) == 0
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(quickstart_model))
    W_U = lm.lm_head.weight.detach().double().numpy().T * lm.transformer.ln_f.weight.detach().double().numpy()[:, None]
    effects = sae.W_dec.detach().double().numpy()[f] @ (W_U - W_U.mean(axis=1, keepdims=True))
    d = feature_data(s.features("tiny-topk"), f)
    assert [t for t, _ in d["logits"]["pos"]] == [fs.token_text(int(i)) for i in np.argsort(-effects, kind="stable")[:10]]
    assert [v for _, v in d["logits"]["neg"]] == pytest.approx(np.sort(effects)[:10], rel=1e-3, abs=1e-4)
    assert "fold_ln, center_unembed" in d["logits"]["note"] and len(d["neighbours"]) == 10

    pages = tmp_path / "pages"
    assert main(["features", "html", str(acts), "tiny-topk", "--out", str(pages), "--max-pages", "5"]) == 0
    chunks = [json.loads(re.sub(r"^StrataView\.put\(|\);\n$", "", p.read_text())) for p in (pages / "data").glob("f*.js")]
    exported = sorted(int(k) for c in chunks for k in c)
    densest = np.lexsort((np.arange(fs.d_sae), -np.asarray(st["density"])))[:5]
    assert exported == sorted(densest.tolist()) and (pages / "index.html").exists()
    page = next(c[str(exported[0])] for c in chunks if str(exported[0]) in c)
    assert len(page["top"]) == fs.info.top_k and page["logits"] is not None
