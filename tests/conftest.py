"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI; pinning the count keeps float reductions stable run to run.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
