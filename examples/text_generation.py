"""Generate text one character at a time with an LSTM language model (rnnkit.LanguageModel).

The data: the help texts of the Python documentation topics, which every Python ships for
``help()`` (``from pydoc_data.topics import topics``, a dict of about 80 texts, some 465,000
characters of English prose and code samples); no download. They are joined into one text, whose
first 90% trains the model and whose last 10% is held out for validation (a cut by position, so
the validation text is unseen writing, not shuffled windows of the training text). The
vocabulary is the text's set of characters.

The model reads characters and predicts the next one at every step. The training text is cut
into windows of ``--seq-len`` characters; :func:`rnnkit.fit` trains on each window in chunks of
``--tbptt`` steps (truncated backpropagation through time: the LSTM state flows from one chunk to
the next, the gradient stops at the boundary), with Adam, a warm-up then cosine decay of the
learning rate and gradient-norm clipping.

The script shows the validation perplexity (the exponential of the cross-entropy per character,
so the effective number of equally likely next characters: the vocabulary size for a uniform
guess) before and after training, the learning curves as a PNG, text generated from a prompt at
temperatures 0.5, 0.8 and 1.0 and with top-k sampling, and that the model saved with
:meth:`~rnnkit.Module.save` and read back with :func:`rnnkit.load` generates the same greedy text.

Run it from the repository root::

    python examples/text_generation.py              # the full run, about two minutes on 2 cores
    python examples/text_generation.py --smoke      # a few seconds, tiny sizes, every code path
    python examples/text_generation.py --help       # sizes, seed, prompt, output directory
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rnnkit
from rnnkit.optim import Adam
from rnnkit.schedules import CosineWarmup

IntArray = npt.NDArray[np.int64]

#: (temperature, top_k) of the samples printed after training.
SAMPLING = ((0.5, None), (0.8, None), (1.0, None), (1.0, 5))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--smoke`` shrinks every size."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, training and sampling")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 5; smoke 1)")
    parser.add_argument("--chars", type=int, default=None, help="characters of text used (default all)")
    parser.add_argument("--hidden", type=int, default=None, help="LSTM hidden size (default 256)")
    parser.add_argument("--seq-len", type=int, default=None, help="characters per window (default 200)")
    parser.add_argument("--tbptt", type=int, default=None, help="truncated-BPTT chunk (default 50)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per step (default 32)")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate of Adam")
    parser.add_argument("--prompt", default="The ", help="the text the samples continue")
    parser.add_argument("--length", type=int, default=None, help="characters per sample (default 240)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "output", help="directory of the PNG"
    )
    parser.add_argument(
        "--keep-model", action="store_true", help="save the model in --out (default: a temporary directory)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one epoch: a quick check")
    args = parser.parse_args(argv)
    full = {"epochs": 5, "chars": None, "hidden": 256, "seq_len": 200, "tbptt": 50, "batch_size": 32}
    smoke = {"epochs": 1, "chars": 6000, "hidden": 16, "seq_len": 40, "tbptt": 20, "batch_size": 16}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.length is None:
        args.length = 40 if args.smoke else 240
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load and cut the text, train, report perplexities, sample, save and reload.

    Args:
        argv: the command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The figures: ``val_perplexity_before`` and ``val_perplexity_after`` (validation text),
        ``train_perplexity`` (last epoch), ``uniform_perplexity`` (the vocabulary size),
        ``seconds`` (training), ``samples`` ({"temperature=0.5": text, ...}), ``greedy`` (the
        greedy continuation), ``reload_matches`` (the reloaded model's greedy text is the same),
        ``model`` (the saved file, kept only with ``--keep-model``) and ``plot`` (the PNG's path,
        None without matplotlib).
    """
    args = parse_args(argv)
    text = rnnkit.data.pydoc_text(args.chars)
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))
    cut = int(0.9 * len(ids))
    windows = rnnkit.data.text_windows
    train_x, val_x = windows(ids[:cut], args.seq_len), windows(ids[cut:], args.seq_len)
    print(
        f"text: {len(text)} characters of pydoc_data topics, {len(vocab)} distinct; training on the "
        f"first {cut} ({len(train_x)} windows of {args.seq_len}), validating on the last {len(ids) - cut}"
    )

    model = rnnkit.LanguageModel(len(vocab), 32, args.hidden, vocab=vocab, seed=args.seed)
    print(f"{model.num_parameters()} parameters")
    before = rnnkit.evaluate(model, val_x, None)["perplexity"]
    print(f"validation perplexity before training: {before:.2f} (uniform guess: {len(vocab)})")

    optimizer = Adam(model, lr=args.lr)
    steps = args.epochs * -(-len(train_x) // args.batch_size) * -(-args.seq_len // args.tbptt)
    schedule = CosineWarmup(optimizer, warmup_steps=steps // 20, total_steps=steps, min_lr=args.lr / 20)
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "text_generation.png" if importlib.util.find_spec("matplotlib") else None
    start = time.perf_counter()
    history = rnnkit.fit(
        model,
        train_x,
        validation_data=(val_x, None),
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=optimizer,
        callbacks=[schedule],
        tbptt=args.tbptt,
        clip_norm=1.0,
        seed=args.seed,
        progress=not args.smoke,
        plot=plot,
    )
    seconds = time.perf_counter() - start
    after = rnnkit.evaluate(model, val_x, None)["perplexity"]

    print(f"\nsamples continuing {args.prompt!r}:")
    samples: dict[str, str] = {}
    for temperature, top_k in SAMPLING:
        name = f"temperature={temperature}" + ("" if top_k is None else f", top_k={top_k}")
        samples[name] = model.generate(
            args.prompt, args.length, temperature=temperature, top_k=top_k, seed=args.seed
        )
        print(f"--- {name}\n{args.prompt}{samples[name]}\n")

    greedy = model.generate(args.prompt, args.length, temperature=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.out if args.keep_model else Path(tmp)) / "text_generation.npz"
        model.save(path)
        loaded = rnnkit.load(path)
        assert isinstance(loaded, rnnkit.LanguageModel)
        reloaded_greedy = loaded.generate(args.prompt, args.length, temperature=0)
        size = path.stat().st_size
    print(f"--- greedy (temperature=0)\n{args.prompt}{greedy}\n")
    reload_matches = reloaded_greedy == greedy
    print(
        f"saved to {path if args.keep_model else 'a temporary file'} ({size / 1e6:.2f} MB); reloaded with "
        f"rnnkit.load, greedy text {'identical' if reload_matches else 'DIFFERENT'}"
    )
    figures: dict[str, Any] = {
        "val_perplexity_before": before,
        "val_perplexity_after": after,
        "train_perplexity": history["perplexity"][-1],
        "uniform_perplexity": float(len(vocab)),
        "seconds": seconds,
        "samples": samples,
        "greedy": greedy,
        "reload_matches": reload_matches,
        "model": path if args.keep_model else None,
        "plot": plot,
    }
    print(
        f"\ntraining: {history.epochs} epochs in {seconds:.1f} s "
        f"({history.epochs * train_x.shape[0] * args.seq_len / seconds:,.0f} characters/s)"
    )
    print(
        f"validation perplexity: {before:.2f} before, {after:.2f} after training "
        f"(training text, last epoch: {figures['train_perplexity']:.2f}); "
        f"{math.log2(after):.2f} bits per character"
    )
    print(f"learning curves: {plot}" if plot else "learning curves: not plotted (no matplotlib)")
    return figures


if __name__ == "__main__":
    main()
