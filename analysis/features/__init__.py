"""Feature tables of SAE latents, seen from analysis code: feature dashboards.

    from strata import store
    from strata.analysis.features import write_pages
    fs = store.open("./acts").features("tiny-topk")
    write_pages(fs, "pages/")                  # the static export of the viewer: `strata features html`

`strata features serve` serves the same viewer live (:mod:`strata.analysis.features.dashboard`). The
table itself (stats, top rows, activations, latents) is read with ``store.features.table``; it is
written by ``pipeline.encode`` (`strata features encode`).
"""

from strata.analysis.features.html import write_pages

__all__ = ["write_pages"]
