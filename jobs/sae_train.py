"""``strata sae train SPEC.yaml [--set key=value ...] [--fresh]``, also the entrypoint of a Ray
job (the store must then be an absolute path every node sees, or S3; the sweep's tasks run on
the job's own cluster):

    ray job submit --working-dir . -- python -m jobs.sae_train examples/sae.yaml --set store=$PWD/acts
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from strata.jobs.spec import load_spec
from strata.store.errors import StrataError

log = logging.getLogger(__name__)


def build_parser(prog: str = "python -m jobs.sae_train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train SAEs on a dataset of a store and commit them into it.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="an SAE training spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. train.lr=1e-3 or 'sweep={sae.k: [16, 32]}'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (as `strata submit` runs it)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the SAEs' checkpoints and start over instead of resuming (also those of another config)")


def _fmt(m: dict[str, Any]) -> str:
    if not m or "explained_variance" not in m:
        return m.get("skipped", "") if m else ""
    parts = [f"explained variance {m['explained_variance']:.3f}", f"L0 {m['l0']:.1f}",
             f"dead {100 * m['dead_fraction']:.1f}% (no held-out token fires them)"]
    if m.get("loss_recovered") is not None:
        parts.append(f"loss recovered {m['loss_recovered']:.3f}")
    return "held out: " + ", ".join(parts)


def train_command(spec_path: str, overrides: Sequence[str], *, fresh: bool) -> int:
    """Load the spec, run the job, print what happened to each SAE. Raises StrataError."""
    from strata.analysis.sae.config import SAETrainSpec  # lazy: torch, sae_lens: CLI start-up
    from strata.analysis.sae.job import run_job  # lazy: torch, sae_lens: CLI start-up

    spec = load_spec(SAETrainSpec, spec_path, list(overrides))
    result = run_job(spec, fresh=fresh)
    for o in result.outcomes:
        if o.status == "unchanged":
            print(f"{o.name}\t{o.hook}\tunchanged: committed already with this config")
        else:
            how = f"resumed from step {o.resumed_from}" if o.status == "resumed" else "trained"
            print(f"{o.name}\t{o.hook}\t{how} in {o.seconds:.1f}s\t{_fmt(o.metrics)}")
    if result.noop:
        print(f"nothing to do: every SAE of the spec is committed in {result.store} with this config")
    first = result.outcomes[0].name
    print(f"open one from a notebook:\n    import strata\n    sae = strata.open({spec.store!r}).sae({first!r})"
          "   # .load(), .lineage, .metrics, .path")
    return 0


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return train_command(args.spec, args.set, fresh=args.fresh)
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
