"""Notebook views of the store: HTML summaries (``_repr_html_``) of the store and its artifacts
(:mod:`.summaries`, :mod:`.info`), coloured tokens (:mod:`.tokens`), stored plots as matplotlib
Figures (:mod:`.plots`), and the HTML pieces and escaping they share (:mod:`.html`).

Every stored or user-given string reaches the HTML through :func:`.html.esc`: a corpus document
holding ``<script>`` shows as text. The artifact classes import these modules (the manifest
imports :mod:`.info`), so this package's ``__init__`` imports nothing.
"""
