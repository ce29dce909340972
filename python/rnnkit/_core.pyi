"""Type stubs of the compiled extension ``rnnkit._core`` (src/python.rs)."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.floating[Any]]
_Params = list[tuple[_Array, _Array, _Array, _Array]]

__all__ = [
    "forward",
    "backward",
    "matmul",
    "set_num_threads",
    "get_num_threads",
    "simd_level",
    "gates",
    "Tape",
    "WeightCache",
    "Stepper",
    "__version__",
]

__version__: str

@final
class Tape:
    """What a training forward kept for backward (opaque). ``backward`` consumes it."""

    @property
    def pending(self) -> bool: ...
    def check_weights(self, weights: _Params) -> None: ...

@final
class WeightCache:
    """One recurrent layer's weights prepared for the kernels, kept between inference calls of
    ``forward``; each call compares the weights with the copy held and prepares them again when
    they changed. Copying or pickling gives an empty cache."""

    def __init__(self) -> None: ...
    @property
    def builds(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def clear(self) -> None: ...
    def __reduce__(self) -> tuple[type[WeightCache], tuple[()]]: ...

@final
class Stepper:
    """The weights of a stack of single-direction layers, checked once, for streaming
    inference: ``stepper(x, state)`` runs one time step of every layer and returns ``(y, state)``.
    It reads the arrays' current contents at each step."""

    def __new__(cls, cell: str, weights: _Params) -> Stepper: ...
    def __call__(
        self, x: _Array, state: _Array | tuple[_Array, _Array] | None = None
    ) -> tuple[_Array, _Array | tuple[_Array, _Array]]: ...
    def __reduce__(self) -> tuple[type[Stepper], tuple[str, _Params]]: ...

def forward(
    cell: str,
    x: _Array,
    weights: _Params,
    h0: _Array | None = None,
    c0: _Array | None = None,
    lengths: npt.NDArray[np.int64] | None = None,
    batch_first: bool = True,
    train: bool = False,
    cache: WeightCache | None = None,
) -> tuple[_Array, _Array, _Array | None, Tape | None]: ...
def backward(
    tape: Tape,
    weights: _Params,
    dy: _Array,
    dhn: _Array | None = None,
    dcn: _Array | None = None,
    *,
    grads: _Params,
    dh_out: _Array | None = None,
) -> tuple[_Array, _Array, _Array | None]: ...
def matmul(
    a: _Array,
    b: _Array,
    out: _Array,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    accumulate: bool = False,
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def gates(cell: str) -> int: ...
