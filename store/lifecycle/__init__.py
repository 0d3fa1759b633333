"""Housekeeping across artifacts: verify-and-repair of every kind, garbage collection, the dependency graph, staleness."""
