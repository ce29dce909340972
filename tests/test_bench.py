"""The benchmark harness (rnnkit.bench): a --quick run of one cell writes its three files, and
every side that ran agreed with PyTorch (peers that are not installed are skipped); the pause
before each repeat lasts until no thread of the process is spinning; the peak is the higher of
the run's two measurements; a thread-scaling row times each side at both thread counts, in turns,
each turn at its own count."""

from __future__ import annotations

import json

import pytest
import rnnkit
from rnnkit.bench import (
    QUICK,
    SETTLE,
    SETTLE_MAX,
    SETTLE_SLICE,
    STREAM_BATCHES,
    STREAM_HIDDEN,
    main,
    measure,
    practical_peak,
    settle,
)


class FakeMachine:
    """A clock and a process CPU time: one thread spins (a full core) until `busy_until`."""

    def __init__(self, busy_until: float) -> None:
        self.now = 0.0
        self.busy_until = busy_until

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def cpu_time(self) -> float:
        return min(self.now, self.busy_until)


@pytest.mark.parametrize(
    ("busy_until", "lo", "hi"),
    [
        (0.0, SETTLE, SETTLE + SETTLE_SLICE),  # quiet: the minimum pause
        (0.062, 0.07, 0.08 + SETTLE_SLICE),  # ONNX Runtime's pool spinning ~60 ms: past it
        (0.2, 0.2, 0.2 + 2 * SETTLE_SLICE),
        (10.0, SETTLE_MAX, SETTLE_MAX + SETTLE_SLICE),  # never quiet: gives up
    ],
)
def test_settle_waits_until_no_thread_spins(busy_until, lo, hi):
    m = FakeMachine(busy_until)
    waited = settle(cpu_time=m.cpu_time, clock=m.clock, sleep=m.sleep)
    assert lo - 1e-9 <= waited <= hi
    assert waited == pytest.approx(m.now)


def test_quick_bench_writes_results(tmp_path):
    assert main(["--quick", "--cells", "gru", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# rnnkit")
    rows = data["rows"]
    assert rows and all(r["cell"] == "gru" for r in rows)
    assert {(r["batch"], r["hidden"]) for r in rows if r["section"] == "stream"} == {
        (b, h) for b in STREAM_BATCHES for h in STREAM_HIDDEN
    }
    assert all(r["times"]["rnnkit"]["median"] > 0 for r in rows), "rnnkit must be timed in every row"
    for r in rows:  # sides checked against torch (when it is installed) agreed
        assert all(err < 1e-4 for err in r["max_rel_error_vs_torch"].values()), r["label"]
    peak = data["peak"]["1"]
    assert peak["gflops_median"] == max(peak["at_start"], peak["at_end"]) > 0
    assert "at the start of the run" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(("start", "end"), [(114.2, 186.5), (186.5, 114.2), (100.0, 100.0)])
def test_practical_peak_is_the_higher_measurement(start, end):
    def measured(gflops):
        return {"n": 2048, "gflops_median": gflops, "gflops_max": gflops + 1, "blas": []}

    p = practical_peak(measured(start), measured(end))
    assert p["gflops_median"] == max(start, end)
    assert p["gflops_max"] == max(start, end) + 1  # the best of the same measurement
    assert (p["at_start"], p["at_end"]) == (start, end)


def test_measure_runs_each_turn_after_its_setup(monkeypatch):
    monkeypatch.setattr("rnnkit.bench.settle", lambda: 0.0)
    log = []
    runners = {side: (lambda side=side: log.append(("call", side)) or {}) for side in ("a", "b")}
    stats = measure(runners, QUICK, before=lambda side: log.append(("before", side)))
    assert set(stats) == {"a", "b"}
    current = None
    for what, side in log:
        if what == "before":
            current = side
        else:
            assert side == current, f"{side} ran after the setup of {current}: {log}"


def test_thread_scaling_rows_time_both_counts_in_one_measurement(tmp_path):
    threads_before = rnnkit.get_num_threads()
    try:
        assert main(["--quick", "--cells", "rnn", "--threads", "2", "--out", str(tmp_path)]) == 0
    finally:
        rnnkit.set_num_threads(threads_before)
    rows = [
        r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["section"] == "threads"
    ]
    assert {r["mode"] for r in rows} == {"inference", "training"}
    for r in rows:
        assert (r["threads"], r["also"]) == (1, 2)
        one, two = r["times"]["rnnkit"]["median"], r["times"]["rnnkit@2t"]["median"]
        assert r["thread_speedup"]["rnnkit"] == pytest.approx(one / two)
        assert all(err < 1e-3 for err in r["max_rel_error_vs_torch"].values()), r["label"]
    assert "Speed-up of 2 threads over 1 (each side timed at both" in (tmp_path / "results.md").read_text()
