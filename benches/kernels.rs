//! Criterion benches of the Rust kernels alone (no Python): `rnnkit::forward` for inference and
//! `forward` + `backward` for training, LSTM and GRU, at the shapes of the grid in
//! shared/BENCHMARKS.md. Throughput is reported in FLOPs (so "Gelem/s" reads as GFLOP/s), counted
//! as there: forward `2*T*B*G*H*(I+H)`, training 3x that.
//!
//! Run: `cargo bench --no-default-features --bench kernels` (smoke: append `-- --test`). The
//! kernels use all cores unless `RNNKIT_NUM_THREADS` says otherwise.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rnnkit::{backward, forward, CellKind, Dims, Grads, Layer, Layout, Tape, Weights};
use std::hint::black_box;
use std::time::Duration;

/// (batch, seq_len, input, hidden), as in the Python grid.
const SHAPES: [(usize, usize, usize, usize); 3] = [(1, 100, 128, 128), (8, 100, 128, 256), (64, 100, 512, 512)];
const CELLS: [CellKind; 2] = [CellKind::Lstm, CellKind::Gru];

/// Deterministic values in [-scale, scale) (a linear congruential generator: no extra crates).
fn filled(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let unit = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            scale * (2.0 * unit - 1.0)
        })
        .collect()
}

/// One direction's parameters (or gradients), in PyTorch's layout.
struct Params {
    w_ih: Vec<f32>,
    w_hh: Vec<f32>,
    b_ih: Vec<f32>,
    b_hh: Vec<f32>,
}

impl Params {
    fn new(gh: usize, input: usize, hidden: usize, scale: f32) -> Self {
        Params {
            w_ih: filled(gh * input, 1, scale),
            w_hh: filled(gh * hidden, 2, scale),
            b_ih: filled(gh, 3, scale),
            b_hh: filled(gh, 4, scale),
        }
    }
    fn weights(&self) -> [Weights<'_, f32>; 1] {
        [Weights {
            w_ih: &self.w_ih,
            w_hh: &self.w_hh,
            b_ih: &self.b_ih,
            b_hh: &self.b_hh,
        }]
    }
    fn zero(&mut self) {
        for v in [&mut self.w_ih, &mut self.w_hh, &mut self.b_ih, &mut self.b_hh] {
            v.fill(0.0);
        }
    }
}

/// A layer with its input, parameters and every output buffer, allocated once.
struct Problem {
    layer: Layer,
    x: Vec<f32>,
    params: Params,
    grads: Params,
    y: Vec<f32>,
    hn: Vec<f32>,
    cn: Vec<f32>,
    dy: Vec<f32>,
    dx: Vec<f32>,
    dh0: Vec<f32>,
    dc0: Vec<f32>,
}

impl Problem {
    fn new(cell: CellKind, (batch, seq_len, input, hidden): (usize, usize, usize, usize)) -> Self {
        let layer = Layer {
            cell,
            dims: Dims {
                seq_len,
                batch,
                input,
                hidden,
            },
            layout: Layout::BatchFirst,
            directions: 1,
        };
        let gh = cell.gates() * hidden;
        let rows = batch * seq_len;
        let state = batch * hidden;
        let c_state = if cell.has_c() { state } else { 0 };
        Problem {
            layer,
            x: filled(rows * input, 5, 1.0),
            params: Params::new(gh, input, hidden, 1.0 / (hidden as f32).sqrt()),
            grads: Params::new(gh, input, hidden, 0.0),
            y: vec![0.0; rows * hidden],
            hn: vec![0.0; state],
            cn: vec![0.0; c_state],
            dy: vec![1.0; rows * hidden], // the gradient of y.sum()
            dx: vec![0.0; rows * input],
            dh0: vec![0.0; state],
            dc0: vec![0.0; c_state],
        }
    }

    fn id(&self) -> String {
        let d = self.layer.dims;
        format!("B{}_T{}_I{}_H{}", d.batch, d.seq_len, d.input, d.hidden)
    }

    /// FLOPs of one forward, or of one forward + backward with `train`.
    fn flops(&self, train: bool) -> u64 {
        let d = self.layer.dims;
        let fwd = 2 * d.seq_len * d.batch * self.layer.cell.gates() * d.hidden * (d.input + d.hidden);
        (if train { 3 * fwd } else { fwd }) as u64
    }

    fn run_forward(&mut self, train: bool) -> Option<Tape<f32>> {
        let w = self.params.weights();
        forward(
            &self.layer,
            &self.x,
            &w,
            None,
            None,
            None,
            &mut self.y,
            &mut self.hn,
            &mut self.cn,
            train,
            None,
        )
        .expect("forward")
    }

    fn infer(&mut self) {
        let tape = self.run_forward(false);
        black_box((tape, &self.y));
    }

    fn train(&mut self) {
        self.grads.zero();
        let tape = self.run_forward(true).expect("a training forward returns a tape");
        let w = self.params.weights();
        let g = &mut self.grads;
        let mut grads = [Grads {
            w_ih: &mut g.w_ih,
            w_hh: &mut g.w_hh,
            b_ih: &mut g.b_ih,
            b_hh: &mut g.b_hh,
        }];
        backward(
            &tape,
            &w,
            &self.dy,
            None,
            None,
            &mut self.dx,
            &mut self.dh0,
            &mut self.dc0,
            &mut grads,
            None,
        )
        .expect("backward");
        black_box((&self.dx, &self.grads.w_hh));
    }
}

fn bench_mode(c: &mut Criterion, train: bool) {
    let mut group = c.benchmark_group(if train { "train" } else { "inference" });
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for cell in CELLS {
        for shape in SHAPES {
            let mut p = Problem::new(cell, shape);
            group.throughput(Throughput::Elements(p.flops(train)));
            group.bench_function(BenchmarkId::new(cell.name(), p.id()), |b| {
                b.iter(|| if train { p.train() } else { p.infer() })
            });
        }
    }
    group.finish();
}

fn inference(c: &mut Criterion) {
    bench_mode(c, false);
}

fn train(c: &mut Criterion) {
    bench_mode(c, true);
}

criterion_group!(benches, inference, train);
criterion_main!(benches);
