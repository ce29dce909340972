"""Read dates the way people write them and answer in ISO 8601, with an attention encoder-decoder.

The task: "14th of March 2021", "Mar 14, 21", "03/14/2021", "SUNDAY, 14 MARCH 2021", "14.3.21" and
so on are all the date 2021-03-14. The script generates such pairs from random dates between
1950-01-01 and 2049-12-31 (seeded, no download) in fourteen formats, each in its usual case or
in lower or upper case. The conventions are fixed, so every input has one answer: slashes are
month/day/year (US), dots are day.month.year, and a two-digit year is 19yy from 50 and 20yy below.

The model: :class:`rnnkit.Seq2Seq`, a character-level LSTM encoder-decoder with Luong attention.
The source vocabulary is letters, digits and punctuation; sources and targets (the ten characters
of "2021-03-14") both end with an end token. :func:`rnnkit.fit` trains it with teacher forcing
(cross-entropy on each target character, Adam with a warm-up and cosine decay); then
:meth:`~rnnkit.Seq2Seq.translate` decodes greedily the held-out dates, which are different days
from every training and validation date. The script prints the exact-match accuracy (the whole
ISO date right) overall and per input format, a few translations, and saves the learning curves
(loss and per-character accuracy, training and validation) as a PNG.

Run it from the repository root::

    python examples/dates_seq2seq.py              # the full run, about a minute on 2 cores
    python examples/dates_seq2seq.py --smoke      # a few seconds, tiny sizes, every code path
    python examples/dates_seq2seq.py --help       # sizes, seed, output directory
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rnnkit
from rnnkit.data import pad_sequences
from rnnkit.optim import Adam
from rnnkit.schedules import CosineWarmup

IntArray = npt.NDArray[np.int64]

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)

#: The input formats, as ``str.format`` templates over the fields of :func:`date_fields`.
FORMATS = (
    "{dth} of {Month} {yyyy}",
    "{Month} {d}, {yyyy}",
    "{Month} {dth}, {yyyy}",
    "{Mon} {d}, {yy}",
    "{d} {Month} {yyyy}",
    "{dd}-{Mon}-{yyyy}",
    "{Weekday}, {d} {Month} {yyyy}",
    "{Wkd}, {Mon} {d}, {yyyy}",
    "{mm}/{dd}/{yyyy}",
    "{m}/{d}/{yy}",
    "{d}.{m}.{yy}",
    "{dd}.{mm}.{yyyy}",
    "{yyyy}-{m}-{d}",
    "{yyyy}{mm}{dd}",
)
#: How a generated date is cased, and how often.
CASES = (str, str.lower, str.upper)
CASE_PROBABILITIES = (0.6, 0.2, 0.2)

PAD, BOS, EOS = 0, 1, 2
SOURCE_VOCAB = [
    "<pad>",
    "<eos>",
    *sorted(set(" ,-./0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")),
]
TARGET_VOCAB = ["<pad>", "<bos>", "<eos>", *"0123456789-"]
SOURCE_INDEX = {ch: i for i, ch in enumerate(SOURCE_VOCAB)}
TARGET_INDEX = {ch: i for i, ch in enumerate(TARGET_VOCAB)}


def ordinal(n: int) -> str:
    """``n`` with its English ordinal suffix: 1st, 2nd, 3rd, 4th, 11th, 21st..."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def date_fields(date: dt.date) -> dict[str, str]:
    """The pieces a date format is made of, e.g. for 2021-03-04: d "4", dd "04", dth "4th",
    m "3", mm "03", Month "March", Mon "Mar", Weekday "Thursday", Wkd "Thu", yyyy "2021", yy "21"."""
    month, weekday = MONTHS[date.month - 1], WEEKDAYS[date.weekday()]
    return {
        "d": str(date.day),
        "dd": f"{date.day:02d}",
        "dth": ordinal(date.day),
        "m": str(date.month),
        "mm": f"{date.month:02d}",
        "Month": month,
        "Mon": month[:3],
        "Weekday": weekday,
        "Wkd": weekday[:3],
        "yyyy": str(date.year),
        "yy": f"{date.year % 100:02d}",
    }


def split_days(n_val: int, n_test: int, rng: np.random.Generator) -> tuple[IntArray, IntArray, IntArray]:
    """Every day of the range, shuffled and cut into three disjoint pools: training, validation
    and test days (as day offsets from :data:`FIRST_DAY`)."""
    days = rng.permutation((LAST_DAY - FIRST_DAY).days + 1)
    return days[n_val + n_test :], days[:n_val], days[n_val : n_val + n_test]


def make_examples(days: IntArray, rng: np.random.Generator) -> tuple[list[str], list[str], IntArray]:
    """Each day written in a random format and case, the formats equally often.

    Args:
        days: day offsets from :data:`FIRST_DAY`.
        rng: draws the formats and cases.

    Returns:
        ``(sources, targets, formats)``: the human-written dates, their ISO forms and the index in
        :data:`FORMATS` of each source's format.
    """
    formats = rng.permutation(np.arange(len(days)) % len(FORMATS))
    cases = rng.choice(len(CASES), size=len(days), p=CASE_PROBABILITIES)
    dates = [FIRST_DAY + dt.timedelta(days=int(k)) for k in days]
    sources = [
        CASES[c](FORMATS[f].format(**date_fields(d))) for d, f, c in zip(dates, formats, cases, strict=True)
    ]
    return sources, [d.isoformat() for d in dates], formats


def encode_sources(texts: list[str]) -> list[IntArray]:
    """Source character ids followed by the end token, one array per text. The encoder reads
    left to right, so without the end token its output at a last "3" could not tell "2021-3-3"
    (day 03) from the start of "2021-3-31"."""
    return [np.array([*(SOURCE_INDEX[ch] for ch in t), EOS], dtype=np.int64) for t in texts]


def encode_targets(texts: list[str]) -> list[IntArray]:
    """Target character ids followed by the end token, one array per text."""
    return [np.array([*(TARGET_INDEX[ch] for ch in t), EOS], dtype=np.int64) for t in texts]


def decode_target(ids: IntArray) -> str:
    """The text of target ids (``translate`` has already cut them at the end token)."""
    return "".join(TARGET_VOCAB[int(i)] for i in ids)


def translate(model: rnnkit.Seq2Seq, texts: list[str], batch_size: int = 512) -> list[str]:
    """Greedy translations of human-written dates into ISO dates, ``batch_size`` at a time."""
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        src, lengths = pad_sequences(encode_sources(texts[start : start + batch_size]), value=PAD)
        out += [decode_target(ids) for ids in model.translate(src, lengths, max_len=len("yyyy-mm-dd") + 1)]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--smoke`` shrinks every size."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and training")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 10; smoke 1)")
    parser.add_argument("--train", type=int, default=None, help="training examples (default 10000)")
    parser.add_argument("--hidden", type=int, default=None, help="LSTM hidden size (default 96)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per training step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of Adam")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "output", help="directory of the PNG"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one epoch: a quick check")
    args = parser.parse_args(argv)
    full = {"epochs": 10, "train": 10000, "hidden": 96, "val": 1000, "test": 2000}
    smoke = {"epochs": 1, "train": 256, "hidden": 16, "val": 64, "test": 128}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate the data, train, evaluate on held-out dates and plot.

    Args:
        argv: the command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The figures: ``exact_match`` (held-out, overall), ``per_format`` (template -> exact match),
        ``train_loss``, ``val_loss``, ``val_accuracy`` (per character, teacher forced, last epoch),
        ``seconds`` (training) and ``plot`` (the PNG's path, None without matplotlib).
    """
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    train_days, val_days, test_days = split_days(args.val, args.test, rng)
    train_src, train_tgt, _ = make_examples(rng.choice(train_days, args.train, replace=False), rng)
    val_src, val_tgt, _ = make_examples(val_days, rng)
    test_src, test_tgt, test_fmt = make_examples(test_days, rng)
    print(
        f"{len(train_src)} training, {len(val_src)} validation and {len(test_src)} held-out dates "
        f"(disjoint days) in {len(FORMATS)} formats x {len(CASES)} cases"
    )
    for s, t in zip(train_src[:3], train_tgt[:3], strict=True):
        print(f"  {s!r} -> {t!r}")

    model = rnnkit.Seq2Seq(
        len(SOURCE_VOCAB), len(TARGET_VOCAB), 32, args.hidden, bos_id=BOS, eos_id=EOS, seed=args.seed
    )
    print(f"{model.num_parameters()} parameters")
    optimizer = Adam(model, lr=args.lr)
    steps = args.epochs * -(-len(train_src) // args.batch_size)
    schedule = CosineWarmup(optimizer, warmup_steps=steps // 20, total_steps=steps, min_lr=args.lr / 50)
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "dates_seq2seq.png" if importlib.util.find_spec("matplotlib") else None
    start = time.perf_counter()
    history = rnnkit.fit(
        model,
        encode_sources(train_src),
        encode_targets(train_tgt),
        validation_data=(encode_sources(val_src), encode_targets(val_tgt)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=optimizer,
        callbacks=[schedule],
        clip_norm=5.0,
        bucket=True,
        seed=args.seed,
        progress=not args.smoke,
        plot=plot,
    )
    seconds = time.perf_counter() - start

    predicted = translate(model, test_src)
    correct = np.array([p == t for p, t in zip(predicted, test_tgt, strict=True)])
    per_format = {template: float(correct[test_fmt == f].mean()) for f, template in enumerate(FORMATS)}
    example = dt.date(2021, 3, 14)
    print(f"\nexact match on {len(test_src)} held-out dates, per input format:")
    for f, template in enumerate(FORMATS):
        shown = repr(template.format(**date_fields(example)))
        print(f"  {template:32s} {shown:25s} {100 * per_format[template]:6.2f}%  (n={(test_fmt == f).sum()})")
    shown_examples = rng.choice(len(test_src), size=min(8, len(test_src)), replace=False)
    mistakes = np.flatnonzero(~correct)
    print(f"\nsome held-out translations, then the first of the {mistakes.size} mistakes (if any):")
    for i in [*shown_examples, *mistakes[:6]]:
        mark = "ok" if correct[i] else f"WRONG (expected {test_tgt[i]!r})"
        print(f"  {test_src[i]!r:34s} -> {predicted[i]!r:14s} {mark}")
    figures: dict[str, Any] = {
        "exact_match": float(correct.mean()),
        "per_format": per_format,
        "train_loss": history["loss"][-1],
        "val_loss": history["val_loss"][-1],
        "val_accuracy": history["val_accuracy"][-1],
        "seconds": seconds,
        "plot": plot,
    }
    print(
        f"\ntraining: {history.epochs} epochs in {seconds:.1f} s; last epoch loss "
        f"{figures['train_loss']:.4f}, validation loss {figures['val_loss']:.4f}, "
        f"validation per-character accuracy {100 * figures['val_accuracy']:.2f}%"
    )
    print(f"held-out exact match (greedy decoding): {100 * figures['exact_match']:.2f}%")
    print(f"learning curves: {plot}" if plot else "learning curves: not plotted (no matplotlib)")
    return figures


if __name__ == "__main__":
    main()
