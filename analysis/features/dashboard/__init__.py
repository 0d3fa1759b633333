"""Feature dashboards: a local web app over a feature table, its static export, and what they need computed once.

    from strata.analysis.features.dashboard import derive, export, make_app
    derive(fs)                         # neighbours by decoder cosine + logit effects, stored beside the table
    export(fs, "pages/")               # static export: index.html + data/*.js, every feature, opens from disk
    make_app(fs)                       # the ASGI app of `strata features serve` (starlette)

Every page is drawn by the one viewer of :mod:`strata.store.features.view` from JSON data.
"""

from strata.analysis.features.dashboard.derive import derive, fold_unembed
from strata.analysis.features.dashboard.export import export, neuronpedia_batch

__all__ = ["derive", "fold_unembed", "export", "neuronpedia_batch", "make_app"]


def make_app(*args, **kwargs):  # noqa: ANN002, ANN003 - forwards to server.make_app
    """:func:`strata.analysis.features.dashboard.server.make_app` (imported on use: starlette is only needed to serve)."""
    from strata.analysis.features.dashboard.server import make_app as _make  # lazy: starlette: only serving needs it

    return _make(*args, **kwargs)
