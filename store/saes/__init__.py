"""SAEs in the store: :class:`~strata.store.saes.handles.SAEHandle`."""
