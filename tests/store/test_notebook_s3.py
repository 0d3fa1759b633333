"""Notebook summaries of a store on S3 (moto's server on loopback, issue 24): the same figures as
locally, and the credentials given in ``storage_options`` appear nowhere in them."""

from __future__ import annotations

import os

import pytest

from strata import store
from strata.analysis.features.synthetic import synthetic_dataset

pytestmark = pytest.mark.s3

H = "blocks.0.hook_resid_post"


def test_summaries_on_s3_show_no_credentials(s3_bucket):
    opts = {"key": "AKIANOTEBOOKVIEWS01", "secret": "n0tebook-v1ews-s3cr3t",  # moto accepts any; distinctive to search for
            "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    s = store.open(f"{s3_bucket}/acts", storage_options=opts)
    synthetic_dataset(s, "syn", hook=H, d=8, units=3, write_units=2)
    ds = s.dataset("syn")
    pages = [s._repr_html_(), ds._repr_html_(), ds.info._repr_html_(), repr(s), repr(ds), repr(ds.info)]
    for page in pages:
        assert opts["secret"] not in page and opts["key"] not in page
    assert "in progress: 2/3 units" in ds._repr_html_() and f"{s3_bucket}/acts" in pages[0]
    rows = ds.num_rows(H)
    assert f"<td class=strata-num>{rows:,}</td><td>2/3</td>" in pages[1]
