"""The `strata` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _cmd_ls(args: argparse.Namespace) -> int:
    import store

    s = store.open(args.store)
    cat = s.catalog()
    if cat.num_rows == 0:
        print(f"{s.uri}: no datasets")
        return 0
    for row in cat.to_pylist():
        ds = s.dataset(row["name"])
        done = len(ds.committed_units())
        print(
            f"{row['name']}\t{row['model'] or '-'}\t{row['dtype']}\tctx={row['context_size']}\t"
            f"hooks={len(row['hooks'])}\tunits={done}/{row['num_units']}\trows={ds.num_rows():,}"
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import store

    ds = store.open(args.store).dataset(args.name)
    info = ds.info.summary()
    info["unit_rows"] = ds.info.unit_rows
    info["committed_units"] = len(ds.committed_units())
    info["token_rows"] = ds.num_rows()
    info["hooks"] = {h: {"d": ds.info.hooks[h].d, "rows": ds.num_rows(h), "units": len(ds.committed_units(h))} for h in ds.hooks}
    info["meta"] = ds.info.meta
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import store

    s = store.open(args.store)
    names = [args.name] if args.name else s.datasets()
    bad = 0
    for name in names:
        report = s.dataset(name).verify()
        print(report)
        bad += not report.ok
    return 1 if bad else 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from jobs.extract import main as extract_main

    argv = [args.spec, *sum((["--set", kv] for kv in args.set or []), [])]
    return extract_main(argv + (["--no-progress"] if args.no_progress else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata", description="Strata: activation datasets at scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("ls", help="list the datasets of a store")
    q.add_argument("store", help="a local folder or s3://bucket/prefix")
    q.set_defaults(func=_cmd_ls)

    q = sub.add_parser("show", help="show one dataset: identity, hooks, committed units")
    q.add_argument("store")
    q.add_argument("name")
    q.set_defaults(func=_cmd_show)

    q = sub.add_parser("verify", help="check every committed unit's checksum; exit 1 on any problem")
    q.add_argument("store")
    q.add_argument("name", nargs="?")
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("extract", help="run an extraction job spec (YAML)")
    q.add_argument("spec")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key, e.g. compute.batch_tokens=4096")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_extract)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from store.errors import StrataError

    try:
        return int(args.func(args) or 0)
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
