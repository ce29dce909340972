"""The inference weight cache: a recurrent layer in eval mode keeps its weights prepared for the
kernels between calls. Its results must be the uncached kernel's, bit for bit, whatever happens
to the weights in between (changes in place, a loaded state), and it must survive copies,
pickling and concurrent calls."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import rnnkit
from helpers import CELLS, at_offset, make_layer, mixed_lengths, random_state, split_state
from reference import reference_forward
from rnnkit import _core

B, T, IN, H = 6, 7, 5, 9
#: Whether the kernels pack the recurrent weights (with AVX2+FMA): else there is nothing to keep.
ONE = 0 if rnnkit.simd_level() == "baseline" else 1


def uncached(layer, x, state=None, lengths=None):
    """The layer's inference forward through the kernel with no cache: (y, hn, cn)."""
    h0, c0 = split_state(state) if state is not None else (None, None)
    nd = layer.num_directions
    hn, cn = [], []
    y = x
    for k in range(layer.num_layers):
        sl = slice(k * nd, (k + 1) * nd)
        y, h, c, _ = _core.forward(
            layer._cell,
            y,
            layer._weights(k),
            None if h0 is None else h0[sl],
            None if c0 is None else c0[sl],
            None if lengths is None else np.asarray(lengths, dtype=np.int64),
            layer.batch_first,
            False,
        )
        hn.append(h)
        if c is not None:
            cn.append(c)
    return y, np.concatenate(hn), np.concatenate(cn) if cn else None


def assert_same(layer, x, state=None, lengths=None):
    y, out = layer(x, state=state, lengths=lengths)
    hn, cn = split_state(out)
    ry, rhn, rcn = uncached(layer, x, state, lengths)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(hn, rhn)
    if rcn is not None:
        np.testing.assert_array_equal(cn, rcn)
    return y


def builds(layer):
    return [c.builds for c in layer._caches]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_cached_equals_uncached_call_after_call(cell, bidirectional, with_lengths, dtype):
    rng = np.random.default_rng(3)
    layer = make_layer(cell, IN, H, 2, bidirectional=bidirectional, dtype=dtype, seed=1).eval()
    x = rng.standard_normal((B, T, IN)).astype(dtype)
    lengths = mixed_lengths(B, T, rng) if with_lengths else None
    state = random_state(rng, layer, B, dtype)
    first = assert_same(layer, x, state, lengths)
    for _ in range(2):
        np.testing.assert_array_equal(assert_same(layer, x, state, lengths), first)
    assert builds(layer) == [ONE, ONE]  # prepared once per stacked layer, then reused
    # And the kernel's result is the reference's.
    h0, c0 = split_state(state)
    ry, _, _ = reference_forward(cell, layer.params, x, h0=h0, c0=c0, lengths=lengths)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(first, ry, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", CELLS)
def test_weights_changed_in_place_are_seen(cell):
    rng = np.random.default_rng(4)
    layer = make_layer(cell, IN, H, 2, dtype=np.float64, seed=2).eval()
    x = rng.standard_normal((B, T, IN))
    before = assert_same(layer, x)
    w = layer.params["weight_hh_l1"]
    w[3, 4] += 0.5  # one element of the second layer's recurrent weights
    after = assert_same(layer, x)
    assert not np.array_equal(after, before)
    assert builds(layer) == [ONE, 2 * ONE]
    layer.params["bias_ih_l0"][:] = 0.0
    assert_same(layer, x)
    assert builds(layer) == [2 * ONE, 2 * ONE]
    new = make_layer(cell, IN, H, 2, dtype=np.float64, seed=9)
    layer.load_state_dict(new.state_dict())
    assert_same(layer, x)
    assert builds(layer) == [3 * ONE, 3 * ONE]


def test_a_change_in_any_piece_of_large_weights_is_seen(two_threads):
    """The cache's copy is made and compared piece by piece (16384 elements), on the threads."""
    rng = np.random.default_rng(10)
    layer = rnnkit.LSTM(96, 96, dtype=np.float64, seed=1).eval()
    x = rng.standard_normal((4, 5, 96))
    before = assert_same(layer, x)
    for where in [(0, 0), (200, 50), (-1, -1)]:  # weight_ih_l0 (384 x 96): pieces 1, 2 and 3
        layer.params["weight_ih_l0"][where] += 0.5
        after = assert_same(layer, x)
        assert not np.array_equal(after, before)
        before = after
    assert builds(layer) == [4 * ONE]


def test_training_mode_frees_the_caches_and_eval_makes_them_again():
    rng = np.random.default_rng(5)
    layer = rnnkit.LSTM(IN, H, num_layers=2, seed=3)
    x = rng.standard_normal((B, T, IN)).astype(np.float32)
    layer(x)
    assert layer._caches is None  # training mode: no cache
    layer.eval()
    assert_same(layer, x)
    assert all((c.nbytes > 0) == bool(ONE) for c in layer._caches)
    layer.train()
    assert layer._caches is None
    y, _ = layer(x)
    dx, _ = layer.backward(np.ones_like(y))  # training still works
    assert dx.shape == x.shape
    layer.eval()
    assert_same(layer, x)
    assert builds(layer) == [ONE, ONE]


def test_batch_of_one_or_two_leaves_the_cache_empty():
    # The recurrent products of one or two rows read the weights as they are: nothing to keep.
    rng = np.random.default_rng(6)
    layer = rnnkit.GRU(IN, H, seed=4).eval()
    for batch in (1, 2):
        assert_same(layer, rng.standard_normal((batch, T, IN)).astype(np.float32))
    assert builds(layer) == [0]
    assert layer._caches[0].nbytes == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_batch_of_one_keeps_an_aligned_copy_of_misaligned_weights(cell, dtype):
    # NumPy's arrays (a copied or unpickled layer's) start on 16 bytes: when the recurrent weights'
    # rows could be aligned (H * itemsize a multiple of 64) but are not, the cache keeps an aligned
    # copy for the dot-product kernel, with the same results; aligned ones are read in place.
    rng = np.random.default_rng(8)
    hidden = 16 if dtype == np.float32 else 8
    layer = make_layer(cell, IN, hidden, dtype=dtype, seed=6)
    x = rng.standard_normal((1, T, IN)).astype(dtype)
    aligned = layer._weights(0)
    want = _core.forward(layer._cell, x, aligned, None, None, None, True, False)[0]
    cache = _core.WeightCache()
    for offset, builds in ((0, 0), (16, 1), (48, 1)):
        weights = [tuple(at_offset(a, offset) for a in aligned[0])]
        got = _core.forward(layer._cell, x, weights, None, None, None, True, False, cache)[0]
        np.testing.assert_array_equal(got, want)
        assert cache.builds == builds * ONE, offset
    weights[0][1][3] *= 0.5  # a change in place is seen
    got = _core.forward(layer._cell, x, weights, None, None, None, True, False, cache)[0]
    np.testing.assert_array_equal(
        got, _core.forward(layer._cell, x, weights, None, None, None, True, False)[0]
    )
    assert not np.array_equal(got, want)
    assert cache.builds == 2 * ONE


def test_copies_and_pickles_start_empty_and_agree():
    rng = np.random.default_rng(7)
    layer = rnnkit.LSTM(IN, H, bidirectional=True, seed=5).eval()
    x = rng.standard_normal((B, T, IN)).astype(np.float32)
    y = assert_same(layer, x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert builds(twin) == [0]
        np.testing.assert_array_equal(assert_same(twin, x), y)
        twin.params["weight_hh_l0"][:] = 0.0  # the twin's weights are its own
    np.testing.assert_array_equal(assert_same(layer, x), y)
    assert builds(layer) == [ONE]
    assert repr(_core.WeightCache()) == "<rnnkit WeightCache: 0 bytes, 0 builds>"


def test_concurrent_calls_on_one_layer(num_threads):
    num_threads(2)
    rng = np.random.default_rng(8)
    layer = rnnkit.LSTM(16, 32, seed=6).eval()
    xs = [rng.standard_normal((8, 20, 16)).astype(np.float32) for _ in range(4)]
    want = [uncached(layer, x)[0] for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(30):
                y, _ = layer(xs[k])
                np.testing.assert_array_equal(y, want[k])
        except Exception as e:  # reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_one_cache_across_dtypes_and_layers():
    rng = np.random.default_rng(9)
    cache = _core.WeightCache()
    for dtype, hidden in ((np.float32, 9), (np.float64, 9), (np.float64, 12), (np.float32, 9)):
        layer = rnnkit.RNN(IN, hidden, dtype=dtype, seed=hidden)
        x = rng.standard_normal((B, T, IN)).astype(dtype)
        got = _core.forward("rnn_tanh", x, layer._weights(0), cache=cache)[0]
        np.testing.assert_array_equal(got, uncached(layer, x)[0])
    assert cache.builds == ONE  # each change of dtype starts a new count
    cache.clear()
    assert cache.nbytes == 0


def test_bad_cache_arguments():
    layer = rnnkit.LSTM(IN, H, seed=7)
    x = np.zeros((B, T, IN), dtype=np.float32)
    with pytest.raises(ValueError, match="cache is for inference only"):
        _core.forward("lstm", x, layer._weights(0), train=True, cache=_core.WeightCache())
    with pytest.raises(TypeError, match="cache must be a WeightCache or None; got dict"):
        _core.forward("lstm", x, layer._weights(0), cache={})
