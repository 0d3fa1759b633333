"""A small feature table for the dashboard tests: a planted feature, a dead one, XSS token text.

Feature ``PLANTED`` fires exactly on the token ``w7`` (value 5 + its row's small jitter), so its top
tokens are known; feature ``XSS`` fires on the three hostile tokens; feature ``DEAD`` never fires.
The decoder and the unembedding are seeded arrays with ``W_dec[PLANTED]`` built to promote ``w9``,
``w10``, ... most and suppress ``w20``, ``w21``, ... most.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from strata.analysis.features.synthetic import token_table, unit_acts, write_table

H = "blocks.0.hook_resid_post"
D_SAE, CTX, UC, UNITS, VOCAB, D = 24, 16, 4, 3, 64, 8
PLANTED, XSS, DEAD = 3, 5, 4
XSS_TEXT = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", '"><svg onload=alert(3)>']
XSS_IDS = [61, 62, 63]


def vocab() -> dict[str, int]:
    v = {f"w{i}": i for i in range(VOCAB)}
    for t, i in zip(XSS_TEXT, XSS_IDS):
        del v[f"w{i}"]
        v[t] = i
    return v


def tokens(u: int):
    t = token_table(u, UC, unit_contexts=UC, context_size=CTX, vocab=VOCAB - 3)
    ids = t.column("token_id").to_numpy().copy()
    pos = t.column("position").to_numpy()
    if u == 1:  # a document holding the hostile tokens
        ids[(pos >= 3) & (pos < 6) & (np.arange(ids.size) < CTX)] = XSS_IDS
    return t.set_column(t.schema.get_field_index("token_id"), "token_id", pa.array(ids.astype(np.int32)))


def latents(u: int) -> np.ndarray:
    rng = np.random.default_rng([3, u])
    z = np.round(rng.exponential(1.0, (CTX * UC, D_SAE)), 2).astype(np.float32)
    z *= rng.random(z.shape) < np.linspace(0.02, 0.5, D_SAE)
    ids = tokens(u).column("token_id").to_numpy()
    z[:, PLANTED] = np.where(ids == 7, 5.0 + np.round(rng.random(ids.size), 2), 0.0)
    z[:, XSS] = np.where(np.isin(ids, XSS_IDS), 3.0, 0.0)
    z[:, DEAD] = 0
    z[np.arange(CTX * UC) % CTX == 0] = 0
    return z


def build(s):
    """Write the dataset and the table into store ``s``; returns the opened table."""
    w = s.create_dataset("syn", hooks={H: D}, context_size=CTX, dtype="float32", num_units=UNITS, unit_contexts=UC,
                         meta={"model": "synthetic", "revision": "0"})
    tok = Tokenizer(WordLevel(vocab(), unk_token="w1"))
    tok.pre_tokenizer = WhitespaceSplit()
    w.write_tokenizer(tok.to_str())
    for u in range(UNITS):
        t = tokens(u)
        w.write_unit(u, tokens=t, acts={H: unit_acts(u, t.num_rows, D)})

    def entries(u: int):
        z = latents(u)
        r, f = np.nonzero(z)
        return r + u * CTX * UC, f, z[r, f], CTX * UC - UC

    return write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=list(range(UNITS)), entries=entries, top_k=10, block_features=8,
                       sample={"quantiles": 4, "per_quantile": 2, "seed": 0})


def weights() -> tuple[np.ndarray, np.ndarray]:
    """(W_dec [D_SAE, D], W_U [D, VOCAB]) with the planted feature's logit effects known."""
    rng = np.random.default_rng(7)
    W_dec = rng.standard_normal((D_SAE, D)).astype(np.float32)
    W_U = (0.01 * rng.standard_normal((D, VOCAB))).astype(np.float32)
    W_dec[PLANTED] = 0
    W_dec[PLANTED, 0] = 1.0
    W_U[0, 9:19] = np.linspace(2.0, 1.1, 10)  # promoted: w9 (most) .. w18
    W_U[0, 20:30] = -np.linspace(2.0, 1.1, 10)  # suppressed: w20 (most) .. w29
    return W_dec, W_U
