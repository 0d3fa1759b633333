"""Strata extraction pipeline: corpora, tokenization, models and Ray workers that fill the store."""
