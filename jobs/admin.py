"""`strata gc` and `strata rm`: collecting what dead attempts left, deleting what is no longer wanted."""

from __future__ import annotations

import argparse
import re
import sys

from strata import store
from strata.store.errors import StrataError
from strata.store.lifecycle import dependents, gc
from strata.store.lifecycle.dependents import Ref


def _duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 3600, 90m, 1h or 2d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _cmd_gc(args: argparse.Namespace) -> int:

    s = store.open(args.store, create=False)
    abandoned = args.abandoned or []
    report = gc.collect(s, grace_s=args.grace, abandoned=abandoned)  # a bad --abandoned NAME: refused here
    if args.apply:
        gc.apply(s, report, grace_s=args.grace, abandoned=abandoned)
    print(report)
    if not args.apply and report.garbage:
        named = "".join(f" --abandoned {n}" for n in abandoned)
        print(f"run `strata gc {args.store}{named} --apply` to delete them")
    idle = [w for w in report.in_progress if not w.live]
    if idle and not abandoned:
        print(f"work in progress is never collected; to delete one a job will not resume: `strata gc {args.store} --abandoned NAME --apply`")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:

    s = store.open(args.store, create=False)
    ref = Ref(args.kind, args.name)  # an invalid name is a one-line error before anything is read
    dependents.check_no_links(s, ref)  # before anything is read or a lease is written through a link
    if not dependents.exists(s, ref):
        have = dependents.names(s, args.kind)
        raise StrataError(f"no {ref} in store {s.uri}; it holds: {', '.join(have) if have else 'none of that kind'}")
    graph = dependents.graph(s)
    for line in graph.damaged:
        print(f"strata: warning: {line}", file=sys.stderr)
    deps = graph.dependents(ref)
    if deps and not args.cascade:
        raise StrataError(
            f"refusing to delete {ref}: {', '.join(map(str, deps))} {'was' if len(deps) == 1 else 'were'} built from it; "
            "delete them first, or pass --cascade to delete them too (dependents first)"
        )
    for d in deps:
        dependents.check_no_links(s, d)
    dependents.check_not_held(s, [*deps, ref])  # nothing is deleted when any of them is being written
    what = str(ref) + (f" and what was built from it: {', '.join(map(str, deps))}" if deps else "")
    if not args.yes:
        if not sys.stdin.isatty():
            raise StrataError(f"refusing to delete {what} without confirmation: pass --yes")
        answer = input(f"delete {what} from {s.uri}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    for d in [*deps, ref]:  # dependents first, each under its own lease (refused while a job holds one)
        dependents.delete(s, d, owner="strata rm")
        print(f"deleted {d}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    q = sub.add_parser("gc", help="list (and with --apply delete) files no commit record references, left by dead attempts")
    q.add_argument("store", help="the store: a local folder or s3://bucket/prefix")
    q.add_argument("--apply", action="store_true", help="delete them (files are re-checked first)")
    q.add_argument("--grace", type=_duration, default=3600.0, help="only files older than this (default 1h; e.g. 90m, 2d)")
    q.add_argument("--abandoned", action="append", metavar="NAME",
                   help="also delete this work in progress (an unfinished SAE run's checkpoints, an unfinished feature table, ...), "
                        "which gc otherwise never collects; NAME or KIND/NAME (e.g. saes/run-1); repeatable")
    q.set_defaults(func=_cmd_gc)

    q = sub.add_parser("rm", help="delete a dataset, SAE, feature table or analysis; refused while a job holds its lease "
                                  "or (without --cascade) while something was built from it")
    q.add_argument("store", help="the store: a local folder or s3://bucket/prefix")
    q.add_argument("name", help="what to delete: a dataset's name (or an SAE's, feature table's or analysis's, with --kind)")
    q.add_argument("--kind", choices=("dataset", "sae", "features", "analysis"), default="dataset")
    q.add_argument("--cascade", action="store_true", help="also delete what was built from it (SAEs, feature tables, analyses), dependents first")
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    q.set_defaults(func=_cmd_rm)
