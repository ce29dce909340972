"""rnnkit: fast recurrent neural networks (RNN, LSTM, GRU) on CPU, over NumPy arrays.

The layers (:mod:`rnnkit.layers`) and ready-made models (:mod:`rnnkit.models`) share one module
protocol (:mod:`rnnkit.module`); :mod:`rnnkit.losses`, :mod:`rnnkit.optim`,
:mod:`rnnkit.schedules`, :mod:`rnnkit.clip`, :mod:`rnnkit.init` and :mod:`rnnkit.data` feed
:func:`fit`; :func:`save` and :func:`load` keep a model in one file.
"""

from rnnkit import clip, data, init, losses, optim, schedules
from rnnkit._core import __version__, simd_level
from rnnkit._threads import get_num_threads, set_num_threads
from rnnkit.io import load, save
from rnnkit.layers import GRU, LSTM, RNN, Dropout, Embedding, LastStep, Linear, MaxPool, MeanPool, Sequential
from rnnkit.models import (
    Forecaster,
    LanguageModel,
    Seq2Seq,
    SequenceClassifier,
    SequenceRegressor,
    SequenceTagger,
)
from rnnkit.module import Module
from rnnkit.train import Callback, EarlyStopping, History, ModelCheckpoint, evaluate, fit, predict

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Callback",
    "Dropout",
    "EarlyStopping",
    "Embedding",
    "Forecaster",
    "History",
    "LanguageModel",
    "LastStep",
    "Linear",
    "MaxPool",
    "MeanPool",
    "ModelCheckpoint",
    "Module",
    "Seq2Seq",
    "Sequential",
    "SequenceClassifier",
    "SequenceRegressor",
    "SequenceTagger",
    "__version__",
    "clip",
    "data",
    "evaluate",
    "fit",
    "get_num_threads",
    "init",
    "load",
    "losses",
    "optim",
    "predict",
    "save",
    "schedules",
    "set_num_threads",
    "simd_level",
]
