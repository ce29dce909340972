"""Getting data into the recurrent layers: padding, a train/validation split and mini-batches.

* :func:`pad_sequences` turns variable-length sequences into one padded array and their lengths.
* :func:`train_val_split` splits arrays (or lists of sequences) into training and validation parts.
* :func:`batches` iterates over a dataset in shuffled mini-batches, one epoch per ``iter()``,
  padding variable-length sequences per batch and optionally grouping similar lengths together.
* :func:`text_windows` cuts a long token stream into language-model training windows, and
  :func:`pydoc_text` is a text every Python ships (its documentation topics), for demos and tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnkit._checks import lengths_array, positive_int

Array = npt.NDArray[Any]
IntArray = npt.NDArray[np.int64]

#: With ``bucket=True``, examples are sorted by length within windows of this many batches.
BUCKET_WINDOW = 50

_NUMERIC_KINDS = "biufc"


# ---------------------------------------------------------------------- text


def pydoc_text(max_chars: int | None = None) -> str:
    """The documentation topics of the standard library's ``pydoc_data`` (what ``help()`` shows for
    keywords and statements: about 465,000 characters of English and code), joined in key order.

    Args:
        max_chars: keep only the first ``max_chars`` characters (None: all).
    """
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))[:max_chars]


def text_windows(ids: Any, seq_len: int) -> IntArray:
    """Consecutive windows of ``seq_len + 1`` token ids, each starting where the previous one's
    inputs end, so that every token but the first is predicted exactly once: (N, seq_len + 1),
    for :class:`~rnnkit.LanguageModel` (inputs ``w[:-1]``, targets ``w[1:]``). Ids left over at
    the end are dropped.

    Args:
        ids: a 1-D sequence of integer token ids.
        seq_len: the inputs per window.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"ids must be a 1-D array of integer token ids; got {arr.dtype} of shape {arr.shape}"
        )
    seq_len = positive_int(seq_len, "seq_len")
    n = (arr.size - 1) // seq_len
    if n < 1:
        raise ValueError(f"ids has {arr.size} tokens; a window needs seq_len + 1 = {seq_len + 1}")
    out: IntArray = arr.astype(np.int64)[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)]
    return out


# ---------------------------------------------------------------------- padding


def pad_sequences(
    sequences: Any,
    *,
    maxlen: int | None = None,
    dtype: Any = None,
    value: Any = 0,
    padding: str = "post",
    truncating: str = "post",
) -> tuple[Array, IntArray]:
    """Pad (and truncate) variable-length sequences into one array, as Keras does.

    Args:
        sequences: a list of N sequences, each an array (T_i, ...) or a list of numbers; every
            sequence needs at least one step, and all must have the same per-step shape.
        maxlen: the padded length T; None for the longest sequence. Longer sequences are truncated.
        dtype: the output dtype; None for the common dtype of the inputs.
        value: the padding value (must be representable in an integer ``dtype``).
        padding: "post" pads at the end of each sequence, "pre" at its start.
        truncating: "post" drops steps from the end of a sequence longer than ``maxlen``,
            "pre" from its start.

    Returns:
        ``(padded, lengths)``: padded is (N, T, ...), lengths the int64 (N,) number of steps of
        each sequence kept in it (after truncation).
    """
    arrays, lengths = _sequence_arrays(sequences, "sequences")
    if maxlen is not None:
        maxlen = positive_int(maxlen, "maxlen")
    out_dtype = _common_dtype(arrays) if dtype is None else _numeric_dtype(dtype, "dtype")
    for name, side in (("padding", padding), ("truncating", truncating)):
        if side not in ("pre", "post"):
            raise ValueError(f"{name} must be 'pre' or 'post'; got {side!r}")
    return _pad(arrays, lengths, maxlen, out_dtype, _fill_value(value, out_dtype), padding, truncating)


def _sequence_arrays(sequences: Any, name: str) -> tuple[list[Array], IntArray]:
    """The sequences as arrays with their lengths, checked to be non-empty, numeric and alike."""
    if isinstance(sequences, str | bytes) or not isinstance(sequences, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a list of sequences; got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name} must hold at least one sequence")
    arrays: list[Array] = []
    for i, seq in enumerate(sequences):
        try:
            arr = np.asarray(seq)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}[{i}] must be an array or a list of numbers: {e}") from e
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{name}[{i}] must hold numbers; got dtype {arr.dtype}")
        if arr.ndim == 0:
            raise ValueError(f"{name}[{i}] must be a sequence (at least 1-dimensional); got a scalar")
        if arr.shape[0] == 0:
            raise ValueError(f"{name}[{i}] is empty; every sequence needs at least one step")
        if arrays and arr.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(
                f"{name}[{i}] has per-step shape {arr.shape[1:]}; {name}[0] has {arrays[0].shape[1:]}"
            )
        arrays.append(arr)
    return arrays, np.array([a.shape[0] for a in arrays], dtype=np.int64)


def _common_dtype(arrays: list[Array]) -> np.dtype[Any]:
    return np.result_type(*{a.dtype for a in arrays})


def _numeric_dtype(dtype: Any, name: str) -> np.dtype[Any]:
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be a numeric NumPy dtype; got {dtype!r}") from e
    if dt.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{name} must be a numeric NumPy dtype; got {dt}")
    return dt


def _fill_value(value: Any, dtype: np.dtype[Any]) -> Any:
    """``value`` as a scalar of ``dtype``, refused if an integer dtype would change it."""
    v = np.asarray(value)
    if v.ndim != 0 or v.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"value must be a number; got {value!r}")
    with np.errstate(invalid="ignore", over="ignore"):
        cast = v.astype(dtype)
    if dtype.kind in "biu" and not cast == v:
        raise ValueError(f"value={value!r} cannot be represented in dtype {dtype}")
    return cast[()]


def _pad(
    arrays: list[Array],
    lengths: IntArray,
    maxlen: int | None,
    dtype: np.dtype[Any],
    value: Any,
    padding: str,
    truncating: str,
) -> tuple[Array, IntArray]:
    """:func:`pad_sequences` on checked arguments: one scatter of all the kept steps."""
    t = int(lengths.max()) if maxlen is None else maxlen
    kept = np.minimum(lengths, t)
    flat = np.concatenate(arrays, dtype=dtype, casting="unsafe")
    row = np.repeat(np.arange(len(arrays)), lengths)
    starts = np.cumsum(lengths) - lengths
    # each step's position in its sequence, shifted so the kept steps are 0..kept-1
    col = np.arange(flat.shape[0]) - np.repeat(starts, lengths)
    if truncating == "pre":
        col -= np.repeat(lengths - kept, lengths)
    keep = (col >= 0) & (col < np.repeat(kept, lengths))
    if padding == "pre":
        col += np.repeat(t - kept, lengths)
    out = np.full((len(arrays), t, *flat.shape[1:]), value, dtype=dtype)
    out[row[keep], col[keep]] = flat[keep]
    return out, kept


# ---------------------------------------------------------------------- splitting


def train_val_split(
    *arrays: Any,
    val_fraction: float = 0.1,
    shuffle: bool = True,
    seed: int | np.random.Generator | None = None,
) -> list[Any]:
    """Split arrays into training and validation parts, like scikit-learn's ``train_test_split``.

    Args:
        *arrays: NumPy arrays (split along the first axis) and/or Python lists (for example of
            variable-length sequences; their parts stay lists), all of the same length N.
        val_fraction: the fraction of examples for validation, in (0, 1); the validation part has
            ``round(val_fraction * N)`` examples, and each part must get at least one.
        shuffle: draw the validation examples at random; if False, the last ones are used.
        seed: an int, a NumPy Generator or None (fresh entropy) for the shuffle.

    Returns:
        ``[a_train, a_val, b_train, b_val, ...]``, in the order of ``arrays``.
    """
    if not arrays:
        raise TypeError("train_val_split needs at least one array")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray | list | tuple):
            raise TypeError(f"arrays[{i}] must be a NumPy array or a list; got {type(a).__name__}")
        if isinstance(a, np.ndarray) and a.ndim == 0:
            raise ValueError(f"arrays[{i}] must have a first axis to split; got a 0-dimensional array")
    n = len(arrays[0])
    for i, a in enumerate(arrays[1:], start=1):
        if len(a) != n:
            raise ValueError(f"arrays[{i}] has {len(a)} examples; arrays[0] has {n}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float | np.floating):
        raise TypeError(f"val_fraction must be a number in (0, 1); got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    n_val = round(val_fraction * n)
    if n_val < 1 or n_val > n - 1:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} examples gives {n_val} for validation and "
            f"{n - n_val} for training; each part needs at least one"
        )
    rng = _rng(seed)
    order = rng.permutation(n) if _flag(shuffle, "shuffle") else np.arange(n)
    train, val = order[: n - n_val], order[n - n_val :]
    return [part for a in arrays for part in (_take(a, train), _take(a, val))]


def _take(a: Array | Sequence[Any], idx: IntArray) -> Any:
    if isinstance(a, np.ndarray):
        return a[idx]
    return [a[i] for i in idx]


def _rng(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
        raise TypeError(f"seed must be an int, a numpy.random.Generator or None; got {type(seed).__name__}")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be non-negative; got {seed}")
    return np.random.default_rng(seed)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


# ---------------------------------------------------------------------- batching


@dataclass
class Batch:
    """One mini-batch from :func:`batches`.

    Attributes:
        x: the inputs, (B, T, ...) (padded if the dataset holds variable-length sequences).
        y: the targets (padded likewise if they are sequences), or None.
        lengths: the int64 (B,) lengths of the sequences in ``x``, or None if none are known.
        y_lengths: the int64 (B,) lengths of the target sequences if ``y`` is a list of
            sequences, else None.
        index: the int64 (B,) positions of these examples in the dataset (None if built by hand).
    """

    x: Array
    y: Array | None = None
    lengths: IntArray | None = None
    y_lengths: IntArray | None = None
    index: IntArray | None = None


@dataclass(frozen=True)
class _Sequences:
    """A column of variable-length sequences, padded per batch to the batch's longest."""

    arrays: list[Array]
    lengths: IntArray
    dtype: np.dtype[Any]

    def take(self, idx: IntArray) -> tuple[Array, IntArray]:
        return _pad([self.arrays[i] for i in idx], self.lengths[idx], None, self.dtype, 0, "post", "post")


class BatchIterator:
    """The mini-batches of a dataset, made by :func:`batches`.

    ``len()`` is the number of batches per epoch; every ``iter()`` is a new epoch, ordered by the
    iterator's own Generator (seeded once), so epochs differ while a whole run is reproducible.
    """

    def __init__(
        self,
        x: Array | _Sequences,
        y: Array | _Sequences | None,
        lengths: IntArray | None,
        *,
        batch_size: int,
        shuffle: bool,
        rng: np.random.Generator,
        bucket: bool,
        drop_last: bool,
    ) -> None:
        self._x = x
        self._y = y
        self._lengths = lengths
        self.batch_size = batch_size
        self.num_examples = len(x.lengths) if isinstance(x, _Sequences) else x.shape[0]
        self._shuffle = shuffle
        self._rng = rng
        self._bucket = bucket
        self._drop_last = drop_last
        # bucketing trims an array x (and a y with x's time axis) to each batch's longest sequence
        self._trim_x = bucket and isinstance(x, np.ndarray)
        self._trim_y = (
            self._trim_x
            and isinstance(y, np.ndarray)
            and isinstance(x, np.ndarray)
            and y.ndim >= 2
            and y.shape[1] == x.shape[1]
        )

    def __len__(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self._drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        return map(self._batch, self._epoch())  # the epoch's order is drawn now, not lazily

    def _epoch(self) -> list[IntArray]:
        n, bs = self.num_examples, self.batch_size
        order = self._rng.permutation(n) if self._shuffle else np.arange(n)
        if self._bucket and self._lengths is not None:
            window = np.arange(n) // (BUCKET_WINDOW * bs)
            order = order[np.lexsort((self._lengths[order], window))]
        parts = np.split(order.astype(np.int64), np.arange(bs, n, bs))
        if self._drop_last and n % bs:
            parts.pop()
        if self._bucket and self._shuffle:
            parts = [parts[i] for i in self._rng.permutation(len(parts))]
        return parts

    def _batch(self, idx: IntArray) -> Batch:
        lengths: IntArray | None
        steps = slice(None)
        if isinstance(self._x, _Sequences):
            x, lengths = self._x.take(idx)
        else:
            lengths = None if self._lengths is None else self._lengths[idx]
            if self._trim_x and lengths is not None:
                steps = slice(int(lengths.max()))
            x = self._x[idx, steps] if self._trim_x else self._x[idx]
        y: Array | None = None
        y_lengths: IntArray | None = None
        if isinstance(self._y, _Sequences):
            y, y_lengths = self._y.take(idx)
        elif self._y is not None:
            y = self._y[idx, steps] if self._trim_y else self._y[idx]
        return Batch(x=x, y=y, lengths=lengths, y_lengths=y_lengths, index=idx)


def batches(
    x: Any,
    y: Any = None,
    *,
    lengths: Any = None,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int | np.random.Generator | None = None,
    bucket: bool = False,
    drop_last: bool = False,
) -> BatchIterator:
    """Mini-batches of a dataset, one epoch per ``iter()``.

    Args:
        x: the inputs: a NumPy array (N, ...) (for sequences (N, T, features), with ``lengths``
            if they vary), or a list of N variable-length sequences (arrays (T_i, ...) or lists
            of numbers), which each batch pads to its own longest sequence (``Batch.lengths``).
        y: the targets, or None: a NumPy array (N, ...) or a list of N sequences padded per batch
            (``Batch.y_lengths``).
        lengths: the (N,) valid lengths of the sequences of an array ``x`` (1..T); with a list
            ``x`` they come from the sequences.
        batch_size: examples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: a new random order every epoch; if False, the dataset's order.
        seed: an int, a NumPy Generator or None (fresh entropy), drawn from by every epoch.
        bucket: group examples of similar lengths to cut padding (needs lengths): shuffle,
            stable-sort by length within windows of ``BUCKET_WINDOW * batch_size`` examples, cut
            into batches, then shuffle the batches. With an array ``x``, each batch's time axis is
            then trimmed to its longest sequence (``x[:, :max_len]``), and so is ``y``'s when
            ``y.ndim >= 2 and y.shape[1] == x.shape[1]`` (per-step targets).
        drop_last: drop the last batch of an epoch if it is smaller than ``batch_size``.

    Returns:
        A :class:`BatchIterator`; ``len()`` gives batches per epoch, iterating gives
        :class:`Batch` objects.
    """
    xs = _column(x, "x")
    n = len(xs.lengths) if isinstance(xs, _Sequences) else xs.shape[0]
    ys = None if y is None else _column(y, "y")
    if ys is not None:
        n_y = len(ys.lengths) if isinstance(ys, _Sequences) else ys.shape[0]
        if n_y != n:
            raise ValueError(f"y has {n_y} examples; x has {n}")
    lens: IntArray | None
    if isinstance(xs, _Sequences):
        if lengths is not None:
            raise ValueError("lengths must be None when x is a list of sequences (it gives the lengths)")
        lens = xs.lengths
    elif lengths is None:
        lens = None
    elif xs.ndim < 2:
        raise ValueError(f"lengths needs x with a time axis, (N, T, ...); got x of shape {xs.shape}")
    else:
        lens = lengths_array(lengths, n, xs.shape[1])
    bs = positive_int(batch_size, "batch_size")
    if _flag(bucket, "bucket") and lens is None:
        raise ValueError("bucket=True needs sequence lengths: pass lengths= or x as a list of sequences")
    if _flag(drop_last, "drop_last") and n < bs:
        raise ValueError(f"drop_last=True with batch_size={bs} and {n} examples leaves no batch")
    return BatchIterator(
        xs,
        ys,
        lens,
        batch_size=bs,
        shuffle=_flag(shuffle, "shuffle"),
        rng=_rng(seed),
        bucket=bool(bucket),
        drop_last=bool(drop_last),
    )


def _column(data: Any, name: str) -> Array | _Sequences:
    """``x`` or ``y`` of :func:`batches`: an array with at least one example, or sequences."""
    if isinstance(data, list):
        arrays, lengths = _sequence_arrays(data, name)
        return _Sequences(arrays, lengths, _common_dtype(arrays))
    if not isinstance(data, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array (N, ...) or a list of sequences; got {type(data).__name__}"
        )
    if data.ndim == 0 or data.shape[0] == 0:
        raise ValueError(
            f"{name} must hold at least one example along its first axis; got shape {data.shape}"
        )
    return data
