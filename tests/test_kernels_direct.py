"""Direct calls of the kernels, rnnkit._core.forward and rnnkit._core.backward, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import CELLS, at_offset
from reference import GATES, loss, numerical_gradient, reference_forward, rel_error
from rnnkit import _core

B, T, IN, H = 3, 5, 4, 3


def random_weights(cell, directions, dtype, rng):
    g = GATES[cell] * H
    shapes = [(g, IN), (g, H), (g,), (g,)]
    return [tuple((0.5 * rng.standard_normal(s)).astype(dtype) for s in shapes) for _ in range(directions)]


def as_params(weights):
    """The reference's params dict of one layer."""
    params = {}
    for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
        sfx = "_reverse" if d else ""
        params |= {f"weight_ih_l0{sfx}": w_ih, f"weight_hh_l0{sfx}": w_hh}
        params |= {f"bias_ih_l0{sfx}": b_ih, f"bias_hh_l0{sfx}": b_hh}
    return params


def inputs(cell, directions, batch_first, dtype, rng):
    x = rng.standard_normal((B, T, IN) if batch_first else (T, B, IN)).astype(dtype)
    h0 = rng.standard_normal((directions, B, H)).astype(dtype)
    c0 = rng.standard_normal((directions, B, H)).astype(dtype) if cell == "lstm" else None
    return x, h0, c0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_core_forward(cell, directions, batch_first, dtype):
    rng = np.random.default_rng(61)
    w = random_weights(cell, directions, dtype, rng)
    x, h0, c0 = inputs(cell, directions, batch_first, dtype, rng)
    lengths = np.array([2, T, 1], dtype=np.int64)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    for lens in (None, lengths):
        for train in (False, True):
            y, hn, cn, tape = _core.forward(cell, x, w, h0, c0, lens, batch_first, train)
            ry, rhn, rcn = reference_forward(cell, as_params(w), x, h0, c0, lens, batch_first)
            assert y.dtype == dtype and hn.dtype == dtype
            assert hn.shape == (directions, B, H)
            np.testing.assert_allclose(y, ry, **tol)
            np.testing.assert_allclose(hn, rhn, **tol)
            if cell == "lstm":
                assert cn.dtype == dtype
                np.testing.assert_allclose(cn, rcn, **tol)
            else:
                assert cn is None
            assert (tape is not None) == train
            if train:
                assert tape.pending


def test_core_forward_defaults():
    rng = np.random.default_rng(62)
    w = random_weights("gru", 1, np.float64, rng)
    x = rng.standard_normal((B, T, IN))
    y, hn, cn, tape = _core.forward("gru", x, w)
    ry, rhn, _ = reference_forward("gru", as_params(w), x)
    np.testing.assert_allclose(y, ry, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hn, rhn, rtol=1e-12, atol=1e-12)
    assert cn is None and tape is None
    assert _core.gates("lstm") == 4 and _core.gates("gru") == 3 and _core.gates("rnn_relu") == 1


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_core_backward(cell, directions, batch_first):
    rng = np.random.default_rng(63)
    w = random_weights(cell, directions, np.float64, rng)
    x, h0, c0 = inputs(cell, directions, batch_first, np.float64, rng)
    lengths = np.array([T, 1, 3], dtype=np.int64)
    y, hn, cn, tape = _core.forward(cell, x, w, h0, c0, lengths, batch_first, True)
    wy = rng.standard_normal(y.shape)
    wh = rng.standard_normal(hn.shape)
    wc = rng.standard_normal(hn.shape) if cell == "lstm" else None
    # grads are added to: start them from a known non-zero value
    start = [tuple(rng.standard_normal(a.shape) for a in t) for t in w]
    grads = [tuple(a.copy() for a in t) for t in start]
    dx, dh0, dc0 = _core.backward(tape, w, wy, wh, wc, grads=grads)
    assert not tape.pending

    params = {k: v.copy() for k, v in as_params(w).items()}
    xr, h0r = x.copy(), h0.copy()
    c0r = None if c0 is None else c0.copy()

    def f():
        ry, rhn, rcn = reference_forward(cell, params, xr, h0r, c0r, lengths, batch_first)
        return loss(ry, rhn, rcn, wy, wh, wc)

    assert rel_error(dx, numerical_gradient(f, xr)) <= 1e-6
    assert rel_error(dh0, numerical_gradient(f, h0r)) <= 1e-6
    if cell == "lstm":
        assert rel_error(dc0, numerical_gradient(f, c0r)) <= 1e-6
    else:
        assert dc0 is None
    for d in range(directions):
        sfx = "_reverse" if d else ""
        for k, kind in enumerate(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
            name = f"{kind}_l0{sfx}"
            num = numerical_gradient(f, params[name])
            assert rel_error(grads[d][k] - start[d][k], num) <= 1e-6, name


def test_core_backward_without_state_gradients_and_float32():
    rng = np.random.default_rng(64)
    w = random_weights("lstm", 2, np.float32, rng)
    x = rng.standard_normal((B, T, IN)).astype(np.float32)
    y, hn, cn, tape = _core.forward("lstm", x, w, None, None, None, True, True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = [tuple(np.zeros_like(a) for a in t) for t in w]
    dx, dh0, dc0 = _core.backward(tape, w, dy, grads=grads)
    assert dx.dtype == np.float32 and dh0.dtype == np.float32 and dc0.dtype == np.float32
    # the same in float64 on the same (float32-exact) numbers, given zero dhn and dcn explicitly
    w64 = [tuple(a.astype(np.float64) for a in t) for t in w]
    y64, hn64, cn64, tape64 = _core.forward("lstm", x.astype(np.float64), w64, None, None, None, True, True)
    grads64 = [tuple(np.zeros_like(a) for a in t) for t in w64]
    zero = np.zeros(hn64.shape)
    dx64, dh064, dc064 = _core.backward(tape64, w64, dy.astype(np.float64), zero, zero, grads=grads64)
    for a, b in [(dx, dx64), (dh0, dh064), (dc0, dc064)]:
        assert rel_error(a, b) <= 1e-5
    for ta, tb in zip(grads, grads64, strict=True):
        for a, b in zip(ta, tb, strict=True):
            assert rel_error(a, b) <= 1e-5


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("hidden", [32, 36, 48])
def test_steps_on_weights_16_bytes_off_give_the_aligned_steps_bits(cell, hidden):
    """NumPy aligns arrays to 16 bytes only (an unpickled layer's weights start 16, 32 or 48 bytes
    past a cache line), and a batch-1 step then reads the weights with a kernel of its own
    (aligned loads from before the rows' starts): the same bits as the steps over 64-byte-aligned
    copies, at every offset. Rows of 48 (W_ih), 32 and 48 (W_hh) floats are a whole number of
    cache lines, as that kernel needs; W_ih's 36, 108 or 144 rows at hidden=36 end with a part
    of a block of eight rows (36 floats, W_hh's rows stay with the usual kernel)."""
    rng = np.random.default_rng(hidden)
    g = GATES[cell] * hidden
    weights = [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in [(g, 48), (g, hidden), (g,), (g,)]]
    xs = rng.standard_normal((4, 1, 48)).astype(np.float32)

    def run(offset):
        stepper = _core.Stepper(cell, [tuple(at_offset(w, offset) for w in weights)])
        state, ys = None, []
        for x in xs:
            y, state = stepper(x, state)
            ys.append(y)
        return np.stack(ys)

    aligned = run(0)
    assert np.isfinite(aligned).all() and np.abs(aligned).max() > 0.01
    for offset in (16, 32, 48):
        np.testing.assert_array_equal(run(offset), aligned, err_msg=f"{offset} bytes off")
