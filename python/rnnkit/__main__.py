"""``python -m rnnkit demo``: a short tour of forward, backward and learning with the fused kernels."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import rnnkit


def demo(cell: str = "lstm", hidden: int = 64, steps: int = 300, seed: int = 0) -> float:
    """Train a recurrent layer plus a linear read-out to report, at every step, the input seen
    ``delay`` steps earlier (a memory task), with Adam on the layer's own gradients.
    Returns the final mean squared error."""
    layers = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}
    rng = np.random.default_rng(seed)
    batch, seq, delay = 32, 30, 3
    layer = layers[cell](1, hidden, seed=seed)
    w_out = rng.normal(0, 1 / np.sqrt(hidden), (hidden, 1)).astype(np.float32)
    b_out = np.zeros(1, np.float32)
    lr = 0.01
    print(
        f"rnnkit {rnnkit.__version__}: {layer!r}, {layer.num_parameters()} parameters, "
        f"{rnnkit.get_num_threads()} threads, SIMD {rnnkit.simd_level()}"
    )
    print(f"task: y[t] = x[t-{delay}] on batches of {batch} sequences of {seq} steps; Adam lr={lr}")
    m1 = [np.zeros_like(p) for p in (*layer.params.values(), w_out, b_out)]
    m2 = [np.zeros_like(p) for p in m1]
    start = time.perf_counter()
    loss = float("nan")
    for it in range(1, steps + 1):
        x = rng.uniform(-1, 1, (batch, seq, 1)).astype(np.float32)
        target = np.zeros_like(x)
        target[:, delay:] = x[:, :-delay]
        layer.zero_grad()
        h, _ = layer(x)
        pred = h @ w_out + b_out
        err = pred - target
        loss = float(np.mean(err**2))
        dpred = 2 * err / err.size
        grad_w = h.reshape(-1, hidden).T @ dpred.reshape(-1, 1)
        grad_b = dpred.sum(axis=(0, 1))
        layer.backward(dpred @ w_out.T)
        params = [*layer.params.values(), w_out, b_out]
        grads = [*layer.grads.values(), grad_w, grad_b]
        for k, (p, g) in enumerate(zip(params, grads, strict=True)):
            m1[k] = 0.9 * m1[k] + 0.1 * g
            m2[k] = 0.999 * m2[k] + 0.001 * g * g
            step = lr * (m1[k] / (1 - 0.9**it)) / (np.sqrt(m2[k] / (1 - 0.999**it)) + 1e-8)
            p -= step.astype(p.dtype)
        if it == 1 or it % 50 == 0:
            print(f"  step {it:4d}  mse {loss:.4f}  (predicting zeros: {float(np.mean(target**2)):.4f})")
    print(f"{steps} training steps in {time.perf_counter() - start:.2f} s")
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small recurrent network on a memory task")
    d.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    d.add_argument("--hidden", type=int, default=64)
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    sub.add_parser(
        "bench",
        help="time rnnkit against PyTorch and ONNX Runtime (options: python -m rnnkit bench --help)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from rnnkit.bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    demo(args.cell, args.hidden, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
