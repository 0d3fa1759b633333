"""Linear probes per layer, with a shuffled-label control (Alain & Bengio 2016; controls as
argued by Hewitt & Liang 2019).

Labels come from the document table (``ds.docs()``, fields kept with ``corpus.keep_fields``) or,
at token level, from a token-table column (``token_id``, ``position``, ...):

- ``level: document``: one example per document, the mean of its non-special tokens at the hook;
- ``level: token``: one example per non-special token (at most ``max_examples`` per split, a
  seeded sample), labelled with its document's field or its own token column.

Documents are split (seeded) into training and held-out sets, so no document is ever on both
sides. Features are standardised with the training mean and standard deviation. A categorical
label (strings, booleans, integers with at most ``max_classes`` values) gets multinomial
logistic regression with L2 penalty ``l2`` (mean cross-entropy plus ``l2/2 |W|^2``, fitted by
L-BFGS in float64), scored by held-out accuracy against ``chance`` (the held-out share of the
majority training class); a numeric label gets ridge regression scored by held-out R^2. The
**control** fits the same probe after permuting the labels among the training documents (a
whole document keeps one shuffled label, so its tokens stay consistent) and scores it on the
true held-out labels: a probe that reads the label out of the representation beats it; one
that memorises does not. ``selectivity = score - control``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch

from strata.analysis.similarity.errors import AnalysisError
from strata.analysis.similarity.spec import ProbeSettings, sections

if TYPE_CHECKING:
    from strata.store import ActivationDataset

log = logging.getLogger(__name__)

__all__ = ["ProbeSettings", "probe", "label_fields"]

_INDEX_COLUMNS = ("doc_id", "row_start", "row_end", "dropped_tokens")
_TOKEN_LABELS = ("token_id", "position", "doc_position")


def label_fields(ds: ActivationDataset, level: str) -> list[str]:
    """Labels a probe of ``level`` can use on ``ds``."""
    docs = ds.docs()
    fields = [c for c in docs.column_names if c not in _INDEX_COLUMNS] if docs is not None else []
    return fields + (list(_TOKEN_LABELS) if level == "token" else [])


def _fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, l2: float) -> torch.Tensor:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1] + 1, classes, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([xt, torch.ones(xt.shape[0], 1, dtype=torch.float64)], dim=1)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, yt) + 0.5 * l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _score_logistic(w: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
    xb = torch.cat([torch.from_numpy(x), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return float(((xb @ w).argmax(1).numpy() == y).mean())


def _ridge(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, l2: float) -> float:
    mu = y.mean()
    a = x.T @ x + l2 * x.shape[0] * np.eye(x.shape[1])
    w = np.linalg.solve(a, x.T @ (y - mu))
    tss = float(((yt - yt.mean()) ** 2).sum())
    return 1.0 - float(((yt - xt @ w - mu) ** 2).sum()) / tss if tss > 0 else math.nan


def _examples(ds: ActivationDataset, hook: str, o: ProbeSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, their doc ids, token labels or None-placeholder) of the non-special committed tokens."""
    t = ds.tokens(hook)
    t = t.filter(pc.and_(pc.invert(t.column("special")), pc.greater_equal(t.column("doc_id"), 0)))
    lab = t.column(o.label).to_numpy() if o.label in _TOKEN_LABELS else np.zeros(t.num_rows)
    return t.column("row").to_numpy(), t.column("doc_id").to_numpy(), lab


def _encode(values: np.ndarray, max_classes: int) -> tuple[np.ndarray, list[Any] | None]:
    """Class indices and class names for a categorical label, or (floats, None) for a numeric one."""
    if values.dtype.kind == "f":
        return values.astype(np.float64), None
    classes, inv = np.unique(values.astype(str) if values.dtype.kind in "OUSb" else values, return_inverse=True)
    if values.dtype.kind in "iu" and classes.size > max_classes:
        return values.astype(np.float64), None
    return inv.astype(np.int64), classes.tolist()


def probe(ds: ActivationDataset, hooks: Sequence[str], settings: ProbeSettings | None = None, *, max_classes: int = 64,
          **fields: Any) -> tuple[pa.Table, dict[str, Any]]:
    """One probe and its control per hook (see the module docstring). ``settings``: a
    :class:`ProbeSettings` (a ``kind: probe`` analysis of a spec is one), or its keys as keywords
    (``label`` and optionally ``level``, ``test_fraction``, ``l2``, ...) with its defaults;
    ``max_classes``: an integer label with more distinct values is a regression target."""
    opts, _ = sections("probe", ProbeSettings, settings, None, fields)
    valid = label_fields(ds, opts.level)
    if opts.label not in valid:
        have = ", ".join(valid) if valid else "none (extract with `corpus.keep_fields: [...]`)"
        raise AnalysisError(f"dataset {ds.name!r} has no {opts.level}-level label {opts.label!r}; labels it has: {have}")
    rows, docs, tok_lab = _examples(ds, hooks[0], opts)
    if opts.label not in _TOKEN_LABELS:
        index = ds.docs()
        ids = index.column("doc_id").to_numpy()
        field = index.column(opts.label).to_numpy(zero_copy_only=False)
        present = np.isin(docs, ids)
        rows, docs = rows[present], docs[present]
        doc_label = dict(zip(ids.tolist(), field.tolist()))
    uniq = np.unique(docs)
    rng = np.random.default_rng([opts.seed, 7])
    perm = rng.permutation(uniq)
    n_test = max(1, int(round(opts.test_fraction * uniq.size)))
    if uniq.size - n_test < 2:
        raise AnalysisError(f"a probe needs at least 3 documents (2 to train on, 1 held out), dataset {ds.name!r} has {uniq.size}")
    test_docs = np.sort(perm[:n_test])
    train_docs = np.sort(perm[n_test:])
    shuffled = dict(zip(train_docs.tolist(), rng.permutation(train_docs).tolist()))  # control: a doc takes another's label
    out: dict[str, list[Any]] = {k: [] for k in ("hook", "score", "control", "chance", "selectivity", "n_train", "n_test")}
    task = "classification"
    for hook in hooks:
        ds.check_hook(hook)
        feats, labels, ctrl = {}, {}, {}
        for split, chosen in (("train", train_docs), ("test", test_docs)):
            sel = np.flatnonzero(np.isin(docs, chosen))
            if opts.level == "document":
                d_ids, inv = np.unique(docs[sel], return_inverse=True)
                tok = np.asarray(ds.read(hook, rows=rows[sel]), dtype=np.float64)
                pool = sp.csr_matrix((np.ones(sel.size), (inv, np.arange(sel.size))), shape=(d_ids.size, sel.size))
                x = (pool @ tok) / np.bincount(inv, minlength=d_ids.size)[:, None]
                y = np.array([doc_label[d] for d in d_ids.tolist()])
                yc = np.array([doc_label[shuffled.get(d, d)] for d in d_ids.tolist()])
            else:
                if sel.size > opts.max_examples:
                    sel = np.sort(np.random.default_rng([opts.seed, 8, split == "test"]).choice(sel, opts.max_examples, replace=False))
                x = np.asarray(ds.read(hook, rows=rows[sel]), dtype=np.float64)
                if opts.label in _TOKEN_LABELS:
                    y = tok_lab[sel]
                    yc = y.copy()  # token labels are shuffled among training tokens below
                else:
                    y = np.array([doc_label[d] for d in docs[sel].tolist()])
                    yc = np.array([doc_label[shuffled.get(d, d)] for d in docs[sel].tolist()])
            feats[split], labels[split], ctrl[split] = x, y, yc
        if opts.level == "token" and opts.label in _TOKEN_LABELS:
            ctrl["train"] = np.random.default_rng([opts.seed, 9]).permutation(labels["train"])
        both, classes = _encode(np.concatenate([labels["train"], labels["test"], ctrl["train"]]), max_classes)
        ntr, nte = labels["train"].size, labels["test"].size
        ytr, yte, yctl = both[:ntr], both[ntr : ntr + nte], both[ntr + nte :]
        mu, sd = feats["train"].mean(0), feats["train"].std(0)
        sd[sd == 0] = 1.0
        xtr, xte = (feats["train"] - mu) / sd, (feats["test"] - mu) / sd
        if classes is None:
            task = "regression"
            score, control = _ridge(xtr, ytr, xte, yte, opts.l2), _ridge(xtr, yctl, xte, yte, opts.l2)
            chance = 0.0
        else:
            k = len(classes)
            score = _score_logistic(_fit_logistic(xtr, ytr, k, opts.l2), xte, yte)
            control = _score_logistic(_fit_logistic(xtr, yctl, k, opts.l2), xte, yte)
            chance = float((yte == np.bincount(ytr, minlength=k).argmax()).mean())
        for key, v in (("hook", hook), ("score", score), ("control", control), ("chance", chance),
                       ("selectivity", score - control), ("n_train", ntr), ("n_test", nte)):
            out[key].append(v)
    prov = {**{k: getattr(opts, k) for k in ProbeSettings.model_fields}, "max_classes": max_classes, "task": task,
            "metric": "accuracy" if task == "classification" else "r2",
            "train_docs": int(train_docs.size), "test_docs": int(test_docs.size)}
    return pa.table(out), prov
