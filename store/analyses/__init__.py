"""Analysis results in the store: :class:`~strata.store.analyses.handles.AnalysisHandle`."""
