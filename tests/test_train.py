"""The training loop: learning on small synthetic tasks (loss thresholds within a bounded number of
steps, no timing), reproducibility, truncated BPTT, validation, callbacks, divergence, history."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from rnnkit.optim import SGD, Adam
from rnnkit.schedules import ReduceLROnPlateau, StepLR
from rnnkit.train import Callback, TrainingDiverged


def _sum_sign_task(n=384, seq=12, seed=0):
    """Is the sum of the first feature over the valid steps positive? Variable lengths."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, seq, 2)).astype(np.float32)
    lengths = rng.integers(2, seq + 1, n)
    valid = np.arange(seq)[None, :] < lengths[:, None]
    y = ((x[..., 0] * valid).sum(axis=1) > 0).astype(np.int64)
    return x, y, lengths


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_classifier_learns_with_lengths(cell):
    x, y, lengths = _sum_sign_task()
    model = rnnkit.SequenceClassifier(2, 2, 24, cell=cell, seed=1)
    history = rnnkit.fit(
        model, x, y, lengths=lengths, epochs=12, batch_size=32, optimizer=Adam(model, lr=1e-2), progress=False
    )
    assert history["loss"][-1] < 0.25 < history["loss"][0]
    assert history["accuracy"][-1] > 0.9


def test_fit_is_reproducible_from_the_seed():
    x, y, lengths = _sum_sign_task(n=96)

    def run():
        model = rnnkit.SequenceClassifier(2, 2, 8, seed=3)
        return rnnkit.fit(
            model, x, y, lengths=lengths, epochs=2, batch_size=16, seed=7, progress=False
        ), model

    (h1, m1), (h2, m2) = run(), run()
    assert h1["loss"] == h2["loss"]
    for k in m1.params:
        np.testing.assert_array_equal(m1.params[k], m2.params[k])


def test_language_model_tbptt_learns_a_periodic_text():
    text = "the cat sat on the mat. " * 60
    vocab = sorted(set(text))
    model = rnnkit.LanguageModel(len(vocab), 8, 32, vocab=vocab, seed=0)
    ids = model.encode(text)
    seqs = ids[: len(ids) // 96 * 96].reshape(-1, 96)
    history = rnnkit.fit(
        model, seqs, epochs=8, batch_size=4, tbptt=16, optimizer=Adam(model, lr=1e-2), progress=False
    )
    assert history["perplexity"][-1] < 1.3 < history["perplexity"][0]
    assert model.generate("the cat sat on the ", 4, temperature=0) == "mat."


def test_tbptt_with_one_chunk_equals_no_tbptt():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (8, 10))

    def run(tbptt):
        model = rnnkit.LanguageModel(5, 3, 6, dtype=np.float64, seed=1)
        rnnkit.fit(model, ids, epochs=1, batch_size=4, tbptt=tbptt, progress=False)
        return model.state_dict()

    a, b = run(None), run(9)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14)


def test_tbptt_steps_once_per_chunk_and_ignores_finished_sequences():
    steps = []

    class Count(Callback):
        def on_batch_end(self, state, logs):
            steps.append(logs["loss"])

    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 4, n) for n in (21, 5, 3, 11)]
    model = rnnkit.LanguageModel(4, 2, 4, seed=0)
    rnnkit.fit(
        model, seqs, epochs=1, batch_size=4, shuffle=False, tbptt=5, callbacks=[Count()], progress=False
    )
    assert len(steps) == 4  # 20 predicted steps of the longest sequence in chunks of 5
    assert all(np.isfinite(steps))


def test_seq2seq_learns_to_reverse():
    rng = np.random.default_rng(4)
    src = [rng.integers(3, 9, rng.integers(2, 6)) for _ in range(600)]
    tgt = [np.append(s[::-1], 2) for s in src]
    model = rnnkit.Seq2Seq(9, 9, 12, 32, seed=5)
    rnnkit.fit(model, src, tgt, epochs=10, batch_size=32, optimizer=Adam(model, lr=1e-2), progress=False)
    test = [rng.integers(3, 9, rng.integers(2, 6)) for _ in range(50)]
    out = model.translate(*rnnkit.data.pad_sequences(test))
    exact = np.mean([np.array_equal(o, t[::-1]) for o, t in zip(out, test, strict=True)])
    assert exact > 0.9


def test_forecaster_beats_last_value_on_a_noisy_sine():
    rng = np.random.default_rng(6)
    t = np.arange(800)
    series = np.sin(2 * np.pi * t / 20) + 0.05 * rng.standard_normal(t.size)
    model = rnnkit.Forecaster(1, window=30, horizon=5, hidden_size=24, seed=7)
    model.fit_scaler(series[:600])
    x, y = model.windows(series[:600])
    rnnkit.fit(model, x, y, epochs=6, optimizer=Adam(model, lr=1e-2), progress=False)
    errors, naive = [], []
    for start in range(600, 790, 5):
        pred = model.forecast(series[:start])
        truth = series[start : start + 5]
        errors.append(np.abs(pred - truth).mean())
        naive.append(np.abs(series[start - 1] - truth).mean())
    assert np.mean(errors) < 0.5 * np.mean(naive)


def test_validation_metrics_and_evaluate_agree():
    x, y, lengths = _sum_sign_task(n=128)
    model = rnnkit.SequenceClassifier(2, 2, 8, seed=0)
    history = rnnkit.fit(
        model,
        x[:96],
        y[:96],
        lengths=lengths[:96],
        validation_data=(x[96:], y[96:], lengths[96:]),
        epochs=2,
        progress=False,
    )
    result = rnnkit.evaluate(model, x[96:], y[96:], lengths[96:])
    assert result["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-6)
    assert result["accuracy"] == pytest.approx(history["val_accuracy"][-1])
    pred = rnnkit.predict(model, x[96:], lengths[96:], batch_size=7)
    assert pred.shape == (32, 2)
    assert np.mean(pred.argmax(axis=1) == y[96:]) == pytest.approx(result["accuracy"])


def test_validation_split_holds_out_examples():
    x, y, lengths = _sum_sign_task(n=100)
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    history = rnnkit.fit(model, x, y, lengths=lengths, validation_split=0.25, epochs=1, progress=False)
    assert "val_loss" in history and "val_accuracy" in history


def test_nan_loss_stops_with_advice():
    x, y, lengths = _sum_sign_task(n=64)
    x[5, 0, 0] = np.nan
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    with pytest.raises(TrainingDiverged, match="lower learning rate.*clip_norm") as info:
        rnnkit.fit(model, x, y, lengths=lengths, epochs=3, batch_size=64, progress=False)
    assert info.value.history.epochs == 0
    assert all(np.isfinite(p).all() for p in model.params.values())  # the NaN step was not applied


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflowing_loss_is_reported():
    x, y, lengths = _sum_sign_task(n=32)
    model = rnnkit.SequenceRegressor(2, 1, 4, seed=0)
    target = np.full((32, 1), 1e25, dtype=np.float32)  # its square overflows float32
    with pytest.raises(TrainingDiverged, match="the loss became inf"):
        rnnkit.fit(model, x, target, lengths=lengths, epochs=1, clip_norm=1.0, progress=False)


def test_non_finite_gradient_norm_is_reported_not_applied():
    x, y, lengths = _sum_sign_task(n=32)
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    before = model.state_dict()

    def infinite_gradient(pred, target, lengths=None):
        return rnnkit.losses.Loss(0.5, np.full_like(pred, np.inf))

    with pytest.raises(TrainingDiverged, match="the gradient norm became not finite"):
        rnnkit.fit(
            model, x, y, lengths=lengths, loss=infinite_gradient, metrics=[], clip_norm=1.0, progress=False
        )
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_early_stopping_restores_the_best_parameters():
    x, y, lengths = _sum_sign_task(n=64)
    model = rnnkit.SequenceClassifier(2, 2, 8, seed=0)
    stopper = rnnkit.EarlyStopping("val_loss", patience=1)
    # a learning rate this high makes validation worse quickly
    history = rnnkit.fit(
        model,
        x[:48],
        y[:48],
        lengths=lengths[:48],
        validation_data=(x[48:], y[48:], lengths[48:]),
        epochs=30,
        optimizer=SGD(model, lr=5.0),
        callbacks=[stopper],
        progress=False,
    )
    assert history.epochs < 30 and "early stopping" in history.stopped
    best = min(history["val_loss"])
    assert rnnkit.evaluate(model, x[48:], y[48:], lengths[48:])["loss"] == pytest.approx(best, rel=1e-6)


def test_checkpoint_saves_the_best_model(tmp_path):
    x, y, lengths = _sum_sign_task(n=64)
    model = rnnkit.SequenceClassifier(2, 2, 8, seed=0)
    path = tmp_path / "best.rnnkit"
    history = rnnkit.fit(
        model,
        x[:48],
        y[:48],
        lengths=lengths[:48],
        validation_data=(x[48:], y[48:], lengths[48:]),
        epochs=4,
        optimizer=Adam(model, lr=1e-2),
        callbacks=[rnnkit.ModelCheckpoint(path)],
        progress=False,
    )
    loaded = rnnkit.load(path)
    assert rnnkit.evaluate(loaded, x[48:], y[48:], lengths[48:])["loss"] == pytest.approx(
        min(history["val_loss"]), rel=1e-6
    )


def test_schedules_are_stepped_by_fit():
    x, y, lengths = _sum_sign_task(n=64)
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    opt = SGD(model, lr=0.1)
    history = rnnkit.fit(
        model,
        x,
        y,
        lengths=lengths,
        epochs=4,
        optimizer=opt,
        callbacks=[StepLR(opt, 2, gamma=0.5)],
        progress=False,
    )
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05])  # the rate each epoch ran at
    opt = SGD(model, lr=0.1)
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0)  # never "improves"
    history = rnnkit.fit(
        model, x, y, lengths=lengths, epochs=3, optimizer=opt, callbacks=[plateau], progress=False
    )
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.025])


def test_user_callback_sees_every_step_and_can_stop():
    seen = []

    class StopAfterTwo(Callback):
        def on_batch_end(self, state, logs):
            seen.append(state.step)

        def on_epoch_end(self, state, logs):
            state.stop_training = state.epoch == 2

    x, y, lengths = _sum_sign_task(n=64)
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    history = rnnkit.fit(
        model, x, y, lengths=lengths, epochs=9, batch_size=16, callbacks=[StopAfterTwo()], progress=False
    )
    assert history.epochs == 2 and seen == list(range(1, 9))


def test_progress_bar_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    x, y, lengths = _sum_sign_task(n=32)
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    png = tmp_path / "history.png"
    rnnkit.fit(model, x, y, lengths=lengths, epochs=2, plot=png, validation_split=0.25)
    err = capsys.readouterr()
    assert "epoch 2/2" in err.out + err.err and "val_loss" in err.out + err.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"tbptt": 0}, "tbptt must be a positive integer"),
        ({"clip_norm": -1.0}, "clip_norm must be a positive number"),
        ({"metrics": ["f1"]}, "unknown metric"),
        ({"loss": "mse", "metrics": ["perplexity"]}, "perplexity"),
        ({"loss": "hinge"}, "hinge"),
    ],
)
def test_bad_fit_arguments(kwargs, message):
    x, y, lengths = _sum_sign_task(n=8)
    model = rnnkit.SequenceClassifier(2, 2, 4, seed=0)
    with pytest.raises(ValueError, match=message):
        rnnkit.fit(model, x, y, lengths=lengths, progress=False, **kwargs)


def test_fit_plain_sequential_module():
    """A user's own Sequential trains with an explicit loss (no forward_batch)."""
    x, y, lengths = _sum_sign_task(n=256)
    model = rnnkit.Sequential(rnnkit.GRU(2, 16, seed=0), rnnkit.LastStep(), rnnkit.Linear(16, 2, seed=1))
    history = rnnkit.fit(
        model,
        x,
        y,
        lengths=lengths,
        loss="cross_entropy",
        metrics=["accuracy"],
        epochs=10,
        optimizer=Adam(model, lr=1e-2),
        progress=False,
    )
    assert history["accuracy"][-1] > 0.85
