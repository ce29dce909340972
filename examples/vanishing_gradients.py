"""Vanishing and exploding gradients: why LSTM and GRU exist, made visible.

The problem: a recurrent network learns a dependency between step t and a loss at a later step T
through the product of the step-to-step Jacobians dh_{k+1}/dh_k between them. For a plain (Elman,
tanh) RNN each factor is ``diag(1 - h**2) W_hh``: when its norm is below 1 the gradient shrinks
geometrically with the distance (vanishes), and when it is above 1 it grows geometrically
(explodes). Either way, the RNN cannot learn what happened many steps back. The LSTM's cell state
and the GRU's update gate give the gradient an additive path whose factor is a learned gate, so
training can keep it open near 1 over long distances.

The data: the adding problem (Hochreiter & Schmidhuber, 1997). Each sequence has T steps of two
channels: a random value in [0, 1] and a marker channel that is 1 at exactly two steps, one in the
first half and one in the second half, and 0 elsewhere. The target is the sum of the two marked
values. Always predicting 1.0 (the mean of the target) gives a mean squared error of 1/6 ~ 0.167; a
network beats that only by remembering the first marked value for up to T steps. Every example is
drawn from ``--seed``: 5,000 training and 1,000 validation sequences of T=100 steps.

What it shows:

(a) ``vanishing_gradients_norms.png``: for one batch of the adding problem and a loss on the last
    step only, the mean over the batch of ||dL/dh_t|| against t (log scale), one line per cell,
    read from the layer's ``hidden_grads`` after a backward with ``retain_hidden_grads = True``.
    Left: at initialisation (PyTorch's default, U(-1/sqrt(H), 1/sqrt(H)), hidden size 32), for
    RNN, LSTM, GRU and an RNN whose recurrent weights are scaled by 4 (exploding). Right: the same
    cells after the training of (b). The ratio ||dL/dh_0|| / ||dL/dh_{T-1}|| is printed for each.
    The probe runs in float64 (a copy of the weights) so that tiny gradients do not underflow.
(b) ``vanishing_gradients_adding.png``: validation MSE per epoch of RNN, LSTM and GRU regressors
    (``Sequential(cell, LastStep(), Linear)``, Adam, lr 0.01, 20 epochs) trained on the adding
    problem with and without gradient clipping (``fit(..., clip_norm=1.0)``). A run whose loss or
    gradient becomes NaN/Inf stops with :class:`rnnkit.train.TrainingDiverged` and is reported as
    diverged. A run "solved" the task if its final validation MSE is below 0.02.

What to expect (seeds 0 and 1): at initialisation the gradients of all three cells vanish alike,
by 20-25 orders of magnitude over 100 steps (the LSTM's and GRU's gates start near 0.5, so their
additive paths also halve the gradient at every step), while the scaled RNN's grow by 7-8 orders.
Training opens the gates: the trained LSTM and GRU carry the gradient back over all 100 steps
(ratios 0.05-0.2), the trained RNN still loses it (1e-9 or less). The LSTM and GRU solve the adding
problem (validation MSE ~1e-3 and below; the GRU within 2 epochs, the LSTM after a plateau of
5-15 epochs), the RNN stays at the baseline. Clipping changes little here because Adam already
normalises each parameter's step, and no run diverges.

How to run it (from the repository root; needs matplotlib for the figures)::

    python examples/vanishing_gradients.py                   # full run, 1.5-2 minutes on 2 shared cores
    python examples/vanishing_gradients.py --seed 1 --out /tmp/vanishing
    python examples/vanishing_gradients.py --smoke           # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rnnkit
from rnnkit import losses
from rnnkit.optim import Adam
from rnnkit.train import TrainingDiverged

Array = npt.NDArray[Any]
Recurrent = rnnkit.RNN | rnnkit.LSTM | rnnkit.GRU

CELLS: dict[str, type[Recurrent]] = {"rnn": rnnkit.RNN, "lstm": rnnkit.LSTM, "gru": rnnkit.GRU}
EXPLODING_SCALE = 4.0  # the recurrent weights of the "exploding" RNN, times PyTorch's default
#: The curves of (a): key -> (cell, recurrent weight scale); the training runs of (b) use the cells.
VARIANTS = {
    "rnn": ("rnn", 1.0),
    "rnn_scaled": ("rnn", EXPLODING_SCALE),
    "lstm": ("lstm", 1.0),
    "gru": ("gru", 1.0),
}
LABELS = {
    "rnn": "RNN (tanh)",
    "rnn_scaled": f"RNN (tanh), W_hh x{EXPLODING_SCALE:g}",
    "lstm": "LSTM",
    "gru": "GRU",
}
COLORS = {"rnn": "C0", "lstm": "C1", "gru": "C2", "rnn_scaled": "C3"}
SOLVED_MSE = 0.02
DEFAULT_OUT = Path(__file__).resolve().parent / "output"
NORMS_PNG = "vanishing_gradients_norms.png"
CURVES_PNG = "vanishing_gradients_adding.png"


@dataclass(frozen=True)
class Config:
    """Sizes of one run of the script.

    Args:
        steps: sequence length T.
        train_size, val_size: examples for training and validation.
        probe_size: sequences in the batch whose gradient norms are measured.
        hidden: hidden size of every cell.
        epochs, batch_size, lr: training of (b).
        clip_norm: the gradient-norm limit of the clipped runs.
    """

    steps: int
    train_size: int
    val_size: int
    probe_size: int
    hidden: int
    epochs: int
    batch_size: int
    lr: float
    clip_norm: float


FULL = Config(
    steps=100,
    train_size=5000,
    val_size=1000,
    probe_size=64,
    hidden=32,
    epochs=20,
    batch_size=32,
    lr=1e-2,
    clip_norm=1.0,
)
SMOKE = dataclasses.replace(FULL, steps=10, train_size=64, val_size=32, probe_size=8, hidden=8, epochs=1)


@dataclass
class Run:
    """One training run of (b): its cell, whether it clipped, and how it went."""

    cell: str
    clipped: bool
    model: rnnkit.Sequential
    history: rnnkit.History
    diverged: bool
    seconds: float

    @property
    def name(self) -> str:
        """e.g. ``lstm_clip`` or ``rnn_noclip``."""
        return f"{self.cell}_{'clip' if self.clipped else 'noclip'}"

    @property
    def label(self) -> str:
        """e.g. ``LSTM, clip`` or ``RNN (tanh), no clip``."""
        return f"{LABELS[self.cell]}, {'clip' if self.clipped else 'no clip'}"

    @property
    def val_mse(self) -> float:
        """The validation MSE of the last completed epoch (NaN if none completed)."""
        values = self.history.values.get("val_loss", [])
        return values[-1] if values else math.nan

    @property
    def solved(self) -> bool:
        """Whether the run ended (without diverging) below :data:`SOLVED_MSE`."""
        return not self.diverged and self.val_mse < SOLVED_MSE


def adding_problem(n: int, steps: int, rng: np.random.Generator) -> tuple[Array, Array]:
    """``n`` sequences of the adding problem.

    Args:
        n: the number of sequences.
        steps: their length T (at least 2).
        rng: the source of randomness.

    Returns:
        ``(x, y)``: x (n, T, 2) float32, channel 0 the values in [0, 1) and channel 1 the markers
        (one 1 in each half); y (n, 1) float32, the sum of the two marked values.
    """
    values = rng.random((n, steps))
    rows = np.arange(n)
    first = rng.integers(0, steps // 2, n)
    second = rng.integers(steps // 2, steps, n)
    markers = np.zeros((n, steps))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    return x, y


def build(
    cell: str, hidden: int, seed: int, *, dtype: Any = np.float32, recurrent_scale: float = 1.0
) -> tuple[rnnkit.Sequential, Recurrent]:
    """A regressor ``Sequential(cell, LastStep(), Linear(hidden, 1))`` with PyTorch's default init.

    Args:
        cell: "rnn", "lstm" or "gru".
        hidden: the hidden size.
        seed: the seed of the initialisation (the same seed gives the same weights in any dtype).
        dtype: numpy.float32 or numpy.float64.
        recurrent_scale: multiplies the recurrent weights ``weight_hh_l0`` after initialisation.

    Returns:
        The model and its recurrent layer.
    """
    layer = CELLS[cell](2, hidden, dtype=dtype, seed=seed)
    weight_hh = layer.params["weight_hh_l0"]
    weight_hh *= recurrent_scale
    model = rnnkit.Sequential(layer, rnnkit.LastStep(), rnnkit.Linear(hidden, 1, dtype=dtype, seed=seed + 1))
    return model, layer


def gradient_norms(model: rnnkit.Sequential, layer: Recurrent, x: Array, y: Array) -> Array:
    """The mean over the batch of ||dL_b/dh_t|| for every step t, L_b the squared error of
    sequence b's prediction from its last step.

    Args:
        model: a model from :func:`build`; its gradients are left at zero.
        layer: its recurrent layer.
        x, y: a batch of the adding problem.

    Returns:
        (T,) norms, in the model's dtype.
    """
    layer.retain_hidden_grads = True
    model.train()
    pred = model(x)
    # A summed loss makes each sequence's gradient its own: dL/dh_t[b] = dL_b/dh_t[b].
    model.backward(losses.mse(pred, y.astype(pred.dtype), reduction="sum").grad)
    model.zero_grad()
    layer.retain_hidden_grads = False
    norms: Array = np.linalg.norm(layer.hidden_grads[0], axis=2).mean(axis=0)
    return norms


def float64_norms(model: rnnkit.Sequential, cell: str, hidden: int, x: Array, y: Array) -> Array:
    """:func:`gradient_norms` of a float64 copy of ``model`` (so tiny gradients do not underflow).

    Args:
        model: a float32 model from :func:`build` with ``cell`` and ``hidden``.
        cell, hidden: its cell and hidden size.
        x, y: the probe batch.

    Returns:
        (T,) float64 norms.
    """
    copy, layer = build(cell, hidden, 0, dtype=np.float64)
    copy.load_state_dict(model.state_dict())
    return gradient_norms(copy, layer, x, y)


def train_run(
    cell: str, clipped: bool, cfg: Config, data: tuple[Array, ...], *, seed: int, progress: bool
) -> Run:
    """Train one regressor on the adding problem; a divergence ends the run, it is not an error.

    Args:
        cell: "rnn", "lstm" or "gru".
        clipped: clip the gradient norm to ``cfg.clip_norm``.
        cfg: the sizes.
        data: ``(x_train, y_train, x_val, y_val)``.
        seed: the seed of the initialisation and of the mini-batch order.
        progress: show fit's progress bar.

    Returns:
        The run, with the history of the epochs completed.
    """
    x_train, y_train, x_val, y_val = data
    model, _ = build(cell, cfg.hidden, seed)
    start = time.perf_counter()
    try:
        history = rnnkit.fit(
            model,
            x_train,
            y_train,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            loss="mse",
            optimizer=Adam(model, lr=cfg.lr),
            validation_data=(x_val, y_val),
            seed=seed,
            clip_norm=cfg.clip_norm if clipped else None,
            progress=progress,
        )
        diverged = False
    except TrainingDiverged as e:
        print(f"{cell} {'with' if clipped else 'without'} clipping diverged: {e}")
        history, diverged = e.history, True
    return Run(cell, clipped, model, history, diverged, time.perf_counter() - start)


def _pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend, or None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)")
        return None
    return plt


def plot_norms(at_init: dict[str, Array], trained: dict[str, Array], path: Path) -> Path | None:
    """The gradient norms against t, at initialisation (left) and after training (right), as a PNG.

    Args:
        at_init, trained: key of :data:`VARIANTS` -> (T,) norms.
        path: where to save the figure.

    Returns:
        ``path``, or None if matplotlib is not installed.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (("at initialisation (PyTorch default)", at_init), ("after training", trained))
    for ax, (title, curves) in zip(axes, panels, strict=True):
        for key, norms in curves.items():
            label = f"{LABELS[key]} (ratio {norms[0] / norms[-1]:.1e})"
            ax.semilogy(np.arange(len(norms)), norms, color=COLORS[key], label=label)
        ax.set_title(title)
        ax.set_xlabel("step t (the loss is on the last step)")
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(r"mean over the batch of $\|\partial L / \partial h_t\|$")
    fig.suptitle(
        r"Gradient reaching each step from a loss on the last one "
        r"(ratio: $\|\partial L / \partial h_0\| \,/\, \|\partial L / \partial h_{T-1}\|$)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(runs: list[Run], baseline: float, path: Path) -> Path | None:
    """Validation MSE per epoch of every run on one log-scale axis, as a PNG.

    Args:
        runs: the training runs.
        baseline: the validation MSE of always predicting 1.0.
        path: where to save the figure.

    Returns:
        ``path``, or None if matplotlib is not installed.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in runs:
        mse = r.history.values.get("val_loss", [])
        label = f"{r.label}{' (diverged)' if r.diverged else ''}"
        ax.semilogy(
            np.arange(1, len(mse) + 1),
            mse,
            color=COLORS[r.cell],
            ls="-" if r.clipped else "--",
            marker="x" if r.diverged else ".",
            label=label,
        )
    ax.axhline(baseline, color="grey", ls=":", label=f"always 1.0 ({baseline:.3f})")
    ax.axhline(SOLVED_MSE, color="black", ls=":", lw=0.8, label=f"solved ({SOLVED_MSE})")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("validation MSE")
    ax.set_title("The adding problem: learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the batches")
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"training epochs (default {FULL.epochs}; 1 with --smoke)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNGs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 epoch: a quick check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure the gradient norms, train the six runs, print the figures and save the two PNGs.

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``ratio_{rnn,rnn_scaled,lstm,gru}`` and ``trained_ratio_{rnn,lstm,gru}`` (||dL/dh_0|| /
        ||dL/dh_T-1||), ``baseline_mse``, and per run ``{cell}_{clip,noclip}_`` + ``val_mse``,
        ``solved``, ``diverged`` (1.0 or 0.0) and ``seconds``.
    """
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = adding_problem(cfg.train_size, cfg.steps, rng)
    x_val, y_val = adding_problem(cfg.val_size, cfg.steps, rng)
    x_probe, y_probe = adding_problem(cfg.probe_size, cfg.steps, rng)
    baseline = float(np.mean((y_val - 1.0) ** 2))
    figures: dict[str, float] = {"baseline_mse": baseline}

    print(f"(a) ||dL/dh_t|| for a loss on the last of T={cfg.steps} steps, hidden size {cfg.hidden}")
    at_init: dict[str, Array] = {}
    for key, (cell, scale) in VARIANTS.items():
        model, layer = build(cell, cfg.hidden, args.seed, dtype=np.float64, recurrent_scale=scale)
        at_init[key] = gradient_norms(model, layer, x_probe, y_probe)
        figures[f"ratio_{key}"] = float(at_init[key][0] / at_init[key][-1])
    print(f"{'cell at initialisation':<26}{'||dL/dh_0|| / ||dL/dh_T-1||':>30}")
    for key, norms in at_init.items():
        print(f"{LABELS[key]:<26}{norms[0] / norms[-1]:>30.3e}")

    print(
        f"\n(b) the adding problem: {cfg.train_size} training and {cfg.val_size} validation sequences, "
        f"T={cfg.steps}; always predicting 1.0 scores MSE {baseline:.4f}"
    )
    data = (x_train, y_train, x_val, y_val)
    runs: list[Run] = []
    for cell in CELLS:
        for clipped in (False, True):
            clipping = f"clip_norm={cfg.clip_norm}" if clipped else "no clipping"
            print(f"\ntraining {LABELS[cell]}, {clipping}")
            runs.append(train_run(cell, clipped, cfg, data, seed=args.seed, progress=not args.smoke))

    trained: dict[str, Array] = {}
    for r in runs:
        if r.clipped:
            trained[r.cell] = norms = float64_norms(r.model, r.cell, cfg.hidden, x_probe, y_probe)
            figures[f"trained_ratio_{r.cell}"] = float(norms[0] / norms[-1])

    args.out.mkdir(parents=True, exist_ok=True)
    norms_png = plot_norms(at_init, trained, args.out / NORMS_PNG)
    curves_png = plot_curves(runs, baseline, args.out / CURVES_PNG)

    print(f"\n{'cell after training (clipped)':<30}{'||dL/dh_0|| / ||dL/dh_T-1||':>30}")
    for key, norms in trained.items():
        print(f"{LABELS[key]:<30}{norms[0] / norms[-1]:>30.3e}")
    print(f"\n{'run':<22}{'final val MSE':>14}{'best':>10}{'epochs':>8}{'time':>8}  result")
    for r in runs:
        best = min(r.history.values.get("val_loss", [math.nan]))
        result = "diverged" if r.diverged else ("solved" if r.solved else "not solved")
        print(
            f"{r.label:<22}{r.val_mse:>14.4f}{best:>10.4f}{r.history.epochs:>8}{r.seconds:>7.1f}s  {result}"
        )
        figures |= {
            f"{r.name}_val_mse": r.val_mse,
            f"{r.name}_solved": float(r.solved),
            f"{r.name}_diverged": float(r.diverged),
            f"{r.name}_seconds": r.seconds,
        }
    solved = [r.name for r in runs if r.solved]
    print(f"solved (final validation MSE < {SOLVED_MSE}): {', '.join(solved) if solved else 'none'}")
    for png in (norms_png, curves_png):
        if png is not None:
            print(f"figure: {png}")
    return figures


if __name__ == "__main__":
    main()
