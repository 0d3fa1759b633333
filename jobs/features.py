"""`strata features ...`: feature tables of SAE latents.

    strata features encode SPEC.yaml [--set k=v] [--no-progress]   encode a dataset with a stored SAE
    strata features ls STORE                                       list feature tables
    strata features show STORE NAME                                one table as JSON: identity, units, generation
    strata features top STORE NAME FEATURE [-k 20] [--json]        a feature's top contexts
    strata features html STORE NAME --out DIR [--features ...]     static export of the feature viewer (every feature)
    strata features serve STORE NAME [--port 8000]                 the feature viewer as a local web app, reading the store live
    strata features derive STORE NAME                              nearest features and logit effects, once per SAE

Reading commands never create a store. Bad input (an unknown store, table or SAE, a feature out
of range) is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from strata import store
from strata.analysis.features import write_pages
from strata.analysis.features.dashboard import derive, serve
from strata.jobs._text import safe
from strata.jobs.features_encode import main as encode_main
from strata.pipeline.errors import SpecError
from strata.store.errors import CorruptionError
from strata.store.features.view import load_derived

STORE_HELP = "the store: a local folder or s3://bucket/prefix"
NAME_HELP = "a feature table of the store (see `strata features ls STORE`)"


def _open(uri: str) -> Any:

    return store.open(uri, create=False)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {port}")
    return port


def _positive(text: str) -> int:
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def _nonneg(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return n


def parse_features(items: list[str] | None, *, d_sae: int | None = None) -> list[int] | None:
    """``["3", "10-12,40"]`` -> ``[3, 10, 11, 12, 40]``. A range runs low to high; with ``d_sae``,
    every index must be below it (checked on the ranges, before any list is built)."""
    if not items:
        return None
    return [f for lo, hi in feature_ranges(items, d_sae=d_sae) for f in range(lo, hi + 1)]


def feature_ranges(items: list[str], *, d_sae: int | None = None) -> list[tuple[int, int]]:
    """The inclusive ``(low, high)`` ranges of ``--features`` arguments, checked; a SpecError names a bad one."""

    ranges: list[tuple[int, int]] = []
    for item in items:
        for part in filter(None, item.split(",")):
            a, sep, b = part.partition("-")
            try:
                lo, hi = (int(a), int(b)) if sep else (int(a), int(a))
            except ValueError:
                raise SpecError(f"--features takes indices and ranges such as 3 10-12,40, not {safe(part)!r}") from None
            if lo > hi:
                raise SpecError(f"--features {safe(part)}: a range runs from low to high (write {hi}-{lo})")
            if d_sae is not None and hi >= d_sae:
                raise SpecError(f"--features {safe(part)}: feature {hi} is out of range; the table has features 0-{d_sae - 1}")
            ranges.append((lo, hi))
    if not ranges:
        raise SpecError("--features: no feature given; e.g. --features 3 10-12,40")
    return ranges


def _cmd_encode(args: argparse.Namespace) -> int:

    argv = [args.spec, *sum((["--set", kv] for kv in args.set or []), [])]
    return encode_main(argv + (["--no-progress"] if args.no_progress else []))


def _cmd_ls(args: argparse.Namespace) -> int:
    s = _open(args.store)
    names = s.feature_tables()
    if not names:
        print(f"{s.uri}: no feature tables")
        return 0

    bad = 0
    for name in names:
        try:  # one damaged table is listed as such; the others are listed all the same
            fs = s.features(name, allow_stale=True)  # listed, and marked below
            i = fs.info
            units, merged = len(fs.units), len(fs.merged_units)
        except CorruptionError as e:
            print(f"{safe(name)}\tDAMAGED: {safe(e)}")
            bad += 1
            continue
        print(f"{safe(name)}\tsae={safe(i.sae)}\t{safe(i.dataset)}:{safe(i.hook)}\td_sae={i.d_sae}\tunits={units}\tmerged={merged}"
              + ("\tSTALE (rerun encode)" if fs.stale else "")
              + (f"\tSTALE: {safe(fs.stale_inputs)}" if fs.stale_inputs else ""))
    return 1 if bad else 0


def _cmd_show(args: argparse.Namespace) -> int:

    fs = _open(args.store).features(args.name, allow_stale=True)  # shown, marked `stale_inputs`
    out = asdict(fs.info)
    out["stale_inputs"] = fs.stale_inputs
    out["units"] = fs.units
    out["merged_units"] = fs.merged_units
    out["stale"] = fs.stale
    if fs.merged_units:
        out["encoded_rows"] = fs.encoded_rows
    out["damaged_records"] = {str(u): m for u, m in fs.damaged.items()}
    print(json.dumps(out, indent=2, default=str))
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    fs = _open(args.store).features(args.name)
    f = fs.check_feature(args.feature)
    t = fs.top(f, k=min(args.k, fs.info.top_k), before=args.before, after=args.after)
    if args.json:
        print(json.dumps(t.to_pylist(), indent=1))
        return 0
    st = fs.stats().slice(f, 1).to_pylist()[0]
    print(f"feature {f} of {safe(repr(fs.name))} (SAE {safe(repr(fs.info.sae))}, {safe(fs.info.dataset)}:{safe(fs.info.hook)}): "
          f"count {st['count']:,}, density {st['density']:.4g}, mean {st['mean_activation']:.4g}, max {st['max_activation']:.4g}")
    print(f"{'#':>3} {'activation':>10} {'row':>10} {'doc':>8} {'pos':>4}  context")
    for i, r in enumerate(t.to_pylist(), 1):
        ctx = safe(r["context"])  # corpus text: no raw ESC/BEL reaches the terminal
        print(f"{i:>3} {r['activation']:>10.4g} {r['row']:>10} {r['doc_id']:>8} {r['position']:>4}  {ctx}")
    if fs.stale:
        print(f"(statistics cover {len(fs.merged_units)} of {len(fs.units)} encoded units: rerun `strata features encode`)", file=sys.stderr)
    return 0


def _cmd_html(args: argparse.Namespace) -> int:

    if args.features:
        feature_ranges(args.features)  # the syntax, before the store is opened
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {safe(args.out)!r} is an existing file; give a folder (new or holding earlier pages)")
    fs = _open(args.store).features(args.name)
    features = parse_features(args.features, d_sae=fs.d_sae)
    _hint_derive(fs, args.store)
    index = write_pages(fs, out, features=features, max_pages=args.max_pages, explanations=args.explanations, neuronpedia=args.neuronpedia)
    print(f"wrote {index} (open it in a browser; a feature is index.html#f=N)")
    return 0


def _hint_derive(fs: Any, uri: str) -> None:
    if load_derived(fs) is None:
        print(f"(no nearest features or logit effects for {safe(repr(fs.name))} yet: `strata features derive {safe(uri)} {safe(fs.name)}` "
              "computes them once)", file=sys.stderr)


def _explanations_arg(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise SpecError(f"--explanations {safe(path)!r}: no such file (give a JSON-lines file of {{\"feature\": F, \"explanation\": ...}})")


def _cmd_serve(args: argparse.Namespace) -> int:
    _explanations_arg(args.explanations)
    fs = _open(args.store).features(args.name)
    _hint_derive(fs, args.store)
    print(f"serving feature table {safe(repr(fs.name))} ({fs.d_sae} features) at http://{args.host}:{args.port}/ (Ctrl-C stops)")
    serve(fs, host=args.host, port=args.port, explanations=args.explanations)
    return 0


def _cmd_derive(args: argparse.Namespace) -> int:
    fs = _open(args.store).features(args.name)
    key = derive(fs, k=args.k)
    print(f"wrote {key}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Add this module's subcommands to the `strata` parser."""
    p = sub.add_parser("features", help="feature tables of SAE latents: encode, ls, show, top, html, serve, derive")
    fsub = p.add_subparsers(dest="features_command", required=True)

    q = fsub.add_parser("encode", help="encode a dataset with a stored SAE into a feature table (spec YAML)")
    q.add_argument("spec", help="a feature-encoding spec (YAML)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key, e.g. top_k=32")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_encode)

    q = fsub.add_parser("ls", help="list the feature tables of a store")
    q.add_argument("store", help=STORE_HELP)
    q.set_defaults(func=_cmd_ls)

    q = fsub.add_parser("show", help="one feature table as JSON")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", help=NAME_HELP)
    q.set_defaults(func=_cmd_show)

    q = fsub.add_parser("top", help="a feature's top activating contexts")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", help=NAME_HELP)
    q.add_argument("feature", type=int, help="a feature (latent) index, 0 to d_sae - 1")
    q.add_argument("-k", type=_positive, default=20, help="how many (at most the table's top_k)")
    q.add_argument("--before", type=_nonneg, default=8, help="tokens of context before the token")
    q.add_argument("--after", type=_nonneg, default=4, help="tokens of context after the token")
    q.add_argument("--json", action="store_true", help="print JSON records")
    q.set_defaults(func=_cmd_top)

    q = fsub.add_parser("html", help="write static HTML feature pages")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", help=NAME_HELP)
    q.add_argument("--out", required=True, help="folder to write index.html and data/ into")
    q.add_argument("--features", nargs="+", metavar="F", help="only these features get data: indices and ranges (3 10-12,40)")
    q.add_argument("--max-pages", type=_positive, default=None, help="without --features: data for this many of the densest features only")
    q.add_argument("--explanations", help="a JSON-lines file of explanations (default: the table's explanations.jsonl in the store)")
    q.add_argument("--neuronpedia", action="store_true", help="also write neuronpedia/batch-N.json (sae-dashboard's Neuronpedia layout)")
    q.set_defaults(func=_cmd_html)

    q = fsub.add_parser("serve", help="serve the feature viewer over a table, reading the store live")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", help=NAME_HELP)
    q.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    q.add_argument("--explanations", help="a JSON-lines file of explanations (default: the table's explanations.jsonl in the store)")
    q.set_defaults(func=_cmd_serve)

    q = fsub.add_parser("derive", help="compute a table's nearest features and logit effects (once per SAE) for the viewer")
    q.add_argument("store", help=STORE_HELP)
    q.add_argument("name", help=NAME_HELP)
    q.add_argument("-k", type=_positive, default=10, help="neighbours and logit tokens per feature")
    q.set_defaults(func=_cmd_derive)
