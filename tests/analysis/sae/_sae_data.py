"""Small deterministic datasets for the SAE tests: planted sparse structure, and a tiny GPT-2's
real activations (captured the way the extraction pipeline captures them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from strata import store

CTX = 16
UNIT_CONTEXTS = 32
D = 16
N_DIRS = 8
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def token_table(unit: int, n_contexts: int, *, context_size: int = CTX, unit_contexts: int = UNIT_CONTEXTS,
                token_ids: np.ndarray | None = None, special: np.ndarray | None = None, doc_len: int = 37) -> pa.Table:
    """Rows of ``unit`` in order; position 0 of each context is special (BOS) unless ``special`` is given."""
    r = np.arange(n_contexts * context_size, dtype=np.int64)
    g = unit * unit_contexts * context_size + r
    return pa.table(
        {
            "context_id": unit * unit_contexts + r // context_size,
            "position": (r % context_size).astype(np.int32),
            "doc_id": g // doc_len,
            "doc_position": (g % doc_len).astype(np.int32),
            "token_id": (((g * 7) % 1000) if token_ids is None else token_ids.reshape(-1)).astype(np.int32),
            "special": ((r % context_size) == 0) if special is None else special.reshape(-1),
        }
    )


def planted_dataset(root: Path, name: str = "planted", *, units: int = 6, seed: int = 0, only: int | None = None
                    ) -> tuple[store.Store, dict[str, np.ndarray]]:
    """Activations that are sparse codes over ``N_DIRS`` random directions (different per hook),
    about 2 active per token; BOS rows are large and constant, as real BOS activations are
    (and are skipped by training and evaluation). ``only``: commit only the first that many
    units. Returns the store and the directions."""
    rng = np.random.default_rng(seed)
    dirs = {h: rng.standard_normal((N_DIRS, D)).astype(np.float32) for h in HOOKS}
    s = store.open(root)
    w = s.create_dataset(name, hooks={h: D for h in HOOKS}, context_size=CTX, dtype="float32", num_units=units,
                         unit_contexts=UNIT_CONTEXTS, meta={"model": "no-such-model", "revision": "r0"})
    rows = UNIT_CONTEXTS * CTX
    bos = (np.arange(rows) % CTX) == 0
    for u in range(units):
        codes = rng.exponential(1.0, (rows, N_DIRS)).astype(np.float32) * (rng.random((rows, N_DIRS)) < 0.25)
        acts = {}
        for h in HOOKS:
            a = codes @ dirs[h]
            a[bos] = 50.0
            acts[h] = a
        if only is None or u < only:
            w.write_unit(u, tokens=token_table(u, UNIT_CONTEXTS), acts=acts)
    return s, dirs


LM_HOOKS = ("blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")
LM_CTX = 16
LM_UNIT_CONTEXTS = 8


def text_contexts(model_folder: Path, n_contexts: int, *, context_size: int = LM_CTX, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, special) ``[n, context_size]``: synthetic documents joined by EOS (special),
    BOS (special) first in each context, as the pipeline's concat packing lays them out."""
    from transformers import AutoTokenizer

    from strata.pipeline.tiny import synthetic_docs

    tok = AutoTokenizer.from_pretrained(model_folder)
    body = context_size - 1
    stream: list[int] = []
    for doc in synthetic_docs(n_contexts * body // 8 + 8, seed=seed):
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= n_contexts * body:
            break
    body_ids = np.asarray(stream[: n_contexts * body], np.int64).reshape(n_contexts, body)
    ids = np.concatenate([np.full((n_contexts, 1), tok.bos_token_id), body_ids], 1)
    special = np.isin(ids, list(tok.all_special_ids))
    special[:, 0] = True
    return ids, special


def train_tiny_lm(model_folder: Path, *, steps: int = 150, seed: int = 0) -> Path:
    """Fit the tiny seeded model a little on synthetic text (so that ablating a hook hurts it)
    and save it back into its folder."""
    from transformers import AutoModelForCausalLM

    ids, _ = text_contexts(model_folder, 256, context_size=32, seed=seed + 100)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.from_numpy(ids)
    for step in range(steps):
        batch = x[(step * 16) % 256 : (step * 16) % 256 + 16]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(model_folder)
    return model_folder


def lm_dataset(root: Path, model_folder: Path, name: str = "lm", *, units: int = 3, meta: dict[str, Any] | None = None,
               hooks: tuple[str, ...] = LM_HOOKS) -> store.Store:
    """Activations of the tiny GPT-2 at ``hooks`` on synthetic text (BOS and EOS special),
    captured with the pipeline's own hook map and ``Capture`` on the base model (as the
    extraction pipeline does), stored as float32."""
    from transformers import AutoConfig, AutoModel

    from strata.pipeline.hooks import Capture, family_of, hook_sites
    from strata.pipeline.models import folder_revision

    cfg = AutoConfig.from_pretrained(model_folder)
    sites = hook_sites(family_of(cfg.model_type), cfg.num_hidden_layers, cfg)  # with the config: the norms' hooks too
    model = AutoModel.from_pretrained(model_folder, dtype=torch.float32).eval()
    base_meta = {
        "model": str(model_folder), "revision": folder_revision(str(model_folder)), "model_type": cfg.model_type,
        "n_layers": cfg.num_hidden_layers, "torch_dtype": "float32", "hook_modules": {h: sites[h].describe() for h in sites},
    }
    s = store.open(root)
    w = s.create_dataset(name, hooks={h: cfg.hidden_size for h in hooks}, context_size=LM_CTX, dtype="float32",
                         num_units=units, unit_contexts=LM_UNIT_CONTEXTS, meta={**base_meta, **(meta or {})})
    all_ids, all_special = text_contexts(model_folder, units * LM_UNIT_CONTEXTS, seed=7)
    for u in range(units):
        ids = all_ids[u * LM_UNIT_CONTEXTS : (u + 1) * LM_UNIT_CONTEXTS]
        special = all_special[u * LM_UNIT_CONTEXTS : (u + 1) * LM_UNIT_CONTEXTS]
        got: dict[str, torch.Tensor] = {}
        with torch.no_grad(), Capture(model, sites, list(hooks), lambda h, t, got=got: got.__setitem__(h, t.detach().clone())) as cap:
            cap.forward(input_ids=torch.from_numpy(ids), use_cache=False)
        acts = {h: got[h].reshape(-1, cfg.hidden_size).numpy() for h in hooks}
        w.write_unit(u, tokens=token_table(u, LM_UNIT_CONTEXTS, context_size=LM_CTX, unit_contexts=LM_UNIT_CONTEXTS,
                                           token_ids=ids, special=special), acts=acts)
    return s
