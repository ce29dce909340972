"""``python -m rnnkit demo``: a character-level language model trained on Python's own documentation;
``python -m rnnkit bench``: the benchmark against PyTorch and ONNX Runtime."""

from __future__ import annotations

import argparse
import sys
import time

import rnnkit


def demo(
    cell: str = "lstm",
    hidden: int = 256,
    epochs: int = 5,
    seed: int = 0,
    max_chars: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train a character-level language model on the documentation topics that ship with Python
    (the standard library's ``pydoc_data``), and show perplexity and samples before and after.

    Returns the validation perplexity before and after training and the training time.
    """
    text = rnnkit.data.pydoc_text(max_chars)
    vocab = sorted(set(text))
    split = int(0.95 * len(text))
    model = rnnkit.LanguageModel(len(vocab), 64, hidden, cell=cell, vocab=vocab, seed=seed)
    ids = model.encode(text)
    windows = rnnkit.data.text_windows
    train, val = windows(ids[:split], SEQ_LEN), windows(ids[split:], SEQ_LEN)
    print(
        f"rnnkit {rnnkit.__version__} ({rnnkit.get_num_threads()} threads, SIMD {rnnkit.simd_level()}): "
        f"a character-level {cell.upper()} language model, {model.num_parameters():,} parameters"
    )
    print(
        f"text: Python's own documentation topics (pydoc_data), {len(text):,} characters, "
        f"{len(vocab)} distinct; {train.shape[0]} training sequences of {SEQ_LEN}, "
        f"{val.shape[0]} for validation"
    )
    before = rnnkit.evaluate(model, val, None)["perplexity"]
    print(f"\nbefore training: validation perplexity {before:.1f} (a uniform guess: {len(vocab)})")
    print(f"sample: {model.generate(PROMPT, 120, temperature=1.0, seed=seed)!r}\n")
    opt = rnnkit.optim.Adam(model, lr=3e-3)
    steps = epochs * -(-train.shape[0] // BATCH) * -(-SEQ_LEN // TBPTT)
    warmup = min(50, steps // 10)
    schedule = rnnkit.schedules.CosineWarmup(opt, warmup_steps=warmup, total_steps=steps, min_lr=3e-4)
    start = time.perf_counter()
    history = rnnkit.fit(
        model,
        train,
        epochs=epochs,
        batch_size=BATCH,
        tbptt=TBPTT,
        clip_norm=1.0,
        optimizer=opt,
        callbacks=[schedule],
        validation_data=(val, None),
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    after = history["val_perplexity"][-1]
    print(f"\nafter {epochs} epoch(s), {seconds:.0f} s: validation perplexity {after:.2f} (was {before:.1f})")
    for temperature, top_k in ((0.7, None), (1.0, 10)):
        sample = model.generate(PROMPT, 300, temperature=temperature, top_k=top_k, seed=seed)
        print(f"\nsample, temperature {temperature}{f', top {top_k}' if top_k else ''}:\n{PROMPT}{sample}")
    return {"perplexity_before": before, "perplexity_after": after, "seconds": seconds}


#: The demo's training setup: sequences of SEQ_LEN characters in batches of BATCH, backpropagated
#: in chunks of TBPTT steps (the state carries across chunks), and the prompt of the samples.
SEQ_LEN, BATCH, TBPTT, PROMPT = 128, 32, 64, "The "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a character-level language model on Python's own documentation")
    d.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    d.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-chars", type=int, default=None, help="train on the first N characters only")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    demo(args.cell, args.hidden, args.epochs, args.seed, args.max_chars, not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
