"""Parameter initialisers that fill NumPy arrays in place, and :func:`init_recurrent` for whole models.

Every initialiser takes the array to fill, writes into it (the array object stays the same, so a
module's live parameters can be re-initialised) and returns it. Randomness comes from ``seed``: an
integer, a :class:`numpy.random.Generator` (used and advanced as is) or None (fresh entropy).

Fans follow PyTorch: for an array of shape ``(out, in, *kernel)``, ``fan_in = in * prod(kernel)``
and ``fan_out = out * prod(kernel)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from rnnkit._checks import finite_number
from rnnkit.module import Module

Array = npt.NDArray[Any]
Seed = int | np.random.Generator | None
ModuleT = TypeVar("ModuleT", bound=Module)

_GAINS = {
    "linear": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "leaky_relu": math.sqrt(2.0 / (1.0 + 0.01**2)),  # PyTorch's default negative slope, 0.01
}


def as_generator(seed: Seed) -> np.random.Generator:
    """A NumPy random Generator from ``seed``.

    Args:
        seed: an integer (a new seeded Generator), a Generator (returned as is, so draws advance it)
            or None (a Generator seeded from fresh entropy).

    Returns:
        The Generator.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
        raise TypeError(f"seed must be an int, a numpy.random.Generator or None; got {type(seed).__name__}")
    return np.random.default_rng(seed)


def calculate_gain(nonlinearity: str) -> float:
    """The recommended gain for a nonlinearity (PyTorch's values).

    Args:
        nonlinearity: "linear", "sigmoid", "tanh", "relu" or "leaky_relu" (negative slope 0.01).

    Returns:
        The gain: 1, 1, 5/3, sqrt(2) and sqrt(2 / (1 + 0.01**2)) respectively.
    """
    if nonlinearity not in _GAINS:
        raise ValueError(f"nonlinearity must be one of {sorted(_GAINS)}; got {nonlinearity!r}")
    return _GAINS[nonlinearity]


def _target(a: Any) -> Array:
    """``a`` checked to be a writeable floating-point NumPy array (initialisers fill it in place)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"a must be a numpy array (it is filled in place); got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"a must be a floating-point array; got dtype {a.dtype}")
    if not a.flags.writeable:
        raise ValueError("a must be writeable; got a read-only array")
    return a


def _matrix(a: Array) -> Array:
    """``a`` checked to have at least 2 dimensions, none empty (to have fans, or be orthogonal)."""
    if a.ndim < 2 or 0 in a.shape:
        raise ValueError(f"a must have at least 2 dimensions, none of size 0; got shape {a.shape}")
    return a


def _fans(a: Array) -> tuple[int, int]:
    """(fan_in, fan_out) of ``a`` as PyTorch computes them."""
    _matrix(a)
    receptive = math.prod(a.shape[2:])
    return a.shape[1] * receptive, a.shape[0] * receptive


def uniform_(a: Any, low: float = 0.0, high: float = 1.0, seed: Seed = None) -> Array:
    """Fill ``a`` with draws from U(low, high).

    Args:
        a: the floating-point array to fill in place.
        low: the lower bound.
        high: the upper bound (at least ``low``).
        seed: an int, a Generator or None.

    Returns:
        ``a``.
    """
    arr = _target(a)
    lo, hi = finite_number(low, "low"), finite_number(high, "high")
    if hi < lo:
        raise ValueError(f"high must be at least low; got low={lo}, high={hi}")
    arr[...] = as_generator(seed).uniform(lo, hi, size=arr.shape)
    return arr


def normal_(a: Any, mean: float = 0.0, std: float = 1.0, seed: Seed = None) -> Array:
    """Fill ``a`` with draws from N(mean, std**2).

    Args:
        a: the floating-point array to fill in place.
        mean: the mean.
        std: the standard deviation (non-negative).
        seed: an int, a Generator or None.

    Returns:
        ``a``.
    """
    arr = _target(a)
    mu, sd = finite_number(mean, "mean"), finite_number(std, "std")
    if sd < 0:
        raise ValueError(f"std must be non-negative; got {sd}")
    arr[...] = as_generator(seed).normal(mu, sd, size=arr.shape)
    return arr


def zeros_(a: Any) -> Array:
    """Fill ``a`` with zeros.

    Args:
        a: the floating-point array to fill in place.

    Returns:
        ``a``.
    """
    arr = _target(a)
    arr.fill(0)
    return arr


def xavier_uniform_(a: Any, gain: float = 1.0, seed: Seed = None) -> Array:
    """Glorot/Xavier uniform: U(-b, b) with ``b = gain * sqrt(6 / (fan_in + fan_out))``.

    Args:
        a: the floating-point array (at least 2-D) to fill in place.
        gain: the scale factor (see :func:`calculate_gain`).
        seed: an int, a Generator or None.

    Returns:
        ``a``.
    """
    fan_in, fan_out = _fans(_target(a))
    bound = finite_number(gain, "gain") * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(a, -bound, bound, seed)


def xavier_normal_(a: Any, gain: float = 1.0, seed: Seed = None) -> Array:
    """Glorot/Xavier normal: N(0, s**2) with ``s = gain * sqrt(2 / (fan_in + fan_out))``.

    Args:
        a: the floating-point array (at least 2-D) to fill in place.
        gain: the scale factor (see :func:`calculate_gain`).
        seed: an int, a Generator or None.

    Returns:
        ``a``.
    """
    fan_in, fan_out = _fans(_target(a))
    std = abs(finite_number(gain, "gain")) * math.sqrt(2.0 / (fan_in + fan_out))
    return normal_(a, 0.0, std, seed)


def _kaiming_std(a: Any, nonlinearity: str) -> float:
    fan_in, _ = _fans(_target(a))
    return calculate_gain(nonlinearity) / math.sqrt(fan_in)


def kaiming_uniform_(a: Any, nonlinearity: str = "relu", seed: Seed = None) -> Array:
    """He/Kaiming uniform (fan_in mode): U(-b, b) with ``b = gain * sqrt(3 / fan_in)``.

    Args:
        a: the floating-point array (at least 2-D) to fill in place.
        nonlinearity: the activation that follows, for the gain (see :func:`calculate_gain`).
        seed: an int, a Generator or None.

    Returns:
        ``a``.
    """
    bound = math.sqrt(3.0) * _kaiming_std(a, nonlinearity)
    return uniform_(a, -bound, bound, seed)


def kaiming_normal_(a: Any, nonlinearity: str = "relu", seed: Seed = None) -> Array:
    """He/Kaiming normal (fan_in mode): N(0, s**2) with ``s = gain / sqrt(fan_in)``.

    Args:
        a: the floating-point array (at least 2-D) to fill in place.
        nonlinearity: the activation that follows, for the gain (see :func:`calculate_gain`).
        seed: an int, a Generator or None.

    Returns:
        ``a``.
    """
    return normal_(a, 0.0, _kaiming_std(a, nonlinearity), seed)


def _row_blocks(a: Array, blocks: int) -> list[Array]:
    """``a`` split into ``blocks`` equal row blocks: views, so filling them fills ``a``."""
    if isinstance(blocks, bool) or not isinstance(blocks, int | np.integer) or blocks < 1:
        raise ValueError(f"blocks must be a positive integer; got {blocks!r}")
    if a.shape[0] % blocks:
        raise ValueError(f"blocks={blocks} must divide the first dimension of a; got shape {a.shape}")
    return np.split(a, blocks)


def _orthogonal_block(a: Array, gain: float, rng: np.random.Generator) -> None:
    rows = a.shape[0]
    cols = a.size // rows
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q *= np.where(np.diagonal(r) < 0, -1.0, 1.0)  # unique factorisation, so Q is uniformly distributed
    a[...] = (gain * (q.T if rows < cols else q)).reshape(a.shape)


def orthogonal_(a: Any, gain: float = 1.0, seed: Seed = None, *, blocks: int = 1) -> Array:
    """A (semi-)orthogonal matrix: QR of a Gaussian matrix with the signs of R's diagonal moved into Q.

    An array of more than 2 dimensions is treated as ``(shape[0], prod(shape[1:]))``. With fewer
    rows than columns the rows are orthonormal, else the columns.

    Args:
        a: the floating-point array (at least 2-D) to fill in place.
        gain: the scale factor.
        seed: an int, a Generator or None.
        blocks: split the rows into this many equal blocks and make each one orthogonal on its own;
            a recurrent weight of stacked gates, shape ``(gates * H, H)``, takes ``blocks=gates``.

    Returns:
        ``a``.
    """
    arr = _matrix(_target(a))
    g = finite_number(gain, "gain")
    rng = as_generator(seed)
    for block in _row_blocks(arr, blocks):
        _orthogonal_block(block, g, rng)
    return arr


# ---------------------------------------------------------------------- whole recurrent models

_Fill = Callable[[Array, np.random.Generator, int], object]

#: The kinds of :func:`init_recurrent`: fill(array, rng, hidden_size).
_WEIGHT_KINDS: dict[str, _Fill] = {
    "xavier_uniform": lambda a, rng, h: xavier_uniform_(a, seed=rng),
    "xavier_normal": lambda a, rng, h: xavier_normal_(a, seed=rng),
    "kaiming_uniform": lambda a, rng, h: kaiming_uniform_(a, seed=rng),
    "kaiming_normal": lambda a, rng, h: kaiming_normal_(a, seed=rng),
    "orthogonal": lambda a, rng, h: orthogonal_(a, seed=rng),
    "default": lambda a, rng, h: uniform_(a, -1.0 / math.sqrt(h), 1.0 / math.sqrt(h), rng),
    "zeros": lambda a, rng, h: zeros_(a),
}
_BIAS_KINDS = ("default", "zeros")


def _kind(value: Any, name: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}; got {value!r}")
    return str(value)


def init_recurrent(
    module: ModuleT,
    *,
    input: str = "xavier_uniform",
    recurrent: str = "orthogonal",
    bias: str = "zeros",
    forget_bias: float | None = None,
    seed: Seed = None,
) -> ModuleT:
    """Re-initialise, in place, every RNN, LSTM and GRU layer inside ``module``.

    The gate-stacked weights, ``weight_ih_*`` of shape ``(gates * H, in)`` and ``weight_hh_*`` of
    shape ``(gates * H, H)``, are initialised one gate block ``(H, ·)`` at a time: each recurrent
    gate block is orthogonal, and the fans are the per-gate ones (``fan_out = H``, not
    ``gates * H``), as if each gate were its own linear map.

    Args:
        module: a model, container or recurrent layer; other layers inside it are left alone.
        input: the kind for ``weight_ih_*``: "xavier_uniform", "xavier_normal", "kaiming_uniform",
            "kaiming_normal" (relu gain, fan_in mode), "orthogonal", "default" (PyTorch's
            U(-1/sqrt(H), 1/sqrt(H))) or "zeros".
        recurrent: the kind for ``weight_hh_*``, the same choices.
        bias: the kind for ``bias_ih_*`` and ``bias_hh_*``: "zeros" or "default".
        forget_bias: if given, every LSTM's forget-gate slice ``[H:2H]`` of ``bias_ih_*`` is set to
            it and that of ``bias_hh_*`` to 0 (gate order i, f, g, o), so the summed bias is
            ``forget_bias``. Needs an LSTM with biases inside ``module``.
        seed: an int, a Generator or None; layers and parameters are filled in a fixed order.

    Returns:
        ``module``.
    """
    if not isinstance(module, Module):
        raise TypeError(f"module must be an rnnkit Module; got {type(module).__name__}")
    kinds = {
        "weight_ih": _kind(input, "input", tuple(_WEIGHT_KINDS)),
        "weight_hh": _kind(recurrent, "recurrent", tuple(_WEIGHT_KINDS)),
        "bias_ih": _kind(bias, "bias", _BIAS_KINDS),
        "bias_hh": _kind(bias, "bias", _BIAS_KINDS),
    }
    from rnnkit.layers.recurrent import LSTM, _Recurrent  # here: the layers import this module

    layers = [m for _, m in module.named_modules() if isinstance(m, _Recurrent)]
    if not layers:
        raise ValueError(f"module has no RNN, LSTM or GRU layer to initialise: {type(module).__name__}")
    forget = None if forget_bias is None else finite_number(forget_bias, "forget_bias")
    if forget is not None and not any(isinstance(m, LSTM) and m.bias for m in layers):
        raise ValueError("forget_bias needs an LSTM layer with bias=True inside module; there is none")
    rng = as_generator(seed)
    for layer in layers:
        h = layer.hidden_size
        for name, a in layer.params.items():
            param_kind = name.split("_l")[0]
            fill = _WEIGHT_KINDS[kinds[param_kind]]
            for block in _row_blocks(a, layer._gates) if param_kind.startswith("weight") else [a]:
                fill(block, rng, h)
            if forget is not None and isinstance(layer, LSTM) and param_kind.startswith("bias"):
                a[h : 2 * h] = forget if param_kind == "bias_ih" else 0.0
    return module
