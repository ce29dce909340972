"""Forward pass of every cell against the plain NumPy reference."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import zlib

import numpy as np
import pytest
import rnnkit
from helpers import CELLS, make_layer, mixed_lengths, random_state, seq_shape, split_state
from reference import reference_forward

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}
B, T, IN, H = 5, 6, 4, 3


def lengths_for(pattern, batch, seq_len, rng):
    if pattern == "none":
        return None
    if pattern == "full":
        return np.full(batch, seq_len, dtype=np.int64)
    return mixed_lengths(batch, seq_len, rng)


def check_against_reference(layer, x, state, lengths, dtype):
    cell = layer._cell
    y, out_state = layer(x, state=state, lengths=lengths)
    hn, cn = split_state(out_state)
    h0, c0 = split_state(state) if state is not None else (None, None)
    ry, rhn, rcn = reference_forward(
        cell, layer.params, x, h0=h0, c0=c0, lengths=lengths, batch_first=layer.batch_first
    )
    assert y.dtype == dtype and hn.dtype == dtype
    assert y.shape == ry.shape
    assert hn.shape == rhn.shape
    np.testing.assert_allclose(y, ry, **TOL[dtype])
    np.testing.assert_allclose(hn, rhn, **TOL[dtype])
    if layer._has_c:
        assert cn.dtype == dtype and cn.shape == rcn.shape
        np.testing.assert_allclose(cn, rcn, **TOL[dtype])
    return y, hn, cn


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("pattern", ["none", "full", "mixed"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_matches_reference(cell, bidirectional, num_layers, pattern, batch_first, with_state, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((cell, bidirectional, num_layers, pattern)).encode()))
    layer = make_layer(
        cell, IN, H, num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=dtype, seed=1
    )
    x = rng.standard_normal(seq_shape(batch_first, B, T, IN)).astype(dtype)
    state = random_state(rng, layer, B, dtype) if with_state else None
    lengths = lengths_for(pattern, B, T, rng)
    y, hn, cn = check_against_reference(layer, x, state, lengths, dtype)
    if lengths is not None:
        yb = y if batch_first else y.transpose(1, 0, 2)
        for b, n in enumerate(lengths):
            assert np.all(yb[b, n:] == 0), f"outputs past length {n} of sequence {b} are not zero"


@pytest.mark.parametrize("pattern", ["none", "mixed"])
@pytest.mark.parametrize("cell", CELLS)
def test_outputs_are_written_in_full(cell, pattern):
    """y and dx are allocated without being cleared (the kernels write every element, zeros past
    the lengths): over memory just freed from arrays of NaN, they come out the same as before."""
    rng = np.random.default_rng(11)
    batch, seq_len = 6, 9
    layer = make_layer(cell, IN, H, 2, bidirectional=True, dtype=np.float64, seed=2)
    x = rng.standard_normal((batch, seq_len, IN))
    lengths = lengths_for(pattern, batch, seq_len, rng)
    y, _ = layer(x, lengths=lengths)
    dy = rng.standard_normal(y.shape)
    dx, _ = layer.backward(dy)
    for _ in range(3):
        poison = [np.full(y.shape, np.nan) for _ in range(4)] + [np.full(x.shape, np.nan) for _ in range(4)]
        del poison
        y2, _ = layer(x, lengths=lengths)
        dx2, _ = layer.backward(dy)
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(dx2, dx)
    assert not np.isnan(y).any() and not np.isnan(dx).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("pattern", ["none", "chunks"])
@pytest.mark.parametrize(("cell", "hidden"), [("lstm", 260), ("gru", 350), ("rnn_tanh", 130)])
def test_chunked_input_projection_matches_reference(cell, hidden, pattern, batch_first, dtype):
    """From 3 sequences the time loop's team makes the input projection 16 steps ahead, one
    product per sequence and unit block: 37 steps (chunks of 16, 16 and 5), lengths that end
    inside, at and just past a chunk's end (with padding skipped: a sequence's steps are then
    consecutive rows in either layout), unit blocks that do not cut the hidden size evenly (72 and
    88 units, 7 inputs), both directions, against the reference."""
    rng = np.random.default_rng(hidden)
    layer = make_layer(cell, 7, hidden, 1, bidirectional=True, batch_first=batch_first, dtype=dtype, seed=3)
    x = rng.standard_normal(seq_shape(batch_first, 5, 37, 7)).astype(dtype)
    state = random_state(rng, layer, 5, dtype)
    lengths = None if pattern == "none" else np.array([37, 16, 17, 1, 33])
    check_against_reference(layer, x, state, lengths, dtype)


_PEAK_MEMORY_SCRIPT = """
import resource, sys
import numpy as np
import rnnkit

batch, seq_len, hidden, bidirectional = 16, 4000, 256, sys.argv[1] == "bi"
layer = rnnkit.LSTM(32, hidden, batch_first=True, bidirectional=bidirectional, seed=0)
layer.eval()
x = np.full((batch, seq_len, 32), 0.1, dtype=np.float32)
layer(x[:, :20])  # the weight cache and the thread pool, made before the measurement
# Raise the peak to what y takes, so that only the call's own scratch can raise it further.
y = np.ones((batch, seq_len, hidden * (2 if bidirectional else 1)), dtype=np.float32)
del y
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
layer(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kilobytes is Linux's")
@pytest.mark.parametrize("directions", ["uni", "bi"])
def test_inference_scratch_does_not_grow_with_the_sequence(directions):
    """Inference keeps one chunk (16 steps) of the input projection, not every step's: an LSTM at
    B=16, T=4000, H=256 would need 262 MB a direction for all of them. In a fresh process (the
    peak resident memory is the process's), the call may raise the peak by far less than that."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, directions], capture_output=True, text=True, check=True
    )
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 64 << 20, f"the call raised the peak resident memory by {grew >> 20} MB"


@pytest.mark.parametrize("cell", CELLS)
def test_step_outputs_are_written_in_full(cell):
    """step's new state is allocated without being cleared: over memory just freed from arrays of
    NaN, it comes out the same as before."""
    rng = np.random.default_rng(12)
    layer = make_layer(cell, IN, H, 2, dtype=np.float64, seed=3)
    x = rng.standard_normal((3, IN))
    state = layer.step(x)[1]
    y, new = layer.step(x, state)
    for _ in range(3):
        poison = [np.full(y.shape, np.nan) for _ in range(2)] + [np.full((2, 3, H), np.nan) for _ in range(4)]
        del poison
        y2, new2 = layer.step(x, state)
        np.testing.assert_array_equal(y2, y)
        for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (new2, new)), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.isnan(y).any()


@pytest.mark.parametrize("cell", CELLS)
def test_length_semantics_explicit(cell):
    """Zeros past the lengths; the final state is the state at each sequence's own last step (forward
    direction: the output at t = len - 1; reverse direction: the output at t = 0); each sequence
    gives what it gives when run alone, truncated to its length."""
    rng = np.random.default_rng(7)
    batch, seq_len = 4, 7
    lengths = np.array([3, 7, 1, 5])
    layer = make_layer(cell, IN, H, 2, bidirectional=True, dtype=np.float64, seed=3)
    x = rng.standard_normal((batch, seq_len, IN))
    state = random_state(rng, layer, batch)
    h0, c0 = split_state(state)
    y, out = layer(x, state=state, lengths=lengths)
    hn, cn = split_state(out)
    for b, n in enumerate(lengths):
        assert np.all(y[b, n:] == 0.0)
        # top layer: forward half at its last step, reverse half at t = 0
        np.testing.assert_allclose(hn[2, b], y[b, n - 1, :H], rtol=0, atol=1e-14)
        np.testing.assert_allclose(hn[3, b], y[b, 0, H:], rtol=0, atol=1e-14)
        # alone and truncated
        sub_state = (h0[:, b : b + 1], c0[:, b : b + 1]) if layer._has_c else h0[:, b : b + 1]
        y1, out1 = layer(x[b : b + 1, :n], state=sub_state)
        hn1, cn1 = split_state(out1)
        np.testing.assert_allclose(y[b, :n], y1[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(hn[:, b], hn1[:, 0], rtol=1e-12, atol=1e-12)
        if layer._has_c:
            np.testing.assert_allclose(cn[:, b], cn1[:, 0], rtol=1e-12, atol=1e-12)
    # padded inputs do not matter at all
    x2 = x.copy()
    for b, n in enumerate(lengths):
        x2[b, n:] = rng.standard_normal((seq_len - n, IN)) * 100
    y2, out2 = layer(x2, state=state, lengths=lengths)
    np.testing.assert_array_equal(y2, y)
    for a, b2 in zip(split_state(out), split_state(out2), strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b2)


@pytest.mark.parametrize("batch", [37, 130, 193])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_large_batch_threads(cell, dtype, batch, two_threads):
    """Large batches with 2 threads: B = 37 (one time loop, threaded GEMMs) and B = 130 and 193 (the
    batch is cut into 2 and 3 slices of at least 64 sequences, each with its own time loop, dealt
    round-robin by length); mixed lengths, 2 layers, both directions, time-major and batch-first."""
    rng = np.random.default_rng(batch)
    seq_len = 6
    for batch_first in (True, False):
        layer = make_layer(cell, 5, 4, 2, bidirectional=True, batch_first=batch_first, dtype=dtype, seed=5)
        x = rng.standard_normal(seq_shape(batch_first, batch, seq_len, 5)).astype(dtype)
        state = random_state(rng, layer, batch, dtype)
        lengths = mixed_lengths(batch, seq_len, rng)
        check_against_reference(layer, x, state, lengths, dtype)
        check_against_reference(layer, x, None, None, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_batch_of_one(cell, dtype):
    rng = np.random.default_rng(13)
    for batch_first in (True, False):
        layer = make_layer(cell, 3, 5, 2, bidirectional=True, batch_first=batch_first, dtype=dtype, seed=6)
        x = rng.standard_normal(seq_shape(batch_first, 1, 8, 3)).astype(dtype)
        state = random_state(rng, layer, 1, dtype)
        check_against_reference(layer, x, state, None, dtype)
        check_against_reference(layer, x, state, np.array([5]), dtype)
        check_against_reference(layer, x, None, np.array([1]), dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_without_bias(cell):
    rng = np.random.default_rng(17)
    layer = make_layer(cell, IN, H, 2, bidirectional=True, bias=False, dtype=np.float64, seed=2)
    assert not any(k.startswith("bias") for k in layer.params)
    x = rng.standard_normal((B, T, IN))
    check_against_reference(layer, x, random_state(rng, layer, B), mixed_lengths(B, T, rng), np.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_forward_is_the_same(cell):
    rng = np.random.default_rng(19)
    layer = make_layer(cell, IN, H, 2, bidirectional=True, dtype=np.float64, seed=2, dropout=0.5)
    x = rng.standard_normal((B, T, IN))
    layer.eval()
    check_against_reference(layer, x, None, mixed_lengths(B, T, rng), np.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_parameters_structure(cell):
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
    layer = make_layer(cell, 7, 5, 3, bidirectional=True, seed=0)
    expected = {}
    for k in range(3):
        in_size = 7 if k == 0 else 10
        for sfx in ("", "_reverse"):
            expected[f"weight_ih_l{k}{sfx}"] = (gates * 5, in_size)
            expected[f"weight_hh_l{k}{sfx}"] = (gates * 5, 5)
            expected[f"bias_ih_l{k}{sfx}"] = (gates * 5,)
            expected[f"bias_hh_l{k}{sfx}"] = (gates * 5,)
    assert {k: v.shape for k, v in layer.params.items()} == expected
    assert {k: v.shape for k, v in layer.grads.items()} == expected
    assert layer.num_parameters() == sum(int(np.prod(s)) for s in expected.values())
    bound = 1 / np.sqrt(5)
    for v in layer.params.values():
        assert v.dtype == np.float32
        assert np.all(np.abs(v) <= bound)
        assert v.ctypes.data % 64 == 0, "parameters start on a cache line (the kernels' vector loads)"
        assert v.flags.c_contiguous and v.flags.writeable
    allw = np.concatenate([v.ravel() for v in layer.params.values()])
    assert allw.min() < -0.8 * bound and allw.max() > 0.8 * bound  # spread over the whole range
    # state_dict round trip, and it is a copy
    sd = layer.state_dict()
    other = make_layer(cell, 7, 5, 3, bidirectional=True, seed=99)
    other.load_state_dict(sd)
    for k in sd:
        np.testing.assert_array_equal(other.params[k], layer.params[k])
    sd["weight_ih_l0"][...] = 0
    assert np.any(layer.params["weight_ih_l0"] != 0)
    # seeds are reproducible
    again = make_layer(cell, 7, 5, 3, bidirectional=True, seed=0)
    for k in sd:
        np.testing.assert_array_equal(again.params[k], layer.params[k])


@pytest.mark.parametrize("cell", CELLS)
def test_initial_state(cell):
    layer = make_layer(cell, 3, 4, 2, bidirectional=True, dtype=np.float64)
    st = layer.initial_state(5)
    h, c = split_state(st)
    assert h.shape == (4, 5, 4) and h.dtype == np.float64 and not h.any()
    if layer._has_c:
        assert c.shape == (4, 5, 4) and not c.any()
    else:
        assert c is None
    x = np.random.default_rng(0).standard_normal((5, 6, 3))
    y1, _ = layer(x)
    y2, _ = layer(x, state=st)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("hidden", [1, 7, 19, 33, 136])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_hidden_sizes_and_saturation(cell, hidden, dtype):
    """Hidden sizes around the SIMD widths and one cut into unit blocks of uneven widths (136:
    72 + 64), and inputs large enough to saturate the gates."""
    rng = np.random.default_rng(hidden)
    layer = make_layer(cell, 5, hidden, 2, bidirectional=True, dtype=dtype, seed=1)
    scales = (1.0, 30.0) if cell == "rnn_relu" else (1.0, 30.0, 1000.0)
    for scale in scales:
        x = (scale * rng.standard_normal((6, 9, 5))).astype(dtype)
        lengths = mixed_lengths(6, 9, rng)
        state = random_state(rng, layer, 6, dtype)
        h0, c0 = split_state(state)
        y, out = layer(x, state, lengths)
        with np.errstate(over="ignore"):
            ry, rhn, rcn = reference_forward(cell, layer.params, x, h0, c0, lengths)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        for name, a, b in [("y", y, ry), ("hn", split_state(out)[0], rhn), ("cn", split_state(out)[1], rcn)]:
            if b is None:
                continue
            assert np.all(np.isfinite(a)), name
            err = np.max(np.abs(a - b) / (1 + np.abs(b)))
            assert err <= tol, (name, scale, err)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_forward(cell, dtype):
    """layer.step over the time steps one by one gives forward's outputs and final state."""
    rng = np.random.default_rng(23)
    layer = make_layer(cell, IN, H, 2, dtype=dtype, seed=4)
    x = rng.standard_normal((B, T, IN)).astype(dtype)
    state = random_state(rng, layer, B, dtype)
    layer.eval()
    y, out = layer(x, state=state)
    s = state
    for t in range(T):
        yt, s = layer.step(x[:, t], s)
        np.testing.assert_allclose(yt, y[:, t], **TOL[dtype])
    for a, b in zip(split_state(s), split_state(out), strict=True):
        if a is not None:
            np.testing.assert_allclose(a, b, **TOL[dtype])
    with pytest.raises(ValueError, match="bidirectional"):
        make_layer(cell, IN, H, bidirectional=True).step(x[:, 0])


@pytest.mark.parametrize("cell", CELLS)
def test_step_of_copies_and_pickles_reads_their_own_weights(cell):
    """A copied or unpickled layer steps with its own parameters (its stepper is rebuilt over the
    copied arrays), and changing them leaves the original's steps alone."""
    rng = np.random.default_rng(9)
    layer = make_layer(cell, IN, H, 2, dtype=np.float64, seed=2).eval()
    x = rng.standard_normal((B, IN))
    want, _ = layer.step(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        y, _ = twin.step(x)
        np.testing.assert_array_equal(y, want)
        twin.params["weight_hh_l1"][:] = 0.0
        twin.params["weight_ih_l1"][:] = 0.0
        y0, _ = twin.step(x)
        np.testing.assert_allclose(y0, twin(x[:, None])[0][:, 0], rtol=1e-12, atol=1e-12)
        assert not np.allclose(y0, want)
    np.testing.assert_array_equal(layer.step(x)[0], want)


@pytest.mark.parametrize("optimizer_first", [False, True])
def test_deep_copies_keep_aligned_parameters_shared_with_a_copied_optimizer(optimizer_first):
    """copy.deepcopy of a layer gives parameter arrays that start on 64 bytes, as the original's
    (the kernels read misaligned rows 1.4-1.6x slower); an optimizer copied in the same call,
    before or after the layer, still updates the copy's parameters from the copy's gradients."""
    rng = np.random.default_rng(10)
    layer = rnnkit.LSTM(IN, 16, 2, seed=3)
    opt = rnnkit.optim.SGD(layer, lr=0.1)
    if optimizer_first:
        opt2, twin = copy.deepcopy((opt, layer))
    else:
        twin, opt2 = copy.deepcopy((layer, opt))
    if not optimizer_first:
        assert all(p.ctypes.data % 64 == 0 for p in twin.params.values())
    before = {k: v.copy() for k, v in layer.params.items()}
    y, _ = twin(rng.standard_normal((B, T, IN)).astype(np.float32))
    twin.backward(np.ones_like(y))
    # The copy's backward adds into the copy's gradients only.
    assert all(g.any() for g in twin.grads.values())
    assert not any(g.any() for g in layer.grads.values())
    opt2.step()
    for k, v in twin.params.items():
        np.testing.assert_array_equal(v, before[k] - 0.1 * twin.grads[k], err_msg=k)
        np.testing.assert_array_equal(layer.params[k], before[k], err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_step_sees_replaced_and_updated_parameters(cell):
    """step caches its view of the parameters; a parameter assigned through layer.params, or
    updated in place (as optimizers and load_state_dict do), is used by the next step."""
    rng = np.random.default_rng(5)
    layer = make_layer(cell, IN, H, 1, dtype=np.float64, seed=1).eval()
    x = rng.standard_normal((B, 1, IN))
    layer.step(x[:, 0])  # fills the cache
    layer.params["weight_ih_l0"] = rng.standard_normal(layer.params["weight_ih_l0"].shape)
    layer.params["weight_hh_l0"] *= 0.5
    y, _ = layer(x)
    yt, _ = layer.step(x[:, 0])
    np.testing.assert_allclose(yt, y[:, 0], rtol=1e-12, atol=1e-12)
