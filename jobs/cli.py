"""The `strata` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

# Modules adding subcommands: each has `register(subparsers)`; a handler returns the exit code
# and raises StrataError for a one-line error (exit 2).
COMMAND_MODULES = ("jobs.sae", "jobs.features", "jobs.analyze", "jobs.admin", "jobs.submit", "jobs.reprocess")


def _open(uri: str):  # noqa: ANN202
    import store

    return store.open(uri, create=False)  # reading never creates a store


def _cmd_ls(args: argparse.Namespace) -> int:
    from store.errors import CorruptionError, FormatVersionError

    s = _open(args.store)
    names = s.datasets()
    if not names:
        print(f"{s.uri}: no datasets")
        return 0
    bad = 0
    for name in names:
        try:
            ds = s.dataset(name)
        except (CorruptionError, FormatVersionError) as e:
            print(f"{name}\t{'DAMAGED' if isinstance(e, CorruptionError) else 'UNREADABLE'}: {e}")
            bad += 1
            continue
        meta = ds.info.meta
        model = meta.get("model") or "-"
        if model == "local" and meta.get("model_path"):
            model = f"local:{str(meta['model_path']).rstrip('/').rsplit('/', 1)[-1]}"
        units = set(ds.committed_units())
        for h in ds.hooks:
            units &= set(ds.committed_units(h))
        problems = f"\tdamaged records={len(ds.damaged)}" if ds.damaged else ""
        print(
            f"{name}\t{model}\t{ds.info.dtype}\tctx={ds.info.context_size}\thooks={len(ds.hooks)}\t"
            f"units={len(units)}/{ds.info.num_units}\trows={sum(ds.unit_counts(None, u)[0] for u in units):,}{problems}"
        )
    return 1 if bad else 0


def _cmd_show(args: argparse.Namespace) -> int:
    ds = _open(args.store).dataset(args.name)
    info = ds.info.summary()
    info["unit_rows"] = ds.info.unit_rows
    info["committed_units"] = len(ds.committed_units())
    info["token_rows"] = ds.num_rows()
    info["hooks"] = {h: {"d": ds.info.hooks[h].d, "rows": ds.num_rows(h), "units": len(ds.committed_units(h))} for h in ds.hooks}
    info["damaged_records"] = [f"unit {u} {h or 'tokens'}: {m}" for (h, u), m in sorted(ds.damaged.items(), key=lambda x: x[0][1])]
    info["meta"] = ds.info.meta  # recorded without secrets (see ExtractSpec.recorded)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from store.errors import CorruptionError, FormatVersionError

    s = _open(args.store)
    names = [args.name] if args.name else s.datasets()
    if not names:
        print(f"{s.uri}: no datasets to verify")
        return 0
    bad = 0
    for name in names:
        try:
            ds = s.dataset(name)
        except (CorruptionError, FormatVersionError) as e:  # a found problem; an unknown name is an error (exit 2)
            print(f"{name}: {'DAMAGED' if isinstance(e, CorruptionError) else 'UNREADABLE'}: {e}")
            bad += 1
            continue
        report = ds.verify(committed_only=args.committed_only)
        print(report)
        if args.repair and report.problems:
            print(ds.repair(report))
        elif report.problems:
            print(f"  run `strata verify {args.store} {name} --repair` to remove the damaged units, then extract again")
        elif not report.complete and not args.committed_only:
            print("  not every unit is committed: run its extraction again to finish it (or pass --committed-only)")
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

    q = sub.add_parser("verify", help="check every committed unit and count what is committed; exit 1 on a problem or a missing unit")
    q.add_argument("store")
    q.add_argument("name", nargs="?")
    q.add_argument("--repair", action="store_true", help="remove the commit records of damaged units so the next extraction recomputes them")
    q.add_argument("--committed-only", action="store_true", help="check the committed units only: missing units are not a failure")
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("extract", help="run an extraction job spec (YAML)")
    q.add_argument("spec")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key, e.g. compute.batch_tokens=4096")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_extract)

    # Each job kind's commands live in its own module, which adds them here.
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
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
