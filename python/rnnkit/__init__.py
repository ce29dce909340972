"""rnnkit: fast recurrent neural networks (RNN, LSTM, GRU) on CPU, over NumPy arrays."""

from rnnkit._core import __version__, simd_level
from rnnkit._threads import get_num_threads, set_num_threads
from rnnkit.layers import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "__version__", "get_num_threads", "set_num_threads", "simd_level"]
