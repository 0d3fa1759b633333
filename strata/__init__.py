"""Strata: activation datasets, SAEs, feature tables and similarity analyses in one store.

    import strata
    s = strata.open("./acts")            # or "s3://bucket/prefix"
    ds = s.dataset("pythia-70m-pile")

The repository keeps its four folders at the top (``store/``, ``pipeline/``, ``analysis/``,
``jobs/``); installed, they are ``strata.store``, ``strata.pipeline``, ``strata.analysis`` and
``strata.jobs`` (setuptools' package-dir mapping), and nothing named bare ``store`` or ``jobs``
reaches site-packages.
"""

from __future__ import annotations

import os as _os

# A source checkout used without installing (a Ray job's working_dir, PYTHONPATH=checkout):
# the four folders sit beside this one, so look for subpackages there too. An installed
# distribution has them inside this folder and needs nothing.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "store")) and _os.path.isfile(_os.path.join(_checkout, "store", "__init__.py")):
    __path__.append(_checkout)  # noqa: F821 - a package's __path__

__version__ = "0.1.0"


def open(uri: str, **kw):  # noqa: A001 - the store's own verb, as in ``store.open``
    """Open (or, with ``create=True``, the default, create) a store: ``strata.open("./acts")``.
    The same as ``strata.store.open``; see it for the keywords."""
    from strata.store import open as _open

    return _open(uri, **kw)


__all__ = ["open", "__version__"]
