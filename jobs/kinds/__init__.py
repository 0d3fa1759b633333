"""The kinds of Strata jobs, one module each (extract, sae, features, analyze), in one registry.

Each kind says what its jobs read and write, plans them against a store (what is missing and
why) and runs them; ``strata reprocess`` only composes them, and ``strata submit`` finds a spec's
kind here. A new kind is one module: subclass :class:`JobKind` and :func:`register` it.
"""

from strata.jobs.kinds.planning import JobKind, Policy, Ref
from strata.jobs.kinds.registry import KINDS, detect, kind, localize, register, unregister

# Imported to register them, in this order: a spec whose keys match no kind's signature is tried
# against each kind in turn, and errors list the kinds in this order.
from strata.jobs.kinds import extract, sae, features, analyze  # noqa: E402, I001  (isort: skip)

__all__ = ["KINDS", "JobKind", "Policy", "Ref", "analyze", "detect", "extract", "features", "kind", "localize", "register", "sae",
           "unregister"]
