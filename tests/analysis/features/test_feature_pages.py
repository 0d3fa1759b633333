"""`write_pages` (the static export of the feature viewer): bad input writes nothing. What the pages
show (the index sorted by density, dead features listed, contexts shaded by the feature's activation,
the histogram) is checked in a real browser in test_dashboard_browser.py; the export's data in
test_dashboard.py."""

from __future__ import annotations

import numpy as np
import pytest

from strata import store
from strata.analysis.features import write_pages
from strata.analysis.features.synthetic import synthetic_dataset, write_table
from strata.store.features.format import FeatureOutOfRangeError

H = "blocks.0.hook_resid_post"
D_SAE, CTX, UC = 24, 16, 4


def _dense(unit: int) -> np.ndarray:
    rng = np.random.default_rng([3, unit])
    z = np.round(rng.exponential(1.0, (CTX * UC, D_SAE)), 2).astype(np.float32)
    z *= rng.random(z.shape) < np.linspace(0.02, 0.5, D_SAE)  # densities differ by feature
    z[:, 4] = 0  # a dead feature
    z[np.arange(CTX * UC) % CTX == 0] = 0
    return z


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    s = store.open(tmp_path_factory.mktemp("pages"))
    synthetic_dataset(s, "syn", hook=H, d=8, units=3, unit_contexts=UC, context_size=CTX)

    def entries(u: int):
        z = _dense(u)
        r, f = np.nonzero(z)
        return r + u * CTX * UC, f, z[r, f], CTX * UC - UC

    return write_table(s, "ft", dataset="syn", hook=H, d_sae=D_SAE, units=[0, 1, 2], entries=entries, top_k=10, block_features=8)


def test_bad_features_write_nothing(fs, tmp_path):
    with pytest.raises(FeatureOutOfRangeError, match=r"features 0\.\.23"):
        write_pages(fs, tmp_path / "out", features=[3, 24])
    assert not (tmp_path / "out").exists()
