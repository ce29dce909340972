"""Smoke test of the benchmark harness (rnnkit.bench): a --quick run of one cell writes its three
files, and every side that ran agreed with PyTorch (peers that are not installed are skipped)."""

from __future__ import annotations

import json

from rnnkit.bench import main


def test_quick_bench_writes_results(tmp_path):
    assert main(["--quick", "--cells", "gru", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# rnnkit")
    rows = data["rows"]
    assert rows and all(r["cell"] == "gru" for r in rows)
    assert all(r["times"]["rnnkit"]["median"] > 0 for r in rows), "rnnkit must be timed in every row"
    for r in rows:  # sides checked against torch (when it is installed) agreed
        assert all(err < 1e-4 for err in r["max_rel_error_vs_torch"].values()), r["label"]
