"""Small deterministic datasets for store tests (importable by spawned writer processes)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from strata import store

HOOKS = {"blocks.0.hook_resid_post": 16, "blocks.1.hook_mlp_out": 8}
CTX = 8
UNIT_CONTEXTS = 4


def token_table(unit: int, n_contexts: int, *, context_size: int = CTX, unit_contexts: int = UNIT_CONTEXTS, doc_len: int = 11) -> pa.Table:
    """Rows of `unit` in order; documents of `doc_len` tokens; position 0 of each context is BOS."""
    r = np.arange(n_contexts * context_size, dtype=np.int64)
    g = unit * unit_contexts * context_size + r  # global row
    return pa.table(
        {
            "context_id": unit * unit_contexts + r // context_size,
            "position": (r % context_size).astype(np.int32),
            "doc_id": g // doc_len,
            "doc_position": (g % doc_len).astype(np.int32),
            "token_id": ((g * 7) % 1000).astype(np.int32),
            "special": (r % context_size) == 0,
        }
    )


def unit_values(unit: int, rows: int, d: int, *, seed: int = 0) -> np.ndarray:
    """Deterministic float32 values for one unit of one hook (row-identifying in column 0)."""
    rng = np.random.default_rng([seed, unit, d])
    x = rng.standard_normal((rows, d)).astype(np.float32)
    return x


def make_dataset(root, name: str = "ds", *, dtype: str = "float32", num_units: int = 4, last_contexts: int | None = None,
                 write: bool = True, hooks: dict[str, int] | None = None) -> tuple[store.Store, dict[int, dict[str, np.ndarray]]]:
    """A dataset of `num_units` units; the last holds `last_contexts` contexts when given."""
    hooks = hooks or HOOKS
    s = store.open(root)
    w = s.create_dataset(name, hooks=hooks, context_size=CTX, dtype=dtype, num_units=num_units,
                         unit_contexts=UNIT_CONTEXTS, meta={"model": "tiny", "revision": "r0"})
    data: dict[int, dict[str, np.ndarray]] = {}
    for u in range(num_units):
        n_ctx = last_contexts if (last_contexts and u == num_units - 1) else UNIT_CONTEXTS
        data[u] = {h: unit_values(u, n_ctx * CTX, d) for h, d in hooks.items()}
        if write:
            w.write_unit(u, tokens=token_table(u, n_ctx), acts=data[u])
    return s, data


def write_units_in_process(root: str, name: str, units: list[int]) -> dict[int, dict[str, str]]:
    """Target of spawned writer processes: opens its own writer, writes `units`."""
    w = store.open(root).writer(name)
    out = {}
    for u in units:
        acts = {h: unit_values(u, UNIT_CONTEXTS * CTX, d) for h, d in w.info.hooks.items() for d in [d.d]}
        out[u] = w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=acts)
    return out
