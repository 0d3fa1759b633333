"""``strata analyze ...``: similarity and layer analyses over the store.

    strata analyze SPEC.yaml [--set key=value ...]   run the analyses of a spec, commit their results
    strata analyze ls STORE                          list the committed analyses
    strata analyze show STORE NAME [--rows N]        one analysis: provenance, files and its results table
    python -m jobs.analyze SPEC.yaml                 the same as the first, as a Ray job entrypoint

``strata similarity SPEC.yaml`` is another name for the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _open(uri: str) -> Any:
    import store

    return store.open(uri, create=False)  # reading never creates a store


def _cmd_ls(store_uri: str) -> int:
    from store import artifacts
    from store.handles import ANALYSES

    s = _open(store_uri)
    names = s.analyses()
    if not names:
        print(f"{s.uri}: no analyses")
        return 0
    for name in names:
        art = artifacts.get(s.storage, ANALYSES, name)
        meta = art.meta if art is not None else {}
        inputs = ", ".join(sorted({str(i.get("dataset")) for i in meta.get("inputs", []) if i.get("dataset")}))
        when = art.record.committed_at if art is not None else "?"
        print(f"{name}\t{meta.get('kind', '?')}\tinputs={inputs or '-'}\tfiles={len(art.files) if art else 0}\t{when}")
    return 0


def _cmd_show(store_uri: str, name: str, rows: int) -> int:
    s = _open(store_uri)
    h = s.analysis(name)
    meta = dict(h.meta)
    out = {"name": name, "kind": meta.get("kind"), "files": h.files, "committed_at": h.artifact.record.committed_at,
           "spec": meta.get("spec"), "inputs": meta.get("inputs"), "provenance": meta.get("provenance"), "versions": meta.get("versions")}
    table = h.table()
    out["results"] = {"rows": table.num_rows, "columns": table.column_names, "head": table.slice(0, rows).to_pylist()}
    print(json.dumps(out, indent=2, default=str))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pipeline.errors import SpecError

    target, rest = args.target, list(args.rest)
    if target == "ls":
        if len(rest) != 1:
            raise SpecError("usage: strata analyze ls STORE")
        return _cmd_ls(rest[0])
    if target == "show":
        if len(rest) != 2:
            raise SpecError("usage: strata analyze show STORE NAME")
        return _cmd_show(rest[0], rest[1], args.rows)
    if rest:
        raise SpecError(f"unexpected arguments after the spec: {' '.join(rest)}; usage: strata analyze SPEC.yaml [--set key=value ...]")
    from jobs.analyze_run import main as run_main

    return run_main([target, *sum((["--set", kv] for kv in args.set or []), [])])


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Add this module's subcommands to the `strata` parser."""
    for name, text in (("analyze", "run an analysis spec (YAML), or `ls STORE` / `show STORE NAME`"),
                       ("similarity", "the same as `strata analyze SPEC`")):
        q = sub.add_parser(name, help=text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("target", metavar="SPEC|ls|show", help="an analysis spec (YAML), `ls` or `show`")
        q.add_argument("rest", nargs="*", metavar="ARG", help="ls: STORE; show: STORE NAME")
        q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key, e.g. compute.tasks=4")
        q.add_argument("--rows", type=int, default=20, help="show: rows of the results table to print (default 20)")
        q.set_defaults(func=_cmd_analyze)


if __name__ == "__main__":
    import logging

    from jobs.analyze_run import main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
