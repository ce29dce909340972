"""float32 against float64, 1 thread against 2, and non-finite numbers."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from helpers import CELLS, make_layer, mixed_lengths, random_state, seq_shape, split_state
from reference import reference_forward, rel_error


def run(layer, x, state, lengths, dy, dstate):
    """Forward + backward; everything the layer produces, as a flat list of (name, array)."""
    layer.zero_grad()
    y, out = layer(x, state=state, lengths=lengths)
    hn, cn = split_state(out)
    dx, ds0 = layer.backward(dy, dstate)
    dh0, dc0 = split_state(ds0)
    res = [("y", y), ("hn", hn), ("dx", dx), ("dh0", dh0)]
    if cn is not None:
        res += [("cn", cn), ("dc0", dc0)]
    res += [(f"grad {k}", v.copy()) for k, v in sorted(layer.grads.items())]
    return res


def problem(cell, batch, seq_len, input_size, hidden, batch_first, rng, dtype):
    layer = make_layer(
        cell, input_size, hidden, 2, bidirectional=True, batch_first=batch_first, dtype=dtype, seed=21
    )
    x = rng.standard_normal(seq_shape(batch_first, batch, seq_len, input_size)).astype(dtype)
    state = random_state(rng, layer, batch, dtype)
    lengths = mixed_lengths(batch, seq_len, rng) if batch > 1 else np.array([seq_len - 3])
    dy = rng.standard_normal(seq_shape(batch_first, batch, seq_len, 2 * hidden)).astype(dtype)
    dstate = random_state(rng, layer, batch, dtype, scale=1.0)
    return layer, x, state, lengths, dy, dstate


@pytest.mark.parametrize(("batch", "hidden"), [(4, 64), (40, 32)])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_close_to_float64(cell, batch, hidden):
    rng = np.random.default_rng(31)
    l32, x, state, lengths, dy, dstate = problem(cell, batch, 20, 16, hidden, True, rng, np.float32)
    l64 = make_layer(cell, 16, hidden, 2, bidirectional=True, dtype=np.float64, seed=999)
    l64.load_state_dict(l32.state_dict())
    for k, v in l32.params.items():
        assert l64.params[k].dtype == np.float64
        np.testing.assert_array_equal(l64.params[k], v.astype(np.float64))

    def as64(s):
        return tuple(a.astype(np.float64) for a in s) if isinstance(s, tuple) else s.astype(np.float64)

    r32 = run(l32, x, state, lengths, dy, dstate)
    r64 = run(l64, x.astype(np.float64), as64(state), lengths, dy.astype(np.float64), as64(dstate))
    for (name, a), (_, b) in zip(r32, r64, strict=True):
        assert a.dtype == np.float32 and b.dtype == np.float64, name
        if name in ("y", "hn", "cn"):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        else:  # gradients sum over many steps: compare them in norm
            assert rel_error(a, b) <= 1e-5, (name, rel_error(a, b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("batch", "hidden"), [(1, 32), (8, 32), (40, 32), (130, 32), (200, 32), (64, 256), (37, 136), (8, 200)]
)
@pytest.mark.parametrize("cell", CELLS)
def test_one_thread_equals_two_threads(cell, batch, hidden, dtype, num_threads):
    """Forward and backward give bitwise the same results with 1 and 2 kernel threads, with and
    without lengths, including batches large enough (130, 200) to be cut into slices that run their
    own time loops. (The GEMM crates' rounding depends on a product's row count, see
    test_batch_composition_rounding_is_ulp_level, so this slicing depends on the batch alone, never
    on the thread count; for the slices made per thread see
    test_slices_per_thread_same_as_one_loop.) At (64, 256), (40, 32) and (37, 136) each step is
    cut into blocks of hidden units, of rows, or both, that the threads share; at (8, 200) into
    four blocks of units (their count rounded up from three), the last one narrower.
    """
    rng = np.random.default_rng(batch)
    for batch_first in (True, False):
        layer, x, state, lengths, dy, dstate = problem(cell, batch, 12, 8, hidden, batch_first, rng, dtype)
        for lens in (lengths, None):
            num_threads(1)
            assert rnnkit.get_num_threads() == 1
            one = run(layer, x, state, lens, dy, dstate)
            num_threads(2)
            assert rnnkit.get_num_threads() == 2
            two = run(layer, x, state, lens, dy, dstate)
            for (name, a), (_, b) in zip(one, two, strict=True):
                msg = f"{name} (batch_first={batch_first}, lengths={lens is not None})"
                np.testing.assert_array_equal(a, b, err_msg=msg)


def same_on_1_2_4_threads(num_threads, cell, layer, x, state, lengths, dy, dstate, tol, label=""):
    """Forward and backward on 1, 2 and 4 threads: each against the reference's outputs within
    `tol`, and 2 and 4 threads bitwise equal to 1."""
    h0, c0 = split_state(state)
    ry, rhn, _ = reference_forward(cell, layer.params, x, h0=h0, c0=c0, lengths=lengths)
    results = {}
    for threads in (1, 2, 4):
        num_threads(threads)
        results[threads] = run(layer, x, state, lengths, dy, dstate)
        np.testing.assert_allclose(results[threads][0][1], ry, **tol)
        np.testing.assert_allclose(results[threads][1][1], rhn, **tol)
    for threads in (2, 4):
        for (name, a), (_, b) in zip(results[1], results[threads], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} on {threads} threads{label}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [3, 8, 13, 37])
@pytest.mark.parametrize("cell", CELLS)
def test_slices_per_thread_same_as_one_loop(cell, batch, dtype, num_threads):
    """A single-direction layer whose W_hh fits in the L2 gives each thread a batch slice of its
    own, with its own time loop, in calls of 200 MFLOP or more where every slice gets 3 rows or
    more. Here the first layer's calls are that long for LSTM and GRU from batch 8 and for RNN at
    37: on 2 threads two slices; on 4 threads two at 8 and four at 13 and 37 (at 3, one loop whose
    steps the threads share). Forward and backward, with and without lengths, give the
    reference's outputs and bitwise what one thread's single loop gives."""
    rng = np.random.default_rng(batch)
    steps, inp, hidden = 100, 256, 128
    layer = make_layer(cell, inp, hidden, 2, batch_first=True, dtype=dtype, seed=5)
    x = rng.standard_normal((batch, steps, inp)).astype(dtype)
    state = random_state(rng, layer, batch, dtype)
    dy = rng.standard_normal((batch, steps, hidden)).astype(dtype)
    dstate = random_state(rng, layer, batch, dtype, scale=1.0)
    lengths = mixed_lengths(batch, steps, rng)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for lens in (lengths, None):
        label = f", lengths={lens is not None}"
        same_on_1_2_4_threads(num_threads, cell, layer, x, state, lens, dy, dstate, tol, label)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_calls_led_by_the_caller_same_on_1_2_4_threads(cell, batch, bidirectional, num_threads):
    """Forwards of one or two rows a step run on the calling thread, which leads the sweeps'
    teams (and the directions' turns) with the kernel threads as helpers, each team's first step
    making the input projection by blocks of hidden units. With H=136 (two unit blocks), one
    direction on 2 or 4 threads and two directions on 4 have teams of two, two directions on 2
    threads one thread each: every way gives the reference's outputs and the same bits, and the
    backward after it too."""
    rng = np.random.default_rng(batch)
    layer = make_layer(
        cell, 24, 136, 2, bidirectional=bidirectional, batch_first=True, dtype=np.float64, seed=4
    )
    x = rng.standard_normal((batch, 30, 24))
    state = random_state(rng, layer, batch)
    dy = rng.standard_normal((batch, 30, layer.num_directions * 136))
    dstate = random_state(rng, layer, batch, scale=1.0)
    lengths = np.array([27, 30][:batch])
    tol = {"rtol": 1e-10, "atol": 1e-12}
    same_on_1_2_4_threads(num_threads, cell, layer, x, state, lengths, dy, dstate, tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("cell", CELLS)
def test_streaming_steps_same_on_one_and_two_threads(cell, batch, dtype, num_threads):
    """Steps of a two-layer stack called back to back are shared by the calling thread and the
    kernel threads at batch 1-8 (the dot kernel's rows), from 768 KB of weights at batch 1-4 (all
    but the RNN's here) and from 256 KB at batch 8 (all); at 9 they are cut by their size alone:
    the same bits as on one thread, where they run whole, and forward's outputs. H=130 cuts the
    steps into unit blocks of 72 and 58, whose edges do not fall on the gates' edges in a whole
    step's products."""
    rng = np.random.default_rng(batch)
    layer = make_layer(cell, 120, 130, 2, dtype=dtype, seed=3).eval()
    x = rng.standard_normal((batch, 6, 120)).astype(dtype)
    y, _ = layer(x)
    outs = {}
    for threads in (1, 2):
        num_threads(threads)
        state = layer.initial_state(batch)
        steps = []
        for t in range(x.shape[1]):
            yt, state = layer.step(x[:, t], state)
            steps.append(yt)
        outs[threads] = np.stack(steps, axis=1)
    np.testing.assert_array_equal(outs[1], outs[2])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[2], y, **tol)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_composition_rounding_is_ulp_level(cell, num_threads):
    """With one thread, a sequence's outputs may change in the last bits when the number of other
    sequences still running changes (the GEMM's kernel depends on its row count), but no more."""
    num_threads(1)
    rng = np.random.default_rng(3)
    layer = make_layer(cell, 8, 32, 1, dtype=np.float64, seed=21)
    x = rng.standard_normal((40, 12, 8))
    base, _ = layer(x)
    for running in (1, 2, 5, 9, 20, 40):
        lens = np.ones(40, dtype=np.int64)
        lens[:running] = 12
        y, _ = layer(x, lengths=lens)
        np.testing.assert_allclose(y[0], base[0], rtol=1e-13, atol=1e-14)
    alone, _ = layer(x[:1])
    np.testing.assert_allclose(alone[0], base[0], rtol=1e-13, atol=1e-14)


def test_set_num_threads_restored(num_threads):
    before = rnnkit.get_num_threads()
    num_threads(1)
    assert rnnkit.get_num_threads() == 1
    num_threads(3)
    assert rnnkit.get_num_threads() == 3
    num_threads(before)
    assert rnnkit.get_num_threads() == before
    assert rnnkit.simd_level() in ("avx512", "avx2", "baseline")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_nan_propagates_within_its_sequence(cell, bidirectional, dtype):
    rng = np.random.default_rng(41)
    batch, seq_len, t0, b0 = 5, 7, 3, 2
    layer = make_layer(cell, 4, 6, 1, bidirectional=bidirectional, dtype=dtype, seed=8)
    x = rng.standard_normal((batch, seq_len, 4)).astype(dtype)
    x[b0, t0, 1] = np.nan
    y, out = layer(x)
    hn, cn = split_state(out)
    fwd = y[..., :6]
    assert np.all(np.isnan(fwd[b0, t0:])), "NaN in x did not reach the later outputs"
    assert np.all(np.isfinite(fwd[b0, :t0]))
    assert np.all(np.isnan(hn[0, b0]))
    if bidirectional:
        rev = y[..., 6:]
        assert np.all(np.isnan(rev[b0, : t0 + 1])), "NaN in x did not reach the reverse outputs"
        assert np.all(np.isfinite(rev[b0, t0 + 1 :]))
        assert np.all(np.isnan(hn[1, b0]))
    others = [b for b in range(batch) if b != b0]
    assert np.all(np.isfinite(y[others])), "NaN leaked into other sequences"
    assert np.all(np.isfinite(hn[:, others]))
    if cn is not None:
        assert np.all(np.isnan(cn[:, b0])) and np.all(np.isfinite(cn[:, others]))


@pytest.mark.parametrize("value", [np.inf, -np.inf])
@pytest.mark.parametrize("cell", CELLS)
def test_inf_in_x_behaves_like_ieee(cell, value):
    """Inf in x gives what IEEE arithmetic gives in the reference (saturated gates, or NaN where the
    reference has one), and nothing in the other sequences."""
    rng = np.random.default_rng(43)
    batch, seq_len = 4, 6
    layer = make_layer(cell, 3, 5, 2, bidirectional=True, dtype=np.float64, seed=9)
    x = rng.standard_normal((batch, seq_len, 3))
    x[1, 2, 0] = value
    y, out = layer(x)
    hn, cn = split_state(out)
    with np.errstate(all="ignore"):
        ry, rhn, rcn = reference_forward(cell, layer.params, x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ry))
    np.testing.assert_allclose(y, ry, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hn, rhn, rtol=1e-12, atol=1e-12)
    if cn is not None:
        np.testing.assert_allclose(cn, rcn, rtol=1e-12, atol=1e-12)
    assert np.all(np.isfinite(y[[0, 2, 3]]))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_non_finite_padding_does_not_leak(cell, dtype, batch_first):
    """NaN and Inf in x past a sequence's length change nothing: outputs, final states, dx and all
    parameter gradients are those with zeros there."""
    rng = np.random.default_rng(47)
    batch, seq_len = 20, 6
    layer = make_layer(cell, 3, 4, 2, bidirectional=True, batch_first=batch_first, dtype=dtype, seed=10)
    xb = rng.standard_normal((batch, seq_len, 3)).astype(dtype)
    lengths = mixed_lengths(batch, seq_len, rng)
    lengths[3] = seq_len - 1
    clean = xb.copy()
    dirty = xb.copy()
    for b, n in enumerate(lengths):
        clean[b, n:] = 0
        dirty[b, n:] = np.nan
    dirty[3, seq_len - 1, 0] = np.inf
    dirty[3, seq_len - 1, 1] = -np.inf

    def layout(a):
        return a if batch_first else np.ascontiguousarray(a.transpose(1, 0, 2))

    state = random_state(rng, layer, batch, dtype)
    dy = rng.standard_normal(seq_shape(batch_first, batch, seq_len, 8)).astype(dtype)
    dstate = random_state(rng, layer, batch, dtype)
    want = run(layer, layout(clean), state, lengths, dy, dstate)
    got = run(layer, layout(dirty), state, lengths, dy, dstate)
    for (name, a), (_, b) in zip(got, want, strict=True):
        if name == "dx":
            a, b = layout(a), layout(b)
            for s, n in enumerate(lengths):
                assert np.all(a[s, n:] == 0), f"dx is not zero past the length of sequence {s}"
        assert np.all(np.isfinite(a)), f"non-finite padding leaked into {name}"
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
def test_callers_float_mode_is_kept(threads, num_threads):
    """The kernels flush denormals to zero, on the pool's threads and, with one thread, on the
    caller's own thread for the call only: NumPy's arithmetic afterwards still sees denormals."""
    num_threads(threads)
    layer = make_layer("lstm", 4, 8, 1, dtype=np.float32, seed=2)
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    layer(x)
    layer.eval()
    layer.step(x[:, 0])
    tiny = np.array([1e-39], dtype=np.float32)  # a float32 denormal
    assert tiny[0] != 0 and (tiny * np.float32(1.0))[0] == tiny[0]
