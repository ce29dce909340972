"""Forecasting atmospheric CO2 a year ahead with an LSTM and a GRU, against two naive baselines.

The task: from the last three years of monthly CO2 concentrations, forecast the next 12 months.

The data: the Mauna Loa CO2 record shipped with statsmodels (``statsmodels.datasets.co2``): weekly
concentrations in ppm from March 1958 to December 2001. Weekly values are averaged into months
and the five months without any measurement (in 1958 and 1964) are filled by linear
interpolation: 526 months. The series has a rising trend (about 1.5 ppm a year by the 1990s) and a
yearly cycle of about 6 ppm.

The split is chronological: the last 72 months (1996-01 to 2001-12) are the held-out test span,
the 48 months before it the validation span (for early stopping and the learning-rate schedule),
the rest is for training. The scaler is fitted on the training months only. Every month of the test
span is a forecast origin whose 12 following months lie in the test span (61 origins): each method
forecasts those 12 months from the data before the origin, and the errors of all 61 x 12 forecasts
are averaged. The baselines are the last value (every month equals the last observed one) and the
seasonal naive forecast (every month equals the same month one year earlier).

The model: :class:`rnnkit.Forecaster` (a recurrent layer whose last state a linear head maps to
all 12 months at once), trained by :func:`rnnkit.fit` with Adam, ``ReduceLROnPlateau`` and
``EarlyStopping`` on the validation span. It reads and forecasts the month-to-month *changes* of
the series; the forecast levels are the last observed level plus the running sum of the forecast
changes. Why: the changes are stationary (the yearly cycle plus a small positive drift), whereas
the levels of the test span lie above every level seen in training, so a model on scaled levels
would have to extrapolate, which a tanh network cannot do: run with ``--levels`` to see it miss by
several ppm (3.5 to 6 ppm MAE, worse than both baselines). Differencing is the only
hand-made step; the seasonal shape, the drift and how they continue are learnt by the network.

What it shows: MAE and RMSE (ppm) of the LSTM, the GRU and both baselines over the test span
(the recurrent models come out about three times better than the seasonal naive forecast), and a
figure (``co2_forecast.png``; needs matplotlib): the test span with the forecasts made at each
January, and the MAE by months ahead.

How to run it (from the repository root; needs statsmodels, matplotlib for the figure)::

    python examples/forecast_co2.py                  # full run, under a minute
    python examples/forecast_co2.py --seed 1 --out /tmp/co2
    python examples/forecast_co2.py --levels         # the same models on the raw levels
    python examples/forecast_co2.py --smoke          # tiny sizes, a few seconds
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
from statsmodels.datasets import co2

Array = npt.NDArray[Any]
IntArray = npt.NDArray[np.intp]

SEASON = 12  # months in the yearly cycle, the seasonal naive lag
HORIZON = 12  # months forecast from each origin
WINDOW = 36  # months the model reads
N_VAL = 48  # months of validation before the test span
N_TEST = 72  # months of the held-out test span, at the end of the series
CELLS = ("lstm", "gru")
DEFAULT_OUT = Path(__file__).resolve().parent / "output"


@dataclass
class Series:
    """The monthly CO2 series and its chronological split.

    Attributes:
        levels: CO2 in ppm, one value a month (T,).
        years: each month as a decimal year (1958.167 is March 1958), for plotting.
        months: "YYYY-MM" of each month.
        n_train: the first ``n_train`` months are for training.
        n_val: the next ``n_val`` months for validation; the rest (``N_TEST``) for testing.
    """

    levels: Array
    years: Array
    months: list[str]
    n_train: int
    n_val: int

    @property
    def test_start(self) -> int:
        """Index of the first test month."""
        return self.n_train + self.n_val


@dataclass
class Fitted:
    """One trained forecaster: its test forecasts (origins, HORIZON) in ppm, history and time."""

    cell: str
    forecasts: Array
    history: rnnkit.History
    seconds: float


def load_series() -> Series:
    """The Mauna Loa record as monthly means, gaps interpolated, split train / validation / test.

    Returns:
        The series and its split.
    """
    weekly = co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean().interpolate()
    levels = monthly.to_numpy(dtype=np.float64)
    years = (monthly.index.year + (monthly.index.month - 1) / 12).to_numpy(dtype=np.float64)
    months = [str(m) for m in monthly.index.strftime("%Y-%m")]
    return Series(levels, years, months, len(levels) - N_VAL - N_TEST, N_VAL)


def model_space(levels: Array, differenced: bool) -> tuple[Array, int]:
    """What the model reads and forecasts: the month-to-month changes, or the levels themselves.

    Args:
        levels: the series in ppm (T,).
        differenced: use the changes ``levels[t + 1] - levels[t]``.

    Returns:
        The model's series and its offset: its value ``k`` becomes known at month ``k + offset``.
    """
    return (np.diff(levels), 1) if differenced else (levels, 0)


def to_levels(pred: Array, levels: Array, origins: IntArray, differenced: bool) -> Array:
    """Forecasts in the model's space (origins, HORIZON) as levels in ppm.

    Args:
        pred: the model's forecasts, changes or levels.
        levels: the observed series.
        origins: the first forecast month of each row.
        differenced: whether ``pred`` holds changes (added up from the last observed level).

    Returns:
        The forecast levels (origins, HORIZON).
    """
    if not differenced:
        return pred
    out: Array = levels[origins - 1, None] + np.cumsum(pred, axis=1)
    return out


def last_value(levels: Array, origins: IntArray) -> Array:
    """Baseline: every forecast month equals the last observed month, (origins, HORIZON)."""
    return np.repeat(levels[origins - 1, None], HORIZON, axis=1)


def seasonal_naive(levels: Array, origins: IntArray) -> Array:
    """Baseline: every forecast month equals the latest observed month one or more whole seasons
    before it, (origins, HORIZON)."""
    ahead = np.arange(1, HORIZON + 1)
    lag = SEASON * ((ahead - 1) // SEASON + 1)
    out: Array = levels[origins[:, None] + ahead - 1 - lag]
    return out


def test_origins(series: Series) -> IntArray:
    """Every test month whose HORIZON months ahead are all in the test span."""
    return np.arange(series.test_start, len(series.levels) - HORIZON + 1)


def truth_of(series: Series, origins: IntArray) -> Array:
    """The observed HORIZON months from each origin, (origins, HORIZON)."""
    out: Array = series.levels[origins[:, None] + np.arange(HORIZON)]
    return out


def train_forecaster(
    cell: str,
    series: Series,
    *,
    differenced: bool,
    hidden: int,
    epochs: int,
    seed: int,
    progress: bool,
) -> Fitted:
    """Train a :class:`rnnkit.Forecaster` on the training span and forecast every test origin.

    Args:
        cell: "lstm" or "gru".
        series: the split series.
        differenced: model the month-to-month changes instead of the levels.
        hidden: the recurrent layer's hidden size.
        epochs: the most epochs (early stopping usually ends sooner).
        seed: the seed of the initialisation and the mini-batch order.
        progress: show fit's progress bar.

    Returns:
        The forecasts for :func:`test_origins`, in ppm, with the history and the training time.
    """
    values, offset = model_space(series.levels, differenced)
    model = rnnkit.Forecaster(1, WINDOW, HORIZON, hidden, cell=cell, seed=seed)
    model.fit_scaler(values[: series.n_train - offset])  # only values known within the training span
    x, y = model.windows(values)
    # Window i reads values[i : i + WINDOW] and forecasts the HORIZON months from its origin on.
    origins = np.arange(len(x)) + WINDOW + offset
    train = origins + HORIZON <= series.n_train
    val = (origins >= series.n_train) & (origins + HORIZON <= series.test_start)
    test = origins >= series.test_start
    optimizer = Adam(model, lr=3e-3)
    callbacks: list[rnnkit.Callback | Schedule] = [
        ReduceLROnPlateau(optimizer, factor=0.5, patience=10),
        rnnkit.EarlyStopping(patience=30),  # on val_loss; the best epoch's weights are restored
    ]
    start = time.perf_counter()
    history = rnnkit.fit(
        model,
        x[train],
        y[train],
        epochs=epochs,
        batch_size=32,
        optimizer=optimizer,
        validation_data=(x[val], y[val]),
        seed=seed,
        callbacks=callbacks,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    pred = model.unscale(rnnkit.predict(model, x[test]))[:, :, 0]
    return Fitted(cell, to_levels(pred, series.levels, origins[test], differenced), history, seconds)


def plot_forecasts(series: Series, forecasts: dict[str, Array], path: Path) -> Path | None:
    """The test span with the forecasts made at each January, and the MAE by months ahead.

    Args:
        series: the split series.
        forecasts: method name -> forecasts (test origins, HORIZON) in ppm.
        path: where to save the PNG.

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
    origins = test_origins(series)
    truth = truth_of(series, origins)
    first = series.test_start - 2 * SEASON
    styles: list[dict[str, Any]] = [
        {"ls": "-", "lw": 2.6, "alpha": 0.8},
        {"ls": "-", "lw": 1.2},
        {"ls": "--", "lw": 1.2},
        {"ls": ":", "lw": 1.2},
    ]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), gridspec_kw=dict(height_ratios=(3, 2)))
    top.plot(series.years[first:], series.levels[first:], color="black", lw=2, label="observed")
    top.axvline(series.years[series.test_start], color="grey", lw=0.8)
    top.text(series.years[series.test_start] + 0.05, series.levels[first:].max(), "test span", va="top")
    every_year = (origins - series.test_start) % SEASON == 0
    ahead = np.arange(1, HORIZON + 1)
    for (name, pred), style in zip(forecasts.items(), styles, strict=True):
        mae = np.abs(pred - truth).mean(axis=0)
        (line,) = bottom.plot(ahead, mae, marker="o", label=name, **style)
        for k, (origin, row) in enumerate(zip(origins[every_year], pred[every_year], strict=True)):
            top.plot(
                series.years[origin : origin + HORIZON],
                row,
                color=line.get_color(),
                label=name if k == 0 else None,
                **style,
            )
    top.set_title(f"Mauna Loa CO2: {HORIZON}-month forecasts made each January of the test span")
    top.set_ylabel("CO2 (ppm)")
    top.legend(loc="upper left")
    bottom.set_title(f"mean absolute error over the {len(origins)} test origins")
    bottom.set_xlabel("months ahead")
    bottom.set_ylabel("MAE (ppm)")
    bottom.set_xticks(ahead)
    bottom.legend(loc="upper left")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    parser.add_argument("--epochs", type=int, default=None, help="most epochs (default 300; 2 with --smoke)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG")
    parser.add_argument(
        "--levels", action="store_true", help="model the raw levels instead of the month-to-month changes"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 epochs: a quick check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the forecasters, compare them with the baselines, print the errors, save the figure.

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``{method}_mae`` and ``{method}_rmse`` (ppm) for "lstm", "gru", "last_value" and
        "seasonal_naive", and ``{cell}_seconds`` (training time) for "lstm" and "gru".
    """
    args = parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.smoke else 300)
    hidden = 8 if args.smoke else 64
    differenced = not args.levels
    series = load_series()
    m = series.months
    print(
        f"Mauna Loa CO2, {len(m)} months: training {m[0]}..{m[series.n_train - 1]}, "
        f"validation {m[series.n_train]}..{m[series.test_start - 1]}, test {m[series.test_start]}..{m[-1]}"
    )
    fitted = []
    for cell in CELLS:
        what = "month-to-month changes" if differenced else "levels"
        print(f"\ntraining Forecaster(cell={cell!r}, window={WINDOW}, horizon={HORIZON}) on the {what}")
        fitted.append(
            train_forecaster(
                cell,
                series,
                differenced=differenced,
                hidden=hidden,
                epochs=epochs,
                seed=args.seed,
                progress=not args.smoke,
            )
        )
    origins = test_origins(series)
    forecasts = {f.cell.upper(): f.forecasts for f in fitted}
    forecasts |= {"seasonal naive": seasonal_naive(series.levels, origins)}
    forecasts |= {"last value": last_value(series.levels, origins)}
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_forecasts(
        series, forecasts, args.out / ("co2_forecast_levels.png" if args.levels else "co2_forecast.png")
    )

    truth = truth_of(series, origins)
    print(f"\n{HORIZON}-month forecasts from {len(origins)} origins in {m[series.test_start]}..{m[-1]} (ppm)")
    print(f"{'method':<16}{'MAE':>8}{'RMSE':>8}")
    figures: dict[str, float] = {}
    for name, pred in forecasts.items():
        err = pred - truth
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt(np.square(err).mean()))
        print(f"{name:<16}{mae:>8.3f}{rmse:>8.3f}")
        key = name.lower().replace(" ", "_")
        figures |= {f"{key}_mae": mae, f"{key}_rmse": rmse}
    for f in fitted:
        print(f"{f.cell.upper()} trained {f.history.epochs} epochs in {f.seconds:.1f}s")
        figures[f"{f.cell}_seconds"] = f.seconds
    if plot is not None:
        print(f"figure: {plot}")
    return figures


if __name__ == "__main__":
    main()
