"""The one protocol every layer, container and model speaks.

No autograd: each module's ``backward`` knows its own derivative and containers chain them.

* ``forward(...)`` (also ``__call__``) computes the output and, in training mode, keeps what its
  backward needs; ``backward(grad)`` takes dL/d(output) of that last forward, **adds** the parameter
  gradients into :attr:`Module.grads` and returns dL/d(input) (None for integer inputs).
* :attr:`Module.params` and :attr:`Module.grads` are mappings with the same keys, dotted for nested
  modules (``"encoder.weight_ih_l0"``). Their values are the live arrays: optimizers update them in
  place, and assigning to a key copies into the array, so references to it stay valid.
* ``zero_grad``, ``train``/``eval``, ``state_dict``/``load_state_dict`` (parameters and buffers,
  PyTorch's names), ``num_parameters`` and ``summary``.
* The constructor's arguments are recorded, so :func:`rnnkit.load` can rebuild any module from a
  saved file (see :mod:`rnnkit.io`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from rnnkit._checks import from_torch

Array = npt.NDArray[Any]

#: Every Module subclass by "module.QualName", so a saved file names its classes without pickling.
REGISTRY: dict[str, type[Module]] = {}


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ArrayDict(Mapping[str, Array]):
    """A module's arrays by name. The keys are fixed; assigning to a key copies the value *into*
    the existing array (so ``params[k] = new`` and ``params[k] *= 0.5`` both update in place and
    every reference to the array, an optimizer's say, stays valid)."""

    __slots__ = ("_arrays",)

    def __init__(self, arrays: dict[str, Array]) -> None:
        self._arrays = arrays

    def __getitem__(self, key: str) -> Array:
        return self._arrays[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._arrays:
            raise KeyError(f"{key!r} is not one of the names: {sorted(self._arrays)}")
        target = self._arrays[key]
        if value is not target:
            target[...] = _as_like(value, target, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: array{v.shape} {v.dtype}" for k, v in self._arrays.items()) + "}"


class Module:
    """Base class of layers, containers and models.

    A subclass calls ``super().__init__()`` first, then registers its parameters with
    :meth:`add_param`, its non-trainable state with :meth:`add_buffer`, and its sub-modules by
    plain attribute assignment (``self.rnn = LSTM(...)``). It implements :meth:`forward` and
    :meth:`backward`, and overrides :meth:`_set_training` if a mode change must drop saved state.
    """

    #: True for layers whose forward returns ``(output, state)`` (the recurrent layers):
    #: :class:`~rnnkit.layers.Sequential` passes the output on and backpropagates with no state grad.
    returns_state: ClassVar[bool] = False
    #: True for modules whose forward takes ``lengths=`` (per-sequence valid lengths).
    takes_lengths: ClassVar[bool] = False

    training: bool
    _params: dict[str, Array]
    _grads: dict[str, Array]
    _buffers: dict[str, Array]
    _modules: dict[str, Module]
    _init_args: tuple[Any, ...]
    _init_kwargs: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[class_name(cls)] = cls
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Module, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:  # the outermost constructor records its arguments
                bound = sig.bind(self, *args, **kw)
                object.__setattr__(self, "_init_args", bound.args[1:])
                object.__setattr__(self, "_init_kwargs", dict(bound.kwargs))
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def __init__(self) -> None:
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_grads", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name[:1] != "_":  # a private attribute is never a sub-module (the layers' per-call state)
            if isinstance(value, Module):
                self._modules[name] = value
            elif name in self.__dict__.get("_modules", ()):
                del self._modules[name]
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ registration

    def add_param(self, name: str, value: Array) -> Array:
        """Register a trainable array (and its zero gradient) under ``name``; returns it."""
        self._params[name] = value
        self._grads[name] = np.zeros_like(value)
        return value

    def add_buffer(self, name: str, value: Array) -> Array:
        """Register a non-trainable array saved with the state (a scaler's statistics, say)."""
        self._buffers[name] = value
        return value

    # ------------------------------------------------------------------ the protocol

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the output (and, in training mode, keep what :meth:`backward` needs)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def backward(self, *grads: Any, **kwargs: Any) -> Any:
        """dL/d(input) from dL/d(output) of the last training forward; parameter gradients are
        added to :attr:`grads`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every module inside it, with dotted names ("" for this one)."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _collect(self, attr: str) -> ArrayDict:
        if not self._modules:
            return ArrayDict(getattr(self, attr))
        out: dict[str, Array] = {}
        for name, module in self.named_modules():
            pre = f"{name}." if name else ""
            out.update((pre + k, v) for k, v in getattr(module, attr).items())
        return ArrayDict(out)

    @property
    def params(self) -> ArrayDict:
        """The trainable arrays by (dotted) name (assignment copies into the existing array)."""
        return self._collect("_params")

    @property
    def grads(self) -> ArrayDict:
        """dL/d(parameter), keyed like :attr:`params`, accumulated by :meth:`backward`."""
        return self._collect("_grads")

    @property
    def buffers(self) -> ArrayDict:
        """The non-trainable saved state by (dotted) name."""
        return self._collect("_buffers")

    def zero_grad(self) -> None:
        """Set every gradient to zero."""
        for g in self.grads.values():
            g.fill(0)

    def num_parameters(self) -> int:
        """The number of trainable scalars."""
        return int(sum(p.size for p in self.params.values()))

    def train(self, mode: bool = True) -> Any:
        """Training mode (forward keeps what backward needs, dropout is on); returns ``self``."""
        for _, module in self.named_modules():
            module._set_training(bool(mode))
        return self

    def eval(self) -> Any:
        """Inference mode (forward keeps nothing, dropout is off); returns ``self``."""
        return self.train(False)

    def _set_training(self, mode: bool) -> None:
        object.__setattr__(self, "training", mode)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Array]:
        """A copy of the parameters and buffers, by (dotted) name; for the recurrent layers the
        names and shapes are PyTorch's."""
        return {k: v.copy() for k, v in (*self.params.items(), *self.buffers.items())}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy parameters and buffers in from ``state`` (NumPy arrays or PyTorch tensors).

        Every entry is checked before anything is copied, so a refused state changes nothing.
        With ``strict=False``, missing and extra names are ignored (shapes must still match).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of arrays; got {type(state).__name__}")
        targets = {**self.params, **self.buffers}
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if strict and (missing or unexpected):
            raise ValueError(
                f"state does not match {type(self).__name__}'s parameters and buffers: "
                f"missing {missing}, unexpected {unexpected}"
            )
        converted = {}
        for k in targets.keys() & state.keys():
            converted[k] = _as_like(state[k], targets[k], f"state[{k!r}]")
        for k, v in converted.items():
            targets[k][...] = v

    def save(self, path: Any) -> None:
        """Write the configuration and the state to one file, atomically (see :func:`rnnkit.save`);
        :func:`rnnkit.load` rebuilds the module from it."""
        from rnnkit.io import save

        save(self, path)

    # ------------------------------------------------------------------ printing

    def extra_repr(self) -> str:
        """The constructor's arguments as shown by ``repr`` (override for a shorter form)."""
        parts = [_short(a) for a in self._init_args if not isinstance(a, Module)]
        parts += [f"{k}={_short(v)}" for k, v in self._init_kwargs.items() if not isinstance(v, Module)]
        return ", ".join(parts)

    def __repr__(self) -> str:
        head = f"{type(self).__name__}({self.extra_repr()})"
        if not self._modules:
            return head
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)

    def summary(self) -> str:
        """A table of every module inside this one with its parameter count, and the total."""
        rows = [("name", "module", "parameters")]
        for name, module in self.named_modules():
            own = int(sum(p.size for p in module._params.values()))
            kind = type(module).__name__ if module._modules else repr(module)
            rows.append((name or "(model)", kind, f"{own:,}" if own or not module._modules else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        rule = "-" * len(lines[0])
        total = f"total: {self.num_parameters():,} trainable parameters"
        return "\n".join([lines[0], rule, *lines[1:], rule, total])


def _short(value: Any) -> str:
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value).name
    if isinstance(value, np.random.Generator):
        return "Generator"
    return repr(value)


def _as_like(value: Any, like: Array, name: str) -> Array:
    """``value`` converted to ``like``'s dtype and checked to have its shape."""
    try:
        arr = np.asarray(from_torch(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array; could not convert it: {e}") from e
    kind = "floating-point" if like.dtype.kind == "f" else "integer"
    if arr.dtype.kind not in "fiub" or (like.dtype.kind == "f") != (arr.dtype.kind == "f"):
        raise TypeError(f"{name} must be a {kind} array; got dtype {arr.dtype}")
    if arr.shape != like.shape:
        raise ValueError(f"{name} has shape {arr.shape}; expected {like.shape}")
    return arr.astype(like.dtype, copy=False)
