"""Small builders shared by the store tests: token tables and activations of a unit, computed
independently of the store from the unit index alone, and a writer entry point for child
processes (it must live in an importable module for the ``spawn`` start method)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

HOOK = "blocks.0.hook_resid_post"
HOOK2 = "blocks.1.hook_mlp_out"
D = 16
CONTEXT_SIZE = 8
UNIT_CONTEXTS = 2
UNIT_ROWS = CONTEXT_SIZE * UNIT_CONTEXTS


def token_table(unit: int, *, context_size: int = CONTEXT_SIZE, unit_contexts: int = UNIT_CONTEXTS, contexts: int | None = None) -> pa.Table:
    """The token table of unit ``unit``: row ``r`` is position ``r % context_size`` of the GLOBAL
    context ``unit * unit_contexts + r // context_size``. One document per context; the first
    token of each context is a special (BOS) token. ``contexts`` < ``unit_contexts`` makes a
    short (last) unit."""
    n = (unit_contexts if contexts is None else contexts) * context_size
    r = np.arange(n, dtype=np.int64)
    ctx = unit * unit_contexts + r // context_size
    return pa.table(
        {
            "context_id": ctx,
            "position": (r % context_size).astype(np.int32),
            "doc_id": ctx,  # one document per context
            "doc_position": (r % context_size).astype(np.int32),
            "token_id": ((ctx * 31 + r * 7) % 1000).astype(np.int32),
            "special": (r % context_size) == 0,
        }
    )


def unit_acts(unit: int, *, rows: int = UNIT_ROWS, d: int = D, seed: int = 0) -> np.ndarray:
    """Float32 activations of one unit, a pure function of ``(seed, unit)``."""
    return np.random.default_rng([seed, unit]).standard_normal((rows, d)).astype(np.float32)


def create_small(s: Any, name: str, *, dtype: str = "float16", num_units: int = 4, hooks: dict[str, int] | None = None,
                 meta: dict[str, Any] | None = None) -> Any:
    """``create_dataset`` with the small shape every store test uses."""
    return s.create_dataset(
        name,
        hooks=hooks or {HOOK: D},
        context_size=CONTEXT_SIZE,
        dtype=dtype,
        num_units=num_units,
        unit_contexts=UNIT_CONTEXTS,
        meta={"model": "tiny"} if meta is None else meta,
    )


def write_units(w: Any, units: list[int] | range, *, hooks: dict[str, int] | None = None, seed: int = 0) -> dict[int, dict[str, str]]:
    hooks = hooks or {HOOK: D}
    return {
        k: w.write_unit(k, tokens=token_table(k), acts={h: unit_acts(k, d=d, seed=seed + i) for i, (h, d) in enumerate(sorted(hooks.items()))})
        for k in units
    }


def writer_process(uri: str, name: str, units: list[int], queue: Any, barrier: Any = None) -> None:
    """Entry point of a writer process: open the store (AWS settings come from the inherited
    environment), wait at ``barrier`` so processes really overlap, write ``units``, and report
    ``(pid, {unit: status})`` on ``queue`` (or ``(pid, error text)``)."""
    try:
        from strata import store

        w = store.open(uri).writer(name)
        if barrier is not None:
            barrier.wait(timeout=60)
        queue.put((os.getpid(), write_units(w, units)))
    except BaseException as e:  # report, so the parent fails with the child's error
        queue.put((os.getpid(), f"{type(e).__name__}: {e}"))
        raise
