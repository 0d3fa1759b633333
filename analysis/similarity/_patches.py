"""Rows of image datasets for ``compare``: one timestep of a diffusion dataset, and
``align="patches"`` (rows paired by image and patch position).

A diffusion dataset holds each image once per timestep (``pipeline.diffusion``: one context per
(image, timestep), a ``timestep`` column, ``doc_id`` the image), so pooling an image or pairing its
positions needs one timestep: a side names it as ``(dataset, hook, timestep)`` (a spec side's
``timestep`` key), and only that timestep's rows are read. ``align="patches"`` pairs the
non-special rows of two image datasets (vision encoders' patches, a denoiser's latent patches or
map positions) by ``(doc_id, doc_position)``, the position on the row-major grid. The grids must be
equal (recorded as ``image.layout.grid`` or ``diffusion.grid`` in each manifest): a UNet's maps can
be resampled to the encoder's grid at extraction (``diffusion.grid``), a ViT's grid follows
``image.size``. Pairs are ordered by side A's row, as every alignment is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.store.datasets.aligned import Alignment, AlignmentError, check_same_corpus

from .errors import AnalysisError

if TYPE_CHECKING:
    from strata.store import ActivationDataset

__all__ = ["split_side", "timesteps_of", "check_timestep", "at_timestep", "grid_of", "align_patches", "keep_timesteps"]

Side = tuple["ActivationDataset", str]


def split_side(side: Any) -> tuple[Side, int | None]:
    """``(dataset, hook)`` or ``(dataset, hook, timestep)`` as ``((dataset, hook), timestep)``."""
    if not isinstance(side, tuple) or len(side) not in (2, 3):
        raise AnalysisError(f"a side is (dataset, hook) or (dataset, hook, timestep), got {side!r}")
    t = side[2] if len(side) == 3 else None
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, np.integer))):
        raise AnalysisError(f"a side's timestep must be an integer (one of its dataset's timesteps), got {t!r}")
    return (side[0], side[1]), None if t is None else int(t)


def timesteps_of(ds: ActivationDataset) -> list[int] | None:
    """The timesteps of a diffusion dataset (its manifest's ``timesteps``); None for other datasets."""
    ts = ds.info.meta.get("timesteps")
    return None if ts is None else [int(t) for t in ts]


def check_timestep(ds: ActivationDataset, timestep: int | None, *, align: str, same_dataset: bool = False) -> None:
    """A chosen timestep must be one of the dataset's; a dataset with several needs one, unless two
    hooks of it pair row by row (``align="tokens"`` within one dataset), and pairs with another
    dataset by ``patches`` or ``docs`` only."""
    ts = timesteps_of(ds)
    if ts is not None and len(ts) > 1 and align == "tokens" and not same_dataset:
        raise AnalysisError(f"align 'tokens' pairs two datasets' rows by document position, which dataset {ds.name!r} repeats at each of its "
                            f"timesteps {ts}; use align 'patches' (by image and position, at each side's timestep) or 'docs'")
    if timestep is None:
        if ts is not None and len(ts) > 1 and not (align == "tokens" and same_dataset):
            raise AnalysisError(f"dataset {ds.name!r} holds each image at {len(ts)} timesteps {ts}; align {align!r} needs one: "
                                "give the side as (dataset, hook, timestep), or `timestep` in the spec's side")
        return
    if ts is None:
        raise AnalysisError(f"`timestep` {timestep} selects rows of a diffusion dataset, but dataset {ds.name!r} has no timesteps")
    if timestep not in ts:
        raise AnalysisError(f"dataset {ds.name!r} has no rows at timestep {timestep}; its timesteps are {ts}")


def at_timestep(t: pa.Table, timestep: int | None) -> pa.Table:
    """The rows of a token table at ``timestep`` (all of them for None)."""
    return t if timestep is None else t.filter(pc.equal(t.column("timestep"), timestep))


def keep_timesteps(al: Alignment, sides: list[Side], timesteps: list[int | None]) -> Alignment:
    """The pairs of ``al`` whose every side's row is at its chosen timestep."""
    keep = np.ones(len(al), dtype=bool)
    for s, ((ds, hook), t) in enumerate(zip(sides, timesteps)):
        if t is not None:
            tok = ds.tokens(hook)
            keep &= np.isin(al.rows[s], at_timestep(tok, t).column("row").to_numpy())
    return al.subset(np.flatnonzero(keep))


def grid_of(ds: ActivationDataset) -> tuple[int, int] | None:
    """A dataset's patch grid (rows, columns): a diffusion dataset's ``diffusion.grid`` or a vision
    encoder's ``image.layout.grid``; None for text datasets."""
    m = ds.info.meta
    g = (m.get("diffusion") or {}).get("grid") or ((m.get("image") or {}).get("layout") or {}).get("grid")
    return None if g is None else (int(g[0]), int(g[1]))


def _patch_rows(ds: ActivationDataset, hook: str, timestep: int | None, cells: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys ``doc_id * cells + position``, rows) of the non-special rows at ``timestep``, and the candidate count."""
    t = at_timestep(ds.tokens(hook), timestep)
    t = t.filter(pc.and_(pc.invert(t.column("special")), pc.greater_equal(t.column("doc_id"), 0)))
    pos = t.column("doc_position").to_numpy().astype(np.int64)
    keys = t.column("doc_id").to_numpy().astype(np.int64) * cells + pos
    rows = t.column("row").to_numpy().astype(np.int64)
    if np.unique(keys).size != keys.size:  # a diffusion dataset's timesteps not told apart: refused before this
        raise AnalysisError(f"dataset {ds.name!r} (hook {hook!r}) has several rows per (image, position); choose a timestep")
    return keys, rows, int(keys.size)


def align_patches(a: Side, b: Side, timesteps: tuple[int | None, int | None]) -> Alignment:
    """Pair the rows of two image datasets by (image, patch position) (see the module docstring)."""
    ga, gb = grid_of(a[0]), grid_of(b[0])
    for (ds, hook), g in ((a, ga), (b, gb)):
        if g is None:
            raise AnalysisError(f"align 'patches' pairs patch positions of image datasets, but {ds.name}:{hook} has no patch grid "
                                "(not a vision-encoder or diffusion dataset); use align 'docs' or 'tokens'")
    if ga != gb:
        raise AnalysisError(f"align 'patches' needs equal patch grids, but {a[0].name} has {ga[0]}x{ga[1]} and {b[0].name} "
                            f"{gb[0]}x{gb[1]}; extract with matching `image.size` (or a UNet with `diffusion.grid`), or use align 'docs'")
    check_same_corpus([a, b], by_docs=True)
    cells = ga[0] * ga[1]  # type: ignore[index]
    ka, ra, na = _patch_rows(*a, timesteps[0], cells)
    kb, rb, nb = _patch_rows(*b, timesteps[1], cells)
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    if ia.size == 0:
        raise AlignmentError(f"cannot align {a[0].name}:{a[1]} with {b[0].name}:{b[1]} by patches: no (image, position) is committed on both sides")
    order = np.argsort(ra[ia], kind="stable")
    units = tuple(tuple(ds.committed_units(hook)) for ds, hook in (a, b))
    return Alignment("patches", (ra[ia][order], rb[ib][order]), (na, nb), units)
