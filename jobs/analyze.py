"""``strata analyze ...``: similarity and layer analyses over the store.

    strata analyze SPEC.yaml [--set key=value ...]   run the analyses of a spec, commit their results
    strata analyze ls STORE                          list the committed analyses
    strata analyze show STORE NAME [--rows N] [--json]   one analysis: its results table first (--json: the full record)
    python -m jobs.analyze SPEC.yaml                 the same as the first, as a Ray job entrypoint

``strata similarity SPEC.yaml`` is another name for the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from strata import store
from strata.jobs._text import safe
from strata.jobs.analyze_run import main as run_main
from strata.pipeline.errors import SpecError
from strata.store.errors import CorruptionError, FormatVersionError


def _open(uri: str) -> Any:

    return store.open(uri, create=False)  # reading never creates a store


def _input_names(meta: dict[str, Any]) -> str:
    names = set()
    for i in meta.get("inputs", []) or []:
        name = i.get("dataset") if isinstance(i, dict) else i
        if name:
            names.add(str(name))
    return ", ".join(sorted(names))


def _cmd_ls(store_uri: str) -> int:

    s = _open(store_uri)
    names = s.analyses()
    if not names:
        print(f"{s.uri}: no analyses")
        return 0
    bad = 0
    for name in names:
        try:  # one damaged analysis is listed as such; the others are listed all the same
            h = s.analysis(name, allow_stale=True)  # listed, and marked STALE below
            meta = h.meta  # the checked provenance.json
        except FormatVersionError as e:
            print(f"{safe(name)}\tOLD FORMAT: {safe(e)}")
            continue
        except CorruptionError as e:
            print(f"{safe(name)}\tDAMAGED: {safe(e)}")
            bad += 1
            continue
        inputs = _input_names(meta)
        print(f"{safe(name)}\t{safe(meta.get('kind', '?'))}\tinputs={safe(inputs or '-')}\tfiles={len(h.files)}\t{h.artifact.record.committed_at}"
              + (f"\tSTALE: {safe(h.stale_inputs)}" if h.stale_inputs else ""))
    return 1 if bad else 0


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return format(v, ".6g")
    if isinstance(v, (list, dict)):
        text = json.dumps(v, default=str)
        return safe(text if len(text) <= 40 else text[:37] + "...")
    return safe(v)


def _table_text(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """Rows as aligned text columns, numbers to 6 significant digits."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(safe(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(safe(c).ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(x.rjust(w) if _numeric(x) else x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in cells]
    return lines


def _numeric(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True


def _cmd_show(store_uri: str, name: str, rows: int, *, as_json: bool = False) -> int:
    s = _open(store_uri)
    h = s.analysis(name, allow_stale=True)  # shown, and marked stale
    meta = dict(h.meta)
    if h.stale_inputs:
        print(f"STALE: {safe(h.stale_inputs)}", file=sys.stderr)
    table = h.table()
    head = table.slice(0, rows).to_pylist()
    if as_json:
        out = {"name": name, "kind": meta.get("kind"), "files": h.files, "committed_at": h.artifact.record.committed_at,
               "spec": meta.get("spec"), "inputs": meta.get("inputs"), "provenance": meta.get("provenance"), "versions": meta.get("versions"),
               "stale_inputs": h.stale_inputs}
        out["results"] = {"rows": table.num_rows, "columns": table.column_names, "head": head}
        print(json.dumps(out, indent=2, default=str))
        return 0
    # The values first, as a table; provenance and the full record are behind --json.
    inputs = ", ".join(sorted({str(i.get("dataset")) for i in meta.get("inputs") or [] if isinstance(i, dict) and i.get("dataset")}))
    print(f"{safe(name)}: {safe(meta.get('kind', '?'))} analysis, committed {safe(h.artifact.record.committed_at)}"
          + (f", inputs {safe(inputs)}" if inputs else ""))
    for line in _table_text(head, table.column_names):
        print(line)
    more = f"{table.num_rows - len(head)} more rows (--rows N); " if table.num_rows > len(head) else ""
    print(f"({table.num_rows} rows; {more}files: {safe(', '.join(h.files))}; --json for the full record with provenance)")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:

    target, rest = args.target, list(args.rest)
    if target == "ls":
        if len(rest) != 1:
            raise SpecError("usage: strata analyze ls STORE")
        return _cmd_ls(rest[0])
    if target == "show":
        if len(rest) != 2:
            raise SpecError("usage: strata analyze show STORE NAME [--rows N] [--json]")
        if args.rows < 0:
            raise SpecError(f"--rows must be 0 or more (rows of the results table to print), got {args.rows}")
        return _cmd_show(rest[0], rest[1], args.rows, as_json=args.json)
    if rest:
        raise SpecError(f"unexpected arguments after the spec: {' '.join(rest)}; usage: strata analyze SPEC.yaml [--set key=value ...]")

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
        q.add_argument("--json", action="store_true", help="show: the full record as JSON (provenance, spec, inputs, versions, rows)")
        q.set_defaults(func=_cmd_analyze)


if __name__ == "__main__":
    import logging

    from strata.jobs.analyze_run import main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
