"""Optimizers that update a model's parameters in place from its accumulated gradients.

The update rules are PyTorch's (``torch.optim``), step for step: SGD (momentum, dampening,
Nesterov), Adam and AdamW (bias corrections, AMSGrad), RMSprop (centered, momentum) and Adagrad
(learning-rate decay, initial accumulator). Weight decay is added to the gradient, except in AdamW,
which shrinks the parameters directly (decoupled weight decay).

An optimizer works on a :class:`~rnnkit.module.Module` (its :attr:`~rnnkit.module.Module.params`
and :attr:`~rnnkit.module.Module.grads`) or on ``(param, grad)`` array pairs. All its state is
allocated once, at construction, and :meth:`Optimizer.step` runs in-place ufuncs only, so a training
step allocates nothing here. The learning rate :attr:`Optimizer.lr` may be changed at any time (the
schedules in :mod:`rnnkit.schedules` do).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from rnnkit._checks import FLOAT_DTYPES, nonnegative_number
from rnnkit.module import Module

Array = npt.NDArray[Any]

#: Per-parameter state: the state arrays by name (PyTorch's names: "exp_avg", "momentum_buffer", ...).
State = dict[str, Array]
#: What an optimizer optimizes: a Module, or (param, grad) array pairs.
Params = Module | Iterable[tuple[Array, Array]]
_STATE_KEYS = frozenset({"optimizer", "step_count", "hyperparameters", "state"})


def _named_pairs(params: Any) -> list[tuple[str, Array, Array]]:
    """``(name, param, grad)`` for a Module or for an iterable of ``(param, grad)`` pairs, checked.

    A Module's parameters are named as in :attr:`~rnnkit.module.Module.params`; pairs by position.
    """
    if isinstance(params, Module):
        ps, gs = params.params, params.grads
        triples = [(k, ps[k], gs[k]) for k in ps]
        label = "params[{!r}]"
    elif isinstance(params, np.ndarray) or not isinstance(params, Iterable):
        raise TypeError(
            "params must be a Module or an iterable of (param, grad) array pairs; "
            f"got {type(params).__name__}"
        )
    else:
        triples = []
        for i, pair in enumerate(params):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"params[{i}] must be a (param, grad) pair of arrays; got {pair!r:.80}")
            triples.append((str(i), pair[0], pair[1]))
        label = "params[{}]"
    if not triples:
        raise ValueError("params is empty: there is nothing to optimize")
    seen: set[int] = set()
    for name, p, g in triples:
        where = label.format(name)
        if not isinstance(p, np.ndarray) or p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where} must be a float32 or float64 NumPy array (it is updated in place)")
        if not p.flags.writeable:
            raise ValueError(f"{where} is read-only; it must be writeable to be updated in place")
        if not isinstance(g, np.ndarray) or g.dtype != p.dtype or g.shape != p.shape:
            got = f"{g.dtype} {g.shape}" if isinstance(g, np.ndarray) else type(g).__name__
            raise ValueError(
                f"the gradient of {where} must be a {p.dtype} array of shape {p.shape}; not {got}"
            )
        if id(p) in seen:
            raise ValueError(f"{where} appears more than once")
        seen.add(id(p))
    return triples


def _scratch(arrays: list[Array]) -> list[Array]:
    """One scratch view per array, of its shape and dtype, all sharing one buffer per dtype."""
    sizes: dict[np.dtype[Any], int] = {}
    for a in arrays:
        sizes[a.dtype] = max(sizes.get(a.dtype, 0), a.size)
    flat = {dt: np.empty(n, dt) for dt, n in sizes.items()}
    return [flat[a.dtype][: a.size].reshape(a.shape) for a in arrays]


class Optimizer:
    """Shared machinery: parameter collection, weight decay, the step loop, state and ``repr``.

    A subclass lists its hyper-parameters in ``_hyper`` (attributes set by its constructor), creates
    its per-parameter state in :meth:`_new_state`, computes per-step scalars in :meth:`_begin_step`
    and updates one parameter in :meth:`_update`.

    Args:
        params: A :class:`~rnnkit.module.Module` or an iterable of ``(param, grad)`` array pairs.
        lr: Learning rate (>= 0).
        weight_decay: L2 penalty (>= 0).
    """

    #: Names of the hyper-parameters (besides ``lr``) shown by ``repr`` and saved by :meth:`state_dict`.
    _hyper: ClassVar[tuple[str, ...]] = ("weight_decay",)
    #: Whether weight decay shrinks the parameters directly (AdamW) instead of adding to the gradient.
    _decoupled_weight_decay: ClassVar[bool] = False

    def __init__(self, params: Params, lr: float, weight_decay: float) -> None:
        self.lr = lr
        self.weight_decay = nonnegative_number(weight_decay, "weight_decay")
        triples = _named_pairs(params)
        self._names = [name for name, _, _ in triples]
        self._params = [p for _, p, _ in triples]
        self._grads = [g for _, _, g in triples]
        self._state = [self._new_state(p) for p in self._params]
        self._decay_buf = _scratch(self._params)
        self._work_buf = _scratch(self._params)
        #: The number of steps taken.
        self.step_count = 0

    @property
    def lr(self) -> float:
        """The learning rate; may be set at any time (schedules do)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = nonnegative_number(value, "lr")

    def _new_state(self, param: Array) -> State:
        """The initial state arrays of ``param``."""
        raise NotImplementedError

    def _begin_step(self) -> None:
        """Compute the scalars this step shares across parameters (``step_count`` is already updated)."""

    def _update(self, param: Array, grad: Array, state: State, work: Array) -> None:
        """Update ``param`` in place from ``grad`` (weight decay included); ``work`` is scratch space."""
        raise NotImplementedError

    def step(self) -> None:
        """Update every parameter in place from its current gradient."""
        self.step_count += 1
        self._begin_step()
        wd = self.weight_decay
        shrink = 1.0 - self._lr * wd
        for p, g, state, decay, work in zip(
            self._params, self._grads, self._state, self._decay_buf, self._work_buf, strict=True
        ):
            if wd and self._decoupled_weight_decay:
                p *= shrink
            elif wd:
                np.multiply(p, wd, out=decay)
                decay += g
                g = decay
            self._update(p, g, state, work)

    def zero_grad(self) -> None:
        """Set every gradient to zero."""
        for g in self._grads:
            g.fill(0)

    def hyperparameters(self) -> dict[str, Any]:
        """The learning rate and the other hyper-parameters, by name."""
        return {"lr": self._lr, **{name: getattr(self, name) for name in self._hyper}}

    def state_dict(self) -> dict[str, Any]:
        """A copy of everything needed to resume: step count, hyper-parameters and state arrays.

        Returns:
            ``{"optimizer", "step_count", "hyperparameters", "state"}``; ``state`` maps each
            parameter's name (a Module's parameter name, or its position) to its state arrays.
        """
        return {
            "optimizer": type(self).__name__,
            "step_count": self.step_count,
            "hyperparameters": self.hyperparameters(),
            "state": {
                name: {k: v.copy() for k, v in s.items()}
                for name, s in zip(self._names, self._state, strict=True)
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output: step count, learning rate and state arrays.

        The other hyper-parameters stay as constructed. Everything is checked before anything is
        copied, so a refused state changes nothing.

        Args:
            state: What :meth:`state_dict` returned (for the same parameters and options).
        """
        if not (isinstance(state, Mapping) and _STATE_KEYS <= state.keys()):
            raise TypeError("state must be a dict returned by Optimizer.state_dict")
        if state["optimizer"] != type(self).__name__:
            raise ValueError(f"state is from a {state['optimizer']} optimizer, not a {type(self).__name__}")
        saved = state["state"]
        if set(saved) != set(self._names):
            raise ValueError(
                f"state has parameters {sorted(saved)}; this optimizer has {sorted(self._names)}"
            )
        for name, own in zip(self._names, self._state, strict=True):
            if set(saved[name]) != set(own):
                raise ValueError(
                    f"state[{name!r}] has {sorted(saved[name])}; expected {sorted(own)} "
                    "(was it saved with other options?)"
                )
            for k, arr in own.items():
                if np.shape(saved[name][k]) != arr.shape:
                    raise ValueError(
                        f"state[{name!r}][{k!r}] has shape {np.shape(saved[name][k])}; expected {arr.shape}"
                    )
        self.lr = state["hyperparameters"]["lr"]
        self.step_count = int(state["step_count"])
        for name, own in zip(self._names, self._state, strict=True):
            for k, arr in own.items():
                arr[...] = saved[name][k]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent, with optional (Nesterov) momentum; ``torch.optim.SGD``'s rule.

    With ``d = grad + weight_decay*param``: ``b = d`` on the first step, then
    ``b = momentum*b + (1-dampening)*d``; the update direction is ``d + momentum*b`` (Nesterov) or
    ``b`` (``d`` without momentum), and ``param -= lr * direction``.

    Args:
        params: A :class:`~rnnkit.module.Module` or an iterable of ``(param, grad)`` array pairs.
        lr: Learning rate (>= 0).
        momentum: Momentum factor (>= 0).
        dampening: Dampening of the momentum, in [0, 1].
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty added to the gradient (>= 0).
    """

    _hyper = ("momentum", "dampening", "nesterov", "weight_decay")

    def __init__(
        self,
        params: Params,
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        nesterov: bool = False,
        weight_decay: float = 0,
    ) -> None:
        self.momentum = nonnegative_number(momentum, "momentum")
        self.dampening = nonnegative_number(dampening, "dampening", at_most=1.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening == 0")
        super().__init__(params, lr, weight_decay)

    def _new_state(self, param: Array) -> State:
        return {"momentum_buffer": np.zeros_like(param)} if self.momentum else {}

    def _update(self, param: Array, grad: Array, state: State, work: Array) -> None:
        mu = self.momentum
        if not mu:
            np.multiply(grad, -self._lr, out=work)
            param += work
            return
        buf = state["momentum_buffer"]
        if self.step_count == 1:
            np.copyto(buf, grad)
        else:
            np.multiply(grad, 1.0 - self.dampening, out=work)
            buf *= mu
            buf += work
        if self.nesterov:
            np.multiply(buf, mu, out=work)
            work += grad
            work *= -self._lr
        else:
            np.multiply(buf, -self._lr, out=work)
        param += work


class Adam(Optimizer):
    """Adam (optionally AMSGrad); ``torch.optim.Adam``'s rule.

    With ``d = grad + weight_decay*param`` and step ``t``: ``m = b1*m + (1-b1)*d``,
    ``v = b2*v + (1-b2)*d**2`` (AMSGrad: ``v_max = max(v_max, v)`` is used in place of ``v``),
    ``param -= lr/(1-b1**t) * m / (sqrt(v/(1-b2**t)) + eps)``.

    Args:
        params: A :class:`~rnnkit.module.Module` or an iterable of ``(param, grad)`` array pairs.
        lr: Learning rate (>= 0).
        betas: ``(b1, b2)``, the decay rates of the moment estimates, each in [0, 1).
        eps: Added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        amsgrad: Use the maximum of the second-moment estimates so far.
    """

    _hyper = ("betas", "eps", "weight_decay", "amsgrad")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
    ) -> None:
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2); got {betas!r}")
        self.betas = (
            nonnegative_number(betas[0], "betas[0]", below=1.0),
            nonnegative_number(betas[1], "betas[1]", below=1.0),
        )
        self.eps = nonnegative_number(eps, "eps")
        self.amsgrad = bool(amsgrad)
        super().__init__(params, lr, weight_decay)

    def _new_state(self, param: Array) -> State:
        names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if self.amsgrad else ("exp_avg", "exp_avg_sq")
        return {name: np.zeros_like(param) for name in names}

    def _begin_step(self) -> None:
        b1, b2 = self.betas
        self._step_size = self._lr / (1.0 - b1**self.step_count)
        self._sqrt_bias2 = math.sqrt(1.0 - b2**self.step_count)

    def _update(self, param: Array, grad: Array, state: State, work: Array) -> None:
        b1, b2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        np.subtract(grad, m, out=work)  # m += (1-b1)*(d-m), i.e. m = b1*m + (1-b1)*d
        work *= 1.0 - b1
        m += work
        np.multiply(grad, grad, out=work)
        work *= 1.0 - b2
        v *= b2
        v += work
        if self.amsgrad:
            v = np.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        np.sqrt(v, out=work)
        work /= self._sqrt_bias2
        work += self.eps
        np.divide(m, work, out=work)
        work *= -self._step_size
        param += work


class AdamW(Adam):
    """Adam with decoupled weight decay; ``torch.optim.AdamW``'s rule.

    Each step first shrinks the parameters, ``param *= 1 - lr*weight_decay``, then applies Adam's
    update to the plain gradient.

    Args:
        params: A :class:`~rnnkit.module.Module` or an iterable of ``(param, grad)`` array pairs.
        lr: Learning rate (>= 0).
        betas: ``(b1, b2)``, the decay rates of the moment estimates, each in [0, 1).
        eps: Added to the denominator (>= 0).
        weight_decay: Decoupled weight decay (>= 0).
        amsgrad: Use the maximum of the second-moment estimates so far.
    """

    _decoupled_weight_decay = True

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


class RMSprop(Optimizer):
    """RMSprop (optionally centered, with momentum); ``torch.optim.RMSprop``'s rule.

    With ``d = grad + weight_decay*param``: ``v = alpha*v + (1-alpha)*d**2``; centered:
    ``g_avg = alpha*g_avg + (1-alpha)*d`` and ``v - g_avg**2`` replaces ``v`` below;
    ``u = d / (sqrt(v) + eps)``; with momentum ``b = momentum*b + u`` and ``param -= lr*b``,
    otherwise ``param -= lr*u``.

    Args:
        params: A :class:`~rnnkit.module.Module` or an iterable of ``(param, grad)`` array pairs.
        lr: Learning rate (>= 0).
        alpha: Smoothing constant of the squared-gradient average, in [0, 1].
        eps: Added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        momentum: Momentum factor (>= 0).
        centered: Normalise by the estimated variance of the gradient instead of its second moment.
    """

    _hyper = ("alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
    ) -> None:
        self.alpha = nonnegative_number(alpha, "alpha", at_most=1.0)
        self.eps = nonnegative_number(eps, "eps")
        self.momentum = nonnegative_number(momentum, "momentum")
        self.centered = bool(centered)
        super().__init__(params, lr, weight_decay)

    def _new_state(self, param: Array) -> State:
        names = ["square_avg"]
        if self.momentum:
            names.append("momentum_buffer")
        if self.centered:
            names.append("grad_avg")
        return {name: np.zeros_like(param) for name in names}

    def _update(self, param: Array, grad: Array, state: State, work: Array) -> None:
        a = self.alpha
        v = state["square_avg"]
        np.multiply(grad, grad, out=work)
        work *= 1.0 - a
        v *= a
        v += work
        if self.centered:
            g_avg = state["grad_avg"]
            np.subtract(grad, g_avg, out=work)  # g_avg += (1-a)*(d-g_avg)
            work *= 1.0 - a
            g_avg += work
            np.multiply(g_avg, g_avg, out=work)
            np.subtract(v, work, out=work)
            np.sqrt(work, out=work)
        else:
            np.sqrt(v, out=work)
        work += self.eps
        np.divide(grad, work, out=work)
        if self.momentum:
            buf = state["momentum_buffer"]
            buf *= self.momentum
            buf += work
            np.multiply(buf, -self._lr, out=work)
        else:
            work *= -self._lr
        param += work


class Adagrad(Optimizer):
    """Adagrad; ``torch.optim.Adagrad``'s rule.

    With ``d = grad + weight_decay*param`` and step ``t``: ``s += d**2`` (``s`` starts at
    ``initial_accumulator_value``), ``param -= lr/(1 + (t-1)*lr_decay) * d / (sqrt(s) + eps)``.

    Args:
        params: A :class:`~rnnkit.module.Module` or an iterable of ``(param, grad)`` array pairs.
        lr: Learning rate (>= 0).
        lr_decay: Learning-rate decay per step (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        initial_accumulator_value: Starting value of the sum of squared gradients (>= 0).
        eps: Added to the denominator (>= 0).
    """

    _hyper = ("lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
    ) -> None:
        self.lr_decay = nonnegative_number(lr_decay, "lr_decay")
        self.initial_accumulator_value = nonnegative_number(
            initial_accumulator_value, "initial_accumulator_value"
        )
        self.eps = nonnegative_number(eps, "eps")
        super().__init__(params, lr, weight_decay)

    def _new_state(self, param: Array) -> State:
        return {"sum": np.full_like(param, self.initial_accumulator_value)}

    def _begin_step(self) -> None:
        self._clr = self._lr / (1.0 + (self.step_count - 1) * self.lr_decay)

    def _update(self, param: Array, grad: Array, state: State, work: Array) -> None:
        s = state["sum"]
        np.multiply(grad, grad, out=work)
        s += work
        np.sqrt(s, out=work)
        work += self.eps
        np.divide(grad, work, out=work)
        work *= -self._clr
        param += work
