"""Recurrent layers: RNN, LSTM and GRU, stacked and bidirectional, with PyTorch's parameters.

Each layer runs one fused Rust kernel call per (layer, both directions) for the forward pass and
one for backpropagation through time; this module only chains layers, applies inter-layer
dropout and keeps the parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnkit import _core
from rnnkit._checks import float_array, float_dtype, lengths_array, positive_int
from rnnkit.module import Module

Array = npt.NDArray[Any]
State = Array | tuple[Array, Array]

_PARAM_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
#: Bytes the parameter arrays are aligned to: a cache line, the widest vector load of the kernels.
_ALIGN = 64


def _aligned(a: Array) -> Array:
    """A copy of ``a`` whose data starts on a 64-byte boundary. NumPy aligns to 16 bytes only,
    and then the kernels' vector loads of the weight rows, which streaming steps and batch-1
    sequences read as they are, each span two cache lines (an LSTM step at H=64 took 1.16x the
    time, GRU at H=256 1.19x)."""
    buf = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    start = -buf.ctypes.data % _ALIGN
    out: Array = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _stacked(h: list[Array], c: list[Array] | None = None) -> State:
    """The states of a stack's layers as one (layers * directions, batch, hidden) array, or the
    pair ``(h, c)`` with ``c``. One layer's array is the kernel's own (new at every call): not
    copied, a microsecond of a batch-1 call."""

    def one(parts: list[Array]) -> Array:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return one(h) if c is None else (one(h), one(c))


class _Recurrent(Module):
    """Common machinery of :class:`RNN`, :class:`LSTM` and :class:`GRU`."""

    returns_state = True
    takes_lengths = True
    _gates: int
    _has_c: bool = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        self.input_size = positive_int(input_size, "input_size")
        self.hidden_size = positive_int(hidden_size, "hidden_size")
        self.num_layers = positive_int(num_layers, "num_layers")
        if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.dtype = float_dtype(dtype)
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(self.hidden_size)
        gh = self._gates * self.hidden_size
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.hidden_size * self.num_directions
            for sfx in self._suffixes():
                shapes: dict[str, tuple[int, ...]] = {
                    "weight_ih": (gh, in_size),
                    "weight_hh": (gh, self.hidden_size),
                }
                if self.bias:
                    shapes |= {"bias_ih": (gh,), "bias_hh": (gh,)}
                for kind, shape in shapes.items():
                    w = self._rng.uniform(-bound, bound, size=shape)
                    self.add_param(f"{kind}_l{layer}{sfx}", _aligned(w.astype(self.dtype)))
        # Per stacked layer, per direction, the 4-tuples the kernels take: the parameters, and
        # the gradients they add to. The parameter arrays are never replaced (Module.params copies
        # into them), so the tuples are made once (a layer without biases gets zeros for the
        # biases, and scratch arrays for their gradients, never read). About 2 us of each call.
        zero_bias = np.zeros(gh, dtype=self.dtype)
        self._kernel_params = [
            self._tuples(self._params, k, lambda: zero_bias) for k in range(self.num_layers)
        ]
        self._kernel_grads = [
            self._tuples(self._grads, k, lambda: np.zeros(gh, dtype=self.dtype))
            for k in range(self.num_layers)
        ]
        self._tapes: list[Any] | None = None
        # Inference only: per stacked layer, the weights prepared for the kernels (the recurrent
        # ones packed), kept between calls; the kernel compares the weights with its copy at every
        # call, so a change in place is never missed. Dropped in training mode.
        self._caches: list[Any] | None = None
        # The parameter arrays are never replaced (Module.params copies into them), so step's
        # weights are checked once, here, and each step reads their current contents.
        self._stepper = (
            None
            if self.bidirectional
            else _core.Stepper(self._cell, [self._weights(k)[0] for k in range(self.num_layers)])
        )
        self._masks: list[Array | None] = []
        #: Set True to keep dL/dh_t of every step in :attr:`hidden_grads` at each backward.
        self.retain_hidden_grads = False
        #: After a backward with :attr:`retain_hidden_grads`: per stacked layer, dL/dh_t at every
        #: step, shaped like y (the sum of what arrives from the output and through the
        #: recurrence; zero at padded steps). Its norm over t shows vanishing or exploding gradients.
        self.hidden_grads: list[Array] = []
        self._in_shape: tuple[int, ...] = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Recurrent:
        """A deep copy whose parameter arrays start on 64 bytes, as the original's do (NumPy's
        copies would not). Arrays already copied in the same ``deepcopy`` call (by an optimizer
        copied beside the layer, before it) are kept as they are, so that the copies still share
        them."""
        for a in self._params.values():
            memo.setdefault(id(a), _aligned(a))
        twin = self.__class__.__new__(self.__class__)
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    # ------------------------------------------------------------------ structure

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @property
    def _cell(self) -> str:
        raise NotImplementedError

    def _tuples(
        self, arrays: dict[str, Array], layer: int, missing_bias: Callable[[], Array]
    ) -> list[tuple[Array, Array, Array, Array]]:
        """``arrays``' (weight_ih, weight_hh, bias_ih, bias_hh) of ``layer``, per direction;
        ``missing_bias()`` stands in for the biases of a layer without them."""
        out = []
        for sfx in self._suffixes():
            w_ih, w_hh = (arrays[f"{kind}_l{layer}{sfx}"] for kind in _PARAM_KINDS[:2])
            b_ih, b_hh = (arrays.get(f"{kind}_l{layer}{sfx}") for kind in _PARAM_KINDS[2:])
            out.append(
                (
                    w_ih,
                    w_hh,
                    missing_bias() if b_ih is None else b_ih,
                    missing_bias() if b_hh is None else b_hh,
                )
            )
        return out

    def _weights(self, layer: int) -> list[tuple[Array, Array, Array, Array]]:
        """The kernels' 4-tuples of ``layer``'s parameters, per direction."""
        return self._kernel_params[layer]

    def extra_repr(self) -> str:
        extra = f", num_layers={self.num_layers}" if self.num_layers > 1 else ""
        extra += ", bidirectional=True" if self.bidirectional else ""
        extra += f", dropout={self.dropout}" if self.dropout else ""
        extra += ", bias=False" if not self.bias else ""
        extra += ", batch_first=False" if not self.batch_first else ""
        return f"{self.input_size}, {self.hidden_size}{extra}, dtype={self.dtype.name}"

    # ------------------------------------------------------------------ modes and state

    def _set_training(self, mode: bool) -> None:
        super()._set_training(mode)
        if mode:
            self._caches = None
        else:  # inference keeps nothing for backward
            self._tapes = None

    def initial_state(self, batch_size: int) -> State:
        """A zero state for ``batch_size`` sequences: (h, c) for LSTM, h otherwise."""
        b = positive_int(batch_size, "batch_size")
        shape = (self.num_layers * self.num_directions, b, self.hidden_size)
        h = np.zeros(shape, dtype=self.dtype)
        return (h, np.zeros(shape, dtype=self.dtype)) if self._has_c else h

    def step(self, x: Any, state: Any = None) -> tuple[Array, State]:
        """Advance every layer by one time step (streaming inference; keeps nothing for backward).

        Args:
            x: (batch, input_size), the input at this step.
            state: the state from :meth:`initial_state` or the previous step (None: zeros).

        Returns:
            ``(y, state)``: y is (batch, hidden_size), the last layer's output at this step (a
            new array), and the new state. The same as running :meth:`forward` over the steps one
            by one.

        A step runs on the calling thread. For layers with 768 KB of weights or more at batch
        1-4, 256 KB or more at batch 5-8, or 1 MB or more at larger batches, steps that follow
        each other closely (under 0.2 ms apart) are shared with the kernel threads (see
        :func:`rnnkit.set_num_threads`); the results are the same on any number of threads.
        """
        stepper = self._stepper
        if stepper is None:
            raise ValueError("step runs forward in time only; a bidirectional layer needs the whole sequence")
        # The stepper checks everything it is given (it refuses an x whose dtype is not the
        # weights'). Only when it refuses are x and the state checked here: to convert x (a list,
        # another dtype, a non-contiguous view) or to say what was wrong in the layer's own terms.
        # This keeps the overhead of a step low.
        try:
            return stepper(x, state)
        except (TypeError, ValueError):
            x = self._check_step_args(x, state)  # raises what was wrong, in the layer's terms,
            return stepper(x, state)  # or made x contiguous

    # ------------------------------------------------------------------ argument checks

    def _check_step_args(self, x: Any, state: Any) -> Array:
        """``x`` of :meth:`step` as a (batch, input_size) array of the layer's dtype, and the state
        checked against it; raises a clear error for anything else."""
        arr = float_array(x, "x", self.dtype, 2)
        if arr.shape[1] != self.input_size:
            raise ValueError(f"x has {arr.shape[1]} features; expected input_size={self.input_size}")
        self._check_state(state, arr.shape[0], "state")
        return arr

    def _check_state(self, state: Any, batch: int, name: str) -> tuple[Array | None, Array | None]:
        if state is None:
            return None, None
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if self._has_c:
            if not isinstance(state, tuple | list) or len(state) != 2:
                raise TypeError(f"{name} must be a tuple (h, c) for LSTM; got {type(state).__name__}")
            h = float_array(state[0], f"{name}[0] (h)", self.dtype, 3)
            c = float_array(state[1], f"{name}[1] (c)", self.dtype, 3)
            for n, a in ((f"{name}[0] (h)", h), (f"{name}[1] (c)", c)):
                if a.shape != shape:
                    raise ValueError(
                        f"{n} must have shape {shape} (layers*directions, batch, hidden); got {a.shape}"
                    )
            return h, c
        if isinstance(state, tuple | list):
            raise TypeError(f"{name} must be one array for {type(self).__name__}, not a tuple")
        h = float_array(state, name, self.dtype, 3)
        if h.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} (layers*directions, batch, hidden); got {h.shape}"
            )
        return h, None

    # ------------------------------------------------------------------ forward / backward

    def forward(self, x: Any, state: Any = None, lengths: Any = None) -> tuple[Array, State]:
        """Run the layer over a batch of sequences.

        Args:
            x: (batch, seq, input_size) if ``batch_first`` else (seq, batch, input_size).
            state: the initial state, (h0, c0) for LSTM and h0 otherwise, each
                (num_layers * num_directions, batch, hidden_size); zeros if None.
            lengths: optional per-sequence lengths (batch integers in 1..seq). Steps past a
                sequence's length are not computed, their outputs are zero, the final state is
                the one at the sequence's last step, and the reverse direction starts there.

        Returns:
            ``(y, state)``: y is (batch, seq, num_directions * hidden_size) (or time-major),
            state the final state shaped like the initial one.

        In eval mode the layer keeps its weights packed for the kernels from one call to the
        next (about twice the recurrent parameters' memory, freed by ``train()``); every call
        checks them against the parameters, so changing those in place is safe.
        """
        x = float_array(x, "x", self.dtype)
        if x.ndim != 3:
            layout = "(batch, seq, input_size)" if self.batch_first else "(seq, batch, input_size)"
            raise ValueError(f"x must be 3-dimensional {layout}; got shape {x.shape}")
        if x.shape[2] != self.input_size:
            raise ValueError(
                f"x has {x.shape[2]} features in its last dimension; expected input_size={self.input_size}"
            )
        batch, seq = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        if batch == 0 or seq == 0:
            raise ValueError(f"x must have at least one sequence and one time step; got shape {x.shape}")
        h0, c0 = self._check_state(state, batch, "state")
        lens = None if lengths is None else lengths_array(lengths, batch, seq)
        nd = self.num_directions
        training = self.training
        tapes: list[Any] = []
        masks: list[Array | None] = []
        hn: list[Array] = []
        cn: list[Array] = []
        caches = None
        if not training:
            if self._caches is None:
                self._caches = [_core.WeightCache() for _ in range(self.num_layers)]
            caches = self._caches
        inp = x
        for layer in range(self.num_layers):
            sl = slice(layer * nd, (layer + 1) * nd)
            y, h, c, tape = _core.forward(
                self._cell,
                inp,
                self._weights(layer),
                None if h0 is None else h0[sl],
                None if c0 is None else c0[sl],
                lens,
                self.batch_first,
                training,
                None if caches is None else caches[layer],
            )
            tapes.append(tape)
            hn.append(h)
            if c is not None:
                cn.append(c)
            if training and self.dropout > 0.0 and layer < self.num_layers - 1:
                keep = 1.0 - self.dropout
                mask = (self._rng.random(y.shape) < keep).astype(self.dtype) / self.dtype.type(keep)
                y = y * mask
                masks.append(mask)
            else:
                masks.append(None)
            inp = y
        self._tapes = tapes if training else None
        self._masks = masks
        self._in_shape = x.shape
        return inp, _stacked(hn, cn) if self._has_c else _stacked(hn)

    __call__ = forward

    def backward(self, dy: Any, dstate: Any = None) -> tuple[Array, State]:
        """Backpropagate through time through the last training forward.

        Args:
            dy: dL/dy, shaped like that forward's y.
            dstate: dL/d(final state), shaped like its state ((dh, dc) for LSTM), or None.

        Returns:
            ``(dx, dstate0)``: dL/dx and dL/d(initial state). Parameter gradients are added to
            :attr:`grads`.
        """
        if self._tapes is None:
            raise ValueError(
                "backward needs a forward in training mode first (call layer.train(), then forward)"
            )
        if not all(t is not None and t.pending for t in self._tapes):
            raise ValueError("backward was already run for the last forward; run forward again first")
        # Refuse changed parameters before any layer's backward changes anything. The last layer
        # (whose backward runs first) is checked by that backward itself, before it changes anything.
        for layer, tape in enumerate(self._tapes[:-1]):
            tape.check_weights(self._weights(layer))
        dy = float_array(dy, "dy", self.dtype)
        nd = self.num_directions
        batch = self._in_shape[0] if self.batch_first else self._in_shape[1]
        seq = self._in_shape[1] if self.batch_first else self._in_shape[0]
        want = (
            (batch, seq, nd * self.hidden_size) if self.batch_first else (seq, batch, nd * self.hidden_size)
        )
        if dy.shape != want:
            raise ValueError(f"dy must have the shape of y, {want}; got {dy.shape}")
        dh, dc = self._check_state(dstate, batch, "dstate")
        dh0: list[Array] = []
        dc0: list[Array] = []
        hidden_grads: list[Array] = []
        for layer in reversed(range(self.num_layers)):
            sl = slice(layer * nd, (layer + 1) * nd)
            dh_out = np.empty_like(dy) if self.retain_hidden_grads else None
            dx, h, c = _core.backward(
                self._tapes[layer],
                self._weights(layer),
                dy,
                None if dh is None else np.ascontiguousarray(dh[sl]),
                None if dc is None else np.ascontiguousarray(dc[sl]),
                grads=self._kernel_grads[layer],
                dh_out=dh_out,
            )
            if dh_out is not None:
                hidden_grads.insert(0, dh_out)
            dh0.insert(0, h)
            if c is not None:
                dc0.insert(0, c)
            if layer > 0:
                mask = self._masks[layer - 1]
                dy = dx if mask is None else dx * mask
        self.hidden_grads = hidden_grads
        return dx, _stacked(dh0, dc0) if self._has_c else _stacked(dh0)


class RNN(_Recurrent):
    """Elman RNN, ``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` (``nonlinearity`` "tanh" or "relu"),
    parameter-compatible with ``torch.nn.RNN``."""

    _gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        nonlinearity: str = "tanh",
        **kwargs: Any,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
        self._nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, **kwargs)

    @property
    def nonlinearity(self) -> str:
        """'tanh' or 'relu' (fixed at construction)."""
        return self._nonlinearity

    @property
    def _cell(self) -> str:
        return f"rnn_{self._nonlinearity}"


class LSTM(_Recurrent):
    """Long short-term memory (gates i, f, g, o), parameter-compatible with ``torch.nn.LSTM``.
    The state is a tuple ``(h, c)``."""

    _gates = 4
    _has_c = True

    @property
    def _cell(self) -> str:
        return "lstm"


class GRU(_Recurrent):
    """Gated recurrent unit (gates r, z, n), parameter-compatible with ``torch.nn.GRU``."""

    _gates = 3

    @property
    def _cell(self) -> str:
        return "gru"
