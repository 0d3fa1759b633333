"""``fs.show(f)``: one feature of a feature table in the notebook, the same view as the served
feature page (:mod:`strata.store.features.view`: density, histogram, top contexts with token
shading, logit effects and neighbours where they are stored)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from strata.store.features.view import feature_data, feature_html

__all__ = ["FeatureView"]


class FeatureView:
    """Feature ``f`` of a feature table, shown by Jupyter (``_repr_html_``); ``.data`` is the
    feature's JSON-able data (:func:`~strata.store.features.view.feature_data`). The feature is
    checked when the view is made: one out of range is a one-line error naming the range."""

    def __init__(self, fs: Any, feature: int, **options: Any) -> None:
        self.fs, self.feature, self.options = fs, fs.check_feature(feature), options

    @cached_property
    def data(self) -> dict[str, Any]:
        return feature_data(self.fs, self.feature, **self.options)

    def _repr_html_(self) -> str:
        return feature_html(self.data)

    def __repr__(self) -> str:
        d = self.data
        return f"FeatureView({self.fs.name!r}, feature={self.feature}, count={d['count']:,}, density={d['density']:.4g}, max={d['max']})"
