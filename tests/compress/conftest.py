"""Fixtures shared by the compression tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run each compression test module's LAPACK calls on one thread. This project's test machines have 2 cores shared with
    other jobs; there, 2 OpenMP threads on a busy core pair were measured up to 50× slower (the dense
    reference SVDs of the MiniLM test: 130 s vs 2.3 s), while one thread loses little at these sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
