"""Fixtures of the SAE tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: these SAEs and models are tiny, and on a busy two-core CI machine
    torch's spinning worker threads make each step over ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
