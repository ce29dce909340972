"""Layers."""

from rnnkit.layers.core import Dropout, Embedding, Linear, Sequential
from rnnkit.layers.pooling import LastStep, MaxPool, MeanPool
from rnnkit.layers.recurrent import GRU, LSTM, RNN

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Dropout",
    "Embedding",
    "LastStep",
    "Linear",
    "MaxPool",
    "MeanPool",
    "Sequential",
]
