"""Fixtures of the similarity tests: small synthetic stores, and two tiny models with different
tokenizers extracted over one corpus (for cross-tokenizer alignment)."""

from __future__ import annotations

import json
from pathlib import Path

import _simdata
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: the matrices here are tiny, and spinning torch threads on a busy
    two-core machine make each call slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def two_hook(tmp_path_factory):
    """A dataset with two related hooks (widths 6 and 5), 30 documents, a document table."""
    return _simdata.two_hook_dataset(tmp_path_factory.mktemp("two_hook"))


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    from strata.pipeline.tiny import synthetic_docs

    return synthetic_docs(16, seed=11) + ["Naïve café résumé — 42 ünïcode wörds.", "Ελληνικά και 日本語 mixed text."]


@pytest.fixture(scope="session")
def two_tokenizers(tmp_path_factory, corpus_texts):
    """Datasets of two tiny GPT-2s whose tokenizers differ (vocabularies of 400 and 300 learned
    on different text) over the same corpus: (store, dataset A, dataset B, corpus texts)."""
    from strata import store
    from strata.pipeline.config import ExtractSpec
    from strata.pipeline.extract import run_extract
    from strata.pipeline.tiny import build_tiny, synthetic_docs

    root = tmp_path_factory.mktemp("xtok")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(corpus_texts)), encoding="utf-8")
    models = {
        "a": build_tiny(root / "model_a", family="gpt2", layers=2, d_model=32, heads=4, max_positions=256, vocab_size=400, seed=0),
        "b": build_tiny(root / "model_b", family="gpt2", layers=2, d_model=24, heads=4, max_positions=256, vocab_size=300, seed=1,
                        texts=synthetic_docs(500, seed=5)),
    }
    acts = str(root / "acts")
    for key, model in models.items():
        run_extract(ExtractSpec(
            store=acts, name=f"tok_{key}", model={"id": str(model)}, corpus={"path": str(corpus), "keep_fields": ["label"]},
            tokenize={"context_size": 32}, hooks=["blocks.*.hook_resid_post"], dtype="float32",
            compute={"executor": "local", "unit_contexts": 4, "batch_tokens": 128},
        ), progress=False)
    s = store.open(acts)
    return s, s.dataset("tok_a"), s.dataset("tok_b"), corpus_texts, {k: Path(v) for k, v in models.items()}
