"""Learning-rate schedules: each sets its optimizer's :attr:`~rnnkit.optim.Optimizer.lr` when stepped.

Call :meth:`Schedule.step` after the optimizer's step, once per epoch or once per optimizer step as
the schedule's :attr:`Schedule.interval` says. :class:`StepLR`, :class:`ExponentialLR` and
:class:`ReduceLROnPlateau` follow PyTorch's schedulers exactly (they multiply the optimizer's current
learning rate, so they give the very same floats); :class:`CosineWarmup` is a closed form of the
step count.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from rnnkit._checks import nonnegative_number, positive_int
from rnnkit.optim import Optimizer

INTERVALS = ("epoch", "step")


class Schedule:
    """Base class: holds the optimizer, the base learning rate and the number of steps taken.

    A subclass computes the next learning rate in :meth:`_next_lr` and lists any further state it
    keeps in ``_extra_state``.

    Args:
        optimizer: The optimizer whose ``lr`` this schedule sets; its current ``lr`` is the base.
        interval: ``"epoch"`` or ``"step"``: how often a training loop should call :meth:`step`.
    """

    #: Attributes (besides the step count and base lr) saved by :meth:`state_dict`.
    _extra_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, optimizer: Optimizer, interval: str = "epoch") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be an rnnkit.optim.Optimizer; got {type(optimizer).__name__}")
        if interval not in INTERVALS:
            raise ValueError(f"interval must be 'epoch' or 'step'; got {interval!r}")
        self.optimizer = optimizer
        self.interval = interval
        #: The learning rate the optimizer had when the schedule was created.
        self.base_lr = optimizer.lr
        #: The number of calls to :meth:`step` so far.
        self.last_step = 0

    @property
    def lr(self) -> float:
        """The optimizer's current learning rate."""
        return self.optimizer.lr

    def _next_lr(self, lr: float, metric: float | None) -> float:
        """The learning rate after step number :attr:`last_step` (already incremented), given the
        current one."""
        raise NotImplementedError

    def step(self, metric: float | None = None) -> None:
        """Advance by one epoch or step and set the optimizer's learning rate.

        Args:
            metric: The monitored quantity (validation loss, say); needed by
                :class:`ReduceLROnPlateau`, ignored by the others.
        """
        self.last_step += 1
        self.optimizer.lr = self._next_lr(self.optimizer.lr, metric)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress: step count, base and current learning rate, and its own state."""
        state = {"last_step": self.last_step, "base_lr": self.base_lr, "lr": self.optimizer.lr}
        return state | {name: getattr(self, name) for name in self._extra_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output; also sets the optimizer's learning rate to the
        saved one.

        Args:
            state: What :meth:`state_dict` returned, for the same kind of schedule.
        """
        keys = {"last_step", "base_lr", "lr", *self._extra_state}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state must be a {type(self).__name__} state_dict with keys {sorted(keys)}; got {got}"
            )
        self.optimizer.lr = state["lr"]
        self.last_step = int(state["last_step"])
        self.base_lr = float(state["base_lr"])
        for name in self._extra_state:
            setattr(self, name, state[name])


class StepLR(Schedule):
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (``torch``'s ``StepLR``).

    Args:
        optimizer: The optimizer to schedule.
        step_size: Steps between decays.
        gamma: Multiplicative factor (> 0).
        interval: ``"epoch"`` or ``"step"``.
    """

    def __init__(
        self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, interval: str = "epoch"
    ) -> None:
        super().__init__(optimizer, interval)
        self.step_size = positive_int(step_size, "step_size")
        self.gamma = _positive(gamma, "gamma")

    def _next_lr(self, lr: float, metric: float | None) -> float:
        return lr * self.gamma if self.last_step % self.step_size == 0 else lr


class ExponentialLR(Schedule):
    """Multiply the learning rate by ``gamma`` at every step (``torch``'s ``ExponentialLR``).

    Args:
        optimizer: The optimizer to schedule.
        gamma: Multiplicative factor (> 0).
        interval: ``"epoch"`` or ``"step"``.
    """

    def __init__(self, optimizer: Optimizer, gamma: float, interval: str = "epoch") -> None:
        super().__init__(optimizer, interval)
        self.gamma = _positive(gamma, "gamma")

    def _next_lr(self, lr: float, metric: float | None) -> float:
        return lr * self.gamma


class CosineWarmup(Schedule):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_lr``.

    After ``t`` steps the rate is ``base * (t + 1) / warmup_steps`` for ``t < warmup_steps`` (so the
    first update already moves, at ``base / warmup_steps``), then
    ``min_lr + (base - min_lr) * (1 + cos(pi * (t - warmup_steps) / (total_steps - warmup_steps))) / 2``
    up to ``total_steps``, and ``min_lr`` after. Creating the schedule sets the rate for ``t = 0``.

    Args:
        optimizer: The optimizer to schedule; its current ``lr`` is the peak.
        warmup_steps: Steps of linear warm-up (>= 0).
        total_steps: Steps until ``min_lr`` is reached (> ``warmup_steps``).
        min_lr: The final learning rate, in [0, base lr].
        interval: ``"step"`` (default) or ``"epoch"``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
        interval: str = "step",
    ) -> None:
        super().__init__(optimizer, interval)
        self.warmup_steps = positive_int(warmup_steps, "warmup_steps", minimum=0)
        self.total_steps = positive_int(total_steps, "total_steps", minimum=self.warmup_steps + 1)
        self.min_lr = nonnegative_number(min_lr, "min_lr", at_most=self.base_lr)
        optimizer.lr = self._next_lr(self.base_lr, None)

    def _next_lr(self, lr: float, metric: float | None) -> float:
        t = self.last_step
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        progress = min(1.0, (t - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ReduceLROnPlateau(Schedule):
    """Multiply the learning rate by ``factor`` when a metric stops improving (``torch``'s semantics).

    A step is an improvement when the metric beats the best so far by more than ``threshold``
    (relative: ``best * (1 -/+ threshold)``, or absolute: ``best -/+ threshold``). After more than
    ``patience`` steps without one, the rate becomes ``max(lr * factor, min_lr)`` (unless that changes
    it by less than 1e-8), and the next ``cooldown`` steps are not counted as bad.

    Args:
        optimizer: The optimizer to schedule.
        mode: ``"min"`` (lower is better, a loss) or ``"max"`` (an accuracy).
        factor: Multiplicative factor, in [0, 1).
        patience: Steps without improvement tolerated before reducing.
        threshold: The least change that counts as an improvement (>= 0).
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: Steps after a reduction during which bad steps are not counted.
        min_lr: Lower bound of the learning rate (>= 0).
    """

    _extra_state = ("best", "num_bad_steps", "cooldown_counter")
    #: Reductions smaller than this are not applied (PyTorch's ``eps``).
    EPS: ClassVar[float] = 1e-8

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__(optimizer, "epoch")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs'; got {threshold_mode!r}")
        self.mode = mode
        self.threshold_mode = threshold_mode
        self.factor = nonnegative_number(factor, "factor", below=1.0)
        self.patience = positive_int(patience, "patience", minimum=0)
        self.threshold = nonnegative_number(threshold, "threshold")
        self.cooldown = positive_int(cooldown, "cooldown", minimum=0)
        self.min_lr = nonnegative_number(min_lr, "min_lr")
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_steps = 0
        self.cooldown_counter = 0

    def _is_better(self, value: float) -> bool:
        sign = 1.0 if self.mode == "min" else -1.0
        if self.threshold_mode == "rel":
            return sign * value < sign * self.best * (1.0 - sign * self.threshold)
        return sign * value < sign * self.best - self.threshold

    def _next_lr(self, lr: float, metric: float | None) -> float:
        if metric is None:
            raise TypeError("ReduceLROnPlateau.step needs the monitored metric: step(metric)")
        value = float(metric)
        if self._is_better(value):
            self.best = value
            self.num_bad_steps = 0
        else:
            self.num_bad_steps += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_steps = 0
        if self.num_bad_steps > self.patience:
            self.cooldown_counter = self.cooldown
            self.num_bad_steps = 0
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > self.EPS:
                return new_lr
        return lr


def _positive(value: Any, name: str) -> float:
    """``value`` as a finite float > 0."""
    v = nonnegative_number(value, name)
    if v == 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return v
