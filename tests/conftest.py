from __future__ import annotations

import numpy as np
import pytest
import rnnkit


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def num_threads():
    """Set the kernel thread count within a test; the original count is restored afterwards."""
    before = rnnkit.get_num_threads()
    try:
        yield rnnkit.set_num_threads
    finally:
        rnnkit.set_num_threads(before)


@pytest.fixture
def two_threads(num_threads):
    num_threads(2)
    return 2
