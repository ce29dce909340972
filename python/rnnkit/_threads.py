"""The kernel thread count."""

from __future__ import annotations

from rnnkit import _core
from rnnkit._checks import positive_int


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (at least 1) for the kernels from now on. The default is the number of
    CPUs available, or the environment variable ``RNNKIT_NUM_THREADS``. Calls of under 8 million
    floating-point operations (a batch-1 RNN forward at H=128 over 100 steps is 6.6 million) run on
    the calling thread alone, whatever ``n`` (the environment variable ``RNNKIT_SMALL_CALL_FLOPS``,
    read at the first call, sets that threshold; 0 sends every call to the threads); results do
    not depend on the thread count."""
    _core.set_num_threads(positive_int(n, "n"))


def get_num_threads() -> int:
    """The number of threads the kernels use."""
    return _core.get_num_threads()
