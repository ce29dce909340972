"""The training loop: :func:`fit`, :func:`evaluate`, :func:`predict`, metrics, callbacks, history.

``fit`` draws shuffled mini-batches from a seed (optionally bucketed by length to cut padding),
runs ``model.forward_batch`` → loss → ``model.backward`` → clipping → optimizer step, validates
every epoch, shows a tqdm progress bar with the live loss, calls the callbacks, and returns the
:class:`History`. Long sequences can be trained with truncated backpropagation through time
(``tbptt=k``): each batch is cut into chunks of k steps, the state is carried from one chunk to
the next and the gradient stops at chunk boundaries.

A model states how it is trained: ``default_loss`` (a name from :mod:`rnnkit.losses`),
``default_metrics`` and ``forward_batch(batch) -> (pred, target, loss_lengths)``; a model that
carries state across calls (for ``tbptt``) takes ``state=`` in ``forward_batch`` and exposes
``final_state``. Every model of :mod:`rnnkit.models` does; a plain module gets
``forward(x[, lengths])`` against ``y``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnkit import losses
from rnnkit.clip import clip_grad_norm
from rnnkit.data import Batch, batches, pad_sequences, train_val_split
from rnnkit.module import Module
from rnnkit.optim import Adam, Optimizer
from rnnkit.schedules import ReduceLROnPlateau, Schedule

Array = npt.NDArray[Any]
LossFn = Callable[..., losses.Loss]


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; :attr:`history` holds the epochs
    completed before. The parameters are those of the last finite update."""

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


# ---------------------------------------------------------------------------------------- metrics


def _step_mask(target: Array, lengths: Any) -> Array | None:
    """True at the counted elements of a (B, T, ...) target with per-sequence lengths."""
    if lengths is None or target.ndim < 2:
        return None
    mask = np.arange(target.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return mask.reshape(mask.shape + (1,) * (target.ndim - 2))


def _masked_sum(values: Array, mask: Array | None) -> tuple[float, float]:
    if mask is None:
        return float(values.sum()), float(values.size)
    full = np.broadcast_to(mask, values.shape)
    return float(values[full].sum()), float(full.sum())


def accuracy(pred: Array, target: Array, lengths: Any = None) -> tuple[float, float]:
    """(number correct, number counted): argmax of the logits against integer targets."""
    return _masked_sum(pred.argmax(axis=-1) == target, _step_mask(target, lengths))


def mae(pred: Array, target: Array, lengths: Any = None) -> tuple[float, float]:
    """(sum of absolute errors, number counted)."""
    return _masked_sum(np.abs(pred - target), _step_mask(target, lengths))


def _squared(pred: Array, target: Array, lengths: Any = None) -> tuple[float, float]:
    return _masked_sum(np.square(pred - target, dtype=np.float64), _step_mask(target, lengths))


#: name -> (per-batch (sum, count), final transform of sum/count)
METRICS: dict[str, tuple[Callable[..., tuple[float, float]] | None, Callable[[float], float]]] = {
    "accuracy": (accuracy, lambda v: v),
    "mae": (mae, lambda v: v),
    "rmse": (_squared, math.sqrt),
    "perplexity": (None, lambda v: math.exp(min(v, 700.0))),  # exp of the mean cross-entropy
}


class _Meter:
    """Sums of the loss and the metrics over an epoch, weighted by the counted elements."""

    def __init__(self, metrics: Sequence[str]) -> None:
        self.metrics = metrics
        self.sums = dict.fromkeys(["loss", *metrics], 0.0)
        self.counts = dict.fromkeys(["loss", *metrics], 0.0)

    def add(self, value: float, pred: Array, target: Array, lengths: Any) -> None:
        t = np.asarray(target)
        mask = _step_mask(t, lengths)
        n = float(t.size if mask is None else np.broadcast_to(mask, t.shape).sum())
        self.sums["loss"] += value * n
        self.counts["loss"] += n
        for name in self.metrics:
            fn = METRICS[name][0]
            s, c = (value * n, n) if fn is None else fn(pred, t, lengths)
            self.sums[name] += s
            self.counts[name] += c

    def result(self) -> dict[str, float]:
        out = {}
        for name, s in self.sums.items():
            mean = s / self.counts[name] if self.counts[name] else float("nan")
            out[name] = mean if name == "loss" else METRICS[name][1](mean)
        return out


# ---------------------------------------------------------------------------------------- history


@dataclass
class History:
    """What :func:`fit` measured: ``history["loss"]``, ``history["val_loss"]``, ``history["lr"]``,
    ``history["time"]`` (seconds per epoch) and every metric, one value per epoch."""

    values: dict[str, list[float]] = field(default_factory=dict)
    stopped: str = ""

    def append(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.values.setdefault(k, []).append(v)

    def __getitem__(self, key: str) -> list[float]:
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    @property
    def epochs(self) -> int:
        return len(self.values.get("loss", []))

    def plot(self, path: str | Path) -> Path:
        """Save the learning curves (the loss and each metric, training and validation) as a PNG.
        Needs matplotlib (``pip install rnnkit[examples]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.ticker import MaxNLocator
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib: pip install matplotlib") from e
        names = [k for k in self.values if not k.startswith("val_") and k not in ("lr", "time")]
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
        epochs = range(1, self.epochs + 1)
        for ax, name in zip(axes[0], names, strict=True):
            ax.plot(epochs, self.values[name], label="train", marker=".")
            if f"val_{name}" in self.values:
                ax.plot(epochs, self.values[f"val_{name}"], label="validation", marker=".")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


# ---------------------------------------------------------------------------------------- callbacks


@dataclass
class FitState:
    """What callbacks see: the model, the optimizer, the history so far, the epoch (from 1) and
    the global step; set ``stop_training`` to end training after this epoch."""

    model: Module
    optimizer: Optimizer
    history: History
    epoch: int = 0
    step: int = 0
    stop_training: bool = False


class Callback:
    """Override any of the hooks; ``logs`` holds the figures so far (loss, metrics, val_*)."""

    def on_train_begin(self, state: FitState) -> None:
        """Before the first epoch."""

    def on_batch_end(self, state: FitState, logs: dict[str, float]) -> None:
        """After each optimizer step (``logs``: this batch's ``loss`` and the ``lr``)."""

    def on_epoch_end(self, state: FitState, logs: dict[str, float]) -> None:
        """After each epoch's validation."""

    def on_train_end(self, state: FitState) -> None:
        """After the last epoch (also when stopped early)."""


def _mode(monitor: str, mode: str) -> str:
    if mode == "auto":
        return "max" if any(k in monitor for k in ("accuracy",)) else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min', 'max' or 'auto'; got {mode!r}")
    return mode


class _Monitor(Callback):
    """Tracks the best value of one logged figure."""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        self.monitor = monitor
        self.mode = _mode(monitor, mode)
        self.min_delta = float(min_delta)
        self.best = math.inf if self.mode == "min" else -math.inf

    def _improved(self, logs: dict[str, float]) -> bool:
        if self.monitor not in logs:
            raise KeyError(f"monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
        value = logs[self.monitor]
        better = (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best = value
        return better


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs; with
    ``restore_best`` the parameters of the best epoch are put back at the end."""

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "auto",
        restore_best: bool = True,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        self.patience = int(patience)
        self.restore_best = restore_best
        self.wait = 0
        self.best_state: dict[str, Array] | None = None
        self.best_epoch = 0

    def on_epoch_end(self, state: FitState, logs: dict[str, float]) -> None:
        if self._improved(logs):
            self.wait = 0
            self.best_epoch = state.epoch
            if self.restore_best:
                self.best_state = state.model.state_dict()
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.stop_training = True
            state.history.stopped = (
                f"early stopping: {self.monitor} did not improve for {self.patience} epochs "
                f"(best {self.best:.6g} at epoch {self.best_epoch})"
            )

    def on_train_end(self, state: FitState) -> None:
        if self.restore_best and self.best_state is not None:
            state.model.load_state_dict(self.best_state)


class ModelCheckpoint(_Monitor):
    """Save the model to ``path`` (atomically, with :meth:`Module.save`) whenever ``monitor``
    improves, or after every epoch with ``save_best_only=False``."""

    def __init__(
        self, path: str | Path, monitor: str = "val_loss", *, mode: str = "auto", save_best_only: bool = True
    ) -> None:
        super().__init__(monitor, mode, 0.0)
        self.path = Path(path)
        self.save_best_only = save_best_only

    def on_epoch_end(self, state: FitState, logs: dict[str, float]) -> None:
        if self._improved(logs) or not self.save_best_only:
            state.model.save(self.path)


class _ScheduleCallback(Callback):
    """Steps a learning-rate schedule at its interval (ReduceLROnPlateau with ``val_loss``, or
    the training loss without validation)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def on_batch_end(self, state: FitState, logs: dict[str, float]) -> None:
        if self.schedule.interval == "step":
            self.schedule.step()

    def on_epoch_end(self, state: FitState, logs: dict[str, float]) -> None:
        if self.schedule.interval == "epoch":
            if isinstance(self.schedule, ReduceLROnPlateau):
                self.schedule.step(logs.get("val_loss", logs["loss"]))
            else:
                self.schedule.step()


# ---------------------------------------------------------------------------------------- the loop


def _loss_fn(model: Module, loss: str | LossFn | None) -> LossFn:
    if loss is None:
        name = getattr(model, "default_loss", None)
        if name is None:
            raise ValueError(f"{type(model).__name__} has no default_loss; pass loss= (a name or a function)")
        return losses.get(name)
    return losses.get(loss) if isinstance(loss, str) else loss


def _metrics(model: Module, metrics: Sequence[str] | None, loss: str | LossFn | None) -> list[str]:
    names = list(getattr(model, "default_metrics", ()) if metrics is None else metrics)
    for n in names:
        if n not in METRICS:
            raise ValueError(f"unknown metric {n!r}; choose from {sorted(METRICS)}")
    if "perplexity" in names and _loss_name(model, loss) != "cross_entropy":
        raise ValueError("perplexity is the exponential of a cross-entropy loss; use loss='cross_entropy'")
    return names


def _loss_name(model: Module, loss: str | LossFn | None) -> str | None:
    if loss is None:
        return getattr(model, "default_loss", None)
    return loss if isinstance(loss, str) else None


def _forward_batch(model: Module, batch: Batch, state: Any = None) -> tuple[Array, Any, Any]:
    fb = getattr(model, "forward_batch", None)
    if fb is not None:
        return fb(batch) if state is None else fb(batch, state=state)  # type: ignore[no-any-return]
    if state is not None:
        raise ValueError(f"{type(model).__name__} cannot carry state across chunks (tbptt)")
    pred = model(batch.x, lengths=batch.lengths) if model.takes_lengths else model(batch.x)
    if batch.y_lengths is not None:
        return pred, batch.y, batch.y_lengths
    per_step = batch.y is not None and batch.y.ndim >= 2 and np.ndim(pred) >= 3  # (B, T, ...) targets
    return pred, batch.y, batch.lengths if per_step else None


def _chunks(batch: Batch, k: int, overlap: int) -> Iterable[tuple[Batch, bool]]:
    """Truncated-BPTT chunks of a batch along time, as (chunk, is_first). A chunk spans k steps
    plus ``overlap`` (a language model's inputs and targets are one step apart). Its ``lengths``
    are each sequence's steps in the chunk, at least 1 for the kernels, and its ``y_lengths`` the
    same but 0 for sequences already finished, so the loss ignores them."""
    x = np.asarray(batch.x)
    lengths = None if batch.lengths is None else np.asarray(batch.lengths)
    longest = x.shape[1] if lengths is None else int(lengths.max())
    y = batch.y
    y_in_time = y is not None and np.ndim(y) >= 2 and np.shape(y)[1] == x.shape[1]
    for s in range(0, max(longest - overlap, 1), k):
        end = min(s + k + overlap, longest)
        steps = None if lengths is None else np.clip(lengths - s, 0, end - s)
        yield (
            Batch(
                x=x[:, s:end],
                y=np.asarray(y)[:, s:end] if y_in_time else y,
                lengths=None if steps is None else np.maximum(steps, 1),
                y_lengths=steps,
                index=batch.index,
            ),
            s == 0,
        )


def fit(
    model: Module,
    x: Any,
    y: Any = None,
    *,
    lengths: Any = None,
    epochs: int = 10,
    batch_size: int = 32,
    loss: str | LossFn | None = None,
    optimizer: Optimizer | None = None,
    metrics: Sequence[str] | None = None,
    validation_data: tuple[Any, ...] | None = None,
    validation_split: float | None = None,
    shuffle: bool = True,
    bucket: bool = False,
    seed: int | None = 0,
    clip_norm: float | None = None,
    tbptt: int | None = None,
    callbacks: Sequence[Callback | Schedule] = (),
    progress: bool = True,
    plot: str | Path | None = None,
) -> History:
    """Train ``model`` on ``(x, y)``.

    Args:
        model: any module; the models of :mod:`rnnkit.models` know their loss and metrics.
        x, y: inputs and targets: arrays with the examples on axis 0, or lists of variable-length
            sequences (padded per batch; their lengths are passed to the model and the loss).
        lengths: per-example lengths when ``x`` is a padded array.
        epochs, batch_size: passes over the data and examples per step.
        loss: a name from :mod:`rnnkit.losses` or a function ``(pred, target, lengths=) -> Loss``;
            default the model's ``default_loss``.
        optimizer: default ``Adam(model, lr=1e-3)``.
        metrics: names among "accuracy", "perplexity", "mae", "rmse"; default the model's.
        validation_data: ``(x_val, y_val)`` or ``(x_val, y_val, lengths_val)``, evaluated each epoch.
        validation_split: instead, hold out this fraction of ``(x, y)`` (seeded).
        shuffle, bucket, seed: mini-batch order from ``seed``; ``bucket`` groups similar lengths.
        clip_norm: clip the global gradient norm to this before each step.
        tbptt: truncated BPTT chunk length (models that carry state: LanguageModel, SequenceTagger).
        callbacks: :class:`Callback` objects and learning-rate schedules (stepped at their interval).
        progress: show a tqdm progress bar per epoch with the live loss.
        plot: save the learning curves to this PNG at the end (needs matplotlib).

    Returns:
        The :class:`History`. Raises :class:`TrainingDiverged` if the loss or gradient norm
        becomes NaN or infinite.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, Module):
        raise TypeError(f"model must be an rnnkit Module; got {type(model).__name__}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
    if tbptt is not None and (not isinstance(tbptt, int) or tbptt < 1):
        raise ValueError(f"tbptt must be a positive integer (chunk length in steps); got {tbptt!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be a positive number; got {clip_norm!r}")
    loss_fn = _loss_fn(model, loss)
    metric_names = _metrics(model, metrics, loss)
    opt = Adam(model, lr=1e-3) if optimizer is None else optimizer
    if validation_split is not None:
        if validation_data is not None:
            raise ValueError("give validation_data or validation_split, not both")
        parts = [a for a in (x, y, lengths) if a is not None]
        split = train_val_split(*parts, val_fraction=validation_split, seed=seed)
        train_parts, val_parts = split[0::2], split[1::2]
        x, y = train_parts[0], train_parts[1] if y is not None else None
        lengths = train_parts[-1] if lengths is not None else None
        validation_data = tuple(val_parts)
    data = batches(x, y, lengths=lengths, batch_size=batch_size, shuffle=shuffle, seed=seed, bucket=bucket)
    cbs = [_ScheduleCallback(c) if isinstance(c, Schedule) else c for c in callbacks]
    history = History()
    state = FitState(model=model, optimizer=opt, history=history)
    overlap = int(getattr(model, "tbptt_overlap", 0))
    model.train()
    for cb in cbs:
        cb.on_train_begin(state)
    try:
        for epoch in range(1, epochs + 1):
            state.epoch = epoch
            start = time.perf_counter()
            meter = _Meter(metric_names)
            bar = tqdm(data, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=True)
            for batch in bar:
                pieces = [(batch, True)] if tbptt is None else _chunks(batch, tbptt, overlap)
                carried: Any = None
                for piece, first in pieces:
                    model.zero_grad()
                    pred, target, loss_lengths = _forward_batch(model, piece, None if first else carried)
                    value, grad = loss_fn(pred, target, lengths=loss_lengths)
                    value = float(value)  # a loss for fit reduces to one number
                    if not math.isfinite(value):
                        raise TrainingDiverged(_diverged("loss", value, state, opt), history)
                    model.backward(grad)
                    if clip_norm is not None:
                        try:
                            clip_grad_norm(model, clip_norm, error_if_nonfinite=True)
                        except FloatingPointError as e:
                            message = _diverged("gradient norm", "not finite", state, opt)
                            raise TrainingDiverged(message, history) from e
                    opt.step()
                    carried = getattr(model, "final_state", None)
                    state.step += 1
                    meter.add(value, pred, target, loss_lengths)
                    logs = {"loss": float(value), "lr": opt.lr}
                    for cb in cbs:
                        cb.on_batch_end(state, logs)
                running = meter.sums["loss"] / max(meter.counts["loss"], 1.0)
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            logs = meter.result()
            if validation_data is not None:
                val = evaluate(
                    model, *validation_data, batch_size=batch_size, loss=loss, metrics=metric_names
                )
                logs |= {f"val_{k}": v for k, v in val.items()}
            logs["lr"] = opt.lr
            logs["time"] = time.perf_counter() - start
            history.append(logs)
            if progress:
                bar.write(f"epoch {epoch}/{epochs}: " + "  ".join(_fmt(k, v) for k, v in logs.items()))
            for cb in cbs:
                cb.on_epoch_end(state, logs)
            if state.stop_training:
                if progress and history.stopped:
                    bar.write(history.stopped)
                break
    finally:
        for cb in cbs:
            cb.on_train_end(state)
    if plot is not None:
        history.plot(plot)
    return history


def _fmt(key: str, value: float) -> str:
    if key == "time":
        return f"{value:.1f}s"
    if key == "lr":
        return f"lr {value:.3g}"
    return f"{key} {value:.4f}"


def _diverged(what: str, value: object, state: FitState, opt: Optimizer) -> str:
    return (
        f"training stopped: the {what} became {value} at epoch {state.epoch}, step {state.step + 1}. "
        f"Try a lower learning rate (now {opt.lr:g}), gradient clipping (fit(..., clip_norm=1.0)), "
        "or check the inputs and targets for NaN/Inf."
    )


def _eval_batches(x: Any, y: Any, lengths: Any, batch_size: int) -> Any:
    return batches(x, y, lengths=lengths, batch_size=batch_size, shuffle=False)


def evaluate(
    model: Module,
    x: Any,
    y: Any = None,
    lengths: Any = None,
    *,
    batch_size: int = 256,
    loss: str | LossFn | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """The loss and metrics of ``model`` on ``(x, y)`` in inference mode (its mode is restored)."""
    loss_fn = _loss_fn(model, loss)
    meter = _Meter(_metrics(model, metrics, loss))
    was_training = model.training
    model.eval()
    try:
        for batch in _eval_batches(x, y, lengths, batch_size):
            pred, target, loss_lengths = _forward_batch(model, batch)
            value = loss_fn(pred, target, lengths=loss_lengths).value
            meter.add(float(value), pred, target, loss_lengths)
    finally:
        model.train(was_training)
    return meter.result()


def predict(model: Module, x: Any, lengths: Any = None, *, batch_size: int = 256) -> Array:
    """``model``'s outputs for every example of ``x`` (inference mode), in order. A list of
    variable-length sequences is padded to the longest first."""
    if isinstance(x, list):
        x, lengths = pad_sequences(x)
    was_training = model.training
    model.eval()
    try:
        outs = []
        for batch in _eval_batches(x, None, lengths, batch_size):
            outs.append(model(batch.x, lengths=batch.lengths) if model.takes_lengths else model(batch.x))
    finally:
        model.train(was_training)
    return np.concatenate(outs)
