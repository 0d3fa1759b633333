"""The HTML summary of a dataset's manifest (:class:`~strata.store.datasets.manifest.DatasetInfo`):
identity and lineage, hooks and their widths. Apart from the summaries module so that the
manifest can import it (it needs the hook order and the HTML pieces only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strata.store.layout import hook_order
from strata.store.views.html import esc, kv_table, page, rows_table, section

__all__ = ["identity_pairs", "info_html"]


def identity_pairs(info: Any) -> list[tuple[str, Any]]:
    m = info.meta
    corpus = m.get("corpus")
    if isinstance(corpus, Mapping) and "path" in corpus:  # the extraction's record: where, and how much
        corpus = f"{corpus['path']} ({corpus.get('format', '?')}, {corpus.get('docs', '?')} documents)"
    return [("model", m.get("model")), ("model path", m.get("model_path")), ("revision", m.get("revision")),
            ("tokenizer", m.get("tokenizer")), ("corpus fingerprint", m.get("corpus_fingerprint")), ("corpus", corpus),
            ("packing", m.get("packing")), ("prepend BOS", m.get("prepend_bos")), ("version of", m.get("version_of")),
            ("fingerprint", info.fingerprint), ("context size", info.context_size), ("stored dtype", info.dtype),
            ("units", f"{info.num_units:,} units of {info.unit_contexts:,} contexts ({info.unit_rows:,} rows each)"), ("created", info.created_at)]



def info_html(info: Any) -> str:
    """A dataset's manifest: identity and lineage, hooks and their widths (no commit state)."""
    hook_rows = [(h, info.hooks[h].d, info.dtype, info.hooks[h].chunk_rows) for h in sorted(info.hooks, key=hook_order)]
    extra = {k: v for k, v in info.meta.items() if k not in {"model", "model_path", "revision", "tokenizer", "corpus_fingerprint", "corpus",
                                                              "packing", "prepend_bos", "version_of"}}
    secs = [section("identity and lineage", kv_table(identity_pairs(info)), open=True),
            section("hooks", rows_table(["hook", "d", "dtype", "chunk rows"], hook_rows), count=len(hook_rows), open=len(hook_rows) <= 12)]
    if extra:
        secs.append(section("more provenance", kv_table(sorted(extra.items())), count=len(extra)))
    sub = esc(f"{info.meta.get('model', '?')} @ {str(info.meta.get('revision') or '?')[:12]} · {len(info.hooks)} hook(s) · "
              f"{info.num_units:,} units · context {info.context_size} · {info.dtype}")
    return page("DatasetInfo", info.name, sub, secs)


