"""`strata gc` and `strata rm`: collecting what dead attempts left, deleting what is no longer wanted."""

from __future__ import annotations

import argparse
import re
import sys


def _duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 3600, 90m, 1h or 2d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _cmd_gc(args: argparse.Namespace) -> int:
    import store
    from store import gc

    s = store.open(args.store, create=False)
    report = gc.collect(s, grace_s=args.grace)
    if args.apply:
        gc.apply(s, report, grace_s=args.grace)
    print(report)
    if not args.apply and report.garbage:
        print(f"run `strata gc {args.store} --apply` to delete them")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    import store
    from store import artifacts
    from store.errors import StrataError

    s = store.open(args.store, create=False)
    if args.kind == "dataset":
        info = s.dataset(args.name)  # an unknown name is a one-line error listing what exists
        what = f"dataset {args.name!r} ({len(info.committed_units())} committed units of {info.info.num_units}, {len(info.hooks)} hooks)"
    else:
        kind = {"sae": "saes", "analysis": "analyses"}[args.kind]
        getter = s.sae if args.kind == "sae" else s.analysis
        getter(args.name)
        what = f"{args.kind} {args.name!r}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise StrataError(f"refusing to delete {what} without confirmation: pass --yes")
        answer = input(f"delete {what} from {s.uri}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    if args.kind == "dataset":
        s.delete_dataset(args.name)  # holds the dataset's lease: refused while a job writes it
    else:
        with s.artifact_lease(kind, args.name, owner="strata rm") as lease:
            artifacts.delete(s.storage, kind, args.name, lease=lease)
    print(f"deleted {what}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    q = sub.add_parser("gc", help="list (and with --apply delete) files no commit record references, left by dead attempts")
    q.add_argument("store")
    q.add_argument("--apply", action="store_true", help="delete them (files are re-checked first)")
    q.add_argument("--grace", type=_duration, default=3600.0, help="only files older than this (default 1h; e.g. 90m, 2d)")
    q.set_defaults(func=_cmd_gc)

    q = sub.add_parser("rm", help="delete a dataset (or an SAE or analysis result); refused while a job holds its lease")
    q.add_argument("store")
    q.add_argument("name")
    q.add_argument("--kind", choices=("dataset", "sae", "analysis"), default="dataset")
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    q.set_defaults(func=_cmd_rm)
