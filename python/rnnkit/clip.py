"""Gradient clipping, in place, over a Module's gradients or any list of gradient arrays."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnkit._checks import nonnegative_number
from rnnkit.module import Module

Array = npt.NDArray[Any]


def _gradients(grads_or_module: Any) -> list[Array]:
    """The gradient arrays of a Module, of one array, or of an iterable of arrays (checked)."""
    if isinstance(grads_or_module, Module):
        return list(grads_or_module.grads.values())
    if isinstance(grads_or_module, np.ndarray):
        return [grads_or_module]
    if not isinstance(grads_or_module, Iterable):
        raise TypeError(
            "grads_or_module must be a Module or an iterable of gradient arrays; "
            f"got {type(grads_or_module).__name__}"
        )
    grads = list(grads_or_module)
    for i, g in enumerate(grads):
        if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
            raise TypeError(
                f"grads_or_module[{i}] must be a floating-point NumPy array (it is changed in place)"
            )
    return grads


def clip_grad_norm(grads_or_module: Any, max_norm: float, *, error_if_nonfinite: bool = False) -> float:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm``.

    The norm is taken over all the arrays together, in float64. If it exceeds ``max_norm``, every
    gradient is multiplied by ``max_norm / (norm + 1e-6)`` (PyTorch's formula: the factor is applied
    whenever it is below 1). A NaN or infinite norm leaves the gradients untouched and warns, or
    raises with ``error_if_nonfinite``.

    Args:
        grads_or_module: A :class:`~rnnkit.module.Module` (its ``grads``), one gradient array or an
            iterable of them.
        max_norm: The largest norm allowed (>= 0).
        error_if_nonfinite: Raise instead of warning when the norm is NaN or infinite.

    Returns:
        The global norm before clipping.

    Raises:
        FloatingPointError: The norm is NaN or infinite and ``error_if_nonfinite`` is set.
    """
    limit = nonnegative_number(max_norm, "max_norm")
    grads = _gradients(grads_or_module)
    total = 0.0
    for g in grads:
        flat = g.ravel().astype(np.float64, copy=False)
        total += float(np.einsum("i,i->", flat, flat))  # not BLAS: its threads would wake beside ours
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        message = (
            f"the total gradient norm is {norm}, so the gradients were left unclipped; the training "
            "is diverging or the inputs hold NaN/Inf: try a lower learning rate, check the data, or "
            "clip earlier with a smaller max_norm"
        )
        if error_if_nonfinite:
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return norm
    scale = limit / (norm + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return norm


def clip_grad_value(grads_or_module: Any, value: float) -> None:
    """Clamp every gradient element to ``[-value, value]``, in place.

    Args:
        grads_or_module: A :class:`~rnnkit.module.Module` (its ``grads``), one gradient array or an
            iterable of them.
        value: The largest magnitude allowed (>= 0).
    """
    limit = nonnegative_number(value, "value")
    for g in _gradients(grads_or_module):
        np.clip(g, -limit, limit, out=g)
