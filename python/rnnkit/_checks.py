"""Argument checks shared by the public API: each raises with the argument's name and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype[Any]:
    """Return ``dtype`` as a NumPy dtype if it is float32 or float64, else raise TypeError."""
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be numpy.float32 or numpy.float64; got {dtype!r}") from e
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be numpy.float32 or numpy.float64; got {dt}")
    return dt


def from_torch(value: Any) -> Any:
    """A PyTorch tensor as a NumPy array (detached, on the CPU); anything else as it is."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return value


def _real(value: Any, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__}")
    return float(value)


def finite_number(value: Any, name: str) -> float:
    """``value`` as a finite float, else TypeError / ValueError naming ``name``."""
    v = _real(value, name, "a real number")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {value}")
    return v


def nonnegative_number(
    value: Any, name: str, *, below: float | None = None, at_most: float | None = None
) -> float:
    """``value`` as a finite float >= 0 (and < ``below`` or <= ``at_most``), else TypeError /
    ValueError naming ``name``."""
    v = _real(value, name, "a number")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    if below is not None and not v < below:
        raise ValueError(f"{name} must be in [0, {below}); got {value}")
    if at_most is not None and not v <= at_most:
        raise ValueError(f"{name} must be in [0, {at_most}]; got {value}")
    return v


def float_array(value: Any, name: str, dtype: np.dtype[Any], ndim: int | None = None) -> npt.NDArray[Any]:
    """``value`` as a C-contiguous array of ``dtype``: any real floating-point array-like is accepted
    (and copied if needed); integers, booleans, complex numbers, objects and strings are refused."""
    try:
        arr = np.asarray(from_torch(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a floating-point array; could not convert it: {e}") from e
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array (float16/32/64); got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional; got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}")
    return int(value)


def lengths_array(lengths: Any, batch: int, seq_len: int) -> npt.NDArray[np.int64]:
    """Per-sequence lengths as int64, checked to be ``batch`` integers in 1..seq_len."""
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers; got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(
            f"lengths must have shape ({batch},), one length per sequence; got shape {arr.shape}"
        )
    if batch and (arr.min() < 1 or arr.max() > seq_len):
        bad = int(arr[(arr < 1) | (arr > seq_len)][0])
        raise ValueError(f"lengths must be in 1..{seq_len} (the sequence length of x); got {bad}")
    return np.ascontiguousarray(arr, dtype=np.int64)
