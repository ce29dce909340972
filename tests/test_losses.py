"""rnnkit.losses against per-element Python references, finite differences and torch.nn.functional."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from rnnkit import losses
from rnnkit.losses import Loss, binary_cross_entropy_with_logits, cross_entropy, mae, mse

REDUCTIONS = ("mean", "sum", "none")
MASKINGS = ("all", "mask", "lengths", "both")
KINDS = ("mse", "mae", "bce", "ce")
B, T, F, C = 3, 4, 2, 5
LENGTHS = np.array([2, 4, 1])


# ------------------------------------------------------------------ independent references


def ref_counted(shape, mask, lengths):
    """Boolean array of the counted elements, built element by element."""
    out = np.ones(shape, bool)
    if mask is not None:
        out &= np.broadcast_to(mask, shape)
    if lengths is not None:
        for idx in np.ndindex(*shape):
            if idx[1] >= lengths[idx[0]]:
                out[idx] = False
    return out


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def ref_elementwise(kind, pred, target, pos_weight=None):
    """Per-element losses of mse/mae/bce, one Python float at a time."""
    pw = np.broadcast_to(1.0 if pos_weight is None else pos_weight, pred.shape)
    out = np.zeros(pred.shape)
    for idx in np.ndindex(*pred.shape):
        x, y = float(pred[idx]), float(target[idx])
        if kind == "mse":
            out[idx] = (x - y) ** 2
        elif kind == "mae":
            out[idx] = abs(x - y)
        else:  # -[pw*y*log(sigmoid(x)) + (1-y)*log(1-sigmoid(x))]
            out[idx] = pw[idx] * y * softplus(-x) + (1 - y) * softplus(x)
    return out


def ref_cross_entropy(logits, target, weight=None, smoothing=0.0):
    """Per-element losses and per-element normalising weights w[y], one row at a time."""
    n = logits.shape[-1]
    w = np.ones(n) if weight is None else weight
    losses_, wy = np.zeros(target.shape), np.zeros(target.shape)
    for idx in np.ndindex(*target.shape):
        row = [float(v) for v in logits[idx]]
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        logp = [v - lse for v in row]
        y = int(target[idx])
        losses_[idx] = (1 - smoothing) * w[y] * -logp[y] + smoothing / n * sum(
            -w[c] * logp[c] for c in range(n)
        )
        wy[idx] = w[y]
    return losses_, wy


def ref_reduce(per_element, counted, norm_weight, reduction):
    per_element = np.where(counted, per_element, 0.0)
    if reduction == "none":
        return per_element
    total = per_element.sum()
    if reduction == "sum":
        return total
    denom = np.where(counted, norm_weight, 0.0).sum()
    return total / denom


# ------------------------------------------------------------------ cases


def make_case(kind, masking, rng, dtype=np.float64):
    """(function, pred, kwargs, reference value function) for a loss kind and a masking choice."""
    mask = lengths = None
    if kind == "ce":
        pred = rng.standard_normal((B, T, C)).astype(dtype)
        target = rng.integers(0, C, size=(B, T))
        elem_shape = (B, T)
        if masking in ("mask", "both"):
            mask = rng.random((B, T)) < 0.7
    else:
        pred = rng.standard_normal((B, T, F)).astype(dtype)
        target = rng.random((B, T, F)) if kind == "bce" else rng.standard_normal((B, T, F))
        elem_shape = (B, T, F)
        if masking in ("mask", "both"):
            mask = rng.random((B, T, 1)) < 0.7  # broadcast over the features
    if masking in ("lengths", "both"):
        lengths = LENGTHS
    fn = {"mse": mse, "mae": mae, "bce": binary_cross_entropy_with_logits, "ce": cross_entropy}[kind]
    counted = ref_counted(elem_shape, mask, lengths)

    def reference(reduction):
        if kind == "ce":
            per, wy = ref_cross_entropy(pred, target)
            return ref_reduce(per, counted, wy, reduction)
        per = ref_elementwise(kind, pred, target)
        return ref_reduce(per, counted, np.ones(elem_shape), reduction)

    return fn, pred, target, {"mask": mask, "lengths": lengths}, reference, counted


def finite_difference(f, x, eps=1e-6):
    """Central differences of the scalar f at every element of x (float64)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        orig = x[idx]
        x[idx] = orig + eps
        up = f(x)
        x[idx] = orig - eps
        down = f(x)
        x[idx] = orig
        grad[idx] = (up - down) / (2 * eps)
    return grad


def scalar(value):
    return float(np.sum(value))


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_value_matches_reference(kind, reduction, masking, rng):
    fn, pred, target, kw, reference, _ = make_case(kind, masking, rng)
    out = fn(pred, target, reduction=reduction, **kw)
    assert isinstance(out, Loss)
    if reduction == "none":
        assert isinstance(out.value, np.ndarray) and out.value.shape == np.shape(target)
    else:
        assert isinstance(out.value, float)
    np.testing.assert_allclose(out.value, reference(reduction), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_grad_matches_finite_differences(kind, reduction, masking, rng):
    fn, pred, target, kw, _, counted = make_case(kind, masking, rng)
    out = fn(pred, target, reduction=reduction, **kw)
    assert out.grad.shape == pred.shape and out.grad.dtype == pred.dtype
    fd = finite_difference(lambda x: scalar(fn(x, target, reduction=reduction, **kw).value), pred.copy())
    np.testing.assert_allclose(out.grad, fd, rtol=1e-6, atol=1e-9)
    not_counted = ~counted if kind != "ce" else np.broadcast_to(~counted[..., None], pred.shape)
    assert np.all(out.grad[not_counted] == 0)


def test_none_grad_is_each_elements_own_derivative(rng):
    # element i's loss depends on pred[i] only, so perturbing pred[i] changes loss[i] alone
    pred = rng.standard_normal((2, 3, C))
    target = rng.integers(0, C, size=(2, 3))
    out = cross_entropy(pred, target, reduction="none", label_smoothing=0.1)
    i = (1, 2)
    fd = finite_difference(
        lambda row: cross_entropy(row[None], target[i][None], reduction="sum", label_smoothing=0.1).value,
        pred[i].copy(),
    )
    np.testing.assert_allclose(out.grad[i], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_weights_ignore_index_smoothing(weighted, smoothing, reduction, masking, rng):
    _, logits, target, kw, _, counted = make_case("ce", masking, rng)
    weight = rng.uniform(0.2, 3.0, C) if weighted else None
    target[0, 1] = target[2, 0] = -1  # ignored
    counted = counted & (target != -1)
    safe_target = np.where(target == -1, 0, target)
    per, wy = ref_cross_entropy(logits, safe_target, weight, smoothing)
    expected = ref_reduce(per, counted, wy, reduction)
    args = {"weight": weight, "ignore_index": -1, "label_smoothing": smoothing, "reduction": reduction, **kw}
    out = cross_entropy(logits, target, **args)
    np.testing.assert_allclose(out.value, expected, rtol=1e-12, atol=1e-14)
    fd = finite_difference(lambda x: scalar(cross_entropy(x, target, **args).value), logits.copy())
    np.testing.assert_allclose(out.grad, fd, rtol=1e-6, atol=1e-9)


def test_cross_entropy_class_weighted_mean_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]: loss ln 4 for class 0, ln(4/3) for class 1
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    out = cross_entropy(logits, np.array([0, 1]), weight=np.array([1.0, 3.0]))
    assert out.value == pytest.approx((1 * math.log(4) + 3 * math.log(4 / 3)) / 4, rel=1e-14)
    # d/dz of w_y * nll / sum(w): w_y * (softmax - onehot) / 4
    expected = np.array([[1 * (0.25 - 1), 1 * 0.75], [3 * 0.25, 3 * (0.75 - 1)]]) / 4
    np.testing.assert_allclose(out.grad, expected, rtol=1e-14)


def test_bce_pos_weight_and_extreme_logits(rng):
    logits = np.array([[-800.0, -30.0, 0.0], [1e-3, 30.0, 800.0]])
    target = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 1.0]])
    pos_weight = np.array([2.0, 0.5, 3.0])
    out = binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="sum")
    assert out.value == pytest.approx(ref_elementwise("bce", logits, target, pos_weight).sum(), rel=1e-13)
    sig = 1 / (1 + np.exp(-np.clip(logits, -700, 700)))
    expected = pos_weight * target * (sig - 1) + (1 - target) * sig
    np.testing.assert_allclose(out.grad, expected, rtol=1e-12, atol=1e-300)
    moderate = rng.standard_normal((2, 3))
    args = {"pos_weight": pos_weight, "reduction": "mean"}
    fd = finite_difference(
        lambda x: binary_cross_entropy_with_logits(x, target, **args).value, moderate.copy()
    )
    np.testing.assert_allclose(binary_cross_entropy_with_logits(moderate, target, **args).grad, fd, rtol=1e-6)


def test_mae_grad_is_zero_where_equal():
    out = mae(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]), reduction="sum")
    np.testing.assert_array_equal(out.grad, [0.0, -1.0, 1.0])


@pytest.mark.parametrize("kind", KINDS)
def test_float32_computed_in_float32(kind, rng):
    fn, pred, target, kw, reference, _ = make_case(kind, "both", rng, dtype=np.float32)
    out = fn(pred, target, **kw)
    assert out.grad.dtype == np.float32
    assert fn(pred, target, reduction="none", **kw).value.dtype == np.float32
    out64 = fn(pred.astype(np.float64), target, **kw)
    np.testing.assert_allclose(out.value, out64.value, rtol=1e-5)
    np.testing.assert_allclose(out.grad, out64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_gives_zero(kind, reduction, rng):
    fn, pred, target, _, _, _ = make_case(kind, "all", rng)
    out = fn(pred, target, mask=np.zeros(np.shape(target), bool), reduction=reduction)
    assert np.all(np.asarray(out.value) == 0)
    assert np.all(out.grad == 0)


# ------------------------------------------------------------------ padding never leaks


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_padding_do_not_leak(kind, reduction, bad, rng):
    fn, pred, target, _, reference, counted = make_case(kind, "lengths", rng)
    pad = ~counted if kind != "ce" else np.broadcast_to(~counted[..., None], pred.shape)
    pred[pad] = bad
    if kind == "ce":
        target[~counted] = 99  # out-of-range classes in the padding are fine too
    else:
        target[pad] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(pred, target, lengths=LENGTHS, reduction=reduction)
    assert np.all(np.isfinite(out.value)) and np.all(np.isfinite(out.grad))
    assert np.all(out.grad[pad] == 0)
    if reduction == "none":
        assert np.all(out.value[~counted] == 0)
    clean_pred = np.where(pad, 0.0, pred)
    clean = fn(clean_pred, np.where(~counted, 0, target), lengths=LENGTHS, reduction=reduction)
    np.testing.assert_array_equal(out.value, clean.value)
    np.testing.assert_array_equal(out.grad, clean.grad)


# ------------------------------------------------------------------ errors


def test_errors_name_the_argument(rng):
    x = rng.standard_normal((B, T, F))
    logits, classes = rng.standard_normal((B, T, C)), rng.integers(0, C, (B, T))
    cases = [
        (ValueError, "target", lambda: mse(x, x[:, :2])),
        (TypeError, "pred", lambda: mse(x.astype(int), x)),
        (TypeError, "pred", lambda: mae(x.astype(np.float16), x)),
        (TypeError, "target", lambda: mse(x, x.astype(complex))),
        (ValueError, "mask", lambda: mse(x, x, mask=np.ones((B, T + 1, 1), bool))),
        (TypeError, "mask", lambda: mse(x, x, mask=np.ones((B, T, F)))),
        (ValueError, "lengths", lambda: mse(x, x, lengths=[1, 2])),
        (ValueError, "lengths", lambda: mse(x, x, lengths=[1, 2, T + 1])),
        (ValueError, "lengths", lambda: mse(x, x, lengths=[1, -1, 2])),
        (TypeError, "lengths", lambda: mse(x, x, lengths=[1.0, 2.0, 3.0])),
        (ValueError, "lengths", lambda: mse(x[0, 0], x[0, 0], lengths=[1])),
        (ValueError, "reduction", lambda: mse(x, x, reduction="avg")),
        (ValueError, "reduction", lambda: cross_entropy(logits, classes, reduction="batchmean")),
        (ValueError, "target", lambda: cross_entropy(logits, np.full((B, T), C))),
        (ValueError, "target", lambda: cross_entropy(logits, np.full((B, T), -1))),
        (ValueError, "target", lambda: cross_entropy(logits, np.full((B, T), -1), ignore_index=-100)),
        (TypeError, "target", lambda: cross_entropy(logits, classes.astype(float))),
        (ValueError, "target", lambda: cross_entropy(logits, classes[:, :2])),
        (ValueError, "logits", lambda: cross_entropy(np.zeros((B, 0)), np.zeros(B, int))),
        (TypeError, "logits", lambda: cross_entropy(logits.astype(int), classes)),
        (ValueError, "weight", lambda: cross_entropy(logits, classes, weight=np.ones(C - 1))),
        (ValueError, "label_smoothing", lambda: cross_entropy(logits, classes, label_smoothing=1.5)),
        (ValueError, "pos_weight", lambda: binary_cross_entropy_with_logits(x, x, pos_weight=np.ones(F + 1))),
        (TypeError, "pos_weight", lambda: binary_cross_entropy_with_logits(x, x, pos_weight=np.ones(F, int))),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


def test_out_of_range_target_is_reported_only_where_counted(rng):
    logits, classes = rng.standard_normal((B, T, C)), rng.integers(0, C, (B, T))
    classes[0, 3] = C + 7
    with pytest.raises(ValueError, match=f"target.*{C + 7}"):
        cross_entropy(logits, classes)
    cross_entropy(logits, classes, lengths=[3, 4, 4])
    cross_entropy(logits, classes, ignore_index=C + 7)


def test_registry():
    assert losses.get("mse") is mse
    assert losses.get("mae") is mae
    assert losses.get("cross_entropy") is cross_entropy
    assert losses.get("bce_with_logits") is binary_cross_entropy_with_logits
    with pytest.raises(ValueError, match="bce_with_logits.*cross_entropy.*mae.*mse"):
        losses.get("hinge")


# ------------------------------------------------------------------ torch.nn.functional


def torch_loss(kind, pred, target, reduction, **kw):
    """torch's value and gradient for the same inputs (no masks: callers select counted elements)."""
    torch = pytest.importorskip("torch")
    fn = torch.nn.functional
    x = torch.tensor(pred, requires_grad=True)
    if kind == "ce":
        weight = kw.get("weight")
        out = fn.cross_entropy(
            x.reshape(-1, pred.shape[-1]),
            torch.tensor(target).reshape(-1),
            weight=None if weight is None else torch.tensor(weight),
            ignore_index=kw.get("ignore_index", -100),
            label_smoothing=kw.get("label_smoothing", 0.0),
            reduction=reduction,
        )
    elif kind == "bce":
        pw = kw.get("pos_weight")
        out = fn.binary_cross_entropy_with_logits(
            x, torch.tensor(target), pos_weight=None if pw is None else torch.tensor(pw), reduction=reduction
        )
    else:
        loss_fn = fn.mse_loss if kind == "mse" else fn.l1_loss
        out = loss_fn(x, torch.tensor(target), reduction=reduction)
    out.sum().backward()
    value = out.detach().numpy()
    return (float(value) if reduction != "none" else value), x.grad.numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ("mse", "mae", "bce"))
def test_elementwise_vs_torch_with_mask(kind, reduction, rng):
    pytest.importorskip("torch")
    fn, pred, target, kw, _, counted = make_case(kind, "both", rng)
    extra = {"pos_weight": rng.uniform(0.5, 2.0, F)} if kind == "bce" else {}
    out = fn(pred, target, reduction=reduction, **extra, **kw)
    # torch gets the counted elements only (each with its feature's pos_weight)
    selected = {"pos_weight": extra["pos_weight"][np.nonzero(counted)[2]]} if kind == "bce" else {}
    value, grad = torch_loss(kind, pred[counted], target[counted], reduction, **selected)
    if reduction == "none":
        np.testing.assert_allclose(out.value[counted], value, rtol=1e-12)
    else:
        np.testing.assert_allclose(out.value, value, rtol=1e-12)
    np.testing.assert_allclose(out.grad[counted], grad, rtol=1e-12, atol=1e-15)
    assert np.all(out.grad[~counted] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": True}, {"label_smoothing": 0.2}, {"weight": True, "label_smoothing": 0.3}],
)
def test_cross_entropy_vs_torch(options, reduction, rng):
    pytest.importorskip("torch")
    _, logits, target, kw, _, counted = make_case("ce", "both", rng)
    opts = dict(options)
    if opts.get("weight"):
        opts["weight"] = rng.uniform(0.2, 3.0, C)
    target[1, 1] = 7  # ignored by index
    out = cross_entropy(logits, target, ignore_index=7, reduction=reduction, **opts, **kw)
    # torch sees the mask and the lengths as ignore_index
    torch_target = np.where(counted & (target != 7), target, -100)
    value, grad = torch_loss("ce", logits, torch_target, reduction, **opts)
    np.testing.assert_allclose(
        np.asarray(out.value).reshape(-1), np.reshape(value, -1), rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(out.grad, grad.reshape(logits.shape), rtol=1e-12, atol=1e-15)
