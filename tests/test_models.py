"""The ready-made models: float64 finite-difference gradients of the full model and its loss,
shapes, streaming generation and decoding, and the forecaster's windows and scaling."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from rnnkit import losses
from rnnkit.data import Batch, pad_sequences
from rnnkit.train import _forward_batch

F64 = np.float64


def _loss(model, batch):
    pred, target, lengths = _forward_batch(model, batch)
    return losses.get(model.default_loss)(pred, target, lengths=lengths)


def _check_gradients(model, batch, n_entries=12, seed=0, rtol=1e-6):
    """dL/d(every parameter array) from backward against central differences at up to
    ``n_entries`` entries per array (all entries of small arrays)."""
    rng = np.random.default_rng(seed)
    model.train()
    model.zero_grad()
    value, grad = _loss(model, batch)
    model.backward(grad)
    grads = {k: g.copy() for k, g in model.grads.items()}
    eps = 1e-6
    worst = 0.0
    for name, p in model.params.items():
        flat = p.reshape(-1)
        picks = rng.choice(flat.size, size=min(n_entries, flat.size), replace=False)
        for i in picks:
            old = flat[i]
            flat[i] = old + eps
            up = _loss(model, batch).value
            flat[i] = old - eps
            down = _loss(model, batch).value
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            analytic = grads[name].reshape(-1)[i]
            err = abs(numeric - analytic) / max(1.0, abs(numeric))
            worst = max(worst, err)
            assert err < rtol, f"{name}[{i}]: backward {analytic}, finite differences {numeric}"
    return worst


def _ids(rng, batch, seq, vocab):
    return rng.integers(0, vocab, size=(batch, seq))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_classifier_embedding_gradients(cell, pooling):
    """Embedding -> recurrent -> pooling -> Linear -> cross-entropy, with lengths, in float64."""
    rng = np.random.default_rng(1)
    model = rnnkit.SequenceClassifier(
        5, 3, 4, vocab_size=7, cell=cell, pooling=pooling, bidirectional=True, dtype=F64, seed=2
    )
    batch = Batch(x=_ids(rng, 4, 6, 7), y=rng.integers(0, 3, 4), lengths=np.array([6, 2, 4, 1]))
    _check_gradients(model, batch)


def test_regressor_features_two_layers_gradients():
    rng = np.random.default_rng(3)
    model = rnnkit.SequenceRegressor(3, 2, 4, num_layers=2, cell="gru", dtype=F64, seed=4)
    batch = Batch(
        x=rng.standard_normal((3, 5, 3)), y=rng.standard_normal((3, 2)), lengths=np.array([5, 3, 2])
    )
    _check_gradients(model, batch)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_tagger_gradients_mask_padding(bidirectional):
    rng = np.random.default_rng(5)
    model = rnnkit.SequenceTagger(3, 4, 5, bidirectional=bidirectional, dtype=F64, seed=6)
    lengths = np.array([6, 3, 1])
    y = rng.integers(0, 4, (3, 6))
    y[1, 3:] = 99  # padding targets: out of range, must be ignored through the lengths
    batch = Batch(x=rng.standard_normal((3, 6, 3)), y=y, lengths=lengths)
    _check_gradients(model, batch)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_language_model_gradients(cell):
    rng = np.random.default_rng(7)
    model = rnnkit.LanguageModel(6, 3, 4, cell=cell, num_layers=2, dtype=F64, seed=8)
    batch = Batch(x=_ids(rng, 3, 7, 6), y=None, lengths=np.array([7, 4, 2]))
    _check_gradients(model, batch)


@pytest.mark.parametrize("attention", [True, False])
def test_seq2seq_gradients(attention):
    rng = np.random.default_rng(9)
    model = rnnkit.Seq2Seq(6, 5, 3, 4, attention=attention, dtype=F64, seed=10)
    src, src_len = pad_sequences([rng.integers(3, 6, n) for n in (5, 2, 4)])
    tgt, tgt_len = pad_sequences([np.append(rng.integers(3, 5, n), 2) for n in (3, 1, 4)])
    _check_gradients(model, Batch(x=src, y=tgt, lengths=src_len, y_lengths=tgt_len))


def test_forecaster_gradients():
    rng = np.random.default_rng(11)
    model = rnnkit.Forecaster(2, window=5, horizon=3, hidden_size=4, dtype=F64, seed=12)
    _check_gradients(model, Batch(x=rng.standard_normal((4, 5, 2)), y=rng.standard_normal((4, 3, 2))))


def test_tbptt_chunks_carry_state_and_stop_the_gradient():
    """Forward over two chunks with the carried state equals one forward over the whole; the
    second chunk's gradient is that of its own loss with the carried state held constant."""
    rng = np.random.default_rng(13)
    model = rnnkit.LanguageModel(5, 3, 4, dtype=F64, seed=14)
    ids = _ids(rng, 2, 9, 5)
    whole = model(ids)
    first = model(ids[:, :4])
    carried = model.final_state
    second = model(ids[:, 4:], state=carried)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-12, atol=1e-12)

    def chunk_loss():
        return losses.cross_entropy(model(ids[:, 4:8], state=carried), ids[:, 5:9])

    model.zero_grad()
    model(ids[:, 4:8], state=carried)
    model.backward(chunk_loss().grad)
    p = model.params["encoder.rnn.weight_hh_l0"]
    g = model.grads["encoder.rnn.weight_hh_l0"].copy()
    eps = 1e-6
    for i in (0, 5, 17):
        old = p.flat[i]
        p.flat[i] = old + eps
        up = chunk_loss().value
        p.flat[i] = old - eps
        down = chunk_loss().value
        p.flat[i] = old
        assert abs((up - down) / (2 * eps) - g.flat[i]) < 1e-7


def test_generate_greedy_topk_seed_and_text():
    text = "abcabcabc"
    vocab = sorted(set(text))
    model = rnnkit.LanguageModel(len(vocab), 4, 8, vocab=vocab, seed=0)
    greedy = model.generate("ab", 10, temperature=0)
    assert isinstance(greedy, str) and len(greedy) == 10
    assert model.generate("ab", 10, top_k=1, seed=5) == greedy
    assert model.generate("ab", 10, seed=3) == model.generate("ab", 10, seed=3)
    ids = model.generate(model.encode("ab"), 4, temperature=0)
    assert model.decode(ids) == greedy[:4]
    # the first generated token is the argmax of the sequence forward's last logits
    model.eval()
    logits = model(model.encode("ab")[None])[0, -1]
    assert greedy[0] == vocab[int(np.argmax(logits))]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate("abz", 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("ab", 3, temperature=-1)


def test_generate_top_k_samples_only_the_k_most_likely():
    model = rnnkit.LanguageModel(12, 4, 8, seed=1)
    model.eval()
    logits = model(np.array([[3]]))[0, -1]
    top2 = set(np.argsort(logits)[-2:].tolist())
    firsts = {int(model.generate([3], 1, top_k=2, seed=s)[0]) for s in range(40)}
    assert firsts <= top2 and len(firsts) == 2


def test_translate_matches_teacher_forced_argmax():
    """Greedy decoding's first token is the argmax of the teacher-forced first step."""
    rng = np.random.default_rng(15)
    model = rnnkit.Seq2Seq(7, 6, 4, 8, seed=16).eval()
    src, lens = pad_sequences([rng.integers(3, 7, n) for n in (4, 2, 5)])
    logits = model(src, lens, np.full((3, 1), model.bos_id))
    out = model.translate(src, lens, max_len=5)
    for row, first in zip(out, logits[:, 0].argmax(axis=-1), strict=True):
        assert row.size == 0 and first == model.eos_id or row[0] == first


def test_forecaster_windows_scaling_and_forecast():
    model = rnnkit.Forecaster(1, window=4, horizon=2, hidden_size=3, seed=0)
    series = np.arange(10.0)
    model.fit_scaler(series)
    assert np.isclose(model.buffers["mean"][0], 4.5) and np.isclose(model.buffers["std"][0], series.std())
    x, y = model.windows(series)
    assert x.shape == (5, 4, 1) and y.shape == (5, 2, 1)
    np.testing.assert_allclose(model.unscale(x[2, :, 0]), series[2:6], rtol=1e-6)
    np.testing.assert_allclose(model.unscale(y[2, :, 0]), series[6:8], rtol=1e-6)
    out = model.forecast(series, steps=5)
    assert out.shape == (5,)
    np.testing.assert_allclose(out[:2], model.forecast(series), rtol=1e-6)
    with pytest.raises(ValueError, match="window"):
        model.forecast(series[:3])


def test_model_save_load_round_trip(tmp_path):
    vocab = list("xyz")
    model = rnnkit.LanguageModel(3, 2, 5, cell="gru", vocab=vocab, seed=0)
    path = tmp_path / "lm.rnnkit"
    model.save(path)
    loaded = rnnkit.load(path)
    assert type(loaded) is rnnkit.LanguageModel and loaded.vocab == vocab
    assert loaded.generate("xy", 6, temperature=0) == model.generate("xy", 6, temperature=0)
    fc = rnnkit.Forecaster(1, window=3, horizon=1, hidden_size=2, seed=0)
    fc.fit_scaler(np.array([1.0, 5.0, 9.0]))
    fc.save(tmp_path / "fc.npz")
    np.testing.assert_array_equal(rnnkit.load(tmp_path / "fc.npz").buffers["std"], fc.buffers["std"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rnnkit.SequenceClassifier(3, 2, cell="lsmt"), "cell must be one of"),
        (lambda: rnnkit.SequenceClassifier(3, 2, pooling="first"), "pooling must be one of"),
        (lambda: rnnkit.SequenceTagger(3, 2, task="ranking"), "task must be"),
        (lambda: rnnkit.LanguageModel(3, vocab=["a", "b"]), "vocab must be a list of 3"),
        (lambda: rnnkit.LanguageModel(2, vocab=["a", "a"]), "repeated"),
        (lambda: rnnkit.Seq2Seq(5, 4, eos_id=4), "eos_id must be a target token id below 4"),
        (lambda: rnnkit.Forecaster(window=0), "window must be at least 1"),
    ],
)
def test_bad_model_arguments(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
