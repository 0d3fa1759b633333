"""Strata analyses: read the store, write results back into it."""
