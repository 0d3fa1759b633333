"""``strata features encode SPEC.yaml [--set key=value ...]``, also the entrypoint of a Ray job
(the store must then be an absolute path every node sees, or S3):

    ray job submit --working-dir . -- python -m jobs.features_encode examples/features.yaml --set store=$PWD/acts
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from strata.jobs.spec import load_spec
from strata.store.errors import StrataError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata features encode", description="Encode a dataset with a stored SAE into a feature table.")
    p.add_argument("spec", help="a feature-encoding spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. top_k=32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from strata.pipeline.encode import EncodeSpec, run_encode  # lazy: torch: CLI start-up

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = load_spec(EncodeSpec, args.spec, args.set)
        result = run_encode(spec, progress=not args.no_progress)
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    print(result.message)
    print(
        "query it from a notebook:\n"
        "    import strata\n"
        f"    fs = strata.open({result.store!r}).features({result.name!r})\n"
        "    fs.stats(); fs.top(0, k=20); fs.activations(0); fs.latents(rows=slice(0, 128))"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
