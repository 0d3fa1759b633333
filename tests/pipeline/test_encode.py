"""`run_encode`: statistics and queries equal a dense brute-force encode, growth encodes only new
units, exactly once under a killed worker (on the session Ray's actor pool), every bad input
refused with nothing written. Where Ray is not the point, in this process (`executor: local`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch

from strata import store
from strata.analysis.features.external import put_sae
from strata.analysis.features.synthetic import random_topk_sae, synthetic_dataset, write_unit
from strata.pipeline.encode import EmptyDatasetError, EncodeSpec, EncodeWorker, SAEMismatchError, run_encode
from strata.pipeline.errors import SpecError
from strata.store.commit.artifacts import ArtifactNotFoundError
from strata.store.errors import LeaseHeldError
from strata.store.features.format import FeatureTableExistsError
from strata.store.features.writer import table_lease

H = "blocks.0.hook_resid_post"
D, D_SAE, CTX, UC = 16, 48, 16, 4
UR = CTX * UC


def _store(tmp_path: Path, *, units: int = 4, write_units: int | None = None, last_contexts: int | None = None):
    s = store.open(tmp_path / "acts")
    w = synthetic_dataset(s, "syn", hook=H, d=D, units=units, write_units=write_units, unit_contexts=UC, context_size=CTX,
                          dtype="float16", step=0.25, last_contexts=last_contexts)
    sae = random_topk_sae(D, D_SAE, k=4, seed=1, dyadic=True)
    put_sae(s, "sae", sae, dataset="syn", hook=H, units=[0, 1])
    return s, w, sae


def _spec(tmp_path: Path, **kw) -> EncodeSpec:
    raw = {"store": str(tmp_path / "acts"), "sae": "sae", "top_k": 8, "block_features": 16, **kw}
    raw["compute"] = {"executor": "local", "batch_rows": 24, **kw.get("compute", {})}
    return EncodeSpec(**raw)


def _brute(s, sae) -> np.ndarray:
    """Every committed row encoded densely in one call; special rows zero (they are skipped)."""
    ds = s.dataset("syn")
    with torch.inference_mode():
        z = sae.encode(ds.read(H, as_="torch").float()).numpy()
    z[ds.tokens(H).column("special").to_numpy()] = 0
    return z


def _check(fs, z: np.ndarray) -> None:
    st = fs.stats().to_pydict()
    counts = (z != 0).sum(0)
    assert st["count"] == counts.tolist()
    encoded = z.shape[0] - z.shape[0] // CTX
    assert fs.encoded_rows == encoded and np.allclose(st["density"], counts / encoded, rtol=0, atol=1e-15)
    assert np.array_equal(np.asarray(st["max_activation"], np.float32), z.max(0))
    mean = np.divide(z.astype(np.float64).sum(0), counts, out=np.zeros(D_SAE), where=counts > 0)
    assert np.allclose(st["mean_activation"], mean, rtol=1e-12, atol=0)
    for f in range(D_SAE):
        col = z[:, f]
        nz = np.flatnonzero(col)
        want = sorted(nz.tolist(), key=lambda r: (-col[r], r))[:8]
        top = fs.top(f, k=8)
        assert top.column("row").to_pylist() == want, f
        assert np.array_equal(top.column("activation").to_numpy(), col[want])
        act = fs.activations(f)
        assert act.column("row").to_pylist() == nz.tolist() and np.array_equal(act.column("activation").to_numpy(), col[nz])
    rows = np.arange(0, z.shape[0], 7)
    assert np.array_equal(fs.latents(rows=rows, dense=True).numpy(), z[rows])


def _commit_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "features" / "sae" / "commits").iterdir()}


def test_encode_equals_brute_force_then_noop_then_growth(tmp_path):
    s, w, sae = _store(tmp_path, units=6, write_units=3)
    seen = []
    r = run_encode(_spec(tmp_path), progress=False, on_unit=seen.append)
    assert (r.units, r.units_run, r.noop) == (3, 3, False) and sorted(x["unit"] for x in seen) == [0, 1, 2]
    fs = s.features("sae")
    assert fs.units == fs.merged_units == [0, 1, 2] and fs.info.sae_lineage["units"] == [0, 1]
    _check(fs, _brute(s, sae))
    before = _commit_files(tmp_path / "acts")

    again = run_encode(_spec(tmp_path), progress=False)
    assert again.noop and "nothing to do" in again.message and _commit_files(tmp_path / "acts") == before

    # The dataset grows: only the new units are encoded; old records are untouched.
    for u in range(3, 6):
        write_unit(w, u, hook=H, step=0.25)
    seen.clear()
    grown = run_encode(_spec(tmp_path), progress=False, on_unit=seen.append)
    assert (grown.units, grown.units_run, grown.units_skipped) == (6, 3, 3) and sorted(x["unit"] for x in seen) == [3, 4, 5]
    after = _commit_files(tmp_path / "acts")
    assert {k: after[k] for k in before} == before and len(after) == 6
    fs = s.features("sae")
    assert fs.merged_units == list(range(6)) and fs._generation().record.extra["incremental"] is True
    _check(fs, _brute(s, sae))

    # Another identity under the same name is refused before anything runs or is written.
    with pytest.raises(FeatureTableExistsError, match=r"already exists with another identity \(top_k: 8 -> 9\); choose a new `name`"):
        run_encode(_spec(tmp_path, top_k=9), progress=False)
    assert _commit_files(tmp_path / "acts") == after


def crashing(after: int, marker: str) -> type[EncodeWorker]:
    """A worker whose process dies in the middle of a unit (encoded, nothing written) once it
    finished ``after`` units; only the first to get there dies."""

    class CrashingWorker(EncodeWorker):
        def encode(self, x):  # noqa: ANN001, ANN202
            out = super().encode(x)
            if self.units_done >= after:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return out
                os._exit(17)
            return out

    return CrashingWorker


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
@pytest.mark.ray
def test_exactly_once_under_a_killed_worker(ray_session, tmp_path):
    s, _, sae = _store(tmp_path, units=5, last_contexts=2)
    marker = tmp_path / "crashed"
    r = run_encode(_spec(tmp_path, compute={"max_restarts": 2, "executor": "ray"}), progress=False, worker_cls=crashing(1, str(marker)))
    assert marker.exists() and r.units_run == 5
    fs = s.features("sae")
    assert fs.units == fs.merged_units == list(range(5)) and not fs.verify()
    assert len(list((tmp_path / "acts" / "features" / "sae" / "units").iterdir())) == 5  # one table per unit
    _check(fs, _brute(s, sae))


def _nothing_written(root: Path) -> None:
    assert not (root / "features").exists()


@pytest.mark.ray
def test_bad_inputs_fail_before_anything_is_written(ray_session, tmp_path):
    s, _, _ = _store(tmp_path)
    root = tmp_path / "acts"
    with pytest.raises(ArtifactNotFoundError, match="no SAE 'nope' .* it holds: sae"):
        run_encode(_spec(tmp_path).updated(sae="nope"), progress=False)
    put_sae(s, "wide", random_topk_sae(D + 1, 8), dataset="syn", hook=H)
    with pytest.raises(SAEMismatchError, match=r"SAE 'wide' takes d_in=17, but hook 'blocks.0.hook_resid_post' of dataset 'syn' is 16 wide"):
        run_encode(_spec(tmp_path).updated(sae="wide"), progress=False)
    synthetic_dataset(s, "empty", hook=H, d=D, units=2, write_units=0)
    put_sae(s, "on-empty", random_topk_sae(D, 8), dataset="empty", hook=H)
    with pytest.raises(EmptyDatasetError, match="dataset 'empty' has no committed unit of hook"):
        run_encode(_spec(tmp_path).updated(sae="on-empty"), progress=False)
    with pytest.raises(store.StoreNotFoundError):
        run_encode(_spec(tmp_path).updated(store=str(tmp_path / "no-store")), progress=False)
    assert not (tmp_path / "no-store").exists()
    with table_lease(s.storage, "sae", owner="another job"):
        _nothing_written_yet = sorted(p.name for p in (root / "features" / "sae").iterdir())
        with pytest.raises(LeaseHeldError, match="another job"):
            run_encode(_spec(tmp_path), progress=False)
        assert sorted(p.name for p in (root / "features" / "sae").iterdir()) == _nothing_written_yet == ["lease"]
    with pytest.raises(SpecError, match="`compute.device` is cuda, but the Ray cluster has no GPU"):
        run_encode(_spec(tmp_path, compute={"device": "cuda", "executor": "ray"}), progress=False)
    assert not (root / "features" / "sae" / "manifest.json").exists()
