"""Layers."""

from rnnkit.layers.recurrent import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN"]
