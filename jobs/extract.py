"""``strata extract SPEC.yaml [--set key=value ...]``, also the entrypoint of a Ray job:

    ray job submit --working-dir . -- python -m jobs.extract examples/quickstart.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jobs.spec import ExtractSpec, load_extract_spec

log = logging.getLogger(__name__)


def job_from_spec(spec: ExtractSpec, *, progress: bool = True):
    """The pipeline's job value for a validated spec."""
    from pipeline.corpus import CorpusSource
    from pipeline.extract import ExtractJob
    from pipeline.models import ModelRef

    c, t, k = spec.corpus, spec.tokenize, spec.compute
    return ExtractJob(
        store=spec.store,
        name=spec.name,
        model=ModelRef(spec.model.id, spec.model.revision, spec.model.torch_dtype, spec.model.trust_remote_code),
        corpus=CorpusSource(
            path=c.path, format=c.format, text_field=c.text_field, id_field=c.id_field, max_docs=c.max_docs,
            text_unit=c.text_unit, hf_config=c.config, hf_split=c.split,
        ),
        hooks=tuple(spec.hooks),
        context_size=t.context_size,
        packing=t.packing,
        prepend_bos=t.prepend_bos,
        split_long=t.split_long,
        growing=c.growing,
        dtype=spec.dtype,
        batch_tokens=k.batch_tokens,
        unit_contexts=k.unit_contexts,
        address=k.address,
        num_workers=k.num_workers,
        cpus_per_worker=k.cpus_per_worker,
        max_restarts=k.max_restarts,
        tokenize_chunk_docs=t.chunk_docs,
        storage_options=spec.storage_options,
        progress=progress,
        spec=spec.model_dump(mode="json"),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata extract", description="Extract activations of a model over a corpus into a store.")
    p.add_argument("spec", help="an extraction spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. compute.batch_tokens=4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.extract import run_extract
    from store.errors import StrataError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = load_extract_spec(args.spec, args.set)
        result = run_extract(job_from_spec(spec, progress=not args.no_progress))
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    print(result.message)
    if result.num_units:
        print(
            "open it from a notebook:\n"
            f"    import store\n"
            f"    ds = store.open({result.store!r}).dataset({spec.name!r})\n"
            f"    ds.read({result.hooks[0]!r}, rows=slice(0, 4096), as_='torch')   # and ds.tokens(), ds.info"
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
