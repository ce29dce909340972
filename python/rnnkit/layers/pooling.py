"""Sequence pooling: from a batch-first sequence (batch, seq, features) to one vector (batch, features).

Each pooling layer takes optional ``lengths`` (batch,): steps ``t >= lengths[b]`` are padding and
ignored, and receive zero gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from rnnkit._checks import lengths_array
from rnnkit.layers.core import _float_input, _grad_input, _Layer

Array = npt.NDArray[Any]


class _Pool(_Layer):
    """Common checks and bookkeeping; subclasses implement :meth:`_pool` and :meth:`_unpool`."""

    takes_lengths = True

    def _pool(self, x: Array, lengths: Array) -> tuple[Array, Any]:
        """(y, what :meth:`_unpool` needs) for a checked x (B, T, F) and lengths (B,)."""
        raise NotImplementedError

    def _unpool(self, dx: Array, dy: Array, lengths: Array, aux: Any) -> None:
        """Write dL/dx into the zero array ``dx`` (B, T, F) from dy (B, F)."""
        raise NotImplementedError

    def forward(self, x: Any, lengths: Any = None) -> Array:
        """Pool each sequence over its valid steps.

        Args:
            x: (batch, seq, features), batch first (float32 and float64 are kept).
            lengths: optional (batch,) integers in 1..seq; None means every step is valid.

        Returns:
            (batch, features).
        """
        arr = _float_input(x, "x")
        if arr.ndim != 3:
            raise ValueError(f"x must be 3-dimensional (batch, seq, features); got shape {arr.shape}")
        batch, seq, _ = arr.shape
        if batch == 0 or seq == 0:
            raise ValueError(f"x must have at least one sequence and one time step; got shape {arr.shape}")
        lens = np.full(batch, seq, dtype=np.int64) if lengths is None else lengths_array(lengths, batch, seq)
        y, aux = self._pool(arr, lens)
        self._keep((arr.shape, arr.dtype, lens, aux))
        return y

    def backward(self, dy: Any) -> Array:
        """dL/dx from dL/dy.

        Args:
            dy: dL/dy, (batch, features).

        Returns:
            dL/dx, (batch, seq, features), zero at the padding steps.
        """
        shape, dtype, lens, aux = self._need()
        dx = np.zeros(shape, dtype=dtype)
        self._unpool(dx, _grad_input(dy, (shape[0], shape[2]), dtype), lens, aux)
        return dx


def _valid(lengths: Array, seq: int) -> Array:
    """(B, T) booleans: True at the valid steps."""
    return np.arange(seq) < lengths[:, None]


class LastStep(_Pool):
    """The output at each sequence's last valid step.

    With ``bidirectional=True`` the features are the two halves of a bidirectional recurrent
    layer's output: the forward half is taken at the last valid step and the reverse half at step 0,
    where each direction ends (together, the layer's final hidden states).

    Args:
        bidirectional: whether to split the features into forward and reverse halves.
    """

    def __init__(self, bidirectional: bool = False) -> None:
        super().__init__()
        self.bidirectional = bool(bidirectional)

    def extra_repr(self) -> str:
        return "bidirectional=True" if self.bidirectional else ""

    def _split(self, features: int) -> int:
        if not self.bidirectional:
            return features
        if features % 2:
            raise ValueError(
                f"x must have an even number of features (forward and reverse halves) for "
                f"LastStep(bidirectional=True); got {features}"
            )
        return features // 2

    def _pool(self, x: Array, lengths: Array) -> tuple[Array, Any]:
        half = self._split(x.shape[2])
        rows = np.arange(x.shape[0])
        y = np.concatenate((x[rows, lengths - 1, :half], x[:, 0, half:]), axis=1)
        return y, None

    def _unpool(self, dx: Array, dy: Array, lengths: Array, aux: Any) -> None:
        half = self._split(dx.shape[2])
        dx[np.arange(dx.shape[0]), lengths - 1, :half] = dy[:, :half]
        dx[:, 0, half:] = dy[:, half:]


class MeanPool(_Pool):
    """The mean over each sequence's valid steps."""

    def _pool(self, x: Array, lengths: Array) -> tuple[Array, Any]:
        weights = (_valid(lengths, x.shape[1]) / lengths[:, None]).astype(x.dtype)  # (B, T)
        return np.matmul(weights[:, None, :], x)[:, 0, :], weights

    def _unpool(self, dx: Array, dy: Array, lengths: Array, aux: Any) -> None:
        np.multiply(aux[:, :, None], dy[:, None, :], out=dx)


class MaxPool(_Pool):
    """The maximum over each sequence's valid steps, per feature; the gradient goes to the step of
    the maximum (the first one on ties)."""

    def _pool(self, x: Array, lengths: Array) -> tuple[Array, Any]:
        if lengths.min() < x.shape[1]:
            x = np.where(_valid(lengths, x.shape[1])[:, :, None], x, -np.inf)
        where = np.argmax(x, axis=1)[:, None, :]  # (B, 1, F)
        return np.take_along_axis(x, where, axis=1)[:, 0, :], where

    def _unpool(self, dx: Array, dy: Array, lengths: Array, aux: Any) -> None:
        np.put_along_axis(dx, aux, dy[:, None, :], axis=1)
