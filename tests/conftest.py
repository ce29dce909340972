from __future__ import annotations

import os

# Every kernel call goes to the thread pool, however small: the tests' problems are, and the
# thread tests are there to exercise the pool (by default a call of under 8 million
# floating-point operations runs on the calling thread, as with one thread). Read at the first call.
os.environ["RNNKIT_SMALL_CALL_FLOPS"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rnnkit  # noqa: E402


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
