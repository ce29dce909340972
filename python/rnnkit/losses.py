"""Loss functions: each returns the loss value and its gradient with respect to the prediction.

No autograd here either: a loss hands back ``Loss(value, grad)`` and ``grad`` goes straight into the
model's :meth:`~rnnkit.module.Module.backward`.

Every loss takes three keyword arguments that decide which elements count:

* ``mask``: a boolean array broadcastable to the per-element loss shape, True where the element counts;
* ``lengths``: per-sequence valid lengths for batch-first sequences (time is axis 1): steps
  ``t >= lengths[b]`` count for nothing;
* ``reduction``: ``"mean"`` (sum over counted elements divided by their number, or by their total
  class weight), ``"sum"``, or ``"none"`` (the per-element losses, 0 where not counted).

Elements that do not count have loss 0 and gradient 0, and whatever they hold (NaN, Inf, an
out-of-range class) never reaches the value or the gradient. When nothing counts, ``"mean"`` gives 0
(PyTorch would give NaN). Everything is computed in the prediction's dtype (float32 or float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from rnnkit._checks import FLOAT_DTYPES, float_array, from_torch

Array = npt.NDArray[Any]

REDUCTIONS = ("mean", "sum", "none")


class Loss(NamedTuple):
    """A loss value and its gradient.

    Attributes:
        value: The reduced loss as a Python float (``"mean"``/``"sum"``), or the per-element losses
            as an array (``"none"``).
        grad: d(value)/d(prediction) (for ``"none"``, of the sum of the per-element losses), with
            the prediction's shape and dtype.
    """

    value: float | Array
    grad: Array


# ---------------------------------------------------------------------------------------- helpers


def _prediction(value: Any, name: str) -> Array:
    """``value`` as a float32/float64 array (the dtype every computation then uses)."""
    arr = np.asarray(from_torch(value))
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array; got dtype {arr.dtype}")
    return arr


def _real_target(value: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    """A real-valued ``target`` (bool, integer or float) of ``shape``, as ``dtype``."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"target must be a real-valued array; got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"target must have the prediction's shape {shape}; got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def _counted(shape: tuple[int, ...], mask: Any, lengths: Any) -> Array | None:
    """The boolean array of ``shape`` marking the elements that count (None: all of them)."""
    keep: Array | None = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array (True = counts); got dtype {m.dtype}")
        try:
            keep = np.broadcast_to(m, shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {m.shape} cannot be broadcast to the per-element loss shape {shape}"
            ) from None
    if lengths is not None:
        if len(shape) < 2:
            raise ValueError(
                f"lengths needs batch-first sequences (batch, time, ...); got per-element shape {shape}"
            )
        lens = np.asarray(lengths)
        if lens.dtype.kind not in "iu":
            raise TypeError(f"lengths must be integers; got dtype {lens.dtype}")
        batch, steps = shape[0], shape[1]
        if lens.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), one length per sequence; got {lens.shape}")
        bad = lens[(lens < 0) | (lens > steps)]
        if bad.size:
            raise ValueError(
                f"lengths must be in 0..{steps} (time is axis 1 of the prediction); got {int(bad[0])}"
            )
        valid = np.arange(steps) < lens[:, None]
        valid = np.broadcast_to(valid.reshape(valid.shape + (1,) * (len(shape) - 2)), shape)
        keep = valid if keep is None else keep & valid
    return keep


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")


def _reduce(losses: Array, grad: Array, total: float, reduction: str) -> Loss:
    """Apply ``reduction`` to per-element ``losses`` (0 where not counted) and their gradient.

    ``total`` is what ``"mean"`` divides by: the number, or the total weight, of counted elements.
    """
    if reduction == "none":
        return Loss(losses, grad)
    value = float(np.sum(losses))
    if reduction == "mean":
        scale = 1.0 / total if total else 0.0
        value *= scale
        grad *= scale
    return Loss(value, grad)


def _elementwise(
    pred: Any,
    target: Any,
    mask: Any,
    lengths: Any,
    reduction: str,
    loss_and_grad: Callable[[Array, Array], tuple[Array, Array]],
) -> Loss:
    """A loss that is a function of each (prediction, target) pair: checks, masking and reduction."""
    _check_reduction(reduction)
    p = _prediction(pred, "pred")
    t = _real_target(target, p.shape, p.dtype)
    keep = _counted(p.shape, mask, lengths)
    if keep is None:
        losses, grad = loss_and_grad(p, t)
        return _reduce(losses, grad, float(p.size), reduction)
    losses, grad = loss_and_grad(np.where(keep, p, 0), np.where(keep, t, 0))
    w = keep.astype(p.dtype)
    losses *= w
    grad *= w
    return _reduce(losses, grad, float(np.count_nonzero(keep)), reduction)


# ---------------------------------------------------------------------------------------- losses


def _squared_error(p: Array, t: Array) -> tuple[Array, Array]:
    diff = p - t
    return diff * diff, diff * 2


def _absolute_error(p: Array, t: Array) -> tuple[Array, Array]:
    diff = p - t
    return np.abs(diff), np.sign(diff)


def mse(
    pred: Any,
    target: Any,
    *,
    mask: Any = None,
    lengths: Any = None,
    reduction: str = "mean",
) -> Loss:
    """Mean squared error, ``(pred - target)**2`` per element.

    Args:
        pred: Predictions, float32 or float64, any shape.
        target: Targets of ``pred``'s shape.
        mask: Boolean, broadcastable to ``pred``'s shape; True where the element counts.
        lengths: Per-sequence lengths ``(batch,)`` when ``pred`` is ``(batch, time, ...)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``Loss(value, grad)`` with ``grad`` of ``pred``'s shape and dtype.
    """
    return _elementwise(pred, target, mask, lengths, reduction, _squared_error)


def mae(
    pred: Any,
    target: Any,
    *,
    mask: Any = None,
    lengths: Any = None,
    reduction: str = "mean",
) -> Loss:
    """Mean absolute error, ``|pred - target|`` per element (gradient 0 where they are equal).

    Args:
        pred: Predictions, float32 or float64, any shape.
        target: Targets of ``pred``'s shape.
        mask: Boolean, broadcastable to ``pred``'s shape; True where the element counts.
        lengths: Per-sequence lengths ``(batch,)`` when ``pred`` is ``(batch, time, ...)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``Loss(value, grad)`` with ``grad`` of ``pred``'s shape and dtype.
    """
    return _elementwise(pred, target, mask, lengths, reduction, _absolute_error)


def binary_cross_entropy_with_logits(
    logits: Any,
    target: Any,
    *,
    pos_weight: Any = None,
    mask: Any = None,
    lengths: Any = None,
    reduction: str = "mean",
) -> Loss:
    """Binary cross-entropy on logits, ``-[pw*y*log(sigmoid(x)) + (1-y)*log(1-sigmoid(x))]``.

    Computed in the stable softplus form, so large logits neither overflow nor lose precision.

    Args:
        logits: Logits, float32 or float64, any shape.
        target: Targets in [0, 1] (probabilities or 0/1 labels) of ``logits``' shape.
        pos_weight: Weight of the positive term, broadcastable to ``logits``' shape (per class:
            shape ``(C,)`` for logits ``(..., C)``). It does not change what ``"mean"`` divides by.
        mask: Boolean, broadcastable to ``logits``' shape; True where the element counts.
        lengths: Per-sequence lengths ``(batch,)`` when ``logits`` is ``(batch, time, ...)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``Loss(value, grad)`` with ``grad`` of ``logits``' shape and dtype.
    """
    dtype = _prediction(logits, "logits").dtype
    pw: Array | None = None
    if pos_weight is not None:
        pw = float_array(pos_weight, "pos_weight", dtype)
        try:
            np.broadcast_shapes(pw.shape, np.shape(logits))
        except ValueError:
            raise ValueError(
                f"pos_weight of shape {pw.shape} cannot be broadcast to the logits' shape {np.shape(logits)}"
            ) from None

    def loss_and_grad(x: Array, y: Array) -> tuple[Array, Array]:
        e = np.exp(-np.abs(x))
        log1p_e = np.log1p(e)
        softplus_pos = np.maximum(x, 0) + log1p_e  # -log(1 - sigmoid(x))
        softplus_neg = softplus_pos - x  # -log(sigmoid(x))
        sig = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        if pw is None:
            return y * softplus_neg + (1 - y) * softplus_pos, sig - y
        wy = pw * y
        return wy * softplus_neg + (1 - y) * softplus_pos, wy * (sig - 1) + (1 - y) * sig

    return _elementwise(logits, target, mask, lengths, reduction, loss_and_grad)


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    weight: Any = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    mask: Any = None,
    lengths: Any = None,
    reduction: str = "mean",
) -> Loss:
    """Softmax cross-entropy of class logits against integer class targets (PyTorch's definition).

    Per element ``i`` with target ``y``, log-probabilities ``lp = log_softmax(logits_i)`` and
    smoothing ``e``: ``l_i = (1-e) * w[y] * -lp[y] + e/C * sum_c w[c] * -lp[c]``; ``"mean"`` divides
    the sum over counted elements by ``sum w[y_i]`` over them (their number without ``weight``).

    Args:
        logits: Logits ``(..., C)``, float32 or float64.
        target: Integer classes of shape ``logits.shape[:-1]``, in ``0..C-1`` where counted.
        weight: Per-class weights ``(C,)``.
        ignore_index: A target value whose elements do not count.
        label_smoothing: ``e`` in [0, 1]: the target distribution is ``(1-e)*onehot + e/C``.
        mask: Boolean, broadcastable to ``logits.shape[:-1]``; True where the element counts.
        lengths: Per-sequence lengths ``(batch,)`` when ``logits`` is ``(batch, time, C)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``Loss(value, grad)`` with ``grad`` of ``logits``' shape and dtype; for ``"none"``, ``value``
        has ``target``'s shape.

    Raises:
        ValueError: A counted target is outside ``0..C-1``, or a shape does not match.
    """
    _check_reduction(reduction)
    z = _prediction(logits, "logits")
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., C) with C >= 1 classes; got shape {z.shape}")
    n_classes = z.shape[-1]
    y = np.asarray(target)
    if y.dtype.kind not in "iu":
        raise TypeError(f"target must be an integer array of class indices; got dtype {y.dtype}")
    if y.shape != z.shape[:-1]:
        raise ValueError(f"target must have shape {z.shape[:-1]} (logits' shape without C); got {y.shape}")
    w: Array | None = None
    if weight is not None:
        w = float_array(weight, "weight", z.dtype)
        if w.shape != (n_classes,):
            raise ValueError(f"weight must have shape ({n_classes},), one weight per class; got {w.shape}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float | np.floating):
        raise TypeError(f"label_smoothing must be a number; got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")

    keep = _counted(y.shape, mask, lengths)
    if ignore_index is not None:
        not_ignored = y != ignore_index
        keep = not_ignored if keep is None else keep & not_ignored
    y_checked = y if keep is None else y[keep]
    if y_checked.size and (y_checked.min() < 0 or y_checked.max() >= n_classes):
        bad = int(y_checked[(y_checked < 0) | (y_checked >= n_classes)][0])
        raise ValueError(f"target must hold classes in 0..{n_classes - 1}; got {bad}")
    if keep is not None:
        z = np.where(keep[..., None], z, 0)
        y = np.where(keep, y, 0)

    shifted = z - np.max(z, axis=-1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    probs = np.exp(log_p)
    y_idx = y[..., None].astype(np.intp)
    nll = -np.take_along_axis(log_p, y_idx, axis=-1)[..., 0]
    w_y = np.ones(y.shape, z.dtype) if w is None else w[y]
    keep_f = None if keep is None else keep.astype(z.dtype)
    if keep_f is not None:
        w_y *= keep_f
    # d/dz of (1-e)*w_y*nll: (1-e)*w_y*(softmax - onehot)
    losses = nll * w_y
    coef = w_y * (1 - label_smoothing)
    grad = probs * coef[..., None]
    np.put_along_axis(grad, y_idx, np.take_along_axis(grad, y_idx, axis=-1) - coef[..., None], axis=-1)
    if label_smoothing:
        # d/dz of e/C * sum_c w_c*(-lp_c): e/C * (W*softmax - w), W = sum_c w_c
        share = label_smoothing / n_classes
        if w is None:
            smooth = -np.sum(log_p, axis=-1)
            smooth_grad = probs * n_classes - 1
        else:
            smooth = -(log_p @ w)
            smooth_grad = probs * np.sum(w) - w
        if keep_f is not None:
            smooth *= keep_f
            smooth_grad *= keep_f[..., None]
        losses = losses * (1 - label_smoothing) + smooth * share
        grad += smooth_grad * share
    return _reduce(losses, grad, float(np.sum(w_y)), reduction)


# ---------------------------------------------------------------------------------------- registry

_LOSSES: dict[str, Callable[..., Loss]] = {
    "mse": mse,
    "mae": mae,
    "cross_entropy": cross_entropy,
    "bce_with_logits": binary_cross_entropy_with_logits,
}


def get(name: str) -> Callable[..., Loss]:
    """The loss function registered under ``name``.

    Args:
        name: One of ``"mse"``, ``"mae"``, ``"cross_entropy"``, ``"bce_with_logits"``.

    Returns:
        The loss function.
    """
    try:
        return _LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_LOSSES))}") from None
