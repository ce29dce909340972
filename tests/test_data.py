"""rnnkit.data: pad_sequences, train_val_split and batches against hand-computed values and
straightforward loop references."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from rnnkit.data import BUCKET_WINDOW, Batch, batches, pad_sequences, train_val_split

SEQS = [[1, 2, 3], [4, 5], [6]]


def pad_reference(seqs, maxlen, value, padding, truncating):
    """Padding one sequence at a time, written out plainly."""
    seqs = [np.asarray(s) for s in seqs]
    t = max(len(s) for s in seqs) if maxlen is None else maxlen
    out = np.full((len(seqs), t, *seqs[0].shape[1:]), value, dtype=np.result_type(*seqs))
    lengths = []
    for i, s in enumerate(seqs):
        s = s[-t:] if truncating == "pre" else s[:t]
        if padding == "pre":
            out[i, t - len(s) :] = s
        else:
            out[i, : len(s)] = s
        lengths.append(len(s))
    return out, np.array(lengths)


# ---------------------------------------------------------------------- pad_sequences


def test_pad_default_is_post_to_longest():
    padded, lengths = pad_sequences(SEQS)
    np.testing.assert_array_equal(padded, [[1, 2, 3], [4, 5, 0], [6, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 2, 1])
    assert padded.dtype == np.int64 and lengths.dtype == np.int64


@pytest.mark.parametrize(
    ("padding", "truncating", "maxlen", "expected", "expected_lengths"),
    [
        ("post", "post", 2, [[1, 2], [4, 5], [6, -1]], [2, 2, 1]),
        ("pre", "post", 2, [[1, 2], [4, 5], [-1, 6]], [2, 2, 1]),
        ("post", "pre", 2, [[2, 3], [4, 5], [6, -1]], [2, 2, 1]),
        ("pre", "pre", 2, [[2, 3], [4, 5], [-1, 6]], [2, 2, 1]),
        ("post", "pre", 4, [[1, 2, 3, -1], [4, 5, -1, -1], [6, -1, -1, -1]], [3, 2, 1]),
        ("pre", "post", 4, [[-1, 1, 2, 3], [-1, -1, 4, 5], [-1, -1, -1, 6]], [3, 2, 1]),
        ("pre", "pre", 1, [[3], [5], [6]], [1, 1, 1]),
    ],
)
def test_pad_hand_computed(padding, truncating, maxlen, expected, expected_lengths):
    padded, lengths = pad_sequences(SEQS, maxlen=maxlen, value=-1, padding=padding, truncating=truncating)
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(lengths, expected_lengths)


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("truncating", ["pre", "post"])
@pytest.mark.parametrize("maxlen", [None, 1, 4, 9])
def test_pad_matches_reference_on_feature_sequences(rng, padding, truncating, maxlen):
    seqs = [rng.standard_normal((k, 2, 3)) for k in rng.integers(1, 8, size=12)]
    padded, lengths = pad_sequences(seqs, maxlen=maxlen, value=7.5, padding=padding, truncating=truncating)
    ref, ref_lengths = pad_reference(seqs, maxlen, 7.5, padding, truncating)
    assert padded.shape == ref.shape
    np.testing.assert_array_equal(padded, ref)
    np.testing.assert_array_equal(lengths, ref_lengths)


def test_pad_dtypes():
    mixed = [np.ones(2, np.int32), np.ones(3, np.float32)]
    assert pad_sequences(mixed)[0].dtype == np.float64  # the common dtype of int32 and float32
    assert pad_sequences([np.ones(2, np.float32), np.ones(1, np.float32)])[0].dtype == np.float32
    padded, _ = pad_sequences(SEQS, dtype=np.float32, value=0.5)
    assert padded.dtype == np.float32
    np.testing.assert_array_equal(padded[2], [6.0, 0.5, 0.5])
    assert pad_sequences([[1.5, 2.5], [3.5]], dtype=np.int8)[0].dtype == np.int8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sequences": [[1, 2], [3], []]}, ValueError, r"sequences\[2\] is empty"),
        ({"sequences": [np.ones((2, 3)), np.ones((2, 4))]}, ValueError, r"sequences\[1\].*per-step shape"),
        ({"sequences": [[1, 2], 3]}, ValueError, r"sequences\[1\].*scalar"),
        ({"sequences": [["a", "b"]]}, TypeError, r"sequences\[0\].*numbers"),
        ({"sequences": []}, ValueError, "sequences must hold at least one"),
        ({"sequences": "abc"}, TypeError, "sequences must be a list"),
        ({"sequences": SEQS, "maxlen": 0}, ValueError, "maxlen"),
        ({"sequences": SEQS, "maxlen": 2.0}, TypeError, "maxlen"),
        ({"sequences": SEQS, "padding": "middle"}, ValueError, "padding"),
        ({"sequences": SEQS, "truncating": "both"}, ValueError, "truncating"),
        ({"sequences": SEQS, "value": 0.5}, ValueError, "value=0.5"),
        ({"sequences": SEQS, "value": 300, "dtype": np.uint8}, ValueError, "value=300"),
        ({"sequences": SEQS, "value": [0]}, TypeError, "value must be a number"),
        ({"sequences": SEQS, "dtype": "U3"}, TypeError, "dtype"),
    ],
)
def test_pad_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pad_sequences(kwargs.pop("sequences"), **kwargs)


# ---------------------------------------------------------------------- train_val_split


def test_split_sizes_alignment_and_disjointness():
    ids = np.arange(100)
    x = np.stack([ids, -ids], axis=1)
    seqs = [[i] * (1 + i % 5) for i in range(100)]
    x_tr, x_val, id_tr, id_val, s_tr, s_val = train_val_split(x, ids, seqs, val_fraction=0.2, seed=3)
    assert x_tr.shape == (80, 2) and x_val.shape == (20, 2)
    assert isinstance(s_tr, list) and isinstance(s_val, list) and len(s_tr) == 80 and len(s_val) == 20
    assert set(id_tr).isdisjoint(id_val) and set(id_tr) | set(id_val) == set(range(100))
    np.testing.assert_array_equal(x_tr[:, 0], id_tr)
    np.testing.assert_array_equal(x_val[:, 1], -id_val)
    assert [s[0] for s in s_val] == list(id_val)
    assert not np.array_equal(np.sort(id_val), np.arange(80, 100))  # shuffled


def test_split_is_reproducible_from_the_seed():
    ids = np.arange(50)
    a = train_val_split(ids, seed=7)
    b = train_val_split(ids, seed=7)
    c = train_val_split(ids, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_without_shuffle_takes_the_last_examples():
    tr, val = train_val_split(list(range(10)), val_fraction=0.3, shuffle=False)
    assert tr == list(range(7)) and val == [7, 8, 9]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((np.arange(10), np.arange(9)), {}, ValueError, r"arrays\[1\] has 9"),
        ((np.arange(10),), {"val_fraction": 0.0}, ValueError, "val_fraction"),
        ((np.arange(10),), {"val_fraction": 1.0}, ValueError, "val_fraction"),
        ((np.arange(10),), {"val_fraction": "0.1"}, TypeError, "val_fraction"),
        ((np.arange(3),), {"val_fraction": 0.1}, ValueError, "at least one"),
        ((np.arange(2),), {"val_fraction": 0.9}, ValueError, "at least one"),
        (({"a": 1},), {}, TypeError, r"arrays\[0\]"),
        ((np.float64(1.0),), {}, TypeError, r"arrays\[0\]"),
        ((np.arange(10),), {"seed": "x"}, TypeError, "seed"),
        ((np.arange(10),), {"shuffle": 1}, TypeError, "shuffle"),
        ((), {}, TypeError, "at least one array"),
    ],
)
def test_split_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_val_split(*args, **kwargs)


# ---------------------------------------------------------------------- batches


def epoch_indices(it):
    return [b.index for b in it]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_per_epoch(rng, shuffle):
    x = rng.standard_normal((103, 4, 2))
    y = rng.standard_normal(103)
    it = batches(x, y, batch_size=10, shuffle=shuffle, seed=0)
    assert len(it) == 11
    for _ in range(2):
        got = list(it)
        assert [len(b.index) for b in got] == [10] * 10 + [3]
        idx = np.concatenate([b.index for b in got])
        np.testing.assert_array_equal(np.sort(idx), np.arange(103))
        assert not shuffle or not np.array_equal(idx, np.arange(103))
        for b in got:
            assert isinstance(b, Batch) and b.index.dtype == np.int64
            np.testing.assert_array_equal(b.x, x[b.index])
            np.testing.assert_array_equal(b.y, y[b.index])
            assert b.lengths is None and b.y_lengths is None
    if not shuffle:
        np.testing.assert_array_equal(idx, np.arange(103))


def test_drop_last():
    it = batches(np.arange(103), batch_size=10, drop_last=True, seed=1)
    assert len(it) == 10
    got = list(it)
    assert len(got) == 10 and all(len(b.index) == 10 for b in got)
    assert len(np.unique(np.concatenate([b.index for b in got]))) == 100


def test_batches_reproducible_from_seed_and_epochs_differ():
    x = np.arange(64)
    a = batches(x, batch_size=8, seed=5)
    b = batches(x, batch_size=8, seed=5)
    runs_a = [np.concatenate(epoch_indices(a)) for _ in range(3)]
    runs_b = [np.concatenate(epoch_indices(b)) for _ in range(3)]
    for ea, eb in zip(runs_a, runs_b, strict=True):
        np.testing.assert_array_equal(ea, eb)
    assert not np.array_equal(runs_a[0], runs_a[1]) and not np.array_equal(runs_a[1], runs_a[2])
    other = np.concatenate(epoch_indices(batches(x, batch_size=8, seed=6)))
    assert not np.array_equal(other, runs_a[0])


def test_epoch_order_is_drawn_at_iter():
    """Each iter() is the next epoch, even before any of its batches is taken."""
    a = batches(np.arange(40), batch_size=40, seed=2)
    b = batches(np.arange(40), batch_size=40, seed=2)
    first, second = iter(a), iter(a)
    b_first = next(iter(b)).index
    b_second = next(iter(b)).index
    np.testing.assert_array_equal(next(second).index, b_second)
    np.testing.assert_array_equal(next(first).index, b_first)
    assert not np.array_equal(b_first, b_second)


def test_list_sequences_are_padded_per_batch(rng):
    lens = rng.integers(1, 12, size=37)
    seqs = [rng.standard_normal((k, 3)).astype(np.float32) for k in lens]
    targets = [list(range(k + 1)) for k in lens]  # int sequences of other lengths
    for b in batches(seqs, targets, batch_size=8, seed=0):
        np.testing.assert_array_equal(b.lengths, lens[b.index])
        np.testing.assert_array_equal(b.y_lengths, lens[b.index] + 1)
        assert b.x.shape == (len(b.index), lens[b.index].max(), 3) and b.x.dtype == np.float32
        assert b.y.shape == (len(b.index), lens[b.index].max() + 1) and b.y.dtype == np.int64
        ref, _ = pad_reference([seqs[i] for i in b.index], None, 0, "post", "post")
        np.testing.assert_array_equal(b.x, ref)
        for row, i in enumerate(b.index):
            np.testing.assert_array_equal(b.y[row, : lens[i] + 1], targets[i])
            assert not b.y[row, lens[i] + 1 :].any()


def test_list_sequences_get_the_dataset_dtype():
    seqs = [[1, 2], [3], [4, 5, 6], np.array([0.5])]  # one float sequence makes all batches float
    assert {b.x.dtype for b in batches(seqs, batch_size=1)} == {np.dtype(np.float64)}


def padding_fraction(it):
    cells = valid = 0
    for b in it:
        cells += b.x.shape[0] * b.x.shape[1]
        valid += int(b.lengths.sum())
    return 1.0 - valid / cells


def test_bucketing_reduces_padding(rng):
    lens = rng.integers(1, 101, size=3000)
    seqs = [np.zeros(k, np.float32) for k in lens]
    plain = padding_fraction(batches(seqs, batch_size=32, seed=0))
    bucketed = batches(seqs, batch_size=32, seed=0, bucket=True)
    assert plain > 0.4
    assert padding_fraction(bucketed) < 0.1
    assert len(bucketed) == 94
    epochs = [list(bucketed) for _ in range(2)]
    for epoch in epochs:
        idx = np.concatenate([b.index for b in epoch])
        np.testing.assert_array_equal(np.sort(idx), np.arange(3000))
        maxima = [b.lengths.max() for b in epoch]
        assert np.sum(np.diff(maxima) < 0) > 20  # the batches are shuffled, not sorted by window
    assert not np.array_equal(epochs[0][0].index, epochs[1][0].index)
    dropped = list(batches(seqs, batch_size=32, seed=0, bucket=True, drop_last=True))
    assert len(dropped) == 93 and all(len(b.index) == 32 for b in dropped)


def test_bucketing_sorts_within_windows_without_shuffle():
    lens = np.array([5, 1, 4, 2, 3, 6])
    x = np.zeros((6, 6, 1))
    got = epoch_indices(batches(x, lengths=lens, batch_size=2, shuffle=False, bucket=True))
    assert 6 <= BUCKET_WINDOW * 2  # one window: a plain sort by length
    np.testing.assert_array_equal(np.concatenate(got), [1, 3, 4, 2, 0, 5])


def test_bucketing_trims_array_x_and_per_step_y(rng):
    n, t = 50, 30
    lens = rng.integers(1, t + 1, size=n)
    x = rng.standard_normal((n, t, 2))
    per_step = rng.standard_normal((n, t, 3))
    other_axis = rng.standard_normal((n, t + 1))
    for y, trimmed in ((per_step, True), (other_axis, False), (rng.standard_normal(n), False)):
        for b in batches(x, y, lengths=lens, batch_size=8, seed=1, bucket=True):
            m = lens[b.index].max()
            np.testing.assert_array_equal(b.lengths, lens[b.index])
            np.testing.assert_array_equal(b.x, x[b.index, :m])
            np.testing.assert_array_equal(b.y, y[b.index, :m] if trimmed else y[b.index])
    for b in batches(x, per_step, lengths=lens, batch_size=8, seed=1):  # no bucketing: no trimming
        assert b.x.shape[1] == t and b.y.shape[1] == t


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((np.zeros((2, 3)), np.zeros((2, 3))),), {}, TypeError, "x must be"),
        ((np.zeros((0, 3)),), {}, ValueError, "x must hold at least one"),
        ((np.zeros((4, 3)), np.zeros(5)), {}, ValueError, "y has 5 examples; x has 4"),
        ((np.zeros((4, 3)), "abc"), {}, TypeError, "y must be"),
        (([[1], [2, 3], []],), {}, ValueError, r"x\[2\] is empty"),
        (([[1], [2, 3]],), {"lengths": [1, 2]}, ValueError, "lengths must be None"),
        ((np.zeros((2, 3)),), {"lengths": [1, 4]}, ValueError, "lengths"),
        ((np.zeros((2, 3)),), {"lengths": [1]}, ValueError, "lengths"),
        ((np.zeros(3),), {"lengths": [1, 1, 1]}, ValueError, "lengths needs x with a time axis"),
        ((np.zeros((4, 3)),), {"bucket": True}, ValueError, "bucket"),
        ((np.zeros((4, 3)),), {"batch_size": 0}, ValueError, "batch_size"),
        ((np.zeros((4, 3)),), {"batch_size": 2.0}, TypeError, "batch_size"),
        ((np.zeros((4, 3)),), {"shuffle": "yes"}, TypeError, "shuffle"),
        ((np.zeros((4, 3)),), {"drop_last": True, "batch_size": 5}, ValueError, "drop_last"),
        ((np.zeros((4, 3)),), {"seed": 1.5}, TypeError, "seed"),
        ((np.zeros((4, 3)),), {"seed": -1}, ValueError, "seed"),
    ],
)
def test_batches_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        batches(*args, **kwargs)


def test_text_windows_overlap_by_one_and_drop_the_rest():
    ids = np.arange(10, 21)  # 11 ids: two windows of 5 inputs (+1 target) and one id left over
    np.testing.assert_array_equal(
        rnnkit.data.text_windows(ids, 5), [[10, 11, 12, 13, 14, 15], [15, 16, 17, 18, 19, 20]]
    )
    np.testing.assert_array_equal(
        rnnkit.data.text_windows(np.arange(12), 5), rnnkit.data.text_windows(np.arange(11), 5)
    )
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 6"):
        rnnkit.data.text_windows(np.arange(5), 5)
    with pytest.raises(ValueError, match="integer token ids"):
        rnnkit.data.text_windows(np.ones(9), 2)


def test_pydoc_text_is_the_joined_topics():
    from pydoc_data.topics import topics

    assert rnnkit.data.pydoc_text(1000) == "".join(topics[k] for k in sorted(topics))[:1000]
    assert len(rnnkit.data.pydoc_text()) > 400_000
