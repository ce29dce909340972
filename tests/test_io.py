"""rnnkit.io: save/load round trips, the file's contents, refusal of damaged files and atomic writes."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import rnnkit
from rnnkit.io import load, save
from rnnkit.module import Module


class Tagger(Module):
    """A small user-defined model: a bidirectional LSTM, a linear head and buffers."""

    def __init__(self, vocab, hidden, *, dims=(2, 3), opts=None, scale=0.5, dtype=np.float64):
        super().__init__()
        self.lstm = rnnkit.LSTM(vocab, hidden, bidirectional=True, dtype=dtype, seed=0)
        self.head = self.add_param("head", np.zeros((2 * hidden, 2), dtype))
        self.mean = self.add_buffer("mean", np.zeros(vocab, dtype))
        self.add_buffer("count", np.zeros((), np.int64))

    def forward(self, x, lengths=None):
        y, _ = self.lstm(x - self.mean, lengths=lengths)
        return y @ self.head


class Wrapper(Module):
    """A module that takes another module as a constructor argument."""

    def __init__(self, inner, gain=1.0):
        super().__init__()
        self.inner = inner
        self.gain = self.add_param("gain", np.full(1, gain))

    def forward(self, x):
        return self.gain * self.inner(x)


def randomize(module, rng):
    """New values for every parameter and float buffer, so a fresh construction cannot match."""
    for arr in (*module.params.values(), *module.buffers.values()):
        arr[...] = rng.standard_normal(arr.shape) if arr.dtype.kind == "f" else rng.integers(1, 99, arr.shape)
    return module


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def read_archive(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__rnnkit__").tobytes().decode("utf-8"))
    return meta, arrays


def write_archive(path, meta, arrays):
    """An archive written with numpy.savez itself (valid zip CRCs), with the given metadata."""
    extra = {} if meta is None else {"__rnnkit__": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    with open(path, "wb") as f:
        np.savez(f, **arrays, **extra)


@pytest.fixture
def tagger(rng):
    return randomize(Tagger(3, 4), rng)


@pytest.fixture
def saved(tmp_path, tagger):
    path = tmp_path / "tagger.npz"
    save(tagger, path)
    return path


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "make",
    [
        lambda: rnnkit.RNN(3, 5, 2, nonlinearity="relu", bidirectional=True, dtype=np.float64),
        lambda: rnnkit.LSTM(3, 5, 2, bidirectional=True, dtype=np.float64, seed=np.random.default_rng(1)),
        lambda: rnnkit.GRU(3, 5, 2, bidirectional=True, dtype="float64", bias=False),
        lambda: rnnkit.LSTM(2, 3),
    ],
    ids=["rnn", "lstm", "gru", "lstm-float32"],
)
def test_recurrent_round_trip(tmp_path, rng, make):
    layer = randomize(make(), rng)
    path = tmp_path / "layer.npz"
    save(layer, str(path))
    loaded = load(path)
    assert type(loaded) is type(layer) and repr(loaded) == repr(layer)
    assert_same_state(layer, loaded)
    x = rng.standard_normal((4, 6, layer.input_size))
    lengths = np.array([6, 1, 3, 5])
    y0, s0 = layer.eval()(x, lengths=lengths)
    y1, s1 = loaded.eval()(x, lengths=lengths)
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(
        s0 if isinstance(s0, tuple) else (s0,), s1 if isinstance(s1, tuple) else (s1,), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_user_module_round_trip(tmp_path, rng, tagger, saved):
    loaded = load(saved)
    assert isinstance(loaded, Tagger) and isinstance(loaded.lstm, rnnkit.LSTM)
    assert_same_state(tagger, loaded)
    assert int(loaded.buffers["count"]) == int(tagger.buffers["count"]) != 0
    x = rng.standard_normal((2, 5, 3))
    np.testing.assert_array_equal(loaded(x, lengths=[5, 2]), tagger(x, lengths=[5, 2]))


def test_nested_module_argument_round_trip(tmp_path, rng):
    model = randomize(Wrapper(Tagger(2, 3, dtype=np.float64), gain=2.0), rng)
    save(model, tmp_path / "w.npz")
    loaded = load(tmp_path / "w.npz")
    assert isinstance(loaded.inner, Tagger)
    assert_same_state(model, loaded)
    x = rng.standard_normal((3, 4, 2))
    np.testing.assert_array_equal(loaded(x), model(x))


def test_loaded_module_is_in_training_mode(tmp_path, tagger):
    save(tagger.eval(), tmp_path / "m.npz")
    loaded = load(tmp_path / "m.npz")
    assert all(m.training for _, m in loaded.named_modules())


def test_constructor_arguments_round_trip(tmp_path):
    opts = {
        "nested": [1, (2, "three", (4.5,)), None, True],
        "dtype": np.dtype(np.int16),
        "kind": np.float32,
        "i32": np.int32(7),
        "f64": np.float64(0.25),
        "flag": np.bool_(True),
        "nan": math.nan,
        "inf": -math.inf,
        "rng": np.random.default_rng(0),
    }
    save(Tagger(2, 3, dims=(5, 6), opts=opts, scale=np.float32(0.125)), tmp_path / "m.npz")
    kwargs = load(tmp_path / "m.npz")._init_kwargs
    assert kwargs["dims"] == (5, 6) and type(kwargs["dims"]) is tuple
    assert type(kwargs["scale"]) is np.float32 and kwargs["scale"] == 0.125
    got = kwargs["opts"]
    assert got["nested"] == [1, (2, "three", (4.5,)), None, True]
    assert type(got["nested"][1]) is tuple and type(got["nested"][1][2]) is tuple
    assert got["dtype"] == np.dtype(np.int16) and isinstance(got["dtype"], np.dtype)
    assert got["kind"] is np.float32
    assert type(got["i32"]) is np.int32 and got["i32"] == 7
    assert type(got["f64"]) is np.float64 and got["f64"] == 0.25
    assert type(got["flag"]) is np.bool_ and got["flag"]
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf
    assert got["rng"] is None  # a Generator is saved as None


def test_file_contents(tmp_path, tagger, saved):
    meta, arrays = read_archive(saved)
    assert meta["format"] == "rnnkit" and meta["format_version"] == 1
    assert meta["rnnkit_version"] == rnnkit.__version__
    assert meta["module"] == {"class": "test_io.Tagger", "args": [3, 4], "kwargs": {}}
    state = tagger.state_dict()
    assert arrays.keys() == state.keys() == meta["arrays"].keys()
    for name, arr in state.items():
        np.testing.assert_array_equal(arrays[name], arr)
        info = meta["arrays"][name]
        assert info["dtype"] == arr.dtype.str and info["shape"] == list(arr.shape)
        assert info["sha256"] == hashlib.sha256(arr.tobytes()).hexdigest()
    save(rnnkit.GRU(2, 3, 2, dtype=np.float64), tmp_path / "g")
    layer_meta, _ = read_archive(tmp_path / "g")
    assert layer_meta["module"] == {
        "class": "rnnkit.layers.recurrent.GRU",
        "args": [2, 3, 2],
        "kwargs": {"dtype": {"__type__": "scalar_type", "dtype": "<f8"}},
    }


def test_path_without_suffix(tmp_path, tagger):
    path = tmp_path / "model"
    save(tagger, path)
    assert path.exists() and not (tmp_path / "model.npz").exists()
    assert_same_state(load(str(path)), tagger)
    assert os.listdir(tmp_path) == ["model"]


# ---------------------------------------------------------------------- refused files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.npz")


@pytest.mark.parametrize("keep", [0, 10, 100, 0.3, 0.5, 0.9, -22, -1])
def test_truncated_file_is_refused(tmp_path, saved, keep):
    data = saved.read_bytes()
    cut = keep if isinstance(keep, int) else int(keep * len(data))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="bad.npz is not a valid rnnkit file"):
        load(bad)


def test_flipped_byte_in_an_array_is_refused(tmp_path, tagger, saved):
    data = bytearray(saved.read_bytes())
    at = data.find(tagger.params["lstm.weight_hh_l0"].tobytes())
    assert at > 0
    data[at + 13] ^= 0x40
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a valid rnnkit file"):
        load(bad)


def test_checksum_mismatch_is_refused(tmp_path, saved):
    """An array changed in a well-formed archive (valid zip CRCs) is caught by its SHA-256."""
    meta, arrays = read_archive(saved)
    arrays["head"] = arrays["head"].copy()
    arrays["head"][0, 0] += 1.0
    write_archive(tmp_path / "bad.npz", meta, arrays)
    with pytest.raises(ValueError, match=r"not a valid rnnkit file: array 'head'.*SHA-256"):
        load(tmp_path / "bad.npz")


def test_missing_metadata_is_refused(tmp_path, saved):
    _, arrays = read_archive(saved)
    write_archive(tmp_path / "bad.npz", None, arrays)
    with pytest.raises(ValueError, match="not a valid rnnkit file: it has no '__rnnkit__' entry"):
        load(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format="other"), "not a valid rnnkit file.*format 'rnnkit'"),
        (lambda m: m.update(format_version="1"), "not a valid rnnkit file.*format_version"),
        (lambda m: m["arrays"].pop("head"), "not a valid rnnkit file.*arrays"),
        (lambda m: m["module"].pop("args"), "not a valid rnnkit file.*module description"),
        (lambda m: m["module"]["kwargs"].update(dims={"__type__": "?"}), "unknown encoding"),
        (lambda m: m.update(format_version=2), "format version 2.*upgrade rnnkit"),
        (
            lambda m: m["module"].update({"class": "somewhere.Missing"}),
            "'somewhere.Missing'.*import the module",
        ),
        (lambda m: m["module"]["kwargs"].update(nope=1), "could not rebuild module"),
        (
            lambda m: m["module"].update(args=[3, 5]),
            r"do not fit the rebuilt module: state\['[\w.]+'\] has shape",
        ),
    ],
    ids=["marker", "version-type", "arrays", "module", "encoding", "newer", "class", "args", "shape"],
)
def test_bad_metadata_is_refused(tmp_path, saved, edit, match):
    meta, arrays = read_archive(saved)
    edit(meta)
    write_archive(tmp_path / "bad.npz", meta, arrays)
    with pytest.raises(ValueError, match=match):
        load(tmp_path / "bad.npz")


def test_other_files_are_refused(tmp_path):
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "single.npy", np.arange(3))
    for name in ("text.npz", "single.npy"):
        with pytest.raises(ValueError, match=f"{name} is not a valid rnnkit file"):
            load(tmp_path / name)


# ---------------------------------------------------------------------- failed saves


def assert_untouched(tmp_path, path, before):
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"f": object()}, r"module\.kwargs\['opts'\]\['f'\].*builtins\.object"),
        ([1, {2: "x"}], r"module\.kwargs\['opts'\]\[1\].*keys must be str"),
        ({"c": 1j}, r"module\.kwargs\['opts'\]\['c'\].*complex"),
        ({"a": np.zeros(2)}, r"module\.kwargs\['opts'\]\['a'\].*ndarray"),
    ],
)
def test_unencodable_argument_fails_cleanly(tmp_path, saved, opts, match):
    before = saved.read_bytes()
    with pytest.raises(TypeError, match=match):
        save(Tagger(2, 3, opts=opts), saved)
    assert_untouched(tmp_path, saved, before)
    with pytest.raises(TypeError, match=r"module\.args\[0\]\.kwargs\['opts'\]"):
        save(Wrapper(Tagger(2, 3, opts=opts)), saved)
    assert_untouched(tmp_path, saved, before)


@pytest.mark.parametrize(("target", "exc"), [("replace", OSError), ("fsync", KeyboardInterrupt)])
def test_failure_while_writing_leaves_old_file(tmp_path, monkeypatch, tagger, saved, target, exc):
    before = saved.read_bytes()

    def fail(*args):
        raise exc("simulated")

    monkeypatch.setattr(os, target, fail)
    with pytest.raises(exc, match="simulated"):
        save(rnnkit.GRU(2, 2), saved)
    monkeypatch.undo()
    assert_untouched(tmp_path, saved, before)
    assert_same_state(load(saved), tagger)


def test_save_argument_errors(tmp_path, tagger):
    with pytest.raises(TypeError, match="module must be an rnnkit Module"):
        save({"w": np.zeros(2)}, tmp_path / "m.npz")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save(tagger, 3)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        load(None)
    assert os.listdir(tmp_path) == []
