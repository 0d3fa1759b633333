"""``strata extract SPEC.yaml [--set key=value ...]``, also the entrypoint of a Ray job (the
store must then be an absolute path every node sees, or S3):

    ray job submit --working-dir . -- python -m jobs.extract examples/quickstart.yaml \
        --set store=$PWD/acts --set model.id=$PWD/models/tiny-gpt2
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from strata.jobs.spec import load_extract_spec
from strata.store.errors import StrataError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata extract", description="Extract activations of a model over a corpus into a store.")
    p.add_argument("spec", help="an extraction spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. compute.batch_tokens=4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="plan without writing a dataset: print shards, documents, tokens, contexts, units and bytes per hook "
                        "(a sharded corpus's tokenized shards are kept for the real run)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from strata.pipeline.extract import run_extract  # lazy: torch: CLI start-up

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = load_extract_spec(args.spec, args.set)
        if args.dry_run:
            from strata.pipeline.dryrun import dry_run_extract  # lazy: torch: CLI start-up

            print(dry_run_extract(spec).table())
            return 0
        result = run_extract(spec, progress=not args.no_progress)
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    print(result.message)
    if result.num_units:
        print(
            "open it from a notebook:\n"
            f"    import strata\n"
            f"    ds = strata.open({result.store!r}).dataset({spec.name!r})\n"
            f"    ds.read({result.hooks[0]!r}, rows=slice(0, 4096), as_='torch')   # and ds.tokens(), ds.info"
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
