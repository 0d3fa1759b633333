"""Feature tables of SAE latents, seen from analysis code: static HTML feature pages.

    from strata import store
    from strata.analysis.features import write_pages
    fs = store.open("./acts").features("tiny-topk")
    write_pages(fs, "pages/")                  # index.html + feature-F.html: `strata features html`

The table itself (stats, top rows, activations, latents) is read with ``store.features.table``; it is
written by ``pipeline.encode`` (`strata features encode`).
"""

from strata.analysis.features.html import feature_page, index_page, write_pages

__all__ = ["write_pages", "feature_page", "index_page"]
