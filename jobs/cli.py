"""The `strata` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import typing
from collections.abc import Sequence

from strata import store
from strata.jobs._text import configure_logging, safe
from strata.jobs.extract import main as extract_main
from strata.jobs.spec import read_raw
from strata.store.datasets.manifest import DatasetInfo
from strata.store.datasets.versions import families
from strata.store.errors import CorruptionError, FormatVersionError, StrataError
from strata.store.lifecycle.fsck import repair_store, verify_store
from strata.store.storage import auth_failure

# Modules adding subcommands: each has `register(subparsers)`; a handler returns the exit code
# and raises StrataError for a one-line error (exit 2).
STORE_HELP = "the store: a local folder or s3://bucket/prefix"
COMMAND_MODULES = ("strata.jobs.sae", "strata.jobs.features", "strata.jobs.analyze", "strata.jobs.admin", "strata.jobs.submit",
                   "strata.jobs.reprocess")


def _open(uri: str):  # noqa: ANN202

    return store.open(uri, create=False)  # reading never creates a store


def _cmd_ls(args: argparse.Namespace) -> int:

    s = _open(args.store)
    names = s.datasets()
    if not names:
        print(f"{s.uri}: no datasets")
        return 0
    bad = 0
    rows: list[tuple[str, str]] = []  # (name, line): printed once the versions are known
    infos: dict[str, DatasetInfo] = {}
    for name in names:
        try:
            ds = s.dataset(name)
        except (CorruptionError, FormatVersionError) as e:
            rows.append((name, f"{name}\t{'DAMAGED' if isinstance(e, CorruptionError) else 'UNREADABLE'}: {e}"))
            bad += 1
            continue
        infos[name] = ds.info
        meta = ds.info.meta
        model = meta.get("model") or "-"
        if model == "local" and meta.get("model_path"):
            model = f"local:{str(meta['model_path']).rstrip('/').rsplit('/', 1)[-1]}"
        units = set(ds.committed_units())
        for h in ds.hooks:
            units &= set(ds.committed_units(h))
        problems = f"\tdamaged records={len(ds.damaged)}" if ds.damaged else ""
        rows.append((name, f"{name}\t{model}\t{ds.info.dtype}\tctx={ds.info.context_size}\thooks={len(ds.hooks)}\t"
                           f"units={len(units)}/{ds.info.num_units}\trows={sum(ds.unit_counts(None, u)[0] for u in units):,}{problems}"))
    # A dataset with versions (made again after its model's revision moved) gets an indented
    # line under its row, oldest first; the rows themselves keep their columns.
    anchors = {(b if b in infos else vs[0].name): vs for b, vs in families(infos).items() if len(vs) > 1}
    for name, line in rows:
        print("\t".join(safe(cell) for cell in line.split("\t")))  # metadata may hold control characters
        if name in anchors:
            vs = anchors[name]
            listed = ", ".join(f"{v.name} (revision {v.short}, {v.created_at}{', latest' if v is vs[-1] else ''})" for v in vs)
            print(safe(f"  versions of {vs[0].base}, oldest first: {listed}"))
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

    s = _open(args.store)
    kinds = [args.kind] if args.kind else None
    report = verify_store(s, kinds=kinds, name=args.name, committed_only=args.committed_only)
    print(report)
    if report.ok:
        return 0
    if args.repair:
        for line in repair_store(s, report):
            print(line)
        return 1  # what was damaged is gone, not rebuilt: the jobs named above rebuild it
    again = " ".join(["strata verify", args.store, *([args.name] if args.name else []), *(["--kind", args.kind] if args.kind else [])])
    if any(c.problems or c.links for c in report.checks) or report.links:
        print(f"  run `{again} --repair` to remove what is damaged; it says which job to rerun to rebuild it")
    if any(c.dataset is not None and not c.dataset.complete for c in report.checks) and not args.committed_only:
        print("  not every unit is committed: run its extraction again to finish it (or pass --committed-only)")
    return 1


def _cmd_extract(args: argparse.Namespace) -> int:

    argv = [args.spec, *sum((["--set", kv] for kv in args.set or []), [])]
    return extract_main(argv + (["--no-progress"] if args.no_progress else []) + (["--dry-run"] if args.dry_run else []))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="strata", description="Strata: activation datasets at scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("ls", help="list the datasets of a store")
    q.add_argument("store", help=STORE_HELP)
    q.set_defaults(func=_cmd_ls)

    q = sub.add_parser("show", help="show one dataset: identity, hooks, committed units")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", help="a dataset of the store (see `strata ls STORE`)")
    q.set_defaults(func=_cmd_show)

    q = sub.add_parser("verify", help="check every artifact of a store (datasets, SAEs, feature tables, analyses); "
                                      "exit 1 on a problem or a missing unit")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", nargs="?", help="check only the artifacts of this name (default: every artifact of the store)")
    q.add_argument("--kind", choices=["dataset", "sae", "features", "analysis"], help="check only artifacts of this kind")
    q.add_argument("--repair", action="store_true", help="remove what is damaged (holding its write lease) and say which job to rerun to rebuild it")
    q.add_argument("--committed-only", action="store_true", help="check the committed units only: missing units are not a failure")
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("extract", help="run an extraction job spec (YAML)")
    q.add_argument("spec", help="an extraction spec (YAML)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key, e.g. compute.batch_tokens=4096")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--dry-run", action="store_true", help="plan without writing a dataset: shards, documents, tokens, contexts, "
                                                          "units and bytes per hook (tokenized shards are kept for the real run)")
    q.set_defaults(func=_cmd_extract)

    # Each job kind's commands live in its own module, which adds them here.
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, ``strata: error: ...`` and exit 2, like every other
    bad input (argparse's own prints the usage block first). Subcommand parsers are made with
    this class too (``add_subparsers`` uses the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"strata: error: {self.prog}: {safe(message)} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _store_url(args: argparse.Namespace) -> str:
    """The store a command works on, for an error message: its STORE argument, or the spec's."""
    if isinstance(getattr(args, "store", None), str):
        return args.store
    spec = getattr(args, "spec", None) or getattr(args, "target", None)
    if isinstance(spec, str):
        try:

            url = read_raw(spec).get("store")
            if isinstance(url, str):
                return url
        except Exception:  # the spec's own problems are reported by the command itself
            pass
    return "the store"


def _auth_error(e: BaseException, args: argparse.Namespace) -> str | None:
    """A one-line message for a storage access refused for want of valid credentials (see
    :func:`strata.store.storage.auth_failure`), else None. Names the URL, never the credentials."""

    url = _store_url(args)
    why = auth_failure(e, remote=url.startswith(("s3://", "gs://", "gcs://")))
    return None if why is None else f"cannot read {url}: {why}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `strata` command. Exit codes: 0 done, 1 a failed or stopped job or a found
    problem, 2 bad input (one line on stderr), 3 a job still running."""

    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except StrataError as e:
        print(f"strata: error: {safe(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`strata sae show ... | head`): what it read is all it wanted.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured in a test)
            pass
        finally:
            os.close(devnull)
        return 0
    except Exception as e:  # noqa: BLE001 - only credential failures are mapped; others re-raise
        message = _auth_error(e, args)
        if message is None:
            raise
        print(f"strata: error: {safe(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
