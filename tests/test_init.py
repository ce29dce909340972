"""rnnkit.init: the in-place initialisers (bounds, variances, orthogonality, seeding, errors) and
init_recurrent on whole models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rnnkit import init
from rnnkit.layers import GRU, LSTM, RNN, Linear, Sequential


def assert_orthonormal_rows(m, gain=1.0):
    m = m.reshape(m.shape[0], -1)
    if m.shape[0] > m.shape[1]:
        m = m.T
    np.testing.assert_allclose(
        m @ m.T, gain**2 * np.eye(m.shape[0]), atol=1e-10 if m.dtype == np.float64 else 1e-6
    )


# ---------------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("shape", [(5, 5), (8, 3), (3, 8), (4, 2, 3)])
def test_orthogonal_shapes(shape):
    a = np.empty(shape)
    assert init.orthogonal_(a, seed=0) is a
    assert_orthonormal_rows(a)


def test_orthogonal_gain_dtype_and_sign_correction():
    a = np.empty((6, 6), dtype=np.float32)
    init.orthogonal_(a, gain=2.0, seed=5)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a.T.astype(np.float64) @ a, 4 * np.eye(6), atol=1e-5)
    # the reference: QR of the same Gaussian, with R's diagonal made positive
    q, r = np.linalg.qr(np.random.default_rng(5).standard_normal((6, 6)))
    ref = q * np.sign(np.diag(r))
    np.testing.assert_allclose(a, 2 * ref, rtol=1e-5, atol=1e-6)


def test_orthogonal_blocks():
    h = 5
    a = np.empty((4 * h, h))
    init.orthogonal_(a, seed=1, blocks=4)
    for g in range(4):
        assert_orthonormal_rows(a[g * h : (g + 1) * h])
    # without blocks, the (4H, H) matrix has orthonormal columns, so a gate block is not orthogonal
    init.orthogonal_(a, seed=1)
    np.testing.assert_allclose(a.T @ a, np.eye(h), atol=1e-10)
    assert not np.allclose(a[:h].T @ a[:h], np.eye(h), atol=1e-3)
    with pytest.raises(ValueError, match="blocks=3 must divide"):
        init.orthogonal_(a, blocks=3)
    with pytest.raises(ValueError, match="blocks must be a positive integer"):
        init.orthogonal_(a, blocks=0)


# ---------------------------------------------------------------------- fan-based initialisers

SHAPE = (300, 500)  # fan_in 500, fan_out 300


def test_xavier_uniform_bound_and_variance():
    a = np.empty(SHAPE)
    init.xavier_uniform_(a, gain=1.5, seed=0)
    bound = 1.5 * math.sqrt(6 / 800)
    assert bound * 0.999 < np.abs(a).max() <= bound
    np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.02)
    assert abs(a.mean()) < 0.01 * bound


def test_xavier_normal_std():
    a = np.empty(SHAPE, dtype=np.float32)
    init.xavier_normal_(a, seed=0)
    np.testing.assert_allclose(a.std(), math.sqrt(2 / 800), rtol=0.01)


@pytest.mark.parametrize(("nonlinearity", "gain"), [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("linear", 1.0)])
def test_kaiming(nonlinearity, gain):
    a = np.empty(SHAPE)
    init.kaiming_uniform_(a, nonlinearity, seed=0)
    bound = gain * math.sqrt(3 / 500)
    assert bound * 0.999 < np.abs(a).max() <= bound
    np.testing.assert_allclose(a.var(), gain**2 / 500, rtol=0.02)
    init.kaiming_normal_(a, nonlinearity, seed=1)
    np.testing.assert_allclose(a.std(), gain / math.sqrt(500), rtol=0.01)


def test_fans_of_more_than_two_dimensions():
    a = np.empty((64, 16, 3, 3))  # fan_in 16*9 = 144, fan_out 64*9 = 576
    init.kaiming_normal_(a, seed=0)
    np.testing.assert_allclose(a.std(), math.sqrt(2 / 144), rtol=0.02)
    init.xavier_uniform_(a, seed=0)
    assert np.abs(a).max() <= math.sqrt(6 / 720)


def test_calculate_gain():
    assert init.calculate_gain("sigmoid") == 1.0
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / 1.0001))
    with pytest.raises(ValueError, match=r"nonlinearity must be one of \['leaky_relu', 'linear', 'relu'"):
        init.calculate_gain("gelu")


def test_uniform_normal_zeros():
    a = np.empty((200, 300), dtype=np.float32)
    assert init.uniform_(a, -2.0, 3.0, seed=0) is a
    assert a.dtype == np.float32 and -2 <= a.min() < -1.99 and 2.99 < a.max() <= 3
    init.normal_(a, mean=1.0, std=0.5, seed=0)
    assert abs(a.mean() - 1) < 0.005 and abs(a.std() - 0.5) < 0.005
    assert init.zeros_(a) is a and not a.any()
    view = np.ones((4, 4))[:, 1:3]  # a non-contiguous view is filled in place too
    init.normal_(view, seed=0)
    assert view.base is not None and np.all(view.base[:, [0, 3]] == 1) and np.all(view != 1)


def test_seeding():
    def draw(seed):
        return init.xavier_normal_(np.empty((4, 5)), seed=seed)

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    gen = np.random.default_rng(0)
    assert not np.array_equal(draw(gen), draw(gen))  # a Generator is advanced
    np.testing.assert_array_equal(
        draw(np.random.default_rng(0)), np.random.default_rng(0).normal(0, math.sqrt(2 / 9), (4, 5))
    )


def test_bad_input():
    with pytest.raises(TypeError, match="a must be a numpy array"):
        init.zeros_([1.0, 2.0])
    with pytest.raises(TypeError, match="a must be a floating-point array; got dtype int64"):
        init.normal_(np.zeros(3, dtype=np.int64))
    ro = np.zeros((2, 2))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="a must be writeable"):
        init.uniform_(ro)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.xavier_uniform_(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.orthogonal_(np.zeros(5))
    with pytest.raises(ValueError, match="none of size 0"):
        init.kaiming_uniform_(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="high must be at least low"):
        init.uniform_(np.zeros(3), 1.0, 0.0)
    with pytest.raises(ValueError, match="std must be non-negative"):
        init.normal_(np.zeros(3), std=-1.0)
    with pytest.raises(TypeError, match="gain must be a real number"):
        init.xavier_uniform_(np.zeros((2, 2)), gain="1")
    with pytest.raises(ValueError, match="low must be finite"):
        init.uniform_(np.zeros(3), -math.inf, 0.0)
    with pytest.raises(TypeError, match="seed must be an int, a numpy.random.Generator or None"):
        init.uniform_(np.zeros(3), seed=1.5)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        init.kaiming_normal_(np.zeros((2, 2)), "swish")


# ---------------------------------------------------------------------- init_recurrent


def test_init_recurrent_lstm_defaults_and_forget_bias():
    lstm = LSTM(5, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    live = dict(lstm.params)
    assert init.init_recurrent(lstm, forget_bias=1.0, seed=0) is lstm
    h = 4
    for name, p in lstm.params.items():
        assert p is live[name]  # filled in place
        if name.startswith("weight_hh"):
            for g in range(4):
                assert_orthonormal_rows(p[g * h : (g + 1) * h])
        elif name.startswith("weight_ih"):
            fan_in = 5 if "_l0" in name else 8
            assert np.abs(p).max() <= math.sqrt(6 / (fan_in + h))  # per-gate fan_out H
        elif name.startswith("bias_ih"):
            np.testing.assert_array_equal(p, np.r_[np.zeros(h), np.ones(h), np.zeros(2 * h)])
        else:
            np.testing.assert_array_equal(p, 0)
    y, _ = lstm(np.ones((2, 3, 5)))
    assert np.all(np.isfinite(y))


def test_init_recurrent_uses_per_gate_fan_out():
    lstm = LSTM(200, 100, dtype=np.float64)
    init.init_recurrent(lstm, seed=0)
    w = lstm.params["weight_ih_l0"]  # (400, 200)
    per_gate, whole = math.sqrt(6 / (200 + 100)), math.sqrt(6 / (200 + 400))
    assert whole * 1.3 < np.abs(w).max() <= per_gate
    np.testing.assert_allclose(w.var(), per_gate**2 / 3, rtol=0.02)


def test_init_recurrent_default_bias_keeps_forget_hh_zero():
    lstm = LSTM(3, 6, dtype=np.float64)
    init.init_recurrent(lstm, bias="default", forget_bias=2.5, seed=1)
    b_ih, b_hh = lstm.params["bias_ih_l0"], lstm.params["bias_hh_l0"]
    np.testing.assert_array_equal(b_ih[6:12], 2.5)
    np.testing.assert_array_equal(b_hh[6:12], 0)
    for rest in (b_ih[:6], b_ih[12:], b_hh[:6], b_hh[12:]):
        assert np.all(rest != 0) and np.abs(rest).max() <= 1 / math.sqrt(6)


@pytest.mark.parametrize("kind", ["xavier_normal", "kaiming_uniform", "kaiming_normal", "default", "zeros"])
def test_init_recurrent_kinds(kind):
    gru = GRU(8, 6, dtype=np.float64)
    init.init_recurrent(gru, input=kind, recurrent=kind, seed=0)
    w = gru.params["weight_hh_l0"]
    if kind == "zeros":
        assert not w.any()
    elif kind == "default":
        assert np.abs(w).max() <= 1 / math.sqrt(6)
    elif kind == "kaiming_uniform":
        assert np.abs(w).max() <= math.sqrt(6 / 6)
    assert w.any() or kind == "zeros"
    assert not gru.params["bias_ih_l0"].any()


def test_init_recurrent_inside_a_model_is_deterministic():
    def model(seed):
        return Sequential(
            RNN(3, 4, seed=seed),
            Linear(4, 4, seed=seed),
            GRU(4, 5, num_layers=2, seed=seed),
        )

    a, b = model(0), model(1)
    linear_before = a.params["1.weight"].copy()
    init.init_recurrent(a, seed=7)
    init.init_recurrent(b, seed=7)
    np.testing.assert_array_equal(a.params["1.weight"], linear_before)  # other layers left alone
    for name, p in a.params.items():
        if not name.startswith("1."):
            np.testing.assert_array_equal(p, b.params[name], err_msg=name)
    assert_orthonormal_rows(a.params["0.weight_hh_l0"])  # RNN: one gate block
    for g in range(3):
        assert_orthonormal_rows(a.params["2.weight_hh_l1"][g * 5 : (g + 1) * 5])
    init.init_recurrent(b, seed=8)
    assert not np.array_equal(a.params["2.weight_hh_l1"], b.params["2.weight_hh_l1"])


def test_init_recurrent_errors():
    lstm = LSTM(3, 4)
    before = {k: v.copy() for k, v in lstm.params.items()}
    with pytest.raises(ValueError, match=r"input must be one of \['xavier_uniform', .*'orthogonal'"):
        init.init_recurrent(lstm, input="he")
    with pytest.raises(ValueError, match=r"recurrent must be one of"):
        init.init_recurrent(lstm, recurrent="identity")
    with pytest.raises(ValueError, match=r"bias must be one of \['default', 'zeros'\]"):
        init.init_recurrent(lstm, bias="orthogonal")
    with pytest.raises(ValueError, match="forget_bias needs an LSTM layer with bias=True"):
        init.init_recurrent(Sequential(GRU(3, 4)), forget_bias=1.0)
    with pytest.raises(ValueError, match="forget_bias needs an LSTM"):
        init.init_recurrent(LSTM(3, 4, bias=False), forget_bias=1.0)
    with pytest.raises(ValueError, match="no RNN, LSTM or GRU layer"):
        init.init_recurrent(Linear(2, 2))
    with pytest.raises(TypeError, match="module must be an rnnkit Module"):
        init.init_recurrent(np.zeros(2))
    with pytest.raises(TypeError, match="forget_bias must be a real number"):
        init.init_recurrent(lstm, forget_bias="1")
    for k, v in lstm.params.items():  # nothing was changed by the refused calls
        np.testing.assert_array_equal(v, before[k])
