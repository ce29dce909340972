"""``python -m rnnkit demo`` in a smoke mode: a tiny model on the first characters of the text."""

from __future__ import annotations

import math
import subprocess
import sys

from rnnkit.__main__ import demo


def test_demo_trains_and_lowers_the_validation_perplexity(capsys):
    result = demo("gru", hidden=24, epochs=2, seed=1, max_chars=30_000, progress=False)
    out = capsys.readouterr().out
    assert math.isfinite(result["perplexity_after"])
    assert result["perplexity_after"] < 0.6 * result["perplexity_before"]
    assert "validation perplexity" in out and "sample, temperature 0.7" in out


def test_demo_command_line():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnkit",
            "demo",
            "--hidden",
            "8",
            "--epochs",
            "1",
            "--max-chars",
            "3000",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "after 1 epoch(s)" in done.stdout
