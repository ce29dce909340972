"""Small shared helpers of the test suite (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import numpy as np
import rnnkit

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def make_layer(cell, input_size, hidden_size, num_layers=1, **kwargs):
    """The rnnkit layer for a cell name ("rnn_tanh", "rnn_relu", "lstm", "gru")."""
    if cell.startswith("rnn_"):
        return rnnkit.RNN(input_size, hidden_size, num_layers, nonlinearity=cell[4:], **kwargs)
    cls = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}[cell]
    return cls(input_size, hidden_size, num_layers, **kwargs)


def state_shape(layer, batch):
    return (layer.num_layers * layer.num_directions, batch, layer.hidden_size)


def random_state(rng, layer, batch, dtype=np.float64, scale=0.5):
    """A random initial state for ``layer``: (h, c) for LSTM, h otherwise."""
    shape = state_shape(layer, batch)
    h = (scale * rng.standard_normal(shape)).astype(dtype)
    if layer._has_c:
        return h, (scale * rng.standard_normal(shape)).astype(dtype)
    return h


def split_state(state):
    """(h, c) of a state (c None unless LSTM)."""
    if isinstance(state, tuple):
        return state
    return state, None


def seq_shape(batch_first, batch, seq_len, features):
    return (batch, seq_len, features) if batch_first else (seq_len, batch, features)


def mixed_lengths(batch, seq_len, rng):
    """Lengths in 1..seq_len with both 1 and seq_len present (batch >= 2)."""
    lens = rng.integers(1, seq_len + 1, size=batch)
    lens[0] = 1
    lens[-1] = seq_len
    if batch > 2:
        rng.shuffle(lens)
    return lens.astype(np.int64)


def at_offset(a, offset):
    """A copy of ``a`` whose data starts ``offset`` bytes past a 64-byte boundary (NumPy aligns
    its arrays to 16 bytes only, so an unpickled layer's start 0, 16, 32 or 48 bytes past one)."""
    buf = np.empty(a.nbytes + 128, dtype=np.uint8)
    start = -buf.ctypes.data % 64 + offset
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out
