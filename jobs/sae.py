"""``strata sae ...``: train SAEs into a store, list them, show one.

    strata sae train SPEC.yaml [--set k=v] [--fresh]   train (or resume), evaluate and commit every SAE of a spec
    strata sae ls STORE                                the committed SAEs (and unfinished ones with a checkpoint)
    strata sae show STORE NAME                         one SAE as JSON: lineage, metrics, config, files
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from strata import store
from strata.jobs._text import safe
from strata.jobs.sae_train import add_arguments, train_command
from strata.store.errors import CorruptionError


def _open(uri: str):  # noqa: ANN202

    return store.open(uri, create=False)  # reading never creates a store


def _cmd_train(args: argparse.Namespace) -> int:

    return train_command(args.spec, args.set, fresh=args.fresh)


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def _cmd_ls(args: argparse.Namespace) -> int:
    from strata.analysis.sae import checkpoint  # lazy: torch, sae_lens: CLI start-up

    s = _open(args.store)
    names = s.saes()
    bad = 0
    for name in names:
        try:
            h = s.sae(name)
            lin, m, cfg = h.lineage, h.metrics, h.cfg
        except CorruptionError as e:
            print(f"{safe(name)}\tDAMAGED: {safe(e)}")
            bad += 1
            continue
        print(
            f"{safe(name)}\tdataset={safe(lin.get('dataset'))}\thook={safe(lin.get('hook'))}\tarch={safe(lin.get('architecture'))}\t"
            f"d_in={cfg.get('d_in')}\td_sae={cfg.get('d_sae')}\tsamples={_num(lin.get('samples_seen'), ',')}\t"
            f"ev={_num(m.get('explained_variance'), '.3f')}\tl0={_num(m.get('l0'), '.1f')}"
            + (f"\tSTALE: {safe(h.stale_inputs)}" if h.stale_inputs else "")
        )
    unfinished = [n for n in s.storage.list_dirs("saes") if n not in names]
    for name in unfinished:
        steps = checkpoint.committed(s.storage, name)
        if steps:
            print(f"{safe(name)}\tunfinished: checkpoint at step {steps[-1][0]} (rerun its job to resume)")
    if not names and not unfinished:
        print(f"{s.uri}: no SAEs")
    return 1 if bad else 0


def _cmd_show(args: argparse.Namespace) -> int:
    h = _open(args.store).sae(args.name)
    why = h.stale_inputs  # its dataset was replaced: no unseen units to speak of
    out = {
        "name": h.name,
        "path": str(h.path),
        "files": h.artifact.files,
        "config_hash": h.meta.get("config_hash"),
        "stale_inputs": why,
        "unseen_units": None if why else h.unseen_units(),
        "metrics": h.metrics,
        "cfg": h.cfg,
        "lineage": h.lineage,
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Add this module's subcommands to the `strata` parser."""

    p = sub.add_parser("sae", help="train SAEs from a store's activations; list and show them")
    ssub = p.add_subparsers(dest="sae_command", required=True)

    q = ssub.add_parser("train", help="train (or resume), evaluate and commit every SAE of a spec (YAML)")
    add_arguments(q)
    q.set_defaults(func=_cmd_train)

    q = ssub.add_parser("ls", help="list the committed SAEs of a store (and unfinished ones with a checkpoint)")
    q.add_argument("store", help="a local folder or s3://bucket/prefix")
    q.set_defaults(func=_cmd_ls)

    q = ssub.add_parser("show", help="show one SAE as JSON: lineage, held-out metrics, sae-lens config, files")
    q.add_argument("store", help="the store: a local folder or s3://bucket/prefix")
    q.add_argument("name", help="an SAE of the store (see `strata sae ls STORE`)")
    q.set_defaults(func=_cmd_show)
