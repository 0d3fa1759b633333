"""A small store for command-line tests, written straight through the store's writers (no
model, no Ray): a dataset whose corpus text holds terminal control sequences, a wide dataset,
a feature table, an SAE and an analysis result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from strata import store
from strata.analysis.features.synthetic import write_table

H = "blocks.0.hook_resid_post"
CTX, UC = 16, 4
D_SAE = 20
EVIL = "\x1b]0;pwned\x07\x1b[2J"  # retitles, then clears, a terminal that prints it raw


def evil_tokenizer_json() -> str:
    """A word-level tokenizer whose token 3 decodes to terminal control sequences."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<bos>": 0, "a": 1, "b": 2, EVIL: 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok.to_str()


def make_store(root: Path) -> store.Store:
    """`syn` (d=8, 3 units, token 3 is EVIL), `wide` (d=512, for the memory check), feature table
    `ft` of `syn` (feature 0 fires on every row holding EVIL), an SAE `sae1`."""
    from strata.analysis.features import synthetic

    s = store.open(root)
    w = s.create_dataset("syn", hooks={H: 8}, context_size=CTX, dtype="float32", num_units=3, unit_contexts=UC,
                         meta={"model": "synthetic\x1b[31m", "revision": "0"})
    w.write_tokenizer(evil_tokenizer_json())
    tables = {}
    for u in range(3):
        t = synthetic.token_table(u, UC, unit_contexts=UC, context_size=CTX, vocab=4)
        tables[u] = t
        w.write_unit(u, tokens=t, acts={H: synthetic.unit_acts(u, t.num_rows, 8)})
    synthetic.synthetic_dataset(s, "wide", d=512, units=2, unit_contexts=1, context_size=8)

    def entries(u: int):
        ids = tables[u].column("token_id").to_numpy()
        rows = np.flatnonzero(ids == 3)
        return rows + u * UC * CTX, np.zeros(rows.size, np.int64), (1.0 + rows / 100).astype(np.float32), int(np.sum(ids != 0))

    write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 1, 2], entries=entries, top_k=4)
    _commit_sae(s, "sae1", root.parent / "sae-src")
    _commit_analysis(s, "cmp")
    return s


def _commit_sae(s: store.Store, name: str, tmp: Path) -> None:
    from strata.analysis.features.synthetic import random_topk_sae
    from strata.store.commit import artifacts

    folder = tmp / name
    random_topk_sae(8, D_SAE, k=2).save_model(folder)
    (folder / "lineage.json").write_text(json.dumps({"dataset": "syn", "hook": H}))
    with s.artifact_lease("saes", name) as lease:
        artifacts.put(s.storage, "saes", name, {p.name: p for p in folder.iterdir()}, lease=lease)




# An analysis result as `strata analyze` commits one: a results table and a provenance record.
RESULTS = {"metric": ["linear_cka", "procrustes"], "value": [0.987654321, 0.25], "a": [f"syn:{H}"] * 2, "b": [f"syn:{H}"] * 2}


def _commit_analysis(s: store.Store, name: str) -> None:
    from strata.store.commit import artifacts

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(RESULTS), sink)
    provenance = {"kind": "compare", "inputs": [{"dataset": "syn", "hook": H}], "provenance": {"method": "exact", "rows": 192},
                  "spec": {"note": "x" * 4000}}
    with s.artifact_lease("analyses", name) as lease:
        artifacts.put(s.storage, "analyses", name, {"results.parquet": sink.getvalue().to_pybytes(),
                                                     "provenance.json": json.dumps(provenance).encode()}, lease=lease)
