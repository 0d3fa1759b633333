"""Feature dashboards: a local web app over a feature table, its static export, and what they need computed once.

    from strata.analysis.features.dashboard import derive, export, make_app
    derive(fs)                         # neighbours by decoder cosine + logit effects, stored beside the table
    export(fs, "pages/")               # static export: index.html + data/*.js, every feature, opens from disk
    make_app(fs)                       # the ASGI app of `strata features serve` (starlette)

Every page is drawn by the one viewer of :mod:`strata.store.features.view` from JSON data.
"""

from strata.analysis.features.dashboard.derive import derive, fold_unembed
from strata.analysis.features.dashboard.export import export, neuronpedia_batch
from strata.analysis.features.dashboard.server import make_app, serve

__all__ = ["derive", "fold_unembed", "export", "neuronpedia_batch", "make_app", "serve"]

