"""Backward of every cell against central finite differences of the NumPy reference (float64)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import CELLS, make_layer, mixed_lengths, random_state, seq_shape, split_state
from reference import loss, loss_weights, numerical_gradient, reference_forward, rel_error

GRAD_TOL = 1e-6
EPS = 1e-6
B, T, IN = 3, 4, 3

# (name, num_layers, bidirectional, lengths, initial state, batch_first, hidden, bias)
CONFIGS = [
    ("uni_1layer_lengths_state", 1, False, [4, 1, 2], True, True, 3, True),
    ("bi_1layer_lengths_state", 1, True, [2, 4, 1], True, True, 3, True),
    ("bi_2layers_lengths_state_time_major", 2, True, [1, 3, 4], True, False, 3, True),
    ("bi_2layers_full_zero_state", 2, True, None, False, True, 2, True),
    ("uni_2layers_lengths_state_no_bias", 2, False, [3, 4, 2], True, True, 2, False),
]


def run_layer_gradients(layer, x, state, lengths, wy, wh, wc):
    """Forward + backward of the loss through the layer; returns (loss, dx, dh0, dc0, grads)."""
    layer.zero_grad()
    y, out = layer(x, state=state, lengths=lengths)
    hn, cn = split_state(out)
    dstate = (wh, wc) if layer._has_c else wh
    dx, dstate0 = layer.backward(wy, dstate)
    dh0, dc0 = split_state(dstate0)
    return loss(y, hn, cn, wy, wh, wc), dx, dh0, dc0, {k: v.copy() for k, v in layer.grads.items()}


def check_all_gradients(cell, layer, x, state, lengths, seed, masks=None):
    rng = np.random.default_rng(seed)
    batch_first = layer.batch_first
    batch = x.shape[0] if batch_first else x.shape[1]
    seq_len = x.shape[1] if batch_first else x.shape[0]
    y_shape = seq_shape(batch_first, batch, seq_len, layer.num_directions * layer.hidden_size)
    sshape = (layer.num_layers * layer.num_directions, batch, layer.hidden_size)
    wy, wh, wc = loss_weights(rng, y_shape, sshape, layer._has_c)

    value, dx, dh0, dc0, grads = run_layer_gradients(layer, x, state, lengths, wy, wh, wc)
    params = {k: v.astype(np.float64).copy() for k, v in layer.params.items()}
    xr = x.astype(np.float64).copy()
    if state is None:
        h0 = np.zeros(sshape)
        c0 = np.zeros(sshape) if layer._has_c else None
    else:
        h0, c0 = (a.astype(np.float64).copy() if a is not None else None for a in split_state(state))

    def f():
        y, hn, cn = reference_forward(cell, params, xr, h0, c0, lengths, batch_first, masks=masks)
        return loss(y, hn, cn, wy, wh, wc)

    assert abs(f() - value) <= 1e-10 * max(1.0, abs(value))
    errors = {}
    for name in sorted(params):
        errors[name] = rel_error(layer.grads[name], numerical_gradient(f, params[name], EPS))
    errors["x"] = rel_error(dx, numerical_gradient(f, xr, EPS))
    errors["h0"] = rel_error(dh0, numerical_gradient(f, h0, EPS))
    if layer._has_c:
        errors["c0"] = rel_error(dc0, numerical_gradient(f, c0, EPS))
    else:
        assert dc0 is None
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL}
    assert not bad, f"relative gradient errors above {GRAD_TOL}: {bad}"
    assert dx.shape == x.shape and dx.dtype == layer.dtype
    assert dh0.shape == sshape
    return grads, dx


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_finite_differences(cell, config):
    _, num_layers, bidirectional, lengths, with_state, batch_first, hidden, bias = config
    rng = np.random.default_rng(2024)
    layer = make_layer(
        cell,
        IN,
        hidden,
        num_layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        dtype=np.float64,
        seed=3,
    )
    x = rng.standard_normal(seq_shape(batch_first, B, T, IN))
    state = random_state(rng, layer, B) if with_state else None
    lens = None if lengths is None else np.array(lengths)
    grads, dx = check_all_gradients(cell, layer, x, state, lens, seed=99)
    if lens is not None:
        xb = dx if batch_first else dx.transpose(1, 0, 2)
        for b, n in enumerate(lens):
            assert np.all(xb[b, n:] == 0), "gradient reaches x past a sequence's length"


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_accumulate_and_zero_grad(cell):
    rng = np.random.default_rng(5)
    layer = make_layer(cell, IN, 3, 2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.standard_normal((B, T, IN))
    state = random_state(rng, layer, B)
    lengths = np.array([4, 1, 3])
    wy, wh, wc = loss_weights(rng, (B, T, 6), (4, B, 3), layer._has_c)
    dstate = (wh, wc) if layer._has_c else wh

    layer.zero_grad()
    layer(x, state=state, lengths=lengths)
    dx1, ds1 = layer.backward(wy, dstate)
    once = {k: v.copy() for k, v in layer.grads.items()}
    assert all(np.any(v != 0) for v in once.values())
    layer(x, state=state, lengths=lengths)
    dx2, ds2 = layer.backward(wy, dstate)
    for k, v in layer.grads.items():
        np.testing.assert_allclose(v, 2 * once[k], rtol=1e-13, atol=1e-14, err_msg=k)
    np.testing.assert_array_equal(dx1, dx2)
    for a, b in zip(split_state(ds1), split_state(ds2), strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    layer.zero_grad()
    assert all(not v.any() for v in layer.grads.values())
    assert set(layer.grads) == set(layer.params)
    # after zero_grad, one backward gives the single gradient again
    layer(x, state=state, lengths=lengths)
    layer.backward(wy, dstate)
    for k, v in layer.grads.items():
        np.testing.assert_allclose(v, once[k], rtol=1e-13, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_dstate_is_zero_dstate(cell):
    rng = np.random.default_rng(6)
    layer = make_layer(cell, IN, 3, 2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.standard_normal((B, T, IN))
    wy = rng.standard_normal((B, T, 6))
    layer(x, lengths=[2, 4, 1])
    dx1, ds1 = layer.backward(wy)
    g1 = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    layer(x, lengths=[2, 4, 1])
    zero = layer.initial_state(B)
    dx2, ds2 = layer.backward(wy, zero)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-14, atol=1e-15)
    for a, b in zip(split_state(ds1), split_state(ds2), strict=True):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    for k, v in layer.grads.items():
        np.testing.assert_allclose(v, g1[k], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_gradients_with_fixed_mask(cell):
    """Train mode with dropout: the forward is the reference with the layer's dropout masks applied
    between layers, and backward is the gradient of that function (mask held fixed)."""
    rng = np.random.default_rng(8)
    layer = make_layer(cell, IN, 2, 3, bidirectional=True, dropout=0.4, dtype=np.float64, seed=4)
    x = rng.standard_normal((B, T, IN))
    state = random_state(rng, layer, B)
    lengths = np.array([3, 4, 1])
    layer._rng = np.random.default_rng(77)
    y, _ = layer(x, state=state, lengths=lengths)
    masks = [m.copy() for m in layer._masks[:-1]]
    assert layer._masks[-1] is None
    assert len(masks) == 2 and all(m is not None and m.shape == (B, T, 4) for m in masks)
    assert all(np.any(m == 0) for m in masks), "dropout=0.4 dropped nothing"
    h0, c0 = split_state(state)
    ry, _, _ = reference_forward(cell, layer.params, x, h0, c0, lengths, masks=masks)
    np.testing.assert_allclose(y, ry, rtol=1e-12, atol=1e-12)
    # the same rng state gives the same masks, hence the same output
    layer._rng = np.random.default_rng(77)
    y2, _ = layer(x, state=state, lengths=lengths)
    np.testing.assert_array_equal(y, y2)

    layer._rng = np.random.default_rng(77)
    check_all_gradients(cell, layer, x, state, lengths, seed=3, masks=masks)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_statistics(cell):
    p = 0.3
    rng = np.random.default_rng(9)
    layer = make_layer(cell, 4, 16, 2, dropout=p, dtype=np.float64, seed=2)
    x = rng.standard_normal((20, 30, 4))
    layer.eval()
    y_eval, _ = layer(x)
    ry, _, _ = reference_forward(cell, layer.params, x)
    np.testing.assert_allclose(y_eval, ry, rtol=1e-12, atol=1e-12)
    y_eval2, _ = layer(x)
    np.testing.assert_array_equal(y_eval, y_eval2)

    layer.train()
    y_train, _ = layer(x)
    assert not np.allclose(y_train, y_eval)
    mask = layer._masks[0]
    frac = float(np.mean(mask == 0))
    assert abs(frac - p) < 0.02, f"dropped fraction {frac} for p={p}"
    np.testing.assert_allclose(mask[mask != 0], 1 / (1 - p), rtol=1e-12)
    ry, _, _ = reference_forward(cell, layer.params, x, masks=[mask])
    np.testing.assert_allclose(y_train, ry, rtol=1e-12, atol=1e-12)
    # a new forward draws a new mask
    layer(x)
    assert np.any(layer._masks[0] != mask)


@pytest.mark.parametrize("batch", [37, 130])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("cell", CELLS)
def test_large_batch_gradients_are_sums_over_sequences(cell, batch_first, batch, two_threads):
    """Large batches with mixed lengths (B = 130: cut into two slices with their own time loops,
    sequences sorted by length): dx, dstate0 and the parameter gradients equal those of each sequence
    run alone (the parameter gradients summed over the sequences). The B = 1 path is checked against
    finite differences above."""
    rng = np.random.default_rng(10)
    seq_len, hidden = 7, 4
    layer = make_layer(
        cell, IN, hidden, 2, bidirectional=True, batch_first=batch_first, dtype=np.float64, seed=12
    )
    x = rng.standard_normal(seq_shape(batch_first, batch, seq_len, IN))
    state = random_state(rng, layer, batch)
    lengths = mixed_lengths(batch, seq_len, rng)
    sshape = (4, batch, hidden)
    wy, wh, wc = loss_weights(rng, seq_shape(batch_first, batch, seq_len, 2 * hidden), sshape, layer._has_c)
    _, dx, dh0, dc0, grads = run_layer_gradients(layer, x, state, lengths, wy, wh, wc)

    bax = 0 if batch_first else 1  # the batch axis of x, y, dx
    total = {k: np.zeros_like(v) for k, v in grads.items()}
    h0, c0 = split_state(state)
    for b in range(batch):
        one = slice(b, b + 1)
        xb = np.take(x, [b], axis=bax)
        sb = (h0[:, one], c0[:, one]) if layer._has_c else h0[:, one]
        wyb = np.take(wy, [b], axis=bax)
        wcb = None if wc is None else wc[:, one]
        _, dxb, dh0b, dc0b, gb = run_layer_gradients(layer, xb, sb, lengths[one], wyb, wh[:, one], wcb)
        np.testing.assert_allclose(np.take(dx, [b], axis=bax), dxb, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dh0[:, one], dh0b, rtol=1e-10, atol=1e-12)
        if layer._has_c:
            np.testing.assert_allclose(dc0[:, one], dc0b, rtol=1e-10, atol=1e-12)
        for k in total:
            total[k] += gb[k]
    for k in total:
        assert rel_error(grads[k], total[k]) <= 1e-10, k


@pytest.mark.parametrize(("hidden", "bidirectional"), [(9, True), (17, False)], ids=["H9_bi", "H17_uni"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_hidden_sizes_past_simd_width(cell, hidden, bidirectional):
    """Hidden sizes that fill whole SIMD vectors (4 doubles, 8 floats with AVX2) plus a remainder, so
    that the vectorised pointwise backward is checked, not only its scalar tail."""
    rng = np.random.default_rng(hidden)
    layer = make_layer(cell, IN, hidden, 1, bidirectional=bidirectional, dtype=np.float64, seed=13)
    x = rng.standard_normal((2, 3, IN))
    state = random_state(rng, layer, 2)
    check_all_gradients(cell, layer, x, state, np.array([3, 2]), seed=14)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_unaffected_by_changing_inputs_after_forward(cell):
    """What backward needs is kept by forward: overwriting x or the initial state afterwards changes
    nothing."""
    rng = np.random.default_rng(15)
    layer = make_layer(cell, IN, 4, 2, bidirectional=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((B, T, IN))
    state = random_state(rng, layer, B)
    dy = rng.standard_normal((B, T, 8))
    layer(x, state=state, lengths=[T, 2, 1])
    dx1, ds1 = layer.backward(dy)
    g1 = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    layer(x, state=state, lengths=[T, 2, 1])
    x[...] = 7.0
    for a in split_state(state):
        if a is not None:
            a[...] = -3.0
    dx2, ds2 = layer.backward(dy)
    np.testing.assert_array_equal(dx1, dx2)
    for a, b in zip(split_state(ds1), split_state(ds2), strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, g1[k], err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_hidden_grads_are_dy_plus_the_gradient_through_the_rest_of_the_sequence(cell):
    """With retain_hidden_grads, backward keeps dL/dh_t for every t. Check it independently: it is
    dy_t plus dL/d(initial state) of a forward over steps t+1.. started from (h_t, c_t)."""
    rng = np.random.default_rng(21)
    seq_len, hidden = 6, 4
    layer = make_layer(cell, IN, hidden, 1, dtype=np.float64, seed=3)
    x = rng.standard_normal((B, seq_len, IN))
    dy = rng.standard_normal((B, seq_len, hidden))
    y, _ = layer(x)
    layer.retain_hidden_grads = True
    layer.backward(dy)
    (got,) = layer.hidden_grads
    assert got.shape == y.shape
    np.testing.assert_allclose(got[:, -1], dy[:, -1], rtol=0, atol=0)  # nothing after the last step
    layer.retain_hidden_grads = False
    for t in range(seq_len - 1):
        _, state_t = layer(x[:, : t + 1])
        layer(x[:, t + 1 :], state=state_t)
        _, dstate = layer.backward(dy[:, t + 1 :])
        dh_t, _ = split_state(dstate)
        np.testing.assert_allclose(got[:, t], dy[:, t] + dh_t[0], rtol=1e-12, atol=1e-12)
    assert layer.hidden_grads == []  # not kept unless asked for


def test_hidden_grads_zero_at_padding_and_one_array_per_stacked_layer():
    rng = np.random.default_rng(22)
    layer = make_layer("lstm", IN, 3, 2, bidirectional=True, dtype=np.float64, seed=4)
    lengths = np.array([5, 2, 3])
    x = rng.standard_normal((B, 5, IN))
    y, _ = layer(x, lengths=lengths)
    layer.retain_hidden_grads = True
    layer.backward(rng.standard_normal(y.shape))
    assert len(layer.hidden_grads) == 2
    for g in layer.hidden_grads:
        assert g.shape == y.shape
        for b, n in enumerate(lengths):
            assert not g[b, n:].any() and np.abs(g[b, :n]).min() > 0


@pytest.mark.parametrize("hidden", [136, 200])
@pytest.mark.parametrize("batch", [37, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_of_steps_cut_into_blocks(cell, batch, hidden, two_threads):
    """A step large enough to be cut into blocks of hidden units (136 = 72 + 64; 200 = 56 + 56 +
    56 + 32) and of rows (37 sequences in two parts), bidirectional, with lengths: every gradient
    against central differences of the reference along three random directions (the full
    finite-difference check would need tens of thousands of forwards). Backward's recurrent
    product is cut into two parts of one unit block each at 136, of two (112 and 88 units) at
    200, whose partial products are added. At batch 1 the calling thread leads the call, and the
    weight gradients' products are cut into blocks of 64 columns (139 = 64 + 64 + 11 at 136)
    that it and the kernel thread take in turn."""
    rng = np.random.default_rng(5)
    seq_len = 5
    layer = make_layer(cell, IN, hidden, 1, bidirectional=True, dtype=np.float64, seed=8)
    x = rng.standard_normal((batch, seq_len, IN))
    state = random_state(rng, layer, batch)
    lengths = mixed_lengths(batch, seq_len, rng)
    sshape = (2, batch, hidden)
    wy, wh, wc = loss_weights(rng, (batch, seq_len, 2 * hidden), sshape, layer._has_c)
    value, dx, dh0, dc0, grads = run_layer_gradients(layer, x, state, lengths, wy, wh, wc)
    params = {k: v.copy() for k, v in layer.params.items()}
    h0, c0 = (a.copy() if a is not None else None for a in split_state(state))
    inputs = {"x": (x.copy(), dx), "h0": (h0, dh0)} | {k: (params[k], grads[k]) for k in params}
    if c0 is not None:
        inputs["c0"] = (c0, dc0)

    def f():
        y, hn, cn = reference_forward(cell, params, inputs["x"][0], h0, c0, lengths)
        # With one layer, y > 0 is the ReLU's pattern (every unit's side of the kink).
        return loss(y, hn, cn, wy, wh, wc), y > 0

    assert abs(f()[0] - value) <= 1e-10 * max(1.0, abs(value))
    for name, (a, grad) in inputs.items():
        checked = 0
        while checked < 3:
            v = rng.standard_normal(a.shape)
            a += EPS * v
            up, up_side = f()
            a -= 2 * EPS * v
            down, down_side = f()
            a += EPS * v
            if cell == "rnn_relu" and not np.array_equal(up_side, down_side):
                continue  # a ReLU crossed its kink between the two points: no derivative there
            numeric, analytic = (up - down) / (2 * EPS), float(np.sum(grad * v))
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, numeric, analytic)
            checked += 1
