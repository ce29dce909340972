"""Ready-made models for the four shapes of sequence problem, each on an RNN, LSTM or GRU core.

=====================  ====================  ==========================================
shape                  model                 output
=====================  ====================  ==========================================
many-to-one            SequenceClassifier    class logits (B, C)
many-to-one            SequenceRegressor     values (B, D)
many-to-many, aligned  SequenceTagger        per-step logits or values (B, T, D)
one-to-many            LanguageModel         next-token logits (B, T, V); ``generate``
many-to-many, delayed  Seq2Seq               target logits (B, T', V); ``translate``
time series            Forecaster            the next ``horizon`` steps (B, horizon, F)
=====================  ====================  ==========================================

Every model is a :class:`~rnnkit.module.Module` (forward, backward, params, save...), and says how
:func:`rnnkit.fit` trains it through two attributes: ``default_loss`` and ``default_metrics``, and
one method, ``forward_batch(batch) -> (pred, target, lengths)`` (the prediction, the target it is
scored against, and the lengths that mask the loss).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from rnnkit._checks import float_dtype, positive_int
from rnnkit.data import Batch
from rnnkit.layers import GRU, LSTM, RNN, Dropout, Embedding, LastStep, Linear, MaxPool, MeanPool
from rnnkit.layers.recurrent import State, _Recurrent
from rnnkit.module import Module

Array = npt.NDArray[Any]

CELLS = ("lstm", "gru", "rnn", "rnn_relu")


def recurrent_layer(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    *,
    bidirectional: bool = False,
    dropout: float = 0.0,
    dtype: Any = np.float32,
    seed: int | None = None,
) -> _Recurrent:
    """The recurrent layer named ``cell``: "lstm", "gru", "rnn" (tanh) or "rnn_relu"."""
    kwargs: dict[str, Any] = dict(bidirectional=bidirectional, dropout=dropout, dtype=dtype, seed=seed)
    if cell == "lstm":
        return LSTM(input_size, hidden_size, num_layers, **kwargs)
    if cell == "gru":
        return GRU(input_size, hidden_size, num_layers, **kwargs)
    if cell in ("rnn", "rnn_relu"):
        nonlinearity = "relu" if cell == "rnn_relu" else "tanh"
        return RNN(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, **kwargs)
    raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")


def _seeds(seed: int | None, n: int) -> list[int | None]:
    """``n`` independent child seeds from ``seed`` (None stays random)."""
    if seed is None:
        return [None] * n
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**63 - 1, size=n)]


class _Encoder(Module):
    """Optional token embedding, then a recurrent layer: the front half of every model.

    With ``vocab_size`` set, inputs are integer token ids in [0, vocab_size) embedded into
    ``input_size`` features; otherwise inputs are float features of size ``input_size``.
    """

    takes_lengths = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        vocab_size: int | None,
        cell: str,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        dtype: Any,
        seed: int | None,
    ) -> None:
        super().__init__()
        s_embed, s_rnn = _seeds(seed, 2)
        self.embedding = (
            None if vocab_size is None else Embedding(vocab_size, input_size, dtype=dtype, seed=s_embed)
        )
        self.rnn = recurrent_layer(
            cell,
            input_size,
            hidden_size,
            num_layers,
            bidirectional=bidirectional,
            dropout=dropout,
            dtype=dtype,
            seed=s_rnn,
        )

    @property
    def output_size(self) -> int:
        return self.rnn.hidden_size * self.rnn.num_directions

    def forward(self, x: Any, lengths: Any = None, state: Any = None) -> tuple[Array, State]:
        if self.embedding is not None:
            x = self.embedding(x)
        return self.rnn(x, state, lengths)

    def backward(self, dy: Array, dstate: Any = None) -> tuple[Array | None, State]:
        dx, dstate0 = self.rnn.backward(dy, dstate)
        if self.embedding is not None:
            self.embedding.backward(dx)
            return None, dstate0
        return dx, dstate0


class _EncoderModel(Module):
    """A model made of an ``encoder`` (embedding and recurrent layer), ``dropout`` and a linear
    ``head``; :meth:`_build` makes the three."""

    encoder: _Encoder
    dropout: Dropout
    head: Linear

    def _build(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        vocab_size: int | None,
        cell: str,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        dtype: Any,
        seed: int | None,
    ) -> None:
        """Make ``encoder``, ``dropout`` and a ``head`` to ``output_size``."""
        s_enc, s_drop, s_head = _seeds(seed, 3)
        self.encoder = _Encoder(
            input_size,
            hidden_size,
            vocab_size=vocab_size,
            cell=cell,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout,
            dtype=dtype,
            seed=s_enc,
        )
        self.dropout = Dropout(dropout, seed=s_drop)
        output_size = positive_int(output_size, "output_size")
        self.head = Linear(self.encoder.output_size, output_size, dtype=dtype, seed=s_head)


class _ManyToOne(_EncoderModel):
    """Encoder, pooling over time, dropout, linear head: one output vector per sequence."""

    takes_lengths = True
    default_loss: ClassVar[str]
    default_metrics: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_size: int = 128,
        *,
        vocab_size: int | None = None,
        cell: str = "lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pooling: str = "last",
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        pools: dict[str, Module] = {
            "last": LastStep(bidirectional=bidirectional),
            "mean": MeanPool(),
            "max": MaxPool(),
        }
        if pooling not in pools:
            raise ValueError(f"pooling must be one of {sorted(pools)}; got {pooling!r}")
        self._build(
            input_size,
            hidden_size,
            output_size,
            vocab_size=vocab_size,
            cell=cell,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout,
            dtype=dtype,
            seed=seed,
        )
        self.pool = pools[pooling]

    def forward(self, x: Any, lengths: Any = None) -> Array:
        """(B, T, input_size) features or (B, T) token ids, and optional lengths -> (B, output)."""
        y, _ = self.encoder(x, lengths)
        return self.head(self.dropout(self.pool(y, lengths=lengths)))  # type: ignore[no-any-return]

    def backward(self, dout: Array) -> Array | None:
        dy = self.pool.backward(self.dropout.backward(self.head.backward(dout)))
        return self.encoder.backward(dy)[0]

    def forward_batch(self, batch: Batch) -> tuple[Array, Any, Any]:
        return self.forward(batch.x, batch.lengths), batch.y, None


class SequenceClassifier(_ManyToOne):
    """Many-to-one classification: a sequence (features or token ids) to class logits (B, C).

    Args:
        input_size: features per step (or the embedding size, with ``vocab_size``).
        num_classes: the number of classes C.
        hidden_size: the recurrent layer's hidden size.
        vocab_size: if set, inputs are token ids embedded into ``input_size`` features.
        cell: "lstm", "gru", "rnn" or "rnn_relu".
        num_layers, bidirectional, dropout: of the recurrent layer (dropout also before the head).
        pooling: how the sequence becomes one vector: "last" (the last valid step), "mean", "max".
        dtype, seed: float32 or float64; the seed of every initialisation and dropout mask.
    """

    default_loss = "cross_entropy"
    default_metrics = ("accuracy",)

    def __init__(self, input_size: int, num_classes: int, hidden_size: int = 128, **kwargs: Any) -> None:
        super().__init__(input_size, num_classes, hidden_size, **kwargs)

    def predict(self, x: Any, lengths: Any = None) -> Array:
        """The most likely class of each sequence (inference mode)."""
        logits: Array = _in_eval(self, lambda: self.forward(x, lengths))
        classes: Array = logits.argmax(axis=-1)
        return classes


class SequenceRegressor(_ManyToOne):
    """Many-to-one regression: a sequence to ``output_size`` values (B, output_size).

    The arguments are :class:`SequenceClassifier`'s, with ``output_size`` for ``num_classes``.
    """

    default_loss = "mse"
    default_metrics = ("mae", "rmse")


class SequenceTagger(_EncoderModel):
    """Many-to-many, aligned: one label (logits) or value per step, (B, T, output_size).

    The arguments are :class:`SequenceClassifier`'s (no pooling); ``task`` is "classification"
    (cross-entropy on per-step integer tags, the default) or "regression" (mean squared error).
    Unidirectional taggers carry state across calls (``forward(..., state=)`` and
    :attr:`final_state`), so :func:`rnnkit.fit` can train them with truncated BPTT.
    """

    takes_lengths = True
    default_metrics: tuple[str, ...]

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_size: int = 128,
        *,
        task: str = "classification",
        vocab_size: int | None = None,
        cell: str = "lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression'; got {task!r}")
        self.default_loss = "cross_entropy" if task == "classification" else "mse"
        self.default_metrics = ("accuracy",) if task == "classification" else ("mae", "rmse")
        self._build(
            input_size,
            hidden_size,
            output_size,
            vocab_size=vocab_size,
            cell=cell,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout,
            dtype=dtype,
            seed=seed,
        )
        self.final_state: State | None = None

    def forward(self, x: Any, lengths: Any = None, state: Any = None) -> Array:
        """(B, T, input_size) features or (B, T) ids -> (B, T, output_size); padded steps are 0
        before the head (their outputs are the head's bias and should be masked by the loss)."""
        y, self.final_state = self.encoder(x, lengths, state)
        return self.head(self.dropout(y))  # type: ignore[no-any-return]

    def backward(self, dout: Array) -> Array | None:
        return self.encoder.backward(self.dropout.backward(self.head.backward(dout)))[0]

    def forward_batch(self, batch: Batch, state: Any = None) -> tuple[Array, Any, Any]:
        loss_lengths = batch.lengths if batch.y_lengths is None else batch.y_lengths
        return self.forward(batch.x, batch.lengths, state), batch.y, loss_lengths


class LanguageModel(_EncoderModel):
    """One-to-many: next-token prediction over token ids, and text generation.

    Args:
        vocab_size: the number of token ids V.
        embedding_dim: the size of the token vectors.
        hidden_size: the recurrent layer's hidden size.
        cell, num_layers, dropout, dtype, seed: as for :class:`SequenceClassifier`.
        vocab: optionally the token of each id (characters for a character model), so that
            :meth:`encode`, :meth:`decode` and :meth:`generate` work on text.

    ``forward(ids, lengths, state)`` returns logits (B, T, V) for the token after each input
    token and keeps :attr:`final_state`, so long texts can be trained in chunks (truncated BPTT).
    """

    takes_lengths = True
    default_loss = "cross_entropy"
    default_metrics = ("perplexity", "accuracy")
    tbptt_overlap = 1  # a chunk's inputs and targets are one step apart

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 64,
        hidden_size: int = 256,
        *,
        cell: str = "lstm",
        num_layers: int = 1,
        dropout: float = 0.0,
        vocab: list[str] | None = None,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        vocab_size = positive_int(vocab_size, "vocab_size")
        if vocab is not None:
            if not all(isinstance(t, str) for t in vocab) or len(vocab) != vocab_size:
                raise ValueError(f"vocab must be a list of {vocab_size} strings (the token of each id)")
            if len(set(vocab)) != len(vocab):
                raise ValueError("vocab has repeated tokens; each token must map to one id")
        self.vocab = None if vocab is None else list(vocab)
        self._index = None if vocab is None else {t: i for i, t in enumerate(vocab)}
        self._build(
            embedding_dim,
            hidden_size,
            vocab_size,
            vocab_size=vocab_size,
            cell=cell,
            num_layers=num_layers,
            bidirectional=False,
            dropout=dropout,
            dtype=dtype,
            seed=seed,
        )
        self.final_state: State | None = None

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def forward(self, ids: Any, lengths: Any = None, state: Any = None) -> Array:
        """Token ids (B, T) -> logits (B, T, V) of the next token at every step."""
        y, self.final_state = self.encoder(ids, lengths, state)
        return self.head(self.dropout(y))  # type: ignore[no-any-return]

    def backward(self, dlogits: Array) -> None:
        self.encoder.backward(self.dropout.backward(self.head.backward(dlogits)))

    def forward_batch(self, batch: Batch, state: Any = None) -> tuple[Array, Any, Any]:
        """Each sequence predicts itself shifted by one: inputs ids[:, :-1], targets ids[:, 1:]."""
        ids = np.asarray(batch.x)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"a language model trains on (batch, seq >= 2) token ids; got shape {ids.shape}")
        steps = batch.y_lengths if batch.y_lengths is not None else batch.lengths
        if steps is None:
            return self.forward(ids[:, :-1], None, state), ids[:, 1:], None
        targets = np.maximum(np.asarray(steps) - 1, 0)  # 0: a finished sequence (truncated BPTT)
        return self.forward(ids[:, :-1], np.maximum(targets, 1), state), ids[:, 1:], targets

    def encode(self, text: str) -> Array:
        """The token ids of ``text`` (one token per character of a character vocabulary)."""
        if self._index is None:
            raise ValueError("this model has no vocab; pass token ids instead of text")
        try:
            return np.fromiter((self._index[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise ValueError(f"text has a character outside the vocabulary: {e.args[0]!r}") from None

    def decode(self, ids: Any) -> str:
        """The text of token ids."""
        if self.vocab is None:
            raise ValueError("this model has no vocab to decode with")
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))

    def generate(
        self,
        prompt: str | Any,
        n: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | np.random.Generator | None = None,
    ) -> Any:
        """Continue ``prompt`` by ``n`` sampled tokens, one streaming step per token.

        Args:
            prompt: text (needs ``vocab``) or a non-empty sequence of token ids.
            n: the number of tokens to generate.
            temperature: divides the logits; below 1 is more conservative, 0 is greedy (argmax).
            top_k: sample only among the k most likely tokens (None: all).
            seed: of the sampling.

        Returns:
            The generated continuation (without the prompt): text if ``prompt`` is text, else ids.
        """
        as_text = isinstance(prompt, str)
        ids = self.encode(prompt) if as_text else np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError("prompt must be non-empty text or a 1-D sequence of token ids")
        n = positive_int(n, "n", minimum=0)
        if not isinstance(temperature, int | float) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0; got {temperature!r}")
        if top_k is not None:
            top_k = min(positive_int(top_k, "top_k"), self.vocab_size)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        was_training = self.training
        self.eval()
        try:
            logits = self.forward(ids[None, :])[0, -1]
            state = self.final_state
            out = np.empty(n, dtype=np.int64)
            for k in range(n):
                out[k] = token = _sample(logits, temperature, top_k, rng)
                x = self.encoder.embedding.params["weight"][token][None, :]  # type: ignore[union-attr]
                h, state = self.encoder.rnn.step(x, state)
                logits = self.head(h)[0]
        finally:
            self.train(was_training)
        return self.decode(out) if as_text else out


def _sample(logits: Array, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token id drawn from softmax(logits / temperature) restricted to the top k."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def _in_eval(module: Module, fn: Any) -> Any:
    """``fn()`` with ``module`` in inference mode, its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        return fn()
    finally:
        module.train(was_training)


class Seq2Seq(Module):
    """Many-to-many, delayed: an encoder-decoder over token ids (translation, transduction).

    The encoder reads the source; its final state starts the decoder, which reads the target
    shifted right (``bos_id`` first: teacher forcing) and predicts each target token. Targets end
    with ``eos_id``. With ``attention`` (default), every decoder step also sees a dot-product
    attention summary of the encoder's outputs (Luong), which is what makes long or reordered
    mappings learnable.
    The encoder reads left to right; ending each source with an end-of-source token of its own
    lets it know where the source stops (what a bidirectional encoder would otherwise see).

    Args:
        src_vocab_size, tgt_vocab_size: the two vocabularies' sizes.
        embedding_dim, hidden_size: of both sides.
        cell, num_layers, dropout, dtype, seed: as for :class:`SequenceClassifier`.
        bos_id, eos_id: the target's begin and end tokens.
        attention: attend over the encoder's outputs at every decoder step.
    """

    takes_lengths = True
    default_loss = "cross_entropy"
    default_metrics = ("accuracy",)

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embedding_dim: int = 64,
        hidden_size: int = 128,
        *,
        cell: str = "lstm",
        num_layers: int = 1,
        dropout: float = 0.0,
        bos_id: int = 1,
        eos_id: int = 2,
        attention: bool = True,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        tgt_vocab_size = positive_int(tgt_vocab_size, "tgt_vocab_size")
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id)):
            if positive_int(v, name, minimum=0) >= tgt_vocab_size:
                raise ValueError(f"{name} must be a target token id below {tgt_vocab_size}; got {v}")
        self.bos_id, self.eos_id, self.attention = int(bos_id), int(eos_id), bool(attention)
        self.dtype = float_dtype(dtype)
        s_enc, s_dec, s_drop, s_head, s_comb = _seeds(seed, 5)
        common: dict[str, Any] = dict(
            cell=cell, num_layers=num_layers, bidirectional=False, dropout=dropout, dtype=dtype
        )
        self.encoder = _Encoder(embedding_dim, hidden_size, vocab_size=src_vocab_size, seed=s_enc, **common)
        self.decoder = _Encoder(embedding_dim, hidden_size, vocab_size=tgt_vocab_size, seed=s_dec, **common)
        self.combine = Linear(2 * hidden_size, hidden_size, dtype=dtype, seed=s_comb) if attention else None
        self.dropout = Dropout(dropout, seed=s_drop)
        self.head = Linear(hidden_size, tgt_vocab_size, dtype=dtype, seed=s_head)
        self._saved: tuple[Array, ...] = ()
        self._enc_shape: tuple[int, ...] = ()

    # ------------------------------------------------------------------ attention

    def _attend(self, dec: Array, enc: Array, src_mask: Array) -> Array:
        """Luong dot attention: tanh(W [dec; context]) with context = softmax(dec·enc) enc."""
        assert self.combine is not None
        scores = np.einsum("bth,bsh->bts", dec, enc)
        scores = np.where(src_mask[:, None, :], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        context = np.einsum("bts,bsh->bth", weights, enc)
        out = np.tanh(self.combine(np.concatenate([dec, context], axis=-1)))
        if self.training:
            self._saved = (dec, enc, weights, context, out)
        return out  # type: ignore[no-any-return]

    def _attend_backward(self, dout: Array) -> tuple[Array, Array]:
        """(d dec, d enc) from d(attention output)."""
        assert self.combine is not None
        dec, enc, weights, context, out = self._saved
        dcat = self.combine.backward(dout * (1 - out * out))
        h = dec.shape[-1]
        ddec, dcontext = dcat[..., :h], dcat[..., h:]
        dweights = np.einsum("bth,bsh->bts", dcontext, enc)
        denc = np.einsum("bts,bth->bsh", weights, dcontext)
        dscores = weights * (dweights - (dweights * weights).sum(axis=-1, keepdims=True))
        ddec = ddec + np.einsum("bts,bsh->bth", dscores, enc)
        denc += np.einsum("bts,bth->bsh", dscores, dec)
        return ddec, denc

    # ------------------------------------------------------------------ forward / backward

    def forward(
        self, src: Any, src_lengths: Any = None, tgt_in: Any = None, tgt_lengths: Any = None
    ) -> Array:
        """Teacher-forced logits (B, T', V) of the target, given the source ids (B, S) and the
        decoder inputs ``tgt_in`` (B, T'): the target shifted right, ``bos_id`` first."""
        if tgt_in is None:
            raise ValueError("tgt_in (the target shifted right, bos_id first) is required; use translate()")
        enc, state = self.encoder(src, src_lengths)
        self._enc_shape = enc.shape
        dec, _ = self.decoder(tgt_in, tgt_lengths, state)
        if self.attention:
            src_mask = _valid_mask(enc.shape[0], enc.shape[1], src_lengths)
            dec = self._attend(dec, enc, src_mask)
        return self.head(self.dropout(dec))  # type: ignore[no-any-return]

    def backward(self, dlogits: Array) -> None:
        ddec = self.dropout.backward(self.head.backward(dlogits))
        denc = None
        if self.attention:
            ddec, denc = self._attend_backward(ddec)
        _, dstate = self.decoder.backward(ddec)
        if denc is None:  # without attention the encoder's outputs feed nothing
            denc = np.zeros(self._enc_shape, self.dtype)
        self.encoder.backward(denc, dstate)

    def forward_batch(self, batch: Batch) -> tuple[Array, Any, Any]:
        """Teacher forcing: batch.x is the source, batch.y the target ids (ending with eos_id)."""
        tgt = np.asarray(batch.y)
        tgt_in = np.concatenate([np.full((tgt.shape[0], 1), self.bos_id, tgt.dtype), tgt[:, :-1]], axis=1)
        return self.forward(batch.x, batch.lengths, tgt_in, batch.y_lengths), tgt, batch.y_lengths

    def translate(self, src: Any, src_lengths: Any = None, max_len: int = 50) -> list[Array]:
        """Greedy decoding: for each source sequence, the target ids up to (not including) eos_id."""
        max_len = positive_int(max_len, "max_len")
        return _in_eval(self, lambda: self._greedy(src, src_lengths, max_len))  # type: ignore[no-any-return]

    def _greedy(self, src: Any, src_lengths: Any, max_len: int) -> list[Array]:
        enc, state = self.encoder(src, src_lengths)
        batch = enc.shape[0]
        src_mask = _valid_mask(batch, enc.shape[1], src_lengths)
        table = self.decoder.embedding.params["weight"]  # type: ignore[union-attr]
        token = np.full(batch, self.bos_id, dtype=np.int64)
        out = np.zeros((batch, max_len), dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        for t in range(max_len):
            h, state = self.decoder.rnn.step(table[token], state)
            if self.attention:
                h = self._attend(h[:, None, :], enc, src_mask)[:, 0]
            token = self.head(h).argmax(axis=-1)
            out[:, t] = token
            done |= token == self.eos_id
            if done.all():
                break
        result = []
        for row in out:
            stop = np.flatnonzero(row == self.eos_id)
            result.append(row[: stop[0]] if stop.size else row)
        return result


def _valid_mask(batch: int, seq: int, lengths: Any) -> Array:
    """(batch, seq) booleans: True at each sequence's valid steps."""
    if lengths is None:
        return np.ones((batch, seq), dtype=bool)
    return np.arange(seq)[None, :] < np.asarray(lengths)[:, None]


class Forecaster(Module):
    """Time-series forecasting: from the last ``window`` steps of a series, the next ``horizon``.

    The model scales its inputs with per-feature mean and standard deviation learnt by
    :meth:`fit_scaler` (kept as buffers, so they are saved with the weights), runs the recurrent
    core over the window and maps its last state to all ``horizon`` steps at once (direct
    multi-step prediction). :meth:`forecast` rolls further ahead by feeding predictions back.

    Args:
        n_features: variables per time step F.
        window: input steps per example.
        horizon: steps predicted per example.
        hidden_size, cell, num_layers, dropout, dtype, seed: as for :class:`SequenceClassifier`.
    """

    default_loss = "mse"
    default_metrics = ("mae", "rmse")

    def __init__(
        self,
        n_features: int = 1,
        window: int = 24,
        horizon: int = 1,
        hidden_size: int = 64,
        *,
        cell: str = "lstm",
        num_layers: int = 1,
        dropout: float = 0.0,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.n_features = positive_int(n_features, "n_features")
        self.window = positive_int(window, "window")
        self.horizon = positive_int(horizon, "horizon")
        self.dtype = float_dtype(dtype)
        s_rnn, s_drop, s_head = _seeds(seed, 3)
        self.rnn = recurrent_layer(
            cell, self.n_features, hidden_size, num_layers, dropout=dropout, dtype=dtype, seed=s_rnn
        )
        self.dropout = Dropout(dropout, seed=s_drop)
        self.head = Linear(hidden_size, self.horizon * self.n_features, dtype=dtype, seed=s_head)
        self.add_buffer("mean", np.zeros(self.n_features, self.dtype))
        self.add_buffer("std", np.ones(self.n_features, self.dtype))
        self._seq = 0

    def _series(self, series: Any, name: str = "series") -> Array:
        arr = np.asarray(series, dtype=np.float64)
        if arr.ndim == 1 and self.n_features == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[1] != self.n_features:
            raise ValueError(f"{name} must be (time, {self.n_features}) values; got shape {arr.shape}")
        return arr

    def fit_scaler(self, series: Any) -> None:
        """Learn the per-feature mean and standard deviation from a training series (T, F)."""
        arr = self._series(series)
        std = arr.std(axis=0)
        self.buffers["mean"] = arr.mean(axis=0)
        self.buffers["std"] = np.where(std > 0, std, 1.0)

    def scale(self, values: Any) -> Array:
        """Values in the model's scaled units."""
        return ((np.asarray(values) - self.buffers["mean"]) / self.buffers["std"]).astype(self.dtype)

    def unscale(self, values: Any) -> Array:
        """Scaled values back in the series' units."""
        return np.asarray(values) * self.buffers["std"] + self.buffers["mean"]

    def windows(self, series: Any) -> tuple[Array, Array]:
        """Every (input window, following horizon) pair of a series, scaled: x (N, window, F) and
        y (N, horizon, F), for :func:`rnnkit.fit`."""
        arr = self.scale(self._series(series))
        n = arr.shape[0] - self.window - self.horizon + 1
        if n < 1:
            raise ValueError(
                f"series has {arr.shape[0]} steps; at least window + horizon = "
                f"{self.window + self.horizon} are needed"
            )
        idx = np.arange(n)[:, None]
        x = arr[idx + np.arange(self.window)]
        y = arr[idx + self.window + np.arange(self.horizon)]
        return x, y

    def forward(self, x: Any) -> Array:
        """Scaled windows (B, window, F) -> scaled predictions (B, horizon, F)."""
        y, _ = self.rnn(x)
        self._seq = y.shape[1]
        out = self.head(self.dropout(y[:, -1]))
        return out.reshape(out.shape[0], self.horizon, self.n_features)  # type: ignore[no-any-return]

    def backward(self, dout: Array) -> Array:
        dlast = self.dropout.backward(self.head.backward(dout.reshape(dout.shape[0], -1)))
        dy = np.zeros((dlast.shape[0], self._seq, dlast.shape[1]), dlast.dtype)
        dy[:, -1] = dlast
        return self.rnn.backward(dy)[0]

    def forward_batch(self, batch: Batch) -> tuple[Array, Any, Any]:
        return self.forward(batch.x), batch.y, None

    def forecast(self, history: Any, steps: int | None = None) -> Array:
        """The next ``steps`` values (default ``horizon``) after ``history`` (T >= window, F), in
        the series' units; beyond one horizon, predictions are fed back as inputs."""
        hist = self._series(history, "history")
        if hist.shape[0] < self.window:
            raise ValueError(f"history needs at least window={self.window} steps; got {hist.shape[0]}")
        steps = self.horizon if steps is None else positive_int(steps, "steps")
        context = self.scale(hist[-self.window :])
        out: list[Array] = []
        total = 0
        while total < steps:
            pred = _in_eval(self, lambda c=context: self.forward(c[None])[0])
            out.append(pred)
            total += self.horizon
            context = np.concatenate([context, pred])[-self.window :]
        result = self.unscale(np.concatenate(out)[:steps])
        return result[:, 0] if np.ndim(history) == 1 else result
