"""Smoke tests of the example scripts under examples/: each runs its --smoke configuration."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_example(name: str) -> ModuleType:
    """Import examples/<name>.py by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _co2_monthly_reference():
    """The monthly CO2 series rebuilt without pandas: the mean of each calendar month's weekly
    values, months without any value linearly interpolated between their neighbours."""
    from statsmodels.datasets import co2

    weekly = co2.load_pandas().data["co2"]
    values = weekly.to_numpy()
    keys = np.asarray(weekly.index.year * 12 + weekly.index.month - 1)
    keys -= keys.min()
    n = keys.max() + 1
    seen = ~np.isnan(values)
    sums = np.bincount(keys[seen], values[seen], minlength=n)
    counts = np.bincount(keys[seen], minlength=n)
    known = np.flatnonzero(counts)
    return np.interp(np.arange(n), known, sums[known] / counts[known])


@pytest.mark.parametrize(
    ("extra", "png"), [([], "co2_forecast.png"), (["--levels"], "co2_forecast_levels.png")]
)
def test_forecast_co2_smoke(tmp_path, extra, png):
    pytest.importorskip("statsmodels")
    pytest.importorskip("matplotlib")
    example = _load_example("forecast_co2")
    figures = example.main(["--smoke", "--out", str(tmp_path), *extra])
    methods = ("lstm", "gru", "last_value", "seasonal_naive")
    expected = {f"{m}_{k}" for m in methods for k in ("mae", "rmse")} | {"lstm_seconds", "gru_seconds"}
    assert set(figures) == expected
    assert all(math.isfinite(v) and v >= 0 for v in figures.values())
    assert (tmp_path / png).stat().st_size > 1000

    # The baselines against a loop-by-loop reference: 12-month forecasts from every origin of the
    # last 72 months whose 12 months ahead are all observed.
    levels = _co2_monthly_reference()
    assert len(levels) == 526
    errors = {"last_value": [], "seasonal_naive": []}
    for origin in range(len(levels) - 72, len(levels) - 12 + 1):
        for h in range(12):
            truth = levels[origin + h]
            errors["last_value"].append(levels[origin - 1] - truth)
            errors["seasonal_naive"].append(levels[origin + h - 12] - truth)
    for name, err in errors.items():
        err = np.array(err)
        assert len(err) == 61 * 12
        assert figures[f"{name}_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-12)
        assert figures[f"{name}_rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-12)


def test_classify_digits_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = _load_example("classify_digits")
    figures = example.main(["--smoke", "--out", str(tmp_path)])
    cells = ("rnn", "lstm", "gru")
    assert set(figures) == {f"{c}_{k}" for c in cells for k in ("accuracy", "params", "seconds")}
    assert all(math.isfinite(v) for v in figures.values())
    assert all(0.0 <= figures[f"{c}_accuracy"] <= 1.0 for c in cells)
    # --smoke uses hidden size 8 on 8 features, 10 classes: per gate 8*8 + 8*8 weights and two
    # biases of 8 (144); the head 8*10 + 10 (90). RNN has 1 gate block, GRU 3, LSTM 4.
    assert (figures["rnn_params"], figures["gru_params"], figures["lstm_params"]) == (234, 522, 666)
    assert (tmp_path / "digits_learning_curves.png").stat().st_size > 1000


def test_dates_seq2seq_formats():
    import datetime as dt

    example = _load_example("dates_seq2seq")
    fields = example.date_fields(dt.date(2021, 3, 3))
    rendered = [template.format(**fields) for template in example.FORMATS]
    assert rendered == [
        "3rd of March 2021",
        "March 3, 2021",
        "March 3rd, 2021",
        "Mar 3, 21",
        "3 March 2021",
        "03-Mar-2021",
        "Wednesday, 3 March 2021",
        "Wed, Mar 3, 2021",
        "03/03/2021",
        "3/3/21",
        "3.3.21",
        "03.03.2021",
        "2021-3-3",
        "20210303",
    ]
    assert [example.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st", "111th"
    ]  # fmt: skip


def test_dates_seq2seq_data():
    import datetime as dt

    example = _load_example("dates_seq2seq")
    rng = np.random.default_rng(3)
    train, val, test = example.split_days(50, 70, rng)
    assert (len(val), len(test)) == (50, 70)
    assert len(train) + 120 == (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days + 1
    assert len(set(train) | set(val) | set(test)) == len(train) + 120  # disjoint days
    sources, targets, formats = example.make_examples(test, rng)
    for src, tgt, f in zip(sources, targets, formats, strict=True):
        date = dt.date.fromisoformat(tgt)
        assert (date - dt.date(1950, 1, 1)).days in set(test)
        expected = example.FORMATS[f].format(**example.date_fields(date))
        assert src in (expected, expected.lower(), expected.upper())
    ids = example.encode_targets(["2021-03-03"])[0]
    assert ids[-1] == example.EOS and len(ids) == 11
    assert example.decode_target(ids[:-1]) == "2021-03-03"
    src_ids = example.encode_sources(["Mar 3, 21"])[0]
    assert "".join(example.SOURCE_VOCAB[i] for i in src_ids[:-1]) == "Mar 3, 21"
    assert src_ids[-1] == example.EOS


def test_dates_seq2seq_smoke(tmp_path):
    example = _load_example("dates_seq2seq")
    figures = example.main(["--smoke", "--out", str(tmp_path)])
    for key in ("exact_match", "train_loss", "val_loss", "val_accuracy", "seconds"):
        assert math.isfinite(figures[key]), key
    assert 0.0 <= figures["exact_match"] <= 1.0
    assert list(figures["per_format"]) == list(example.FORMATS)
    assert all(0.0 <= v <= 1.0 for v in figures["per_format"].values())
    if importlib.util.find_spec("matplotlib") is None:
        assert figures["plot"] is None
    else:
        assert figures["plot"] == tmp_path / "dates_seq2seq.png"
        assert figures["plot"].stat().st_size > 1000


def test_text_generation_smoke(tmp_path):
    example = _load_example("text_generation")
    figures = example.main(["--smoke", "--out", str(tmp_path), "--keep-model"])
    for key in ("val_perplexity_before", "val_perplexity_after", "train_perplexity", "seconds"):
        assert math.isfinite(figures[key]), key
    vocab = figures["uniform_perplexity"]
    # an untrained model is close to a uniform guess; one epoch already does better
    assert 0.5 * vocab < figures["val_perplexity_before"] < 2 * vocab
    assert figures["val_perplexity_after"] < figures["val_perplexity_before"]
    assert set(figures["samples"]) == {
        "temperature=0.5",
        "temperature=0.8",
        "temperature=1.0",
        "temperature=1.0, top_k=5",
    }
    assert all(len(s) == 40 for s in figures["samples"].values())
    assert len(figures["greedy"]) == 40 and figures["reload_matches"] is True
    import rnnkit

    reloaded = rnnkit.load(figures["model"])
    assert reloaded.generate("The ", 40, temperature=0) == figures["greedy"]
    if importlib.util.find_spec("matplotlib") is None:
        assert figures["plot"] is None
    else:
        assert figures["plot"] == tmp_path / "text_generation.png"
        assert figures["plot"].stat().st_size > 1000


def test_vanishing_gradients_adding_problem():
    example = _load_example("vanishing_gradients")
    x, y = example.adding_problem(200, 9, np.random.default_rng(0))
    assert x.shape == (200, 9, 2) and y.shape == (200, 1) and x.dtype == y.dtype == np.float32
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert (markers[:, :4].sum(axis=1) == 1).all() and (markers[:, 4:].sum(axis=1) == 1).all()
    np.testing.assert_allclose(y[:, 0], (values * markers).sum(axis=1), rtol=1e-6)


def test_vanishing_gradients_norms_match_numpy_bptt():
    example = _load_example("vanishing_gradients")
    x, y = example.adding_problem(5, 7, np.random.default_rng(1))
    model, layer = example.build("rnn", 4, 3, dtype=np.float64, recurrent_scale=2.0)
    default, _ = example.build("rnn", 4, 3, dtype=np.float64)
    w_ih, w_hh = layer.params["weight_ih_l0"], layer.params["weight_hh_l0"]
    np.testing.assert_array_equal(w_hh, 2.0 * default.params["0.weight_hh_l0"])
    norms = example.gradient_norms(model, layer, x, y)
    # Independent tanh-RNN BPTT: L = sum_b (w.h_{T-1} + c - y_b)^2, dL/dh_t = dL/dh_{t+1} (1-h^2) W_hh.
    bias = layer.params["bias_ih_l0"] + layer.params["bias_hh_l0"]
    w, c = model.params["2.weight"], model.params["2.bias"]
    h = np.zeros((5, 4))
    hs = []
    for t in range(7):
        h = np.tanh(x[:, t] @ w_ih.T + h @ w_hh.T + bias)
        hs.append(h)
    g = 2 * (h @ w.T + c - y) @ w
    expected = np.zeros(7)
    for t in reversed(range(7)):
        expected[t] = np.linalg.norm(g, axis=1).mean()
        g = (g * (1 - hs[t] ** 2)) @ w_hh
    np.testing.assert_allclose(norms, expected, rtol=1e-10)
    assert not any(g.any() for g in model.grads.values())  # the probe leaves no gradient behind


def test_vanishing_gradients_smoke(tmp_path):
    example = _load_example("vanishing_gradients")
    figures = example.main(["--smoke", "--out", str(tmp_path)])
    runs = [f"{c}_{k}" for c in ("rnn", "lstm", "gru") for k in ("clip", "noclip")]
    expected = {"baseline_mse"} | {f"ratio_{v}" for v in ("rnn", "rnn_scaled", "lstm", "gru")}
    expected |= {f"trained_ratio_{c}" for c in ("rnn", "lstm", "gru")}
    expected |= {f"{r}_{k}" for r in runs for k in ("val_mse", "solved", "diverged", "seconds")}
    assert set(figures) == expected
    assert all(math.isfinite(v) for v in figures.values())
    assert all(figures[f"{r}_diverged"] == 0.0 for r in runs)
    assert all(0 < figures[k] for k in expected if "ratio" in k)
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("vanishing_gradients_norms.png", "vanishing_gradients_adding.png"):
            assert (tmp_path / png).stat().st_size > 1000
