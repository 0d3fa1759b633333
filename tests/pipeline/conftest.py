"""Tiny seeded models of each family and small corpora, built once per session, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.pipeline.tiny import build_tiny, synthetic_docs, write_jsonl


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A factory: ``tiny_models(family)`` -> folder of a 2-layer seeded model of that family."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(family: str = "gpt2") -> Path:
        if family not in built:
            built[family] = build_tiny(root / family, family=family, layers=2, d_model=32, heads=4, max_positions=256, vocab_size=400, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models) -> Path:
    return tiny_models("gpt2")


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    """24 short documents: about 1,800 tokens with the tiny tokenizer, 14 units of 8 x 16 tokens."""
    return write_jsonl(tmp_path / "corpus.jsonl", synthetic_docs(24, seed=7))
