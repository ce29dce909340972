"""Compare rnnkit with PyTorch and ONNX Runtime on CPU, following shared/BENCHMARKS.md.

Usage::

    python benches/compare.py [--quick] [--threads N] [--cells lstm,gru,rnn] [--out DIR]
    python -m rnnkit bench [same options]

Every peer runs in this process, on the same shapes, weights and thread count; each side's
outputs (and, for training, its gradients) are checked against PyTorch's before anything is
timed. A peer that is not installed, or that disagrees, is skipped with a note. The practical
peak (numpy float32 matmul) is measured in a subprocess of the same run.

Writes ``results.json`` (every figure and the machine), ``results.md`` (tables) and
``results.png`` (speed-up chart) to ``--out`` (default ``bench-results/``). Importable:
``main(argv)`` is the entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

import rnnkit

Array = npt.NDArray[Any]
Outputs = dict[str, Array]
Runner = Callable[[], Outputs]

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
TORCH_NAMES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
RNNKIT_CLASSES: dict[str, Callable[..., Any]] = {"rnn": rnnkit.RNN, "lstm": rnnkit.LSTM, "gru": rnnkit.GRU}
# (batch, seq, input, hidden) of the main grid; the last one is the "large batch" shape.
GRID_SHAPES = ((1, 100, 128, 128), (8, 100, 128, 256), (64, 100, 512, 512))
STREAM_HIDDEN = (64, 256)
# Streaming batches: one stream (the targets), and several served together, step by step.
STREAM_BATCHES = (1, 8)
MODES = ("inference", "training")
SIDES = ("rnnkit", "torch", "ort")
SEED = 1234
PEAK_N = 2048
# Peaks at a run's start and end further apart than this ratio are reported as a change of speed.
PEAK_DRIFT = 1.15
# A row timed while other processes kept more cores than this busy is flagged as noisy.
BUSY = 0.2
# Agreement with PyTorch: max |a - b| / max(1, max |b|), per output.
TOLERANCE = {"inference": 1e-4, "training": 1e-3}


# ---------------------------------------------------------------------------------------------
# Settings and cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """How long to time each side of each case."""

    warmup: int  # untimed repeats after calibration
    min_repeats: int
    max_repeats: int
    budget: float  # seconds of timed repeats per side, within [min_repeats, max_repeats]
    min_repeat_time: float  # calls per repeat are raised until one repeat takes this long
    warm_time: float  # untimed calls after each settle, at least one, for at least this long
    seq_len: int  # T of every sequence case (and steps of the streaming cases)
    peak_repeats: int


FULL = Timing(
    warmup=1,
    min_repeats=5,
    max_repeats=20,
    budget=4.0,
    min_repeat_time=0.05,
    warm_time=0.03,
    seq_len=100,
    peak_repeats=5,
)
QUICK = Timing(
    warmup=0,
    min_repeats=1,
    max_repeats=1,
    budget=0.0,
    min_repeat_time=0.0,
    warm_time=0.0,
    seq_len=8,
    peak_repeats=1,
)


@dataclass(frozen=True)
class Case:
    """One configuration, timed on every available side."""

    section: str  # "grid", "lengths", "stream" or "threads"
    cell: str
    mode: str  # "inference" or "training"
    batch: int
    seq: int
    input: int
    hidden: int
    threads: int
    #: In the "threads" section: the thread count every side is also timed at, in turns with
    #: `threads` in one measurement, so that the speed-up is not a ratio of two moments of a VM
    #: whose speed changes within minutes (0: none).
    also: int = 0

    @property
    def streaming(self) -> bool:
        return self.section == "stream"

    @property
    def var_lengths(self) -> bool:
        return self.section == "lengths"

    @property
    def label(self) -> str:
        if self.streaming:
            return f"{self.cell} stream B={self.batch} H={self.hidden} (per step) {self.threads}t"
        lens = " var-len" if self.var_lengths else ""
        shape = f"B={self.batch} T={self.seq} I={self.input} H={self.hidden}"
        return f"{self.cell} {self.mode} {shape}{lens} {self.threads}t"

    def flops(self, steps: int) -> float:
        """FLOPs of one call over `steps` (sequence, time) pairs: 2*steps*G*H*(I+H), x3 to train."""
        fwd = 2.0 * steps * GATES[self.cell] * self.hidden * (self.input + self.hidden)
        return 3.0 * fwd if self.mode == "training" else fwd


def build_cases(cells: Sequence[str], threads: int, seq: int) -> list[Case]:
    """The grid of shared/BENCHMARKS.md, in running order (thread count changes once)."""
    cases = [
        Case("grid", c, m, b, seq, i, h, threads) for b, _, i, h in GRID_SHAPES for c in cells for m in MODES
    ]
    big = GRID_SHAPES[-1]
    cases += [Case("lengths", c, m, big[0], seq, big[2], big[3], threads) for c in cells for m in MODES]
    cases += [
        Case("stream", c, "inference", b, seq, h, h, threads)
        for b in STREAM_BATCHES
        for h in STREAM_HIDDEN
        for c in cells
    ]
    if threads > 1:
        cases += [
            Case("threads", c, m, big[0], seq, big[2], big[3], 1, also=threads) for c in cells for m in MODES
        ]
    return cases


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Seconds per call (or per step, for streaming): median and min over `repeats`."""

    median: float
    min: float
    repeats: int
    number: int  # calls per repeat
    #: Median over the repeats of the first call after the idle pause (see `measure`): the
    #: latency of a call that comes after the machine has been idle, not part of the timing.
    after_idle: float

    def scaled(self, factor: float) -> Stats:
        return replace(
            self, median=self.median * factor, min=self.min * factor, after_idle=self.after_idle * factor
        )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


#: Idle seconds before each timed repeat, at least (see `settle`).
SETTLE = 0.05
#: The slices `settle` sleeps in, the fraction of one core under which a slice counts as quiet,
#: and the longest it waits.
SETTLE_SLICE = 0.01
QUIET = 0.05
SETTLE_MAX = 1.0


def settle(
    cpu_time: Callable[[], float] = time.process_time,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Sleep for at least `SETTLE` seconds and until the process is quiet: until a slice of
    `SETTLE_SLICE` passes in which all its threads together used under `QUIET` of a core (at most
    `SETTLE_MAX`). The peers' thread pools spin after their calls: ONNX Runtime's for about 60 ms,
    OpenMP's (PyTorch's) for about 10 ms, measured here as the process's CPU time during a sleep;
    a fixed 50 ms pause had left ONNX Runtime's pool spinning on one of the two cores through
    the next side's first call (rnnkit's LSTM at B=8: 17 ms after ONNX Runtime's calls, 10 ms
    without them). Returns the seconds waited."""
    start = clock()
    while True:
        c0, t0 = cpu_time(), clock()
        sleep(SETTLE_SLICE)
        quiet = cpu_time() - c0 < QUIET * (clock() - t0)
        waited = clock() - start
        if (quiet and waited >= SETTLE) or waited >= SETTLE_MAX:
            return waited


def measure(
    runners: dict[str, Runner], timing: Timing, before: Callable[[str], None] = lambda side: None
) -> dict[str, Stats]:
    """Time every side, round-robin so that the machine's noise falls on all of them alike.

    Each side is warmed up and given enough calls per repeat to take `min_repeat_time`; the
    repeat count fits the slowest side's repeats into `budget`, within [min_repeats, max_repeats].
    Before each repeat the process is left idle (`settle`): the thread pools of every side (ONNX
    Runtime's, OpenMP's, rayon's) spin for a while after their work before they sleep, and on two
    cores a pool still spinning from the previous side would slow the next one. Then the side
    makes untimed calls for `warm_time` (at least one), so that every repeat is timed warm: at
    batch 1 on two threads a side can need 10-20 ms of calls after a pause to get back to its
    speed (rnnkit's GRU: 3.3 ms, 1.03 ms, 0.75 ms, then 0.56, 0.51 and 0.45 ms at the 5th, 9th and
    17th call; ONNX Runtime's, 1.39, 0.88 and 0.80 ms, level from the 5th call). The first call
    after the pause is timed apart, as `Stats.after_idle`. `before(side)` runs before each of a
    side's turns, untimed (it sets the side's thread count).
    """

    def repeat(fn: Runner, number: int) -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - t0

    def warm(fn: Runner) -> float:
        """Calls for `warm_time` (at least one); the time of the first."""
        first = repeat(fn, 1)
        end = time.perf_counter() + timing.warm_time - first
        while time.perf_counter() < end:
            fn()
        return first

    with gc_paused():
        once = {}
        for side, fn in runners.items():  # warm-up and calibration
            before(side)
            once[side] = repeat(fn, 1)
        number = {side: max(1, math.ceil(timing.min_repeat_time / max(t, 1e-9))) for side, t in once.items()}
        slowest = max((once[side] * number[side] for side in runners), default=1.0)
        repeats = min(timing.max_repeats, max(timing.min_repeats, int(timing.budget / max(slowest, 1e-9))))
        times: dict[str, list[float]] = {side: [] for side in runners}
        firsts: dict[str, list[float]] = {side: [] for side in runners}
        for i in range(timing.warmup + repeats):
            for side, fn in runners.items():
                before(side)
                settle()
                first = warm(fn)
                t = repeat(fn, number[side]) / number[side]
                if i >= timing.warmup:
                    times[side].append(t)
                    firsts[side].append(first)
    return {
        side: Stats(statistics.median(ts), min(ts), repeats, number[side], statistics.median(firsts[side]))
        for side, ts in times.items()
    }


# ---------------------------------------------------------------------------------------------
# The machine and the practical peak
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have]
    return []


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def blas_info() -> list[dict[str, Any]]:
    """The BLAS libraries numpy loaded in this process, as threadpoolctl sees them."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("internal_api", "architecture", "num_threads", "version", "threading_layer")
    return [{k: i.get(k) for k in keep} for i in threadpool_info() if i.get("user_api") == "blas"]


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its children)."""
    busy = math.nan
    with contextlib.suppress(OSError, ValueError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def other_load() -> Iterator[list[float]]:
    """Yields a list that receives, on exit, how many cores other processes kept busy meanwhile."""
    out: list[float] = []
    start, (busy0, ours0) = time.perf_counter(), cpu_seconds()
    yield out
    busy1, ours1 = cpu_seconds()
    out.append(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(time.perf_counter() - start, 1e-9))


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("numpy", "torch", "onnxruntime", "onnx", "matplotlib")}
        | {"rnnkit": rnnkit.__version__},
        "rnnkit_simd": rnnkit.simd_level(),
        "load_average_at_start": os.getloadavg(),
        "numpy_blas_in_process": blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")},
    }


# Run in a fresh interpreter: prints the JSON of one peak measurement.
_PEAK_SCRIPT = """
import json, statistics, sys, time
import numpy as np
n, repeats, threads = (int(a) for a in sys.argv[1:4])
try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:
    threadpool_info = None
else:
    threadpool_limits(threads, user_api="blas")
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
flops = 2.0 * n**3
info = [] if threadpool_info is None else [i for i in threadpool_info() if i.get("user_api") == "blas"]
print(json.dumps({"n": n, "threads": threads, "gflops_median": flops / statistics.median(times) / 1e9,
                  "gflops_max": flops / min(times) / 1e9, "blas": info}))
"""


def measure_peak(threads: int, repeats: int) -> dict[str, Any]:
    """numpy float32 matmul GFLOP/s at n=2048 in a subprocess without OPENBLAS_CORETYPE/L2_SIZE."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", _PEAK_SCRIPT, str(PEAK_N), str(repeats), str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def practical_peak(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The higher of two peak measurements, made at the start and at the end of a run, with both
    medians kept (``at_start``, ``at_end``): a shared VM's speed can change within a run (one run
    of the README's VM measured 114 GFLOP/s at its start, and its kernels ran at up to 164 later)."""
    used = max(start, end, key=lambda p: float(p["gflops_median"]))
    return {**used, "at_start": start["gflops_median"], "at_end": end["gflops_median"]}


def peak_kernel(peak: dict[str, Any]) -> str:
    """Which BLAS kernel the peak measurement ran, e.g. "openblas Haswell"."""
    return ", ".join(f"{b.get('internal_api')} {b.get('architecture')}" for b in peak["blas"]) or "unknown"


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


def optional_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@dataclass
class Peers:
    torch: ModuleType | None
    ort: ModuleType | None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls) -> Peers:
        torch, ort = optional_import("torch"), optional_import("onnxruntime")
        notes = []
        if torch is None:
            notes.append("PyTorch is not installed: its columns are skipped, and nothing is checked.")
        if ort is None:
            notes.append("ONNX Runtime is not installed: its columns are skipped.")
        elif torch is None:
            notes.append("ONNX Runtime is skipped too: its models are exported from PyTorch.")
            ort = None
        elif optional_import("onnx") is None:
            notes.append("ONNX Runtime is skipped: the onnx package (needed to export) is not installed.")
            ort = None
        return cls(torch, ort, notes)


def set_threads(peers: Peers, n: int) -> None:
    if rnnkit.get_num_threads() != n:
        rnnkit.set_num_threads(n)
    if peers.torch is not None and peers.torch.get_num_threads() != n:
        peers.torch.set_num_threads(n)


def first(state: Any) -> Any:
    """h of an LSTM's (h, c), or the state itself."""
    return state[0] if isinstance(state, tuple) else state


def make_torch_module(torch: ModuleType, case: Case) -> Any:
    torch.manual_seed(SEED)
    if case.streaming:
        cls = getattr(torch.nn, f"{TORCH_NAMES[case.cell]}Cell")
        return cls(case.input, case.hidden)
    return getattr(torch.nn, TORCH_NAMES[case.cell])(case.input, case.hidden, batch_first=True)


def make_rnnkit_layer(case: Case, torch_module: Any | None) -> Any:
    """An rnnkit layer, with the PyTorch module's weights when there is one."""
    layer = RNNKIT_CLASSES[case.cell](case.input, case.hidden, batch_first=True, dtype=np.float32, seed=SEED)
    if torch_module is not None:
        # A *Cell's parameters are named like layer 0 of the sequence module.
        suffix = "_l0" if case.streaming else ""
        layer.load_state_dict({k + suffix: v.detach().numpy() for k, v in torch_module.state_dict().items()})
    return layer


def stream_runner(step: Callable[[Any, Any], tuple[Any, Any]], state0: Any, xs: Sequence[Any]) -> Runner:
    """One Python call per time step, as a streaming application makes them."""

    def run() -> Outputs:
        y, state = None, state0
        for x_t in xs:
            y, state = step(x_t, state)
        return {"y_last": np.asarray(y)}

    return run


def rnnkit_runner(case: Case, layer: Any, x: Array, lengths: Array | None) -> Runner:
    if case.streaming:
        xs = [np.ascontiguousarray(x[:, t]) for t in range(case.seq)]
        return stream_runner(layer.step, layer.initial_state(case.batch), xs)
    if case.mode == "training":
        layer.train()

        def train() -> Outputs:
            layer.zero_grad()
            y, _ = layer(x, lengths=lengths)
            dx, _ = layer.backward(np.ones_like(y))
            return {"y": y, "dx": dx} | {f"grad.{k}": g for k, g in layer.grads.items()}

        return train
    layer.eval()

    def infer() -> Outputs:
        y, state = layer(x, lengths=lengths)
        return {"y": y, "h": first(state)}

    return infer


def torch_runner(torch: ModuleType, case: Case, module: Any, x: Array, lengths: Array | None) -> Runner:
    if case.streaming:
        module.eval()
        xs = [torch.from_numpy(np.ascontiguousarray(x[:, t])) for t in range(case.seq)]
        zero = torch.zeros(case.batch, case.hidden)
        if case.cell == "lstm":
            loop = stream_runner(lambda x_t, s: ((h := module(x_t, s))[0], h), (zero, zero.clone()), xs)
        else:
            loop = stream_runner(lambda x_t, s: ((h := module(x_t, s)), h), zero, xs)

        def stream() -> Outputs:
            with torch.no_grad():
                return loop()

        return stream
    xt = torch.from_numpy(x)
    rnn_utils = torch.nn.utils.rnn
    lens = None if lengths is None else torch.from_numpy(lengths.astype(np.int64))

    def forward(inp: Any) -> tuple[Any, Any]:
        if lens is None:
            y, state = module(inp)
            return y, first(state)
        packed = rnn_utils.pack_padded_sequence(inp, lens, batch_first=True, enforce_sorted=False)
        y_packed, state = module(packed)
        y, _ = rnn_utils.pad_packed_sequence(y_packed, batch_first=True, total_length=case.seq)
        return y, first(state)

    if case.mode == "training":
        module.train()
        xt.requires_grad_(True)  # rnnkit's backward always returns dx: make torch compute it too

        def train() -> Outputs:
            module.zero_grad()
            xt.grad = None
            y, _ = forward(xt)
            y.sum().backward()
            grads = {f"grad.{k}": p.grad.numpy() for k, p in module.named_parameters()}
            return {"y": y.detach().numpy(), "dx": xt.grad.numpy()} | grads

        return train
    module.eval()

    def infer() -> Outputs:
        with torch.no_grad():
            y, h = forward(xt)
        return {"y": y.numpy(), "h": h.numpy()}

    return infer


def export_onnx(torch: ModuleType, case: Case, module: Any, path: Path) -> None:
    """Export the PyTorch module with fixed shapes: inputs x (and h, c for a cell)."""

    class Sequence_(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, x: Any) -> tuple[Any, Any]:
            y, state = self.m(x)
            return y, first(state)

    class LSTMCell_(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, x: Any, h: Any, c: Any) -> tuple[Any, Any]:
            out: tuple[Any, Any] = self.m(x, (h, c))
            return out

    module.eval()
    zero = torch.zeros(case.batch, case.hidden)
    x = torch.zeros(case.batch, case.seq, case.input)
    args: tuple[Any, ...]
    if not case.streaming:
        wrapper, args, names, outs = Sequence_(), (x,), ["x"], ["y", "h"]
    elif case.cell == "lstm":
        wrapper, args, names, outs = LSTMCell_(), (x[:, 0], zero, zero), ["x", "h", "c"], ["h_out", "c_out"]
    else:
        wrapper, args, names, outs = module, (x[:, 0], zero), ["x", "h"], ["h_out"]
    # The TorchScript exporter emits ONNX's own RNN/LSTM/GRU operators (ORT's fused kernels), where
    # the dynamo exporter unrolls some of them; use it while this torch still has it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=outs, dynamo=False)
        except Exception:  # this torch has no TorchScript exporter: use the default one
            with contextlib.redirect_stdout(sys.stderr):
                torch.onnx.export(
                    wrapper, args, str(path), input_names=names, output_names=outs, external_data=False
                )


def ort_runner(ort: ModuleType, case: Case, path: Path, x: Array) -> Runner:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = case.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    if not case.streaming:

        def infer() -> Outputs:
            y, h = sess.run(None, {"x": x})
            return {"y": y, "h": h}

        return infer
    xs = [np.ascontiguousarray(x[:, t]) for t in range(case.seq)]
    zero = np.zeros((case.batch, case.hidden), dtype=np.float32)
    if case.cell == "lstm":

        def step(x_t: Array, s: tuple[Array, Array]) -> tuple[Array, tuple[Array, Array]]:
            h, c = sess.run(None, {"x": x_t, "h": s[0], "c": s[1]})
            return h, (h, c)

        return stream_runner(step, (zero, zero), xs)
    return stream_runner(lambda x_t, s: ((h := sess.run(None, {"x": x_t, "h": s})[0]), h), zero, xs)


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """Every figure of one case."""

    case: Case
    flops: float  # per call, or per step when streaming
    times: dict[str, Stats] = field(default_factory=dict)  # side -> stats
    errors: dict[str, float] = field(default_factory=dict)  # side -> worst disagreement with torch
    notes: list[str] = field(default_factory=list)
    other_cores: float = 0.0  # cores other processes kept busy while this row was timed

    def gflops(self, side: str = "rnnkit") -> float | None:
        s = self.times.get(side)
        return None if s is None else self.flops / s.median / 1e9

    def ratio(self, side: str) -> float | None:
        """How many times longer `side` takes than rnnkit (> 1: rnnkit is faster)."""
        ours, theirs = self.times.get("rnnkit"), self.times.get(side)
        return None if ours is None or theirs is None else theirs.median / ours.median

    def thread_speedup(self, side: str) -> float | None:
        """How many times faster `side` ran at `case.also` threads than at `case.threads`, both
        timed in turns in this row's measurement."""
        one = self.times.get(side)
        many = self.times.get(at_threads(side, self.case.also)) if self.case.also else None
        return None if one is None or many is None else one.median / many.median

    def to_json(self, peak: float | None) -> dict[str, Any]:
        gf = self.gflops()
        return {
            "label": self.case.label,
            **asdict(self.case),
            "flops": self.flops,
            "per": "step" if self.case.streaming else "call",
            "times": {k: asdict(v) for k, v in self.times.items()},
            "rnnkit_gflops": gf,
            "rnnkit_pct_of_peak": None if gf is None or not peak else 100.0 * gf / peak,
            "ratio_torch": self.ratio("torch"),
            "ratio_ort": self.ratio("ort"),
            "thread_speedup": {side: self.thread_speedup(side) for side in SIDES} if self.case.also else None,
            "max_rel_error_vs_torch": self.errors,
            "other_processes_cores_busy": self.other_cores,
            "notes": self.notes,
        }


def disagreement(ours: Outputs, ref: Outputs) -> tuple[float, str]:
    """The worst max|a - b| / max(1, max|b|) over the outputs both sides have, and where."""
    worst, where = 0.0, ""
    for key in ours.keys() & ref.keys():
        a, b = np.asarray(ours[key], dtype=np.float64), np.asarray(ref[key], dtype=np.float64)
        if a.shape != b.shape:
            return math.inf, f"{key} shape {a.shape} vs {b.shape}"
        err = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
        if err > worst:
            worst, where = err, key
    return worst, where


def case_inputs(case: Case) -> tuple[Array, Array | None]:
    """x (batch, seq, input), and the lengths (uniform in 1..seq) of a variable-length case."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((case.batch, case.seq, case.input), dtype=np.float32)
    lengths = rng.integers(1, case.seq + 1, size=case.batch) if case.var_lengths else None
    return x, lengths


def prepare(
    case: Case, x: Array, lengths: Array | None, peers: Peers, workdir: Path, notes: list[str]
) -> dict[str, Runner]:
    """The runner of every side that can run this case (missing ones explained in `notes`)."""
    torch, ort = peers.torch, peers.ort
    module = None if torch is None else make_torch_module(torch, case)
    runners: dict[str, Runner] = {}
    layer = make_rnnkit_layer(case, module)
    if case.streaming and not hasattr(layer, "step"):
        notes.append("rnnkit has no layer.step yet: skipped")
    else:
        runners["rnnkit"] = rnnkit_runner(case, layer, x, lengths)
    if torch is not None:
        runners["torch"] = torch_runner(torch, case, module, x, lengths)
    if ort is not None and torch is not None:
        if case.mode == "training":
            notes.append("ORT: inference only")
        elif case.var_lengths:
            notes.append("ORT: the fixed-shape export takes no lengths")
        else:
            path = workdir / "model.onnx"
            try:
                export_onnx(torch, case, module, path)
                runners["ort"] = ort_runner(ort, case, path, x)
            except Exception as e:  # a peer that cannot run is skipped, and the note says why
                notes.append(f"ORT skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return runners


def at_threads(side: str, threads: int) -> str:
    """The key of `side` timed at `threads` in a thread-scaling case (see `Case.also`)."""
    return f"{side}@{threads}t"


def run_case(case: Case, peers: Peers, timing: Timing, workdir: Path) -> Row:
    notes: list[str] = []
    x, lengths = case_inputs(case)
    set_threads(peers, case.threads)
    runners = prepare(case, x, lengths, peers, workdir, notes)
    threads = dict.fromkeys(runners, case.threads)
    if case.also:
        set_threads(peers, case.also)
        more_notes: list[str] = []
        more = prepare(replace(case, threads=case.also, also=0), x, lengths, peers, workdir, more_notes)
        notes += [f"at {case.also} threads: {n}" for n in more_notes if n not in notes]
        runners |= {at_threads(side, case.also): run for side, run in more.items()}
        threads |= {at_threads(side, case.also): case.also for side in more}

    def before(side: str) -> None:
        set_threads(peers, threads[side])

    # The (sequence, time) pairs one call computes; streaming rows are per step.
    steps = case.batch if case.streaming else case.batch * case.seq
    if lengths is not None:
        steps = int(lengths.sum())
    row = Row(case, case.flops(steps), notes=notes)

    outputs = {}
    for side, run in runners.items():
        before(side)
        outputs[side] = run()
    ref = outputs.get("torch")
    for side in list(runners):
        if ref is None or side == "torch":
            continue
        err, where = disagreement(outputs[side], ref)
        row.errors[side] = err
        if not err <= TOLERANCE[case.mode]:
            row.notes.append(f"{side} disagrees with torch ({where}: {err:.2e}): not timed")
            del runners[side]

    per = 1.0 / case.seq if case.streaming else 1.0
    with other_load() as load:
        row.times = {side: stats.scaled(per) for side, stats in measure(runners, timing, before).items()}
    row.other_cores = load[0]
    if row.other_cores > BUSY:
        row.notes.append(f"machine busy: other processes used {row.other_cores:.1f} cores")
    return row


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.2f} ms" if s < 1.0 else f"{s:.3f} s"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def fmt_stats(s: Stats | None) -> str:
    return "—" if s is None else f"{fmt_time(s.median)} ({fmt_time(s.min)})"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def twin(rows: Sequence[Row], case: Case, **changes: Any) -> Row | None:
    """The row of `case` with `changes` made (e.g. the full-length twin of a var-len case)."""
    want = replace(case, **changes)
    return next((r for r in rows if r.case == want), None)


def speedup(slow: Row, fast: Row, side: str) -> str:
    """How many times faster `fast` runs than `slow` on one side."""
    a, b = slow.times.get(side), fast.times.get(side)
    return fmt_ratio(None if a is None or b is None else a.median / b.median)


QUICK_WARNING = "Quick smoke run (small T, one repeat): not a measurement. "
SECTION_TITLES = {
    "grid": "Grid",
    "lengths": "Variable lengths (uniform in 1..T; GFLOP/s of the steps computed)",
    "stream": "Streaming (one Python call per step; times per step)",
    "threads": "One thread",
}


def markdown(result: dict[str, Any], rows: Sequence[Row], peaks: dict[int, dict[str, Any]]) -> str:
    m = result["machine"]
    threads = result["settings"]["threads"]
    lines = [
        "# rnnkit against PyTorch and ONNX Runtime",
        "",
        f"Machine: {m['cpu']}, {m['cores_available']} cores available ({', '.join(m['cpu_flags'])}); "
        f"rnnkit {m['versions']['rnnkit']} (SIMD {m['rnnkit_simd']}), numpy {m['versions']['numpy']}, "
        f"torch {m['versions']['torch'] or 'not installed'}, "
        f"onnxruntime {m['versions']['onnxruntime'] or 'not installed'}, Python {m['python']}.",
        f"Threads: {threads} on every side unless the config says otherwise. "
        f"{QUICK_WARNING if result['settings']['quick'] else ''}"
        "Times: median (min) of the repeats; ratios: peer median / rnnkit median (> 1: rnnkit faster). "
        f"Run took {result['seconds']:.0f} s; load average (1 min) {m['load_average_at_start'][0]:.2f} "
        f"at start, {m['load_average_at_end'][0]:.2f} at end; other processes kept "
        f"{m['other_processes_cores_busy']:.2f} cores busy on average.",
        "",
    ]
    for t, p in sorted(peaks.items()):
        kernel = peak_kernel(p)
        lines.append(
            f"Practical peak, {t} thread(s): numpy float32 matmul n={p['n']}: "
            f"{p['gflops_median']:.1f} GFLOP/s median, {p['gflops_max']:.1f} best (kernel: {kernel}); "
            f"the higher of two measurements, {p['at_start']:.1f} at the start of the run and "
            f"{p['at_end']:.1f} at its end."
        )
    lines += [f"- {n}" for n in result["notes"]]
    headers = ["config", "rnnkit", "GFLOP/s", "% of peak", "torch", "torch/rnnkit", "ORT", "ORT/rnnkit"]
    headers.append("notes")
    for section, title in SECTION_TITLES.items():
        body = []
        for r in rows:
            if r.case.section != section:
                continue
            gf = r.gflops()
            peak = peaks.get(r.case.threads, {}).get("gflops_median")
            body.append(
                [
                    r.case.label,
                    fmt_stats(r.times.get("rnnkit")),
                    "—" if gf is None else f"{gf:.1f}",
                    "—" if gf is None or not peak else f"{100 * gf / peak:.1f}%",
                    fmt_stats(r.times.get("torch")),
                    fmt_ratio(r.ratio("torch")),
                    fmt_stats(r.times.get("ort")),
                    fmt_ratio(r.ratio("ort")),
                    "; ".join(r.notes),
                ]
            )
        if body:
            lines += ["", f"## {title}", "", *md_table(headers, body)]
    lengths = [
        [r.case.label, speedup(g, r, "rnnkit"), speedup(g, r, "torch")]
        for r in rows
        if r.case.var_lengths and (g := twin(rows, r.case, section="grid")) is not None
    ]
    if lengths:
        lines += ["", "Full length time / variable-length time (higher: more of the padding skipped):", ""]
        lines += md_table(["config", "rnnkit", "torch (packed)"], lengths)
    scaling = [
        [r.case.label, *(fmt_ratio(r.thread_speedup(side)) for side in SIDES)] for r in rows if r.case.also
    ]
    if scaling:
        title = f"Speed-up of {threads} threads over 1 (each side timed at both thread counts, in turns):"
        lines += ["", title, ""]
        lines += md_table(["config", "rnnkit", "torch", "ORT"], scaling)
    idle = [
        [r.case.label, *(fmt_time(st.after_idle) if (st := r.times.get(side)) else "—" for side in SIDES)]
        for r in rows
        if r.case.section == "grid"
    ]
    if idle:
        title = (
            f"First call after at least {SETTLE * 1e3:.0f} ms idle, no thread of any side spinning "
            "(median of the repeats; not in the timings):"
        )
        lines += ["", title, ""]
        lines += md_table(["config", "rnnkit", "torch", "ORT"], idle)
    return "\n".join(lines) + "\n"


def chart(rows: Sequence[Row], path: Path, title: str) -> str | None:
    """A bar chart of the peer/rnnkit ratios; returns why not, if it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart."
    shown = [r for r in rows if r.ratio("torch") is not None or r.ratio("ort") is not None]
    if not shown:
        return "no peer was timed: no chart."
    pos = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.32 * len(shown)))
    for k, (side, name) in enumerate((("torch", "PyTorch"), ("ort", "ONNX Runtime"))):
        values = [r.ratio(side) or 0.0 for r in shown]
        ax.barh(pos + (k - 0.5) * 0.4, values, height=0.4, label=f"{name} time / rnnkit time")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(pos, [r.case.label for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of rnnkit (> 1: rnnkit faster; log scale)")
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small T, one repeat (not a measurement)")
    ap.add_argument("--threads", type=int, default=available_cores(), help="threads (default: all cores)")
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated subset of rnn,lstm,gru")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    args = ap.parse_args(argv)
    args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not args.cells or any(c not in CELLS for c in args.cells):
        ap.error(f"--cells takes a comma-separated subset of {','.join(CELLS)}")
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    return args


def run_all(cases: Sequence[Case], peers: Peers, timing: Timing) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rnnkit-bench-") as tmp:
        for i, case in enumerate(cases, 1):
            row = run_case(case, peers, timing, Path(tmp))
            rows.append(row)
            cols = "  ".join(f"{side} {fmt_time(st.median)}" for side, st in row.times.items())
            extra = f"  [{'; '.join(row.notes)}]" if row.notes else ""
            print(f"[{i}/{len(cases)}] {case.label}: {cols}{extra}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    timing = QUICK if args.quick else FULL
    peers = Peers.load()
    cases = build_cases(args.cells, args.threads, timing.seq_len)
    info = machine()
    simd = info["rnnkit_simd"]
    cores = info["cores_available"]
    print(f"{info['cpu']}, {cores} cores, rnnkit SIMD {simd}, {args.threads} threads", flush=True)
    for n in peers.notes:
        print(f"note: {n}")

    def peaks_now(when: str) -> dict[int, dict[str, Any]]:
        peaks = {t: measure_peak(t, timing.peak_repeats) for t in sorted({c.threads for c in cases})}
        for t, p in peaks.items():
            gf, kernel = p["gflops_median"], peak_kernel(p)
            print(f"peak {t}t {when}: {gf:.1f} GFLOP/s (numpy n={p['n']}, kernel {kernel})", flush=True)
        return peaks

    with other_load() as whole_run:
        at_start = peaks_now("at start")
        rows = run_all(cases, peers, timing)
        at_end = peaks_now("at end")
    peaks = {t: practical_peak(at_start[t], at_end[t]) for t in at_start}
    info["load_average_at_end"] = os.getloadavg()
    # Cores kept busy by other processes during the run, on average: noise in every figure.
    info["other_processes_cores_busy"] = whole_run[0]

    notes = list(peers.notes)
    for t, p in sorted(peaks.items()):
        if max(p["at_start"], p["at_end"]) > PEAK_DRIFT * min(p["at_start"], p["at_end"]):
            notes.append(
                f"The {t}-thread peak moved during this run ({p['at_start']:.1f} GFLOP/s at its start, "
                f"{p['at_end']:.1f} at its end): the machine's speed changed, and every figure with it."
            )
    if whole_run[0] > BUSY:
        notes.append(
            f"Other processes kept {whole_run[0]:.2f} cores busy during this run: its figures are noisy."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"rnnkit {rnnkit.__version__} vs PyTorch and ONNX Runtime: {info['cpu']}, {args.threads} threads"
    why_not = chart(rows, args.out / "results.png", title)
    if why_not:
        notes.append(why_not)
    result: dict[str, Any] = {
        "settings": {
            "quick": args.quick,
            "threads": args.threads,
            "cells": args.cells,
            "timing": asdict(timing),
            "tolerance": TOLERANCE,
            "seed": SEED,
        },
        "machine": info,
        "peak": {str(t): p for t, p in peaks.items()},
        "rows": [r.to_json(peaks[r.case.threads]["gflops_median"]) for r in rows],
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }
    (args.out / "results.md").write_text(markdown(result, rows, peaks))
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}/results.{{json,md{',png' if not why_not else ''}}} in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
