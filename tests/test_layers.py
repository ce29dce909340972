"""Linear, Embedding, Dropout, Sequential and the pooling layers: forward against NumPy references,
float64 central-difference gradients, state and printing, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from reference import numerical_gradient
from rnnkit.layers import (
    GRU,
    LSTM,
    Dropout,
    Embedding,
    LastStep,
    Linear,
    MaxPool,
    MeanPool,
    Sequential,
)


def check_gradients(module, x, rng, run=None, **fwd):
    """Backward of ``module`` (in its current mode) against central differences of
    sum(R * module(x)) for x and every parameter; ``run`` (default: a plain forward) computes the
    output."""
    run = run or (lambda: module(x, **fwd))
    module.zero_grad()
    r = rng.standard_normal(run().shape)
    dx = module.backward(r)

    def loss():
        return float(np.sum(r * run()))

    if dx is not None:
        np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    assert module.params, "nothing to check"
    for name, p in module.params.items():
        np.testing.assert_allclose(
            module.grads[name], numerical_gradient(loss, p), rtol=1e-6, atol=1e-8, err_msg=name
        )


# ---------------------------------------------------------------------- Linear


@pytest.mark.parametrize("shape", [(5, 3), (4, 6, 3), (2, 2, 2, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_forward_matches_numpy(rng, shape, dtype):
    lin = Linear(3, 4, dtype=dtype, seed=1)
    x = rng.standard_normal(shape)
    y = lin(x)
    w, b = lin.params["weight"].astype(np.float64), lin.params["bias"].astype(np.float64)
    ref = np.einsum("...i,oi->...o", x, w) + b
    assert y.shape == (*shape[:-1], 4) and y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_linear_init_is_pytorch_default_and_seeded():
    lin = Linear(400, 300, seed=3)
    bound = 1 / np.sqrt(400)
    w, b = lin.params["weight"], lin.params["bias"]
    assert w.shape == (300, 400) and b.shape == (300,) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.abs(b).max() <= bound
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.02)
    np.testing.assert_array_equal(w, Linear(400, 300, seed=3).params["weight"])
    assert not np.array_equal(w, Linear(400, 300, seed=4).params["weight"])
    assert set(Linear(2, 3, bias=False).params) == {"weight"}


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(rng, shape, bias):
    lin = Linear(3, 2, bias=bias, dtype=np.float64, seed=0)
    check_gradients(lin, rng.standard_normal(shape), rng)


def test_linear_backward_accumulates(rng):
    lin = Linear(3, 2, dtype=np.float64, seed=0)
    x, dy = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    lin(x)
    lin.backward(dy)
    once = {k: v.copy() for k, v in lin.grads.items()}
    lin.backward(dy)
    for k, v in lin.grads.items():
        np.testing.assert_allclose(v, 2 * once[k])
    np.testing.assert_allclose(once["weight"], dy.T @ x)
    np.testing.assert_allclose(once["bias"], dy.sum(0))


def test_linear_bad_input():
    lin = Linear(3, 2)
    with pytest.raises(ValueError, match="in_features=3"):
        lin(np.zeros((4, 5)))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        lin(np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="in_features"):
        Linear(0, 2)
    with pytest.raises(TypeError, match="dtype"):
        Linear(3, 2, dtype=np.int32)
    with pytest.raises(ValueError, match="training mode"):
        Linear(3, 2).backward(np.zeros((1, 2)))
    lin(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"dy must have the shape of the output, \(4, 2\)"):
        lin.backward(np.zeros((4, 3)))
    lin.eval()
    lin(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="training mode"):
        lin.backward(np.zeros((4, 2)))


# ---------------------------------------------------------------------- Embedding


def test_embedding_forward_and_init(rng):
    emb = Embedding(1000, 64, seed=0)
    w = emb.params["weight"]
    assert w.shape == (1000, 64) and w.dtype == np.float32
    assert abs(w.mean()) < 0.01 and abs(w.std() - 1) < 0.01
    ids = rng.integers(0, 1000, size=(3, 7))
    y = emb(ids)
    assert y.shape == (3, 7, 64) and y.dtype == np.float32
    for b, t in np.ndindex(ids.shape):
        np.testing.assert_array_equal(y[b, t], w[ids[b, t]])
    np.testing.assert_array_equal(emb([4, 4, 0]), w[[4, 4, 0]])  # lists and uint work too
    np.testing.assert_array_equal(emb(np.array(5, dtype=np.uint8)), w[5])


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_backward_matches_loop(rng, padding_idx):
    emb = Embedding(6, 3, padding_idx=padding_idx, dtype=np.float64, seed=0)
    ids = rng.integers(0, 6, size=(4, 9))
    ids[0, :3] = 2  # repeats, and the padding row
    ids[1, :2] = 5
    emb(ids)
    dy = rng.standard_normal((4, 9, 3))
    assert emb.backward(dy) is None
    pad = None if padding_idx is None else padding_idx % 6
    ref = np.zeros((6, 3))
    for idx in np.ndindex(ids.shape):
        if ids[idx] != pad:
            ref[ids[idx]] += dy[idx]
    np.testing.assert_allclose(emb.grads["weight"], ref, rtol=1e-12, atol=1e-12)
    if padding_idx is None:  # (with padding, backward deliberately differs from the derivative)
        check_gradients(emb, ids, rng)


def test_embedding_padding_row():
    emb = Embedding(5, 4, padding_idx=-2, seed=1)
    assert emb.padding_idx == 3
    np.testing.assert_array_equal(emb.params["weight"][3], 0)
    assert np.all(emb.params["weight"][[0, 1, 2, 4]] != 0)
    np.testing.assert_array_equal(emb(np.array([[3, 3]])), 0)
    emb.backward(np.ones((1, 2, 4)))
    np.testing.assert_array_equal(emb.grads["weight"], 0)  # only padding ids: no gradient at all


def test_embedding_bad_input():
    emb = Embedding(10, 4)
    with pytest.raises(TypeError, match="ids must be an integer array; got dtype float64"):
        emb(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="ids"):
        emb(np.array([True]))
    with pytest.raises(ValueError, match=r"ids must be in 0\.\.9 .* got 10"):
        emb(np.array([[1, 10]]))
    with pytest.raises(ValueError, match=r"ids must be in 0\.\.9 .* got -1"):
        emb([-1, 3])
    with pytest.raises(ValueError, match=r"padding_idx must be in -10\.\.9"):
        Embedding(10, 4, padding_idx=10)
    with pytest.raises(TypeError, match="padding_idx"):
        Embedding(10, 4, padding_idx=1.0)
    emb(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"dy must have the shape of the output, \(2, 4\)"):
        emb.backward(np.zeros((2, 5)))


# ---------------------------------------------------------------------- Dropout


def test_dropout_statistics_and_mask_reuse(rng):
    p = 0.3
    drop = Dropout(p, seed=0)
    x = np.ones((400, 500), dtype=np.float32)
    y = drop(x)
    assert y.dtype == np.float32
    kept = y != 0
    assert abs(1 - kept.mean() - p) < 0.005
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)
    assert abs(y.mean() - 1) < 0.01
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(drop.backward(dy), dy * y, rtol=1e-6)  # x is ones: y is the mask
    y2 = drop(x)
    assert not np.array_equal(y, y2)  # a new mask per forward


def test_dropout_is_seeded_and_eval_is_identity(rng):
    x = rng.standard_normal((6, 7))
    np.testing.assert_array_equal(Dropout(0.5, seed=3)(x), Dropout(0.5, seed=3)(x))
    drop = Dropout(0.5, seed=3).eval()
    y = drop(x)
    np.testing.assert_array_equal(y, x)
    assert y.dtype == np.float64
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(drop.backward(dy), dy)
    zero = Dropout(0.0)
    np.testing.assert_array_equal(zero(x), x)
    np.testing.assert_array_equal(zero.backward(dy), dy)


def test_dropout_bad_input():
    for p in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\)"):
            Dropout(p)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        Dropout()(np.ones(3, dtype=np.int32))
    with pytest.raises(ValueError, match="training mode"):
        Dropout().backward(np.ones(3))
    with pytest.raises(TypeError, match="seed"):
        Dropout(seed="x")


# ---------------------------------------------------------------------- pooling


def pool_reference(kind, x, lengths):
    out = np.empty((x.shape[0], x.shape[2]))
    for b, n in enumerate(lengths):
        valid = x[b, :n]
        out[b] = {"last": valid[-1], "mean": valid.mean(0), "max": valid.max(0)}[kind]
    return out


POOLS = {"last": LastStep, "mean": MeanPool, "max": MaxPool}


@pytest.mark.parametrize("kind", POOLS)
@pytest.mark.parametrize("with_lengths", [True, False])
def test_pooling_forward_matches_loop(rng, kind, with_lengths):
    x = rng.standard_normal((4, 6, 5)).astype(np.float32)
    lengths = np.array([6, 1, 3, 5]) if with_lengths else None
    x[1, 1:] = 100.0  # padding must be ignored, even when it would win the max
    y = POOLS[kind]()(x, lengths=lengths)
    assert y.shape == (4, 5) and y.dtype == np.float32
    ref = pool_reference(kind, x.astype(np.float64), lengths if with_lengths else [6] * 4)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", POOLS)
def test_pooling_gradients_with_lengths(rng, kind):
    pool = POOLS[kind]()
    x = rng.standard_normal((3, 5, 4))
    lengths = np.array([2, 5, 1])
    check_gradients_no_params(pool, x, rng, lengths)


def check_gradients_no_params(module, x, rng, lengths):
    r = rng.standard_normal((x.shape[0], x.shape[2]))
    module(x, lengths=lengths)
    dx = module.backward(r)
    num = numerical_gradient(lambda: float(np.sum(r * module(x, lengths=lengths))), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(dx[b, n:], 0)


def test_laststep_bidirectional_gives_final_states(rng):
    lstm = LSTM(3, 4, bidirectional=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((3, 6, 3))
    lengths = np.array([6, 2, 4])
    y, (h, _) = lstm(x, lengths=lengths)
    pooled = LastStep(bidirectional=True)(y, lengths=lengths)
    np.testing.assert_allclose(pooled, np.concatenate([h[0], h[1]], axis=1), rtol=1e-12)
    np.testing.assert_allclose(LastStep()(y, lengths=lengths)[:, :4], h[0], rtol=1e-12)
    check_gradients_no_params(LastStep(bidirectional=True), y.copy(), rng, lengths)


def test_pooling_bad_input():
    pool = MeanPool()
    with pytest.raises(ValueError, match=r"x must be 3-dimensional \(batch, seq, features\)"):
        pool(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least one"):
        pool(np.zeros((2, 0, 3)))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        pool(np.zeros((2, 3, 4)), lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"lengths must be in 1\.\.3"):
        pool(np.zeros((2, 3, 4)), lengths=[0, 2])
    with pytest.raises(TypeError, match="lengths must be integers"):
        pool(np.zeros((2, 3, 4)), lengths=[1.0, 2.0])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        pool(np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="even number of features"):
        LastStep(bidirectional=True)(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="training mode"):
        MaxPool().backward(np.zeros((2, 4)))
    pool(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"dy must have the shape of the output, \(2, 4\)"):
        pool.backward(np.zeros((2, 3, 4)))
    pool.eval()
    pool(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="training mode"):
        pool.backward(np.zeros((2, 4)))


# ---------------------------------------------------------------------- Sequential


def test_sequential_linear_dropout_gradients(rng):
    drop = Dropout(0.4)
    seq = Sequential(Linear(3, 5, dtype=np.float64, seed=0), drop, Linear(5, 2, dtype=np.float64, seed=1))
    x = rng.standard_normal((2, 4, 3))
    drop.eval()  # Dropout as identity inside a training model
    check_gradients(seq, x, rng)
    drop.train()

    def fixed_mask():  # the same mask on every forward, so central differences see one function
        drop._rng = np.random.default_rng(7)
        return seq(x)

    check_gradients(seq, x, rng, run=fixed_mask)
    assert np.any(fixed_mask() != seq[2](seq[0](x)))  # the mask did something


def test_sequential_lstm_laststep_linear_gradients_with_lengths(rng):
    seq = Sequential(
        LSTM(3, 4, dtype=np.float64, seed=0),
        LastStep(),
        Linear(4, 2, dtype=np.float64, seed=1),
    )
    x = rng.standard_normal((3, 5, 3))
    lengths = np.array([5, 2, 3])
    check_gradients(seq, x, rng, lengths=lengths)
    # the same as running the modules by hand
    y, _ = seq[0](x, lengths=lengths)
    np.testing.assert_allclose(seq(x, lengths=lengths), seq[2](seq[1](y, lengths=lengths)), rtol=1e-12)


def test_sequential_bidirectional_gru_gradients(rng):
    seq = Sequential(
        GRU(2, 3, bidirectional=True, dtype=np.float64, seed=0),
        LastStep(bidirectional=True),
        Linear(6, 1, dtype=np.float64, seed=1),
    )
    check_gradients(seq, rng.standard_normal((3, 4, 2)), rng, lengths=np.array([1, 4, 3]))


def test_sequential_embedding_lstm_meanpool(rng):
    seq = Sequential(
        Embedding(7, 3, padding_idx=0, dtype=np.float64, seed=0),
        LSTM(3, 4, dtype=np.float64, seed=1),
        MeanPool(),
        Linear(4, 2, dtype=np.float64, seed=2),
    )
    ids = rng.integers(1, 7, size=(3, 5))
    lengths = np.array([5, 3, 1])
    for b, n in enumerate(lengths):
        ids[b, n:] = 0
    check_gradients(seq, ids, rng, lengths=lengths)  # backward returns None for the ids
    np.testing.assert_array_equal(seq.grads["0.weight"][0], 0)


def test_sequential_container_protocol():
    a, b, c = Linear(2, 3), Dropout(), Linear(3, 1)
    seq = Sequential(a, b, c)
    assert len(seq) == 3
    assert list(seq) == [a, b, c]
    assert seq[0] is a and seq[-1] is c
    part = seq[1:]
    assert isinstance(part, Sequential) and list(part) == [b, c]
    assert list(part.params) == ["1.weight", "1.bias"]  # a slice renumbers from 0
    with pytest.raises(IndexError, match="out of range"):
        seq[3]
    seq.eval()
    assert not any(m.training for m in seq)
    seq.train()
    assert all(m.training for m in seq)
    with pytest.raises(TypeError, match="module 1 must be an rnnkit Module"):
        Sequential(a, np.zeros(3))
    with pytest.raises(ValueError, match="module 2 is the same object as module 0"):
        Sequential(a, b, a)


def test_sequential_state_dict_round_trip(rng):
    def build(seed):
        return Sequential(
            LSTM(3, 4, dtype=np.float64, seed=seed),
            MaxPool(),
            Dropout(0.2),
            Linear(4, 2, dtype=np.float64, seed=seed),
        )

    src, dst = build(0), build(1)
    state = src.state_dict()
    assert set(state) == {
        "0.weight_ih_l0",
        "0.weight_hh_l0",
        "0.bias_ih_l0",
        "0.bias_hh_l0",
        "3.weight",
        "3.bias",
    }
    assert state["3.weight"].shape == (2, 4)
    state["3.weight"][...] = 0  # a copy: the module is unchanged
    assert np.any(src.params["3.weight"] != 0)
    x = rng.standard_normal((2, 5, 3))
    src.eval(), dst.eval()
    assert not np.allclose(src(x), dst(x))
    live = dst.params["0.weight_ih_l0"]
    dst.load_state_dict(src.state_dict())
    assert dst.params["0.weight_ih_l0"] is live  # loaded in place
    np.testing.assert_array_equal(src(x), dst(x))
    assert src.num_parameters() == sum(v.size for v in state.values())


def test_sequential_repr_and_summary():
    seq = Sequential(Embedding(10, 3, padding_idx=0), LSTM(3, 4), LastStep(), Dropout(0.1), Linear(4, 2))
    text = repr(seq)
    for part in (
        "(0): Embedding(10, 3, padding_idx=0",
        "(1): LSTM(3, 4",
        "(2): LastStep()",
        "(3): Dropout(p=0.1)",
    ):
        assert part in text
    assert "(4): Linear(4, 2, dtype=float32)" in text
    summary = seq.summary()
    total = 30 + (16 * 3 + 16 * 4 + 32) + 10
    assert f"total: {total:,} trainable parameters" in summary
    for name in ("0", "1", "2", "3", "4", "Linear(4, 2"):
        assert f"{name}" in summary
    assert repr(LastStep(bidirectional=True)) == "LastStep(bidirectional=True)"
    assert repr(Linear(2, 3, bias=False, dtype=np.float64)) == "Linear(2, 3, bias=False, dtype=float64)"


def test_exports():
    for name in ("Linear", "Embedding", "Dropout", "Sequential", "LastStep", "MeanPool", "MaxPool"):
        assert name in rnnkit.layers.__all__
