"""What a job would find in the store that makes it fail, found before any work: each job kind's
own read-only check, in one place for ``strata submit`` (and reused, not copied, by the jobs and
by ``strata reprocess``'s plan).

=========  =============================================  ========================================
kind       the job's own check                            a conflict it refuses
=========  =============================================  ========================================
extract    :func:`pipeline.extract.prepare`               dataset ``name`` with another identity
sae        :func:`analysis.sae.plan.plan`                 SAE committed (or checkpointed) with
                                                          another config
features   :func:`pipeline.encode.check_table`            feature table with another identity
analysis   :func:`jobs.analyze_run.check_committed`       analysis committed with another spec
=========  =============================================  ========================================

A submission runs them against the store as the submitter sees it. A conflict (a
``FileExistsError``: the output's name is taken by something else) is the job's certain failure,
so it is refused here, one line, nothing submitted. Other problems of the check itself (a corpus
or model only the cluster can read, an input another submitted job is still making) are not
certain failures there: they are logged, and the job checks again on the cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from strata import store
from strata.jobs.analyze_run import check_committed
from strata.store.errors import StoreNotFoundError, StrataError

log = logging.getLogger(__name__)


def check_job(kind: str, spec: Any, s: Any) -> None:
    """Run job kind ``kind``'s own read-only check of ``spec`` against store ``s``; raises what
    the job would raise. Checks whose inputs the store does not hold yet are skipped (another
    job may be making them)."""
    if kind == "extract":
        from strata.pipeline.extract import prepare  # lazy: torch: CLI start-up

        if spec.name in s.datasets():  # a new dataset cannot conflict; its checks need the corpus
            prepare(spec, s)
    elif kind == "sae":
        from strata.analysis.sae.crosscoder_run import plan_crosscoders  # lazy: torch, sae_lens: CLI start-up
        from strata.analysis.sae.plan import plan  # lazy: as above

        if spec.sources:  # a crosscoder: checked once every source's dataset is here
            if all((src.dataset or spec.dataset) in s.datasets() for src in spec.sources):
                plan_crosscoders(spec, s)
        elif spec.dataset in s.datasets():
            plan(spec, s)
    elif kind == "features":
        from strata.pipeline.encode import check_table  # lazy: torch: CLI start-up

        if spec.sae in s.saes():
            check_table(spec, s)
    elif kind == "analysis":

        check_committed(spec, s)


def presubmit(kind: str, spec: Any) -> None:
    """``strata submit``'s check before anything is shipped: a conflict with what the store
    holds raises (see the module docstring); the store not existing here is no conflict."""

    try:
        s = store.open(spec.store, storage_options=spec.storage_options, create=False)
    except StoreNotFoundError:
        return  # a new store, or one only the cluster reaches: nothing to conflict with here
    try:
        check_job(kind, spec, s)
    except StrataError as e:
        if isinstance(e, FileExistsError):
            raise
        log.warning("pre-submit check of the %s job could not finish here (%s); the job checks again on the cluster",
                    kind, str(e).splitlines()[0] if str(e) else type(e).__name__)
