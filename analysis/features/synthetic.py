"""Small seeded datasets and SAEs for tests, examples and the benchmark (nothing downloaded).

``synthetic_dataset`` writes units of random activations with a word-level tokenizer whose token
``i`` decodes to ``w{i}``, one document per context and a BOS row at position 0 of every context,
so decoded contexts are easy to check. ``random_topk_sae`` is a sae-lens TopK SAE with seeded
random weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from strata.store.features.format import FeatureTableInfo, unit_records
from strata.store.features.merge import build, load_generation
from strata.store.features.stats import HIST_BINS, HIST_HI, HIST_LO
from strata.store.features.writer import FeatureWriter, create_or_open, publish, table_lease

if TYPE_CHECKING:
    from strata.store.core import Store
    from strata.store.datasets.writer import DatasetWriter

BOS = 0


def word_tokenizer_json(vocab: int) -> str:
    """A ``tokenizers`` word-level tokenizer of ``vocab`` words (``w0``, ``w1``, ...), ``w0`` being BOS."""

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tok.pre_tokenizer = Whitespace()
    return tok.to_str()


def token_table(unit: int, contexts: int, *, unit_contexts: int, context_size: int, vocab: int, seed: int = 0) -> pa.Table:
    """Unit ``unit``'s token table: seeded random tokens, BOS at each context's position 0."""
    n = contexts * context_size
    r = np.arange(n, dtype=np.int64)
    ctx = unit * unit_contexts + r // context_size
    pos = (r % context_size).astype(np.int32)
    ids = np.random.default_rng([seed, unit, 1]).integers(1, vocab, n).astype(np.int32)
    ids[pos == 0] = BOS
    return pa.table({"context_id": ctx, "position": pos, "doc_id": ctx, "doc_position": pos, "token_id": ids, "special": pos == 0})


def unit_acts(unit: int, rows: int, d: int, *, seed: int = 0, step: float | None = None) -> np.ndarray:
    """Seeded float32 activations of one unit; with ``step``, multiples of it (exact in float16)."""
    x = np.random.default_rng([seed, unit, 2]).standard_normal((rows, d)).astype(np.float32)
    return x if step is None else (np.round(x / step) * step).astype(np.float32)


def synthetic_dataset(store: Store, name: str, *, hook: str = "blocks.0.hook_resid_post", d: int = 16, units: int = 4,
                      write_units: int | None = None, unit_contexts: int = 4, context_size: int = 16, dtype: str = "float32",
                      vocab: int = 64, seed: int = 0, last_contexts: int | None = None, step: float | None = None) -> DatasetWriter:
    """Create a dataset of ``units`` units and write the first ``write_units`` (default all; the
    last one holds ``last_contexts`` contexts when given). ``step``: activations are multiples of it."""
    w = store.create_dataset(name, hooks={hook: d}, context_size=context_size, dtype=dtype, num_units=units,
                             unit_contexts=unit_contexts, meta={"model": "synthetic", "revision": str(seed)})
    w.write_tokenizer(word_tokenizer_json(vocab))
    for u in range(units if write_units is None else write_units):
        write_unit(w, u, hook=hook, vocab=vocab, seed=seed, step=step,
                   contexts=last_contexts if (last_contexts and u == units - 1) else None)
    return w


def write_unit(w: DatasetWriter, unit: int, *, hook: str, vocab: int = 64, seed: int = 0, contexts: int | None = None,
               step: float | None = None) -> Any:
    info = w.info
    n_ctx = contexts or info.unit_contexts
    t = token_table(unit, n_ctx, unit_contexts=info.unit_contexts, context_size=info.context_size, vocab=vocab, seed=seed)
    x = unit_acts(unit, t.num_rows, info.hooks[hook].d, seed=seed, step=step)
    x[t.column("special").to_numpy()] *= 4  # BOS rows stand out, as real ones do
    return w.write_unit(unit, tokens=t, acts={hook: x})


def random_topk_sae(d_in: int, d_sae: int, *, k: int = 4, seed: int = 0, dyadic: bool = False) -> Any:
    """A sae-lens TopK SAE with seeded random weights (encoder columns of unit norm).

    ``dyadic=True``: weights are multiples of 1/4 and biases distinct multiples of 2**-12, so on
    inputs that are multiples of 1/4 (``synthetic_dataset(step=0.25)``) every latent is exact in
    float32 whatever the batching or summation order, and no two latents of a row tie: tests can
    compare an encode job with a dense brute force bit for bit."""
    import torch  # lazy: ~2 s; only the synthetic SAE needs torch
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # lazy: imports torch and transformers; only the synthetic SAE needs it

    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    with torch.no_grad():
        w = torch.randn(d_in, d_sae, generator=g)
        if dyadic:
            sae.W_enc.copy_(torch.round(w.clamp(-2, 2) * 4) / 4)
            sae.b_enc.copy_(torch.randperm(d_sae, generator=g).float() / 4096)
        else:
            sae.W_enc.copy_(w / w.norm(dim=0, keepdim=True))
            sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_dec.zero_()
    return sae.eval()


def write_table(store: Store, name: str, *, dataset: str, hook: str, d_sae: int, units: list[int],
                entries: Any, top_k: int = 8, skip_special: bool = True, block_features: int = 16,
                sample: dict[str, int] | None = None, memory_bytes: int = 4 << 30) -> Any:
    """Write a feature table straight through the store's writer, without an SAE or Ray (tests
    and the query benchmark): ``entries(unit)`` gives ``(row, feature, value, encoded_rows)``
    of a unit, global rows sorted by row then feature. Returns the opened table."""

    ds = store.dataset(dataset)
    info = FeatureTableInfo(
        name=name, sae="synthetic", sae_fingerprint="synthetic", dataset=ds.name, dataset_fingerprint=ds.info.fingerprint,
        hook=hook, d_in=ds.info.hooks[hook].d, d_sae=d_sae, unit_rows=ds.info.unit_rows, top_k=top_k, skip_special=skip_special,
        hist={"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS}, sample=dict(sample or {"quantiles": 4, "per_quantile": 2, "seed": 0}),
        block_features=block_features,
    )
    with table_lease(store.storage, name, owner="synthetic") as lease:
        info = create_or_open(store.storage, info, lease=lease)
        w = FeatureWriter(store.storage, info, fence=lease.fence())
        for u in units:
            row, feature, value, encoded = entries(u)
            w.write_unit(u, rows=ds.record(hook, u).rows, encoded_rows=encoded, row=row, feature=feature, value=value)
        records, _ = unit_records(store.storage, info)
        prev = None
        if info.merged:

            prev = load_generation(store.storage, info, info.merged)
        gen = build(store.storage, info, records, previous=prev, lease=lease, memory_bytes=memory_bytes)
        publish(store.storage, info, gen, lease=lease)
    return store.features(name)
