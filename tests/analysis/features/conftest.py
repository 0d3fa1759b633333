"""Fixtures of the feature-table tests: the quickstart's tiny model, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strata.pipeline.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def quickstart_model(tmp_path_factory) -> Path:
    """The model examples/quickstart.sh builds: GPT-2 shaped, 4 layers, d_model 128, a tokenizer
    trained on the shipped corpus."""
    corpus = ROOT / "examples" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-gpt2", family="gpt2", layers=4, d_model=128, heads=4,
                      max_positions=512, vocab_size=1024, seed=0, texts=texts)
