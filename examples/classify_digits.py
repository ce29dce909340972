"""Handwritten digits read as sequences: RNN, LSTM and GRU classifiers compared.

The task: recognise the digit (0-9) in a small greyscale image by reading the image one pixel row at
a time, the classic "many-to-one" sequence problem: the network sees a sequence and gives one label.

The data: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``, 1,797 images
of 8x8 pixels with intensities 0-16, from the UCI "Optical Recognition of Handwritten Digits" set).
Each image becomes a sequence of 8 steps (the rows, top to bottom) of 8 features (the pixels of
the row, scaled to [0, 1]). A stratified split with a fixed seed keeps 25% of the images, in the
same class proportions, as the test set; the training part holds back 10% for validation, which
early stopping watches (the best epoch's weights are kept) and the learning-rate schedule follows.

What it shows: :class:`rnnkit.SequenceClassifier` with each of the three recurrent cells trained by
:func:`rnnkit.fit` (Adam, ``ReduceLROnPlateau``, ``EarlyStopping``); a table of test accuracy,
trainable parameters and training time; and the validation learning curves of the three cells in
one figure (``digits_learning_curves.png`` in the output directory; needs matplotlib). All three
cells reach 96-99% test accuracy (seeds 0-4). With only 8 steps per sequence, vanishing gradients
hardly matter, so the plain (tanh) RNN keeps up here with a quarter of the LSTM's parameters; the
gates pay off on longer sequences.

How to run it (from the repository root; needs scikit-learn, matplotlib for the figure)::

    python examples/classify_digits.py                   # full run, well under a minute
    python examples/classify_digits.py --seed 1 --out /tmp/digits
    python examples/classify_digits.py --smoke           # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rnnkit
from rnnkit.optim import Adam
from rnnkit.schedules import ReduceLROnPlateau, Schedule
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Array = npt.NDArray[Any]

CELLS = ("rnn", "lstm", "gru")
DEFAULT_OUT = Path(__file__).resolve().parent / "output"
PLOT_NAME = "digits_learning_curves.png"


@dataclass
class Digits:
    """The digits as sequences: images (N, 8 rows, 8 pixels) in [0, 1] and labels (N,)."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array


@dataclass
class Result:
    """One trained classifier: its test accuracy, size, training time and learning curves."""

    cell: str
    accuracy: float
    params: int
    seconds: float
    history: rnnkit.History


def load_data(seed: int) -> Digits:
    """The digits, rows as time steps, split 75/25 into training and test sets (stratified).

    Args:
        seed: the seed of the split.

    Returns:
        The split data set, float32 pixels scaled to [0, 1].
    """
    images, labels = load_digits(return_X_y=True)
    x = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)  # (N, 8 steps = rows, 8 features)
    x_train, x_test, y_train, y_test = train_test_split(
        x, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    return Digits(x_train, y_train, x_test, y_test)


def train_classifier(
    cell: str, data: Digits, *, hidden: int, epochs: int, seed: int, progress: bool
) -> Result:
    """Train one :class:`rnnkit.SequenceClassifier` and measure it on the test set.

    Args:
        cell: "rnn", "lstm" or "gru".
        data: the split digits.
        hidden: the recurrent layer's hidden size.
        epochs: the most epochs to train (early stopping usually ends sooner).
        seed: the seed of the initialisation and of the mini-batch order.
        progress: show fit's progress bar.

    Returns:
        The test accuracy, the parameter count, the training time and the history.
    """
    model = rnnkit.SequenceClassifier(8, 10, hidden, cell=cell, seed=seed)
    optimizer = Adam(model, lr=3e-3)
    callbacks: list[rnnkit.Callback | Schedule] = [
        ReduceLROnPlateau(optimizer, factor=0.5, patience=3),
        rnnkit.EarlyStopping(patience=8),  # on val_loss; the best epoch's weights are restored
    ]
    start = time.perf_counter()
    history = rnnkit.fit(
        model,
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=32,
        optimizer=optimizer,
        validation_split=0.1,
        seed=seed,
        callbacks=callbacks,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(model.predict(data.x_test) == data.y_test))
    params = sum(p.size for p in model.params.values())
    return Result(cell, accuracy, params, seconds, history)


def plot_curves(results: list[Result], path: Path) -> Path | None:
    """Validation loss and accuracy per epoch of every classifier, side by side, as a PNG.

    Args:
        results: the trained classifiers.
        path: where to save the figure.

    Returns:
        ``path``, or None if matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        epochs = np.arange(1, r.history.epochs + 1)
        label = f"{r.cell.upper()} ({r.accuracy:.1%} test)"
        (line,) = axes[0].plot(epochs, r.history["val_loss"], marker=".", label=label)
        axes[0].plot(epochs, r.history["loss"], color=line.get_color(), ls=":", alpha=0.7)
        axes[1].plot(epochs, r.history["val_accuracy"], marker=".", color=line.get_color(), label=label)
    axes[0].set_title("cross-entropy (solid: validation, dotted: training)")
    axes[0].set_yscale("log")
    axes[1].set_title("validation accuracy")
    axes[1].set_ylim(0.8, 1.0)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("8x8 digits read row by row: SequenceClassifier learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches")
    parser.add_argument("--epochs", type=int, default=None, help="most epochs (default 60; 2 with --smoke)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 epochs: a quick check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and compare the three cells; print the table and save the learning curves.

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``{cell}_accuracy``, ``{cell}_params`` and ``{cell}_seconds`` for each cell.
    """
    args = parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.smoke else 60)
    hidden = 8 if args.smoke else 128
    data = load_data(args.seed)
    print(
        f"digits: {len(data.x_train)} training and {len(data.x_test)} test images, "
        "read as 8 steps of 8 pixels"
    )
    results = []
    for cell in CELLS:
        print(f"\ntraining SequenceClassifier(cell={cell!r}, hidden_size={hidden})")
        results.append(
            train_classifier(
                cell, data, hidden=hidden, epochs=epochs, seed=args.seed, progress=not args.smoke
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(results, args.out / PLOT_NAME)

    print(f"\n{'cell':<6}{'test accuracy':>15}{'parameters':>12}{'epochs':>8}{'training time':>15}")
    for r in results:
        print(
            f"{r.cell.upper():<6}{r.accuracy:>15.2%}{r.params:>12,}{r.history.epochs:>8}{r.seconds:>14.1f}s"
        )
    if plot is not None:
        print(f"learning curves: {plot}")
    figures: dict[str, float] = {}
    for r in results:
        figures |= {
            f"{r.cell}_accuracy": r.accuracy,
            f"{r.cell}_params": r.params,
            f"{r.cell}_seconds": r.seconds,
        }
    return figures


if __name__ == "__main__":
    main()
