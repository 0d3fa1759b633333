"""An analysis's stored plots as matplotlib Figures (:meth:`~strata.store.analyses.handles.AnalysisHandle.plot`):
the PNG the analysis committed, shown at its own size; Jupyter displays the PNG bytes themselves."""

from __future__ import annotations

import io
from typing import Any

from strata.store.views.html import ViewError

__all__ = ["plot_names", "analysis_plot", "png_figure"]


def plot_names(a: Any) -> list[str]:
    """The plots an analysis holds, by metric: ``heatmap`` for ``heatmap.png``, ``norm`` for ``norm.png``."""
    return [f[: -len(".png")] for f in a.files if f.endswith(".png")]


def analysis_plot(a: Any, metric: str | None = None) -> Any:
    """The plot stored with an analysis as a matplotlib Figure (see :meth:`AnalysisHandle.plot`)."""
    names = plot_names(a)
    kind = a.meta.get("kind", "?") if "provenance.json" in a.files else "?"
    if not names:
        raise ViewError(f"analysis {a.name!r} ({kind}) has no plot; its files are: {', '.join(a.files)} (read them with .table())")
    if metric is None:
        if len(names) > 1:
            raise ViewError(f"analysis {a.name!r} has {len(names)} plots: pass plot(metric) with one of: {', '.join(names)}")
        metric = names[0]
    if metric not in names:
        raise ViewError(f"analysis {a.name!r} has no plot of {metric!r}; its plots are: {', '.join(names)}")
    return png_figure(a.read(f"{metric}.png"))


_PLOT_CLASS: list[type] = []


def _plot_class() -> type:
    """:class:`StoredPlot`, made once: a Figure subclass needs matplotlib, imported only here."""
    if not _PLOT_CLASS:
        from matplotlib.figure import Figure  # lazy: matplotlib loads in ~0.3 s; summaries never need it

        class StoredPlot(Figure):
            """A matplotlib Figure of a stored PNG (``.png``: its bytes, which Jupyter shows as they are)."""

            png: bytes = b""

            def _repr_png_(self) -> bytes:
                return self.png

        StoredPlot.__module__, StoredPlot.__qualname__ = __name__, "StoredPlot"
        _PLOT_CLASS.append(StoredPlot)
    return _PLOT_CLASS[0]


def png_figure(png: bytes) -> Any:
    """A matplotlib Figure showing a stored PNG at its own size; Jupyter displays the PNG itself."""
    from matplotlib.image import imread  # lazy: matplotlib loads in ~0.3 s; summaries never need it

    img = imread(io.BytesIO(png), format="png")
    dpi = 100
    fig = _plot_class()(figsize=(img.shape[1] / dpi, img.shape[0] / dpi), dpi=dpi)
    fig.png = png
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img)
    ax.set_axis_off()
    return fig

