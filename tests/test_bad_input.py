"""Wrong inputs raise ValueError or TypeError naming the argument; odd but valid inputs are accepted."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from helpers import CELLS, make_layer, split_state
from rnnkit import _core

B, T, IN, H = 2, 3, 4, 5


def raises(exc, match, fn, *args, **kwargs):
    """pytest.raises that also refuses pyo3's PanicException (a BaseException, not an Exception)."""
    try:
        fn(*args, **kwargs)
    except BaseException as e:
        assert type(e).__name__ != "PanicException", f"panic instead of an error: {e}"
        if not isinstance(e, exc):
            raise
        with pytest.raises(exc, match=match or None):
            raise e
        return e
    pytest.fail(f"no {exc} raised")


@pytest.fixture
def lstm():
    return rnnkit.LSTM(IN, H, 2, bidirectional=True, seed=0)


@pytest.fixture
def gru():
    return rnnkit.GRU(IN, H, 2, bidirectional=True, seed=0)


def x32(shape=(B, T, IN)):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------- x


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", [(T, IN), (B, T, IN, 1), (IN,), ()], ids=["2d", "4d", "1d", "0d"])
def test_x_wrong_ndim(cell, shape):
    layer = make_layer(cell, IN, H)
    raises(ValueError, r"\bx\b.*3-dimensional", layer, np.zeros(shape, np.float32))


@pytest.mark.parametrize("batch_first", [True, False])
def test_x_wrong_feature_size(batch_first):
    layer = rnnkit.GRU(IN, H, batch_first=batch_first)
    raises(ValueError, r"\bx\b.*input_size", layer, np.zeros((B, T, IN + 1), np.float32))
    raises(ValueError, r"\bx\b.*input_size", layer, np.zeros((B, T, IN - 1), np.float32))


def test_x_empty(gru):
    raises(ValueError, r"\bx\b", gru, np.zeros((0, T, IN), np.float32))
    raises(ValueError, r"\bx\b", gru, np.zeros((B, 0, IN), np.float32))


@pytest.mark.parametrize(
    "value",
    [
        np.zeros((B, T, IN), np.int64),
        np.zeros((B, T, IN), np.int32),
        np.zeros((B, T, IN), np.uint8),
        np.zeros((B, T, IN), np.complex128),
        np.zeros((B, T, IN), np.complex64),
        np.zeros((B, T, IN), dtype=object),
        np.full((B, T, IN), "a"),
        "not an array",
        np.zeros((B, T, IN), bool),
        np.zeros((B, T, IN), "datetime64[s]"),
        None,
        [[[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0]]],
    ],
    ids=[
        "int64",
        "int32",
        "uint8",
        "complex128",
        "complex64",
        "object",
        "str_array",
        "str",
        "bool",
        "datetime",
        "None",
        "ragged",
    ],
)
@pytest.mark.parametrize("cell", CELLS)
def test_x_unsupported_dtype(cell, value):
    layer = make_layer(cell, IN, H)
    raises(TypeError, r"\bx\b", layer, value)


# ------------------------------------------------------------------------------------ state


def test_state_wrong_for_lstm(lstm):
    x = x32()
    good = np.zeros((4, B, H))
    raises(TypeError, "state", lstm, x, good)  # one array for an LSTM
    raises(TypeError, "state", lstm, x, (good, good, good))
    raises(ValueError, r"state\[0\] \(h\)", lstm, x, (np.zeros((4, B + 1, H)), good))
    raises(ValueError, r"state\[0\] \(h\)", lstm, x, (np.zeros((2, B, H)), good))
    raises(ValueError, r"state\[0\] \(h\)", lstm, x, (np.zeros((4, B, H + 1)), good))
    raises(ValueError, r"state\[1\] \(c\)", lstm, x, (good, np.zeros((4, B, H - 1))))
    raises(ValueError, r"state\[1\] \(c\)", lstm, x, (good, np.zeros((4 * B, H))))
    raises(ValueError, r"state\[0\] \(h\)", lstm, x, (np.zeros((1, 4, B, H)), good))
    raises(TypeError, r"state\[0\] \(h\)", lstm, x, (good.astype(int), good))
    raises(TypeError, r"state\[1\] \(c\)", lstm, x, (good, good.astype(complex)))


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru"])
def test_state_wrong_for_rnn_and_gru(cell):
    layer = make_layer(cell, IN, H, 2, bidirectional=True)
    x = x32()
    good = np.zeros((4, B, H))
    raises(TypeError, "state", layer, x, (good, good))
    raises(ValueError, "state", layer, x, np.zeros((2, B, H)))
    raises(ValueError, "state", layer, x, np.zeros((4, B + 1, H)))
    raises(ValueError, "state", layer, x, np.zeros((4, B, H + 1)))
    raises(ValueError, "state", layer, x, np.zeros((4 * B, H)))
    raises(TypeError, "state", layer, x, good.astype(np.int64))
    raises(TypeError, "state", layer, x, good.astype(bool))


# ---------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("cell", CELLS)
def test_lengths_bad(cell):
    layer = make_layer(cell, IN, H, bidirectional=True)
    x = x32()
    raises(ValueError, "lengths", layer, x, lengths=[0, 2])
    raises(ValueError, "lengths", layer, x, lengths=[1, T + 1])
    raises(ValueError, "lengths", layer, x, lengths=[-1, 2])
    raises(ValueError, "lengths", layer, x, lengths=np.array([2**63 - 1, 1]))
    raises(ValueError, "lengths", layer, x, lengths=np.array([2**64 - 1, 1], np.uint64))
    raises(TypeError, "lengths", layer, x, lengths=[1.0, 2.0])
    raises(TypeError, "lengths", layer, x, lengths=[1.5, 2])
    raises(TypeError, "lengths", layer, x, lengths=np.array([True, True]))
    raises(TypeError, "lengths", layer, x, lengths=["1", "2"])
    raises(ValueError, "lengths", layer, x, lengths=[1, 2, 3])
    raises(ValueError, "lengths", layer, x, lengths=[1])
    raises(ValueError, "lengths", layer, x, lengths=2)
    raises(ValueError, "lengths", layer, x, lengths=[[1, 2]])


def test_lengths_integer_kinds_accepted(gru):
    x = x32()
    gru.eval()
    want, _ = gru(x, lengths=np.array([1, 3]))
    for lens in ([1, 3], (1, 3), np.array([1, 3], np.int32), np.array([1, 3], np.uint8)):
        y, _ = gru(x, lengths=lens)
        np.testing.assert_array_equal(y, want)


# ----------------------------------------------------------------------------- dy / dstate


def test_dy_and_dstate_bad(lstm, gru):
    x = x32()
    good_dy = np.zeros((B, T, 2 * H), np.float32)
    good = np.zeros((4, B, H), np.float32)
    for layer in (lstm, gru):
        layer(x)
        raises(ValueError, r"\bdy\b", layer.backward, np.zeros((B, T, H), np.float32))
        raises(ValueError, r"\bdy\b", layer.backward, np.zeros((T, B, 2 * H), np.float32))
        raises(ValueError, r"\bdy\b", layer.backward, np.zeros((B, T * 2 * H), np.float32))
        raises(TypeError, r"\bdy\b", layer.backward, good_dy.astype(int))
        raises(TypeError, r"\bdy\b", layer.backward, good_dy.astype(complex))
    raises(TypeError, "dstate", lstm.backward, good_dy, good)
    raises(ValueError, r"dstate\[0\] \(h\)", lstm.backward, good_dy, (np.zeros((4, B + 1, H)), good))
    raises(ValueError, r"dstate\[1\] \(c\)", lstm.backward, good_dy, (good, np.zeros((2, B, H))))
    raises(ValueError, r"dstate\[1\] \(c\)", lstm.backward, good_dy, (good, np.zeros((4, B))))
    raises(TypeError, "dstate", gru.backward, good_dy, (good, good))
    raises(ValueError, "dstate", gru.backward, good_dy, np.zeros((4, B, H + 1)))
    raises(TypeError, "dstate", gru.backward, good_dy, good.astype(np.int16))
    # none of the rejected calls used up the forward: a correct backward still works, once
    for layer in (lstm, gru):
        dx, _ = layer.backward(good_dy)
        assert dx.shape == (B, T, IN)
        raises(ValueError, "backward", layer.backward, good_dy)


def test_time_major_dy_shape():
    layer = rnnkit.RNN(IN, H, batch_first=False)
    layer(x32((T, B, IN)))
    raises(ValueError, r"\bdy\b", layer.backward, np.zeros((B, T, H), np.float32))
    dx, _ = layer.backward(np.zeros((T, B, H), np.float32))
    assert dx.shape == (T, B, IN)


# ----------------------------------------------------------------------- backward ordering


@pytest.mark.parametrize("cell", CELLS)
def test_backward_needs_a_training_forward(cell):
    layer = make_layer(cell, IN, H, 2)
    dy = np.zeros((B, T, H), np.float32)
    raises(ValueError, "forward", layer.backward, dy)  # never run
    layer.eval()
    layer(x32())
    raises(ValueError, "forward", layer.backward, dy)  # eval-mode forward
    layer.train()
    raises(ValueError, "forward", layer.backward, dy)  # still no training forward
    layer(x32())
    layer.eval()  # switching to eval drops what a training forward kept
    layer.train()
    raises(ValueError, "forward", layer.backward, dy)
    layer(x32())
    layer.backward(dy)
    raises(ValueError, "backward", layer.backward, dy)  # twice for one forward
    layer(x32())
    layer.backward(dy)  # a new forward allows a new backward


def test_eval_forward_after_training_forward_blocks_backward(gru):
    gru(x32())
    gru.eval()
    gru(x32())
    gru.train()
    raises(ValueError, "forward", gru.backward, np.zeros((B, T, 2 * H), np.float32))


# ----------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("cell", CELLS)
def test_load_state_dict_bad(cell):
    layer = make_layer(cell, IN, H, 2, bidirectional=True, seed=1)
    sd = layer.state_dict()
    missing = dict(sd)
    del missing["bias_hh_l1_reverse"]
    raises(ValueError, "bias_hh_l1_reverse", layer.load_state_dict, missing)
    extra = dict(sd, weight_ih_l2=np.zeros((3, 3)))
    raises(ValueError, "weight_ih_l2", layer.load_state_dict, extra)
    wrong = dict(sd, weight_hh_l1=np.zeros((sd["weight_hh_l1"].shape[0], H + 1)))
    raises(ValueError, "weight_hh_l1", layer.load_state_dict, wrong)
    wrong = dict(sd, bias_ih_l0=np.zeros(3))
    raises(ValueError, "bias_ih_l0", layer.load_state_dict, wrong)
    wrong = dict(sd, weight_ih_l0=sd["weight_ih_l0"].astype(np.int64))
    raises(TypeError, "weight_ih_l0", layer.load_state_dict, wrong)
    raises(TypeError, "state", layer.load_state_dict, list(sd.items()))
    # a non-strict load with a wrong shape still fails
    raises(ValueError, "bias_ih_l0", layer.load_state_dict, {"bias_ih_l0": np.zeros(3)}, strict=False)
    # failed loads changed nothing
    for k, v in layer.params.items():
        np.testing.assert_array_equal(v, sd[k])
    # non-strict: missing and extra names are ignored, the rest is loaded
    part = {"weight_ih_l0": np.ones_like(sd["weight_ih_l0"]), "unrelated": np.zeros(2)}
    layer.load_state_dict(part, strict=False)
    assert np.all(layer.params["weight_ih_l0"] == 1)
    np.testing.assert_array_equal(layer.params["weight_hh_l0"], sd["weight_hh_l0"])


# ----------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(hidden_size=0), ValueError, "hidden_size"),
        (dict(hidden_size=-3), ValueError, "hidden_size"),
        (dict(hidden_size=2.5), TypeError, "hidden_size"),
        (dict(hidden_size=True), TypeError, "hidden_size"),
        (dict(input_size=0), ValueError, "input_size"),
        (dict(input_size="4"), TypeError, "input_size"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(nonlinearity="sigmoid"), ValueError, "nonlinearity"),
        (dict(dropout=1.5), ValueError, "dropout"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(dtype=np.int32), TypeError, "dtype"),
        (dict(dtype=np.float16), TypeError, "dtype"),
        (dict(dtype=np.complex128), TypeError, "dtype"),
        (dict(dtype="no such type"), TypeError, "dtype"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_constructor_bad(kwargs, exc, match):
    args = dict(input_size=IN, hidden_size=H) | kwargs
    raises(exc, match, rnnkit.RNN, **args)
    if "nonlinearity" not in kwargs:
        raises(exc, match, rnnkit.LSTM, **args)
        raises(exc, match, rnnkit.GRU, **args)


def test_initial_state_bad(lstm):
    raises(ValueError, "batch_size", lstm.initial_state, 0)
    raises(TypeError, "batch_size", lstm.initial_state, 2.0)


def test_set_num_threads_bad(num_threads):
    before = rnnkit.get_num_threads()
    raises(ValueError, r"\bn\b", rnnkit.set_num_threads, 0)
    raises(ValueError, r"\bn\b", rnnkit.set_num_threads, -2)
    raises(TypeError, "", rnnkit.set_num_threads, 1.5)
    assert rnnkit.get_num_threads() == before


@pytest.mark.parametrize("cell", CELLS)
def test_step_bad(cell):
    """`step` lets the kernel check its arguments and explains a refusal in the layer's terms."""
    layer = make_layer(cell, IN, H, 2, seed=2)
    lstm = cell == "lstm"
    x = x32((B, IN))
    state = layer.initial_state(B)
    h, c = split_state(state)
    raises(ValueError, "input_size=4", layer.step, x32((B, IN + 1)), state)
    raises(ValueError, "2-dimensional", layer.step, x32((B, 1, IN)), state)
    raises(TypeError, "floating-point", layer.step, np.ones((B, IN), dtype=np.int64), state)
    raises(ValueError, "bidirectional", make_layer(cell, IN, H, bidirectional=True).step, x)
    wrong_batch = layer.initial_state(B + 1)
    raises(ValueError, r"state.*\(2, 2, 5\)", layer.step, x, wrong_batch)
    if lstm:
        raises(TypeError, r"tuple \(h, c\)", layer.step, x, h)
        raises(ValueError, r"state\[1\] \(c\)", layer.step, x, (h, c[:, :, :2]))
    else:
        raises(ValueError, "state", layer.step, x, h[:1])
        raises(TypeError, "state", layer.step, x, h.astype(np.int32))


def test_stepper_bad():
    """The stepper checks its weights once, when made, and refuses them if they are reshaped later."""
    w = rnnkit.GRU(IN, H, seed=0)._weights(0)[0]
    raises(ValueError, "at least one layer", _core.Stepper, "gru", [])
    raises(ValueError, "cell", _core.Stepper, "gru2", [w])
    raises(TypeError, "tuple", _core.Stepper, "gru", [list(w)])
    raises(TypeError, r"weights\[0\]\.weight_ih", _core.Stepper, "gru", [(w[0].astype(np.int32), *w[1:])])
    mixed = [(w[0], w[1].astype(np.float64), *w[2:])]
    raises(TypeError, r"weights\[0\]\.weight_hh", _core.Stepper, "gru", mixed)
    raises(ValueError, "weight_hh", _core.Stepper, "gru", [(w[0], w[1][:, :2].copy(), *w[2:])])
    raises(ValueError, r"weight_hh.*\(20, 5\)", _core.Stepper, "lstm", [w])
    raises(ValueError, r"weights\[0\]\.weight_hh", _core.Stepper, "gru", [(w[0], w[1].T, *w[2:])])
    stepper = _core.Stepper("gru", [w])
    x = np.zeros((B, IN), dtype=np.float32)
    y, h = stepper(x)
    assert y.shape == (B, H) and h.shape == (1, B, H)
    raises(TypeError, "state must be a numpy array", stepper, x, (h,))
    raises(TypeError, r"tuple \(h, c\)", _core.Stepper("lstm", rnnkit.LSTM(IN, H)._weights(0)), x, [h, h])
    w[1].shape = (-1,)  # reshaped in place after the check
    raises(ValueError, "weight_hh", stepper, x)
    w[1].shape = (3 * H, H)
    assert stepper(x)[0].shape == (B, H)


def test_nonlinearity_is_fixed():
    """forward and step both use the nonlinearity given at construction."""
    layer = rnnkit.RNN(IN, H, nonlinearity="relu")
    assert layer.nonlinearity == "relu"
    raises(AttributeError, "", setattr, layer, "nonlinearity", "tanh")


@pytest.mark.parametrize("cell", CELLS)
def test_step_converts_x(cell):
    """A list, another float dtype or a strided view give the same step as a contiguous array."""
    layer = make_layer(cell, IN, H, 2, seed=2)
    layer.eval()
    x = x32((B, IN))
    state = layer.initial_state(B)
    want, _ = layer.step(x, state)
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    assert not strided.flags.c_contiguous
    for name, v in {"list": x.tolist(), "float64": x.astype(np.float64), "strided": strided}.items():
        y, _ = layer.step(v, state)
        assert y.dtype == np.float32, name
        np.testing.assert_array_equal(y, want, err_msg=name)


# ------------------------------------------------------------------ accepted unusual inputs


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_and_other_float_x_accepted(cell):
    rng = np.random.default_rng(3)
    layer = make_layer(cell, IN, H, 2, bidirectional=True, seed=2)
    base = rng.standard_normal((B, T, IN)).astype(np.float16).astype(np.float32)
    lengths = [T, 1]
    want, wstate = layer(base, lengths=lengths)
    variants = {
        "transposed view": np.ascontiguousarray(base.transpose(1, 0, 2)).transpose(1, 0, 2),
        "strided": np.repeat(base, 2, axis=2)[:, :, ::2],
        "fortran": np.asfortranarray(base),
        "float16": base.astype(np.float16),
        "float64": base.astype(np.float64),
        "list": base.tolist(),
        "read-only": base.copy(),
    }
    variants["read-only"].flags.writeable = False
    assert not variants["transposed view"].flags.c_contiguous
    for name, x in variants.items():
        y, state = layer(x, lengths=lengths)
        assert y.dtype == np.float32, name
        np.testing.assert_array_equal(y, want, err_msg=name)
        for a, b in zip(split_state(state), split_state(wstate), strict=True):
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=name)
        dx, _ = layer.backward(np.ones_like(y))
        assert dx.shape == base.shape and dx.dtype == np.float32


def test_non_contiguous_state_and_dy_accepted():
    rng = np.random.default_rng(4)
    layer = rnnkit.LSTM(IN, H, 2, bidirectional=True, dtype=np.float64, seed=3)
    x = rng.standard_normal((B, T, IN))
    h = rng.standard_normal((4, B, H))
    c = rng.standard_normal((4, B, H))
    dy = rng.standard_normal((B, T, 2 * H))
    y1, s1 = layer(x, state=(h, c))
    r1 = layer.backward(dy, (h, c))
    hv = np.ascontiguousarray(h.transpose(2, 1, 0)).transpose(2, 1, 0)
    cv = np.asfortranarray(c)
    dyv = np.ascontiguousarray(dy.transpose(1, 0, 2)).transpose(1, 0, 2)
    y2, s2 = layer(x, state=(hv, cv))
    r2 = layer.backward(dyv, (hv, cv))
    np.testing.assert_array_equal(y1, y2)
    for a, b in zip((*s1, r1[0], *r1[1]), (*s2, r2[0], *r2[1]), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ low-level _core


def core_weights(gates, hidden, inp, dtype=np.float64, directions=1, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(gates * hidden, inp), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,)]
    return [tuple(rng.standard_normal(s).astype(dtype) for s in shapes) for _ in range(directions)]


def zero_grads(weights):
    return [tuple(np.zeros_like(a) for a in t) for t in weights]


X = np.random.default_rng(5).standard_normal((B, T, IN))
W = core_weights(4, H, IN)


def replace(weights, d, k, value):
    out = [list(t) for t in weights]
    out[d][k] = value
    return [tuple(t) for t in out]


CORE_FORWARD_BAD = {
    "cell name": (ValueError, lambda: _core.forward("lstmx", X, W)),
    "weight_ih columns": (
        ValueError,
        lambda: _core.forward("lstm", X, replace(W, 0, 0, np.zeros((4 * H, IN + 1)))),
    ),
    "weight_ih rows": (ValueError, lambda: _core.forward("lstm", X, replace(W, 0, 0, np.zeros((3 * H, IN))))),
    "weight_ih 1d": (ValueError, lambda: _core.forward("lstm", X, replace(W, 0, 0, np.zeros(4 * H * IN)))),
    "weight_hh columns": (
        ValueError,
        lambda: _core.forward("lstm", X, replace(W, 0, 1, np.zeros((4 * H, H - 1)))),
    ),
    "weight_hh rows": (
        ValueError,
        lambda: _core.forward("lstm", X, replace(W, 0, 1, np.zeros((4 * H - 1, H)))),
    ),
    "bias_ih length": (ValueError, lambda: _core.forward("lstm", X, replace(W, 0, 2, np.zeros(3)))),
    "bias_hh 2d": (ValueError, lambda: _core.forward("lstm", X, replace(W, 0, 3, np.zeros((1, 4 * H))))),
    "gates of another cell": (ValueError, lambda: _core.forward("gru", X, W)),
    "hidden 0": (ValueError, lambda: _core.forward("lstm", X, core_weights(4, 0, IN))),
    "directions differ": (ValueError, lambda: _core.forward("lstm", X, W + core_weights(4, H + 1, IN))),
    "x float32, weights float64": (TypeError, lambda: _core.forward("lstm", X.astype(np.float32), W)),
    "x float64, weights float32": (
        TypeError,
        lambda: _core.forward("lstm", X, core_weights(4, H, IN, np.float32)),
    ),
    "one weight float32": (
        TypeError,
        lambda: _core.forward("lstm", X, replace(W, 0, 3, W[0][3].astype(np.float32))),
    ),
    "x int": (TypeError, lambda: _core.forward("lstm", X.astype(np.int64), W)),
    "x list": (TypeError, lambda: _core.forward("lstm", X.tolist(), W)),
    "x non-contiguous": (ValueError, lambda: _core.forward("lstm", X.transpose(1, 0, 2), W)),
    "x 2d": (ValueError, lambda: _core.forward("lstm", X[0], W)),
    "x empty batch": (ValueError, lambda: _core.forward("lstm", X[:0], W)),
    "x empty seq": (ValueError, lambda: _core.forward("lstm", X[:, :0], W)),
    "x feature mismatch": (ValueError, lambda: _core.forward("lstm", X[:, :, :2].copy(), W)),
    "weights tuple": (TypeError, lambda: _core.forward("lstm", X, tuple(W))),
    "weights None": (TypeError, lambda: _core.forward("lstm", X, None)),
    "weights array": (TypeError, lambda: _core.forward("lstm", X, W[0][0])),
    "weights list of lists": (TypeError, lambda: _core.forward("lstm", X, [list(W[0])])),
    "weights list of arrays": (TypeError, lambda: _core.forward("lstm", X, list(W[0]))),
    "weights 3-tuple": (ValueError, lambda: _core.forward("lstm", X, [W[0][:3]])),
    "weights empty": (ValueError, lambda: _core.forward("lstm", X, [])),
    "weights 3 directions": (ValueError, lambda: _core.forward("lstm", X, W * 3)),
    "weight not an array": (TypeError, lambda: _core.forward("lstm", X, replace(W, 0, 0, W[0][0].tolist()))),
    "h0 shape": (ValueError, lambda: _core.forward("lstm", X, W, np.zeros((1, B, H + 1)))),
    "h0 directions": (ValueError, lambda: _core.forward("lstm", X, W, np.zeros((2, B, H)))),
    "h0 2d": (ValueError, lambda: _core.forward("lstm", X, W, np.zeros((B, H)))),
    "h0 float32": (TypeError, lambda: _core.forward("lstm", X, W, np.zeros((1, B, H), np.float32))),
    "c0 shape": (ValueError, lambda: _core.forward("lstm", X, W, None, np.zeros((1, B + 1, H)))),
    "c0 for gru": (
        ValueError,
        lambda: _core.forward("gru", X, core_weights(3, H, IN), None, np.zeros((1, B, H))),
    ),
    "lengths int32": (TypeError, lambda: _core.forward("lstm", X, W, lengths=np.array([1, 2], np.int32))),
    "lengths uint64": (TypeError, lambda: _core.forward("lstm", X, W, lengths=np.array([1, 2], np.uint64))),
    "lengths float": (TypeError, lambda: _core.forward("lstm", X, W, lengths=np.array([1.0, 2.0]))),
    "lengths list": (TypeError, lambda: _core.forward("lstm", X, W, lengths=[1, 2])),
    "lengths count": (ValueError, lambda: _core.forward("lstm", X, W, lengths=np.array([1, 2, 3]))),
    "lengths 2d": (ValueError, lambda: _core.forward("lstm", X, W, lengths=np.array([[1, 2]]))),
    "lengths zero": (ValueError, lambda: _core.forward("lstm", X, W, lengths=np.array([0, 2]))),
    "lengths negative": (ValueError, lambda: _core.forward("lstm", X, W, lengths=np.array([-5, 2]))),
    "lengths past T": (ValueError, lambda: _core.forward("lstm", X, W, lengths=np.array([T + 1, 2]))),
    "lengths huge": (ValueError, lambda: _core.forward("lstm", X, W, lengths=np.array([2**62, 2]))),
    "batch_first not bool": (TypeError, lambda: _core.forward("lstm", X, W, batch_first="yes")),
}


@pytest.mark.parametrize("case", list(CORE_FORWARD_BAD))
def test_core_forward_bad_arguments(case):
    exc, fn = CORE_FORWARD_BAD[case]
    e = raises((ValueError, TypeError), "", fn)
    assert isinstance(e, exc), f"{case}: {type(e).__name__}: {e}"


def fresh_tape():
    y, hn, cn, tape = _core.forward("lstm", X, W, train=True)
    assert tape.pending
    return y, tape


CORE_BACKWARD_BAD = {
    "tape None": (TypeError, lambda t, y: _core.backward(None, W, y, grads=zero_grads(W))),
    "dy shape": (ValueError, lambda t, y: _core.backward(t, W, y[:, :2].copy(), grads=zero_grads(W))),
    "dy 2d": (ValueError, lambda t, y: _core.backward(t, W, y[0], grads=zero_grads(W))),
    "dy float32": (TypeError, lambda t, y: _core.backward(t, W, y.astype(np.float32), grads=zero_grads(W))),
    "dy non-contiguous": (
        ValueError,
        lambda t, y: _core.backward(t, W, np.asfortranarray(y), grads=zero_grads(W)),
    ),
    "dhn shape": (ValueError, lambda t, y: _core.backward(t, W, y, np.zeros((2, B, H)), grads=zero_grads(W))),
    "dcn shape": (
        ValueError,
        lambda t, y: _core.backward(t, W, y, None, np.zeros((1, B, H - 1)), grads=zero_grads(W)),
    ),
    "weights float32": (
        TypeError,
        lambda t, y: _core.backward(t, core_weights(4, H, IN, np.float32), y, grads=zero_grads(W)),
    ),
    "weights tuple": (TypeError, lambda t, y: _core.backward(t, tuple(W), y, grads=zero_grads(W))),
    "grads tuple": (TypeError, lambda t, y: _core.backward(t, W, y, grads=tuple(zero_grads(W)))),
    "grads float32": (
        TypeError,
        lambda t, y: _core.backward(t, W, y, grads=zero_grads(core_weights(4, H, IN, np.float32))),
    ),
    "grads read-only": (ValueError, lambda t, y: _core.backward(t, W, y, grads=read_only(zero_grads(W)))),
    "grads are the weights": (ValueError, lambda t, y: _core.backward(t, W, y, grads=W)),
    "grads twice the same array": (ValueError, lambda t, y: _core.backward(t, W, y, grads=same_array(W))),
    "grads 3-tuple": (ValueError, lambda t, y: _core.backward(t, W, y, grads=[zero_grads(W)[0][:3]])),
    # the following are only detected by the kernel's own checks
    "grads wrong shape": (
        ValueError,
        lambda t, y: _core.backward(t, W, y, grads=replace(zero_grads(W), 0, 0, np.zeros((3, 3)))),
    ),
    "grads no direction": (ValueError, lambda t, y: _core.backward(t, W, y, grads=[])),
    "grads two directions": (ValueError, lambda t, y: _core.backward(t, W, y, grads=zero_grads(W) * 2)),
    "weights of another hidden size": (
        ValueError,
        lambda t, y: _core.backward(
            t, core_weights(4, H + 1, IN), y, grads=zero_grads(core_weights(4, H + 1, IN))
        ),
    ),
    "weights of another input size": (
        ValueError,
        lambda t, y: _core.backward(
            t, core_weights(4, H, IN - 1), y, grads=zero_grads(core_weights(4, H, IN - 1))
        ),
    ),
    "weights of two directions": (
        ValueError,
        lambda t, y: _core.backward(t, W + W, y, grads=zero_grads(W) + zero_grads(W)),
    ),
}


def read_only(grads):
    for a in grads[0]:
        a.flags.writeable = False
    return grads


def same_array(weights):
    g = zero_grads(weights)[0]
    return [(g[0], g[1], g[2], g[2])]


@pytest.mark.parametrize("case", list(CORE_BACKWARD_BAD))
def test_core_backward_bad_arguments(case):
    exc, fn = CORE_BACKWARD_BAD[case]
    y, tape = fresh_tape()
    e = raises((ValueError, TypeError), "", fn, tape, y)
    assert isinstance(e, exc), f"{case}: {type(e).__name__}: {e}"


@pytest.mark.parametrize("case", [c for c in CORE_BACKWARD_BAD if c != "tape None"])
def test_core_backward_rejected_call_keeps_the_tape(case):
    """A rejected backward leaves the tape pending, so that a corrected call can be made (as
    src/python.rs intends: "Take the tape only once every argument has been accepted, so that a
    bad call can be retried")."""
    _, fn = CORE_BACKWARD_BAD[case]
    y, tape = fresh_tape()
    raises((ValueError, TypeError), "", fn, tape, y)
    assert tape.pending, f"the rejected call ({case}) used up the tape"
    dx, dh0, dc0 = _core.backward(tape, W, np.ones_like(y), grads=zero_grads(W))
    assert dx.shape == X.shape and not tape.pending


def test_core_backward_twice_and_eval_tape():
    y, tape = fresh_tape()
    _core.backward(tape, W, y, grads=zero_grads(W))
    raises(ValueError, "backward", _core.backward, tape, W, y, grads=zero_grads(W))
    assert "used" in repr(tape)
    y, hn, cn, tape = _core.forward("lstm", X, W, train=False)
    assert tape is None
    raises(TypeError, "", _core.backward, tape, W, y, grads=zero_grads(W))


def test_backward_sees_a_change_in_any_piece_of_large_weights(two_threads):
    """Weights of more than one piece (16384 elements) are copied and compared piece by piece,
    on the threads: a change in any piece is refused."""
    x = np.ones((2, 3, 96))
    for where in [(0, 0), (200, 50), (-1, -1)]:  # weight_ih_l0 (384 x 96): pieces 1, 2 and 3
        layer = rnnkit.LSTM(96, 96, dtype=np.float64, seed=0)
        y, _ = layer(x)
        w = layer.params["weight_ih_l0"]
        saved = w[where]
        w[where] += 1e-3
        with pytest.raises(ValueError, match="parameters changed between this forward and its backward"):
            layer.backward(np.ones_like(y))
        w[where] = saved
        layer.backward(np.ones_like(y))


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_backward_refuses_parameters_changed_since_forward(cell):
    """Gradients of a forward with other weights would be silently wrong: refused, and the tape
    stays usable once the parameters are back."""
    for name in ("weight_hh_l1_reverse", "bias_ih_l0"):  # the last layer's backward runs first
        layer = make_layer(cell, 3, 4, 2, bidirectional=True, dtype=np.float64, seed=0)
        y, _ = layer(np.ones((2, 5, 3)))
        saved = layer.params[name].copy()
        layer.params[name] += 1e-3
        with pytest.raises(ValueError, match="parameters changed between this forward and its backward"):
            layer.backward(np.ones_like(y))
        assert all(not g.any() for g in layer.grads.values()), "a refused backward changed grads"
        layer.params[name][...] = saved
        layer.backward(np.ones_like(y))
