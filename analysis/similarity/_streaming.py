"""``from_moments``: every streaming metric from one :class:`Moments` accumulator."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._cca import RANK_RTOL, Spectra, cca_from_moments, pwcca_from_moments, svcca_from_moments
from ._checks import check_fraction, check_metric_names, check_n
from ._cka import KernelStats, cka_from_stats, cosine_from_parts, debiased_cka_from_stats, procrustes_from_moments
from ._moments import Moments

__all__ = ["STREAMING_METRICS", "from_moments"]

STREAMING_METRICS: tuple[str, ...] = ("linear_cka", "debiased_cka", "cca", "svcca", "pwcca", "procrustes", "cosine")
"""Metrics computable from :class:`Moments` alone (``r2`` needs two: see ``r2_from_moments``)."""


def from_moments(
    m: Moments,
    metrics: Iterable[str] | str | None = None,
    *,
    keep: float = 0.99,
    rtol: float = RANK_RTOL,
) -> dict[str, float]:
    """Metrics of the rows accumulated in ``m``, as ``{name: value}``.

    ``metrics``: names from :data:`STREAMING_METRICS`; ``None`` means all of them (``cosine``
    only when ``d1 == d2``). ``keep`` is SVCCA's variance fraction and ``rtol`` the eigenvalue
    cut-off of the CCA family. Each value equals the in-memory function of the same name on the
    concatenated rows, up to float64 rounding.
    """
    if metrics is None:
        names = [n for n in STREAMING_METRICS if n != "cosine" or m.d1 == m.d2]
    else:
        names = check_metric_names(metrics, STREAMING_METRICS)
    check_n(m.n, min_n=1 if names == ["cosine"] else 2, metric="from_moments")
    check_fraction(keep, "keep")
    stats: list[KernelStats] = []
    spectra = Spectra(m, rtol=rtol)  # lazy: eigendecompositions shared by cca, svcca and pwcca

    def kernel() -> KernelStats:  # shared by both CKAs, computed once
        if not stats:
            stats.append(KernelStats.from_moments(m))
        return stats[0]

    table: dict[str, Callable[[], float]] = {
        "linear_cka": lambda: cka_from_stats(kernel()),
        "debiased_cka": lambda: debiased_cka_from_stats(kernel()),
        "cca": lambda: cca_from_moments(m, spectra=spectra),
        "svcca": lambda: svcca_from_moments(m, keep=keep, spectra=spectra),
        "pwcca": lambda: pwcca_from_moments(m, spectra=spectra),
        "procrustes": lambda: procrustes_from_moments(m),
        "cosine": lambda: cosine_from_parts(m.cos_sum, m.cos_zero, m.n, m.d1, m.d2),
    }
    return {name: table[name]() for name in names}
