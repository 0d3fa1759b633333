"""`strata features html`: the static export of the feature viewer (see
:mod:`strata.analysis.features.dashboard.export`).

    from strata.analysis.features import write_pages
    write_pages(store.open("./acts").features("tiny-topk"), "pages/")   # pages/index.html, pages/data/*.js

Every feature is in the export (dead ones listed in the index); open ``index.html`` from disk, a
feature at ``index.html#f=12``. The pages are drawn by the same viewer as `strata features serve`
and notebook views (:mod:`strata.store.features.view`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from strata.analysis.features.dashboard.export import export

if TYPE_CHECKING:
    from strata.store.features.table import FeatureTable

__all__ = ["write_pages"]


def write_pages(fs: FeatureTable, out: str | Path, *, features: Iterable[int] | None = None, max_pages: int | None = None,
                before: int = 8, after: int = 4, explanations: str | None = None, neuronpedia: bool = False) -> Path:
    """Export ``fs`` into ``out``; returns ``index.html``'s path. ``features``: only these get data;
    ``max_pages``: without ``features``, only the ``max_pages`` densest live features get data (default:
    every feature). Every feature is checked before anything is written."""
    chosen = [fs.check_feature(f) for f in features] if features is not None else None
    if chosen is None and max_pages is not None:
        st = fs.stats()
        dens, count = st.column("density").to_numpy(), st.column("count").to_numpy()
        order = np.lexsort((np.arange(fs.d_sae), -dens))
        chosen = [int(f) for f in order if count[f] > 0][:max_pages]
    return export(fs, out, features=chosen, before=before, after=after, explanations=explanations, neuronpedia=neuronpedia)
