//! Integration tests of the kernels: forward against a naive f64 reference written straight from
//! the cell equations, backward against central finite differences, `sweep::step` against
//! `forward`, bit-identical results across thread counts, and errors for bad arguments.
//!
//! The reference is deliberately plain: scalar loops over one sequence and one time step at a time,
//! no GEMM, no batching, no permutation — so it can be checked by reading it.

// The reference is written as index loops on purpose, to mirror the equations.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use rnnkit::simd::Float;
use rnnkit::sweep::{step, WeightCache};
use rnnkit::{
    backward, forward, set_num_threads, set_small_call_flops, CellKind, Dims, Grads, Layer, Layout, Tape, Weights,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// The kernel thread pool is global: every test that changes its size holds this lock.
static THREADS: Mutex<()> = Mutex::new(());

/// Also sends every call to the pool, however small: these tests' problems are, and the thread
/// tests are there to exercise the pool (a small call runs as with one thread).
fn lock_threads() -> MutexGuard<'static, ()> {
    let guard = THREADS.lock().unwrap_or_else(|e| e.into_inner());
    set_small_call_flops(0);
    guard
}

const CELLS: [CellKind; 4] = [CellKind::RnnTanh, CellKind::RnnRelu, CellKind::Lstm, CellKind::Gru];
const LAYOUTS: [Layout; 2] = [Layout::TimeMajor, Layout::BatchFirst];

/// xorshift64* — small, deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in (-a, a), rounded to an f32 so that f32 runs see exactly the same inputs.
    fn uniform(&mut self, a: f64) -> f64 {
        ((2.0 * self.unit() - 1.0) * a) as f32 as f64
    }
    fn vec(&mut self, n: usize, a: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(a)).collect()
    }
    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One direction's parameters: w_ih (G*H, I), w_hh (G*H, H), b_ih (G*H), b_hh (G*H).
type DirParams<T> = [Vec<T>; 4];
const PARAM_NAMES: [&str; 4] = ["w_ih", "w_hh", "b_ih", "b_hh"];

fn cast<T: Float>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&a| T::from_f64(a)).collect()
}

fn widen<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f64()).collect()
}

fn weights_of<T>(params: &[DirParams<T>]) -> Vec<Weights<'_, T>> {
    params
        .iter()
        .map(|[w_ih, w_hh, b_ih, b_hh]| Weights { w_ih, w_hh, b_ih, b_hh })
        .collect()
}

/// The largest |a - b|; NaN (e.g. an output never written) counts as infinitely far.
fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold(0.0, |m: f64, (&u, &v)| {
        let d = (u - v).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// ||a - b|| / ||b|| (NaN counts as infinitely far; a zero reference needs a zero result).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: Vec<f64> = a.iter().zip(b).map(|(u, v)| u - v).collect();
    let (nd, nb) = (norm(&diff), norm(b));
    if nd.is_nan() {
        f64::INFINITY
    } else if nb == 0.0 {
        nd
    } else {
        nd / nb
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let d = max_diff(got, want);
    assert!(
        d <= tol,
        "{what}: max |diff| = {d:e} > {tol:e}\n got: {got:?}\nwant: {want:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// h0 / c0 not passed (zero).
    Absent,
    /// Passed, all zeros.
    Zero,
    /// Passed, random.
    Random,
}

/// Everything one forward call takes, in f64 (every value exactly representable in f32).
#[derive(Clone, Debug)]
struct Problem {
    layer: Layer,
    x: Vec<f64>,
    params: Vec<DirParams<f64>>,
    h0: Option<Vec<f64>>,
    c0: Option<Vec<f64>>,
    lengths: Option<Vec<usize>>,
}

impl Problem {
    fn new(
        rng: &mut Rng,
        cell: CellKind,
        dims: Dims,
        layout: Layout,
        directions: usize,
        lengths: Option<Vec<usize>>,
        state: State,
    ) -> Problem {
        let layer = Layer {
            cell,
            dims,
            layout,
            directions,
        };
        let (i, h, gh) = (dims.input, dims.hidden, cell.gates() * dims.hidden);
        let x = rng.vec(dims.seq_len * dims.batch * i, 1.0);
        let params = (0..directions)
            .map(|_| {
                [
                    rng.vec(gh * i, 0.6),
                    rng.vec(gh * h, 0.6),
                    rng.vec(gh, 0.5),
                    rng.vec(gh, 0.5),
                ]
            })
            .collect();
        let n = directions * dims.batch * h;
        let mut make_state = |a: f64| match state {
            State::Absent => None,
            State::Zero => Some(vec![0.0; n]),
            State::Random => Some(rng.vec(n, a)),
        };
        let h0 = make_state(0.8);
        let c0 = if cell.has_c() { make_state(1.0) } else { None };
        if let Some(l) = &lengths {
            assert_eq!(l.len(), dims.batch);
        }
        Problem {
            layer,
            x,
            params,
            h0,
            c0,
            lengths,
        }
    }

    fn dims(&self) -> Dims {
        self.layer.dims
    }
    fn y_len(&self) -> usize {
        let d = self.dims();
        d.seq_len * d.batch * self.layer.directions * d.hidden
    }
    fn state_len(&self) -> usize {
        self.layer.directions * self.dims().batch * self.dims().hidden
    }
    fn c_len(&self) -> usize {
        if self.layer.cell.has_c() {
            self.state_len()
        } else {
            0
        }
    }
    fn describe(&self) -> String {
        let d = self.dims();
        format!(
            "{:?} dirs={} {:?} T={} B={} I={} H={} lengths={:?} h0={} c0={}",
            self.layer.cell,
            self.layer.directions,
            self.layer.layout,
            d.seq_len,
            d.batch,
            d.input,
            d.hidden,
            self.lengths,
            self.h0.is_some(),
            self.c0.is_some()
        )
    }
}

fn dims(seq_len: usize, batch: usize, input: usize, hidden: usize) -> Dims {
    Dims {
        seq_len,
        batch,
        input,
        hidden,
    }
}

/// Random lengths in 1..=T, with 1 and T both present (batch >= 2), in no particular order.
fn mixed_lengths(rng: &mut Rng, batch: usize, seq_len: usize) -> Vec<usize> {
    let mut l: Vec<usize> = (0..batch).map(|_| 1 + rng.below(seq_len)).collect();
    if batch >= 2 {
        l[batch / 3] = 1;
        l[(2 * batch) / 3] = seq_len;
    }
    l
}

// ---------------------------------------------------------------------------------------------
// The naive f64 reference
// ---------------------------------------------------------------------------------------------

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Row of (t, b) in the layout's order.
fn row(layout: Layout, d: Dims, t: usize, b: usize) -> usize {
    match layout {
        Layout::TimeMajor => t * d.batch + b,
        Layout::BatchFirst => b * d.seq_len + t,
    }
}

/// One step of one sequence: returns (h', c') (c' empty unless LSTM).
fn ref_cell(cell: CellKind, w: &DirParams<f64>, x: &[f64], h: &[f64], c: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (ni, nh) = (x.len(), h.len());
    let gh = cell.gates() * nh;
    // a = W_ih x + b_ih, r = W_hh h + b_hh, per gate row k.
    let mut a = vec![0.0; gh];
    let mut r = vec![0.0; gh];
    for k in 0..gh {
        a[k] = w[2][k];
        for j in 0..ni {
            a[k] += w[0][k * ni + j] * x[j];
        }
        r[k] = w[3][k];
        for j in 0..nh {
            r[k] += w[1][k * nh + j] * h[j];
        }
    }
    let mut h_new = vec![0.0; nh];
    let mut c_new = Vec::new();
    match cell {
        CellKind::RnnTanh => {
            for j in 0..nh {
                h_new[j] = (a[j] + r[j]).tanh();
            }
        }
        CellKind::RnnRelu => {
            for j in 0..nh {
                h_new[j] = (a[j] + r[j]).max(0.0);
            }
        }
        CellKind::Lstm => {
            c_new = vec![0.0; nh];
            for j in 0..nh {
                let i = sigmoid(a[j] + r[j]);
                let f = sigmoid(a[nh + j] + r[nh + j]);
                let g = (a[2 * nh + j] + r[2 * nh + j]).tanh();
                let o = sigmoid(a[3 * nh + j] + r[3 * nh + j]);
                c_new[j] = f * c[j] + i * g;
                h_new[j] = o * c_new[j].tanh();
            }
        }
        CellKind::Gru => {
            for j in 0..nh {
                let rg = sigmoid(a[j] + r[j]);
                let z = sigmoid(a[nh + j] + r[nh + j]);
                let n = (a[2 * nh + j] + rg * r[2 * nh + j]).tanh();
                h_new[j] = (1.0 - z) * n + z * h[j];
            }
        }
    }
    (h_new, c_new)
}

/// The whole layer, one sequence and one direction at a time: (y, hn, cn).
fn reference(p: &Problem) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = p.dims();
    let (cell, nd, nh, ni) = (p.layer.cell, p.layer.directions, d.hidden, d.input);
    let ydim = nd * nh;
    let mut y = vec![0.0; p.y_len()];
    let mut hn = vec![0.0; p.state_len()];
    let mut cn = vec![0.0; p.c_len()];
    for dir in 0..nd {
        for b in 0..d.batch {
            let len = p.lengths.as_ref().map_or(d.seq_len, |l| l[b]);
            let at = (dir * d.batch + b) * nh;
            let mut h = p.h0.as_ref().map_or(vec![0.0; nh], |s| s[at..at + nh].to_vec());
            let mut c = if cell.has_c() {
                p.c0.as_ref().map_or(vec![0.0; nh], |s| s[at..at + nh].to_vec())
            } else {
                Vec::new()
            };
            for s in 0..len {
                let t = if dir == 0 { s } else { len - 1 - s };
                let r = row(p.layer.layout, d, t, b);
                let (h2, c2) = ref_cell(cell, &p.params[dir], &p.x[r * ni..(r + 1) * ni], &h, &c);
                h = h2;
                c = c2;
                y[r * ydim + dir * nh..r * ydim + (dir + 1) * nh].copy_from_slice(&h);
            }
            hn[at..at + nh].copy_from_slice(&h);
            if cell.has_c() {
                cn[at..at + nh].copy_from_slice(&c);
            }
        }
    }
    (y, hn, cn)
}

// ---------------------------------------------------------------------------------------------
// Calling the library
// ---------------------------------------------------------------------------------------------

struct FwdOut<T: Float> {
    y: Vec<T>,
    hn: Vec<T>,
    cn: Vec<T>,
    tape: Option<Tape<T>>,
}

/// The library's forward on `p` in precision T; outputs start as NaN so that anything left
/// unwritten shows.
fn run_forward<T: Float>(p: &Problem, train: bool) -> FwdOut<T> {
    run_forward_cached(p, train, None)
}

/// [`run_forward`] with a weight cache.
fn run_forward_cached<T: Float>(p: &Problem, train: bool, cache: Option<&mut WeightCache<T>>) -> FwdOut<T> {
    let x = cast::<T>(&p.x);
    let params: Vec<DirParams<T>> = p.params.iter().map(|w| w.each_ref().map(|v| cast(v))).collect();
    let h0 = p.h0.as_deref().map(cast::<T>);
    let c0 = p.c0.as_deref().map(cast::<T>);
    let nan = T::from_f64(f64::NAN);
    let mut y = vec![nan; p.y_len()];
    let mut hn = vec![nan; p.state_len()];
    let mut cn = vec![nan; p.c_len()];
    let tape = forward(
        &p.layer,
        &x,
        &weights_of(&params),
        h0.as_deref(),
        c0.as_deref(),
        p.lengths.as_deref(),
        &mut y,
        &mut hn,
        &mut cn,
        train,
        cache,
    )
    .unwrap_or_else(|e| panic!("forward failed on {}: {e}", p.describe()));
    assert_eq!(tape.is_some(), train, "tape iff train");
    FwdOut { y, hn, cn, tape }
}

struct BwdOut<T> {
    dx: Vec<T>,
    dh0: Vec<T>,
    dc0: Vec<T>,
    /// The gradient buffers after backward (they started at `grad_init`).
    grads: Vec<DirParams<T>>,
}

fn run_backward<T: Float>(
    p: &Problem,
    tape: Tape<T>,
    dy: &[f64],
    dhn: Option<&[f64]>,
    dcn: Option<&[f64]>,
    grad_init: &[DirParams<f64>],
) -> BwdOut<T> {
    let params: Vec<DirParams<T>> = p.params.iter().map(|w| w.each_ref().map(|v| cast(v))).collect();
    let dy = cast::<T>(dy);
    let dhn = dhn.map(cast::<T>);
    let dcn = dcn.map(cast::<T>);
    let nan = T::from_f64(f64::NAN);
    let mut dx = vec![nan; p.x.len()];
    let mut dh0 = vec![nan; p.state_len()];
    let mut dc0 = vec![nan; p.c_len()];
    let mut gbuf: Vec<DirParams<T>> = grad_init.iter().map(|g| g.each_ref().map(|v| cast(v))).collect();
    let mut grads: Vec<Grads<'_, T>> = gbuf
        .iter_mut()
        .map(|[w_ih, w_hh, b_ih, b_hh]| Grads { w_ih, w_hh, b_ih, b_hh })
        .collect();
    backward(
        &tape,
        &weights_of(&params),
        &dy,
        dhn.as_deref(),
        dcn.as_deref(),
        &mut dx,
        &mut dh0,
        &mut dc0,
        &mut grads,
        None,
    )
    .unwrap_or_else(|e| panic!("backward failed on {}: {e}", p.describe()));
    drop(grads);
    BwdOut {
        dx,
        dh0,
        dc0,
        grads: gbuf,
    }
}

/// Forward of `p` in f64 and f32 (inference and training) against the reference.
fn check_forward(p: &Problem) {
    let (y, hn, cn) = reference(p);
    for train in [false, true] {
        let o = run_forward::<f64>(p, train);
        let what = |name: &str| format!("f64 {name} (train={train}) of {}", p.describe());
        assert_close(&what("y"), &widen(&o.y), &y, 1e-12);
        assert_close(&what("hn"), &widen(&o.hn), &hn, 1e-12);
        assert_close(&what("cn"), &widen(&o.cn), &cn, 1e-12);
        let o = run_forward::<f32>(p, train);
        let what = |name: &str| format!("f32 {name} (train={train}) of {}", p.describe());
        assert_close(&what("y"), &widen(&o.y), &y, 1e-5);
        assert_close(&what("hn"), &widen(&o.hn), &hn, 1e-5);
        assert_close(&what("cn"), &widen(&o.cn), &cn, 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// 1-2. Forward against the reference
// ---------------------------------------------------------------------------------------------

#[test]
fn reference_sanity() {
    // The reference itself, on values worked out by hand: H = I = 1, all weights 0.5, x = 1.
    let w: DirParams<f64> = [vec![0.5], vec![0.5], vec![0.5], vec![0.5]];
    let (h, _) = ref_cell(CellKind::RnnTanh, &w, &[1.0], &[0.2], &[]);
    assert!((h[0] - (0.5f64 + 0.5 + 0.1 + 0.5).tanh()).abs() < 1e-15);
    let (h, _) = ref_cell(
        CellKind::RnnRelu,
        &[vec![-1.0], vec![0.0], vec![0.0], vec![0.0]],
        &[1.0],
        &[0.0],
        &[],
    );
    assert_eq!(h[0], 0.0);
    let w4: DirParams<f64> = [vec![0.5; 4], vec![0.5; 4], vec![0.5; 4], vec![0.5; 4]];
    let (h, c) = ref_cell(CellKind::Lstm, &w4, &[1.0], &[0.2], &[0.3]);
    let s = sigmoid(1.6);
    let g = 1.6f64.tanh();
    assert!((c[0] - (s * 0.3 + s * g)).abs() < 1e-15);
    assert!((h[0] - s * c[0].tanh()).abs() < 1e-15);
    let w3: DirParams<f64> = [vec![0.5; 3], vec![0.5; 3], vec![0.5; 3], vec![0.5; 3]];
    let (h, _) = ref_cell(CellKind::Gru, &w3, &[1.0], &[0.2], &[]);
    let n = (1.0 + s * 0.6).tanh();
    assert!((h[0] - ((1.0 - s) * n + s * 0.2)).abs() < 1e-15);
}

#[test]
fn forward_matches_reference_all_configurations() {
    let mut rng = Rng::new(1);
    let (t, b) = (5, 4);
    for cell in CELLS {
        for directions in [1, 2] {
            for layout in LAYOUTS {
                for lengths in [None, Some(vec![3, 5, 1, 4])] {
                    for state in [State::Absent, State::Zero, State::Random] {
                        let p = Problem::new(
                            &mut rng,
                            cell,
                            dims(t, b, 3, 4),
                            layout,
                            directions,
                            lengths.clone(),
                            state,
                        );
                        check_forward(&p);
                    }
                }
            }
        }
    }
}

#[test]
fn forward_batch_one() {
    let mut rng = Rng::new(2);
    let t = 4;
    for cell in CELLS {
        for directions in [1, 2] {
            for layout in LAYOUTS {
                for lengths in [None, Some(vec![t]), Some(vec![1]), Some(vec![3])] {
                    for state in [State::Absent, State::Random] {
                        let p = Problem::new(
                            &mut rng,
                            cell,
                            dims(t, 1, 2, 3),
                            layout,
                            directions,
                            lengths.clone(),
                            state,
                        );
                        check_forward(&p);
                    }
                }
            }
        }
    }
}

#[test]
fn forward_length_one_sequence_and_single_step() {
    // T = 1 (every length is both 1 and T), and hidden size 1.
    let mut rng = Rng::new(3);
    for cell in CELLS {
        for directions in [1, 2] {
            for layout in LAYOUTS {
                let p = Problem::new(
                    &mut rng,
                    cell,
                    dims(1, 3, 2, 1),
                    layout,
                    directions,
                    Some(vec![1; 3]),
                    State::Random,
                );
                check_forward(&p);
            }
        }
    }
}

#[test]
fn forward_batch_130_two_threads() {
    let _guard = lock_threads();
    set_num_threads(2).unwrap();
    let mut rng = Rng::new(4);
    let (t, b) = (6, 130);
    for cell in CELLS {
        for directions in [1, 2] {
            for layout in LAYOUTS {
                for mixed in [false, true] {
                    let lengths = mixed.then(|| mixed_lengths(&mut rng, b, t));
                    let state = if mixed { State::Random } else { State::Absent };
                    let p = Problem::new(&mut rng, cell, dims(t, b, 3, 5), layout, directions, lengths, state);
                    check_forward(&p);
                }
            }
        }
    }
}

/// The bits of an inference forward's outputs.
fn output_bits<T: Float>(o: &FwdOut<T>) -> Vec<u64> {
    o.y.iter()
        .chain(&o.hn)
        .chain(&o.cn)
        .map(|v| v.to_f64().to_bits())
        .collect()
}

/// A forward with a weight cache gives the bits of one without, call after call; the cache is
/// made once, made again when a weight changes in place (and then gives the new weights' result)
/// or the layer changes, and is not used where nothing would be packed (a batch of one or two).
fn check_cache<T: Float>(rng: &mut Rng) {
    let packs = usize::from(rnnkit::gemm::PackedB::<T>::packs(4, true));
    // A cached forward of `p`, checked against an uncached one; its bits.
    let cached = |p: &Problem, cache: &mut WeightCache<T>, what: &str| {
        let got = output_bits(&run_forward_cached::<T>(p, false, Some(cache)));
        assert_eq!(
            got,
            output_bits(&run_forward::<T>(p, false)),
            "{what}: {}",
            p.describe()
        );
        got
    };
    for cell in CELLS {
        for directions in [1, 2] {
            for lengths in [None, Some(vec![3, 5, 1, 4])] {
                let mut p = Problem::new(
                    rng,
                    cell,
                    dims(5, 4, 3, 6),
                    Layout::BatchFirst,
                    directions,
                    lengths,
                    State::Random,
                );
                let mut cache = WeightCache::<T>::default();
                let first = cached(&p, &mut cache, "first call");
                for call in 2..=3 {
                    assert_eq!(cached(&p, &mut cache, "again"), first, "call {call}");
                }
                assert_eq!(cache.builds(), packs, "builds of {}", p.describe());
                p.params[directions - 1][1].iter_mut().for_each(|v| *v *= 0.5); // in place
                assert_ne!(cached(&p, &mut cache, "after a change"), first, "the change shows");
                assert_eq!(cache.builds(), 2 * packs, "builds after the change");
                let q = Problem::new(
                    rng,
                    cell,
                    dims(5, 4, 3, 9),
                    Layout::TimeMajor,
                    directions,
                    None,
                    State::Absent,
                );
                cached(&q, &mut cache, "another layer through the same cache");
                assert_eq!(cache.builds(), 3 * packs, "builds for another layer");
                // Batch one: the products read W_hh as it is, and the cache is left alone.
                let one = Problem::new(
                    rng,
                    cell,
                    dims(5, 1, 3, 9),
                    Layout::BatchFirst,
                    directions,
                    None,
                    State::Random,
                );
                cached(&one, &mut cache, "batch one");
                assert_eq!(cache.builds(), 3 * packs, "batch one makes nothing");
            }
        }
    }
}

#[test]
fn cached_forward_is_the_uncached_forward() {
    let mut rng = Rng::new(5);
    check_cache::<f64>(&mut rng);
    check_cache::<f32>(&mut rng);
}

// ---------------------------------------------------------------------------------------------
// 3. Gradients against central finite differences
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Target {
    X,
    H0,
    C0,
    Param(usize, usize),
}

fn slot(p: &mut Problem, t: Target) -> &mut Vec<f64> {
    match t {
        Target::X => &mut p.x,
        Target::H0 => p.h0.as_mut().expect("h0"),
        Target::C0 => p.c0.as_mut().expect("c0"),
        Target::Param(d, k) => &mut p.params[d][k],
    }
}

/// L = sum(y*wy) + sum(hn*wh) + sum(cn*wc), with the reference forward (wh / wc None: no term).
fn loss(p: &Problem, wy: &[f64], wh: Option<&[f64]>, wc: Option<&[f64]>) -> f64 {
    let (y, hn, cn) = reference(p);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(u, v)| u * v).sum::<f64>();
    dot(&y, wy) + wh.map_or(0.0, |w| dot(&hn, w)) + wc.map_or(0.0, |w| dot(&cn, w))
}

fn finite_difference(p: &Problem, t: Target, wy: &[f64], wh: Option<&[f64]>, wc: Option<&[f64]>) -> Vec<f64> {
    let eps = 1e-6;
    let mut q = p.clone();
    let n = slot(&mut q, t).len();
    (0..n)
        .map(|i| {
            let v = slot(&mut q, t)[i];
            slot(&mut q, t)[i] = v + eps;
            let up = loss(&q, wy, wh, wc);
            slot(&mut q, t)[i] = v - eps;
            let down = loss(&q, wy, wh, wc);
            slot(&mut q, t)[i] = v;
            (up - down) / (2.0 * eps)
        })
        .collect()
}

/// Backward of the library against finite differences of the reference, for x, h0, c0 and every
/// parameter. `with_final`: the loss has the hn / cn terms (else dhn / dcn are None).
fn check_gradients(rng: &mut Rng, p: &Problem, with_final: bool) {
    let cell = p.layer.cell;
    let wy = rng.vec(p.y_len(), 1.0);
    let wh = with_final.then(|| rng.vec(p.state_len(), 1.0));
    let wc = (with_final && cell.has_c()).then(|| rng.vec(p.c_len(), 1.0));
    let grad_init: Vec<DirParams<f64>> = p
        .params
        .iter()
        .map(|w| w.each_ref().map(|v| rng.vec(v.len(), 1.0)))
        .collect();

    let fwd = run_forward::<f64>(p, true);
    let (y, hn, _) = reference(p);
    assert_close(
        &format!("train forward y of {}", p.describe()),
        &widen(&fwd.y),
        &y,
        1e-12,
    );
    assert_close(
        &format!("train forward hn of {}", p.describe()),
        &widen(&fwd.hn),
        &hn,
        1e-12,
    );
    let g = run_backward::<f64>(p, fwd.tape.unwrap(), &wy, wh.as_deref(), wc.as_deref(), &grad_init);

    // Finite differences at the same point; an absent h0 / c0 is a zero one.
    let mut q = p.clone();
    q.h0.get_or_insert_with(|| vec![0.0; p.state_len()]);
    if cell.has_c() {
        q.c0.get_or_insert_with(|| vec![0.0; p.state_len()]);
    }
    let (wh, wc) = (wh.as_deref(), wc.as_deref());
    let mut checks: Vec<(String, Vec<f64>, Vec<f64>)> = vec![
        ("dx".into(), g.dx.clone(), finite_difference(&q, Target::X, &wy, wh, wc)),
        (
            "dh0".into(),
            g.dh0.clone(),
            finite_difference(&q, Target::H0, &wy, wh, wc),
        ),
    ];
    if cell.has_c() {
        checks.push((
            "dc0".into(),
            g.dc0.clone(),
            finite_difference(&q, Target::C0, &wy, wh, wc),
        ));
    } else {
        assert!(g.dc0.is_empty());
    }
    for d in 0..p.layer.directions {
        for k in 0..4 {
            let added: Vec<f64> = g.grads[d][k].iter().zip(&grad_init[d][k]).map(|(a, b)| a - b).collect();
            let fd = finite_difference(&q, Target::Param(d, k), &wy, wh, wc);
            checks.push((format!("d{}[dir {d}]", PARAM_NAMES[k]), added, fd));
        }
    }
    for (name, got, want) in checks {
        let e = rel_err(&got, &want);
        assert!(
            e < 1e-6,
            "{name} of {} (with_final={with_final}): relative error {e:e}\n got: {got:?}\nwant: {want:?}",
            p.describe()
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(5);
    let (t, b, i, h) = (4, 3, 3, 3);
    for cell in CELLS {
        // (directions, layout, lengths, state, with_final)
        let cases = [
            (2, Layout::TimeMajor, Some(vec![4, 1, 3]), State::Random, true),
            (2, Layout::BatchFirst, Some(vec![2, 4, 1]), State::Random, true),
            (1, Layout::BatchFirst, Some(vec![1, 3, 4]), State::Random, true),
            (2, Layout::TimeMajor, None, State::Absent, true),
            (2, Layout::BatchFirst, Some(vec![3, 1, 4]), State::Random, false),
        ];
        for (directions, layout, lengths, state, with_final) in cases {
            let p = Problem::new(&mut rng, cell, dims(t, b, i, h), layout, directions, lengths, state);
            check_gradients(&mut rng, &p, with_final);
        }
    }
}

#[test]
fn backward_dhn_none_equals_zero_dhn() {
    let mut rng = Rng::new(6);
    for cell in CELLS {
        let p = Problem::new(
            &mut rng,
            cell,
            dims(4, 3, 3, 3),
            Layout::TimeMajor,
            2,
            Some(vec![2, 4, 1]),
            State::Random,
        );
        let dy = rng.vec(p.y_len(), 1.0);
        let zeros = vec![0.0; p.state_len()];
        let init: Vec<DirParams<f64>> = p
            .params
            .iter()
            .map(|w| w.each_ref().map(|v| vec![0.0; v.len()]))
            .collect();
        let a = run_backward::<f64>(&p, run_forward::<f64>(&p, true).tape.unwrap(), &dy, None, None, &init);
        let zc = cell.has_c().then_some(&zeros[..]);
        let b = run_backward::<f64>(
            &p,
            run_forward::<f64>(&p, true).tape.unwrap(),
            &dy,
            Some(&zeros),
            zc,
            &init,
        );
        let what = p.describe();
        assert_close(&format!("dx {what}"), &a.dx, &b.dx, 0.0);
        assert_close(&format!("dh0 {what}"), &a.dh0, &b.dh0, 0.0);
        assert_close(&format!("dc0 {what}"), &a.dc0, &b.dc0, 0.0);
        for d in 0..2 {
            for k in 0..4 {
                assert_close(&format!("grad {d} {k} {what}"), &a.grads[d][k], &b.grads[d][k], 0.0);
            }
        }
    }
}

#[test]
fn backward_f32_close_to_f64() {
    // f32 backward against f64 backward (which the finite differences check).
    let mut rng = Rng::new(7);
    for cell in CELLS {
        let p = Problem::new(
            &mut rng,
            cell,
            dims(4, 5, 3, 4),
            Layout::BatchFirst,
            2,
            Some(vec![4, 1, 3, 2, 4]),
            State::Random,
        );
        let dy = rng.vec(p.y_len(), 1.0);
        let dhn = rng.vec(p.state_len(), 1.0);
        let dcn = cell.has_c().then(|| rng.vec(p.c_len(), 1.0));
        let init: Vec<DirParams<f64>> = p
            .params
            .iter()
            .map(|w| w.each_ref().map(|v| vec![0.0; v.len()]))
            .collect();
        let a = run_backward::<f64>(
            &p,
            run_forward::<f64>(&p, true).tape.unwrap(),
            &dy,
            Some(&dhn),
            dcn.as_deref(),
            &init,
        );
        let b = run_backward::<f32>(
            &p,
            run_forward::<f32>(&p, true).tape.unwrap(),
            &dy,
            Some(&dhn),
            dcn.as_deref(),
            &init,
        );
        let what = p.describe();
        assert!(rel_err(&widen(&b.dx), &a.dx) < 1e-5, "dx {what}");
        assert!(rel_err(&widen(&b.dh0), &a.dh0) < 1e-5, "dh0 {what}");
        assert!(rel_err(&widen(&b.dc0), &a.dc0) < 1e-5, "dc0 {what}");
        for d in 0..2 {
            for k in 0..4 {
                let e = rel_err(&widen(&b.grads[d][k]), &a.grads[d][k]);
                assert!(e < 1e-5, "d{} dir {d} {what}: {e:e}", PARAM_NAMES[k]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. sweep::step
// ---------------------------------------------------------------------------------------------

/// `step` for one or more layers, three times in a row (the later calls, in a burst, may share
/// the step between the threads; see `sweep::step`), checking that they agree to the bit;
/// returns (h_out, c_out).
fn run_step<T: Float>(
    cell: CellKind,
    x: &[f64],
    batch: usize,
    hidden: usize,
    layers: &[DirParams<f64>],
    h: Option<&[f64]>,
    c: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>) {
    let x = cast::<T>(x);
    let params: Vec<DirParams<T>> = layers.iter().map(|w| w.each_ref().map(|v| cast(v))).collect();
    let h = h.map(cast::<T>);
    let c = c.map(cast::<T>);
    let n = layers.len() * batch * hidden;
    let nan = T::from_f64(f64::NAN);
    let weights = weights_of(&params);
    let outs: Vec<_> = (0..3)
        .map(|_| {
            let mut h_out = vec![nan; n];
            let mut c_out = vec![nan; if cell.has_c() { n } else { 0 }];
            step(
                cell,
                &x,
                batch,
                hidden,
                &weights,
                h.as_deref(),
                c.as_deref(),
                &mut h_out,
                &mut c_out,
            )
            .unwrap_or_else(|e| panic!("step failed ({cell:?}, batch {batch}): {e}"));
            (widen(&h_out), widen(&c_out))
        })
        .collect();
    let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    for o in &outs[1..] {
        assert!(
            same(&o.0, &outs[0].0) && same(&o.1, &outs[0].1),
            "{cell:?} batch {batch}: repeated steps differ"
        );
    }
    outs.into_iter().next().expect("three steps")
}

#[test]
fn step_equals_one_step_forward() {
    let mut rng = Rng::new(8);
    for cell in CELLS {
        for batch in [1, 3, 12] {
            for state in [State::Absent, State::Zero, State::Random] {
                let p = Problem::new(&mut rng, cell, dims(1, batch, 4, 5), Layout::TimeMajor, 1, None, state);
                let (y, hn, cn) = reference(&p);
                let f = run_forward::<f64>(&p, false);
                let (h, c) = run_step::<f64>(cell, &p.x, batch, 5, &p.params, p.h0.as_deref(), p.c0.as_deref());
                let what = p.describe();
                assert_close(&format!("step h vs forward hn, {what}"), &h, &widen(&f.hn), 1e-12);
                assert_close(&format!("step h vs forward y, {what}"), &h, &widen(&f.y), 1e-12);
                assert_close(&format!("step c vs forward cn, {what}"), &c, &widen(&f.cn), 1e-12);
                assert_close(&format!("step h vs reference, {what}"), &h, &hn, 1e-12);
                assert_close(&format!("step h vs reference y, {what}"), &h, &y, 1e-12);
                assert_close(&format!("step c vs reference, {what}"), &c, &cn, 1e-12);
                let (h, c) = run_step::<f32>(cell, &p.x, batch, 5, &p.params, p.h0.as_deref(), p.c0.as_deref());
                assert_close(&format!("f32 step h vs reference, {what}"), &h, &hn, 1e-5);
                assert_close(&format!("f32 step c vs reference, {what}"), &c, &cn, 1e-5);
            }
        }
    }
}

#[test]
fn steps_equal_sequence_forward() {
    let mut rng = Rng::new(9);
    let (t, b, i, h) = (5, 3, 4, 3);
    for cell in CELLS {
        for state in [State::Absent, State::Random] {
            let p = Problem::new(&mut rng, cell, dims(t, b, i, h), Layout::TimeMajor, 1, None, state);
            let f = run_forward::<f64>(&p, false);
            let (y, hn, cn) = (widen(&f.y), widen(&f.hn), widen(&f.cn));
            let mut hs = p.h0.clone();
            let mut cs = p.c0.clone();
            for s in 0..t {
                let (h2, c2) = run_step::<f64>(
                    cell,
                    &p.x[s * b * i..(s + 1) * b * i],
                    b,
                    h,
                    &p.params,
                    hs.as_deref(),
                    cs.as_deref(),
                );
                assert_close(
                    &format!("step {s} h vs forward y, {}", p.describe()),
                    &h2,
                    &y[s * b * h..(s + 1) * b * h],
                    1e-12,
                );
                hs = Some(h2);
                cs = cell.has_c().then_some(c2);
            }
            assert_close(
                &format!("last step h vs hn, {}", p.describe()),
                hs.as_deref().unwrap(),
                &hn,
                1e-12,
            );
            if cell.has_c() {
                assert_close(
                    &format!("last step c vs cn, {}", p.describe()),
                    cs.as_deref().unwrap(),
                    &cn,
                    1e-12,
                );
            }
        }
    }
}

#[test]
fn steps_of_a_two_layer_stack_equal_two_forwards() {
    let mut rng = Rng::new(10);
    for cell in CELLS {
        two_layer_steps::<f64>(&mut rng, cell, (4, 3, 2, 3), 1e-12);
    }
}

/// Steps whose weights are large enough to be cut into unit blocks that the threads share give
/// the reference's states (in f32 to 1e-3: the ReLU cell's states reach a few hundred), and the
/// same bits on one thread as on two. H=130: blocks of 72 and 58 units. At batch 1-8, the dot
/// kernel's rows, the steps of a burst are cut on two threads and not on one: from 768 KB of
/// weights at batch 1-4 (LSTM and GRU in both types; the RNN's steps stay whole) and from 256 KB
/// at batch 8 (all). At batch 9, from 1 MB, they are always cut: LSTM in both types, GRU in f64.
#[test]
fn steps_in_unit_blocks_on_one_and_two_threads() {
    let _guard = lock_threads();
    for cell in CELLS {
        for b in [1, 2, 3, 8, 9] {
            let run = |threads: usize| {
                set_num_threads(threads).unwrap();
                let dims = (3, b, 120, 130);
                (
                    two_layer_steps::<f64>(&mut Rng::new(13), cell, dims, 1e-12),
                    two_layer_steps::<f32>(&mut Rng::new(13), cell, dims, 1e-3),
                )
            };
            assert!(run(1) == run(2), "{cell:?} batch {b}: 1 and 2 threads differ");
            // A first step, from no state.
            let p = Problem::new(
                &mut Rng::new(14),
                cell,
                dims(1, b, 120, 130),
                Layout::TimeMajor,
                1,
                None,
                State::Absent,
            );
            let (_, hn, cn) = reference(&p);
            for threads in [1, 2] {
                set_num_threads(threads).unwrap();
                let (h, c) = run_step::<f64>(cell, &p.x, b, 130, &p.params, None, None);
                assert_close(
                    &format!("{cell:?} batch {b} first step h, {threads} threads"),
                    &h,
                    &hn,
                    1e-12,
                );
                assert_close(
                    &format!("{cell:?} batch {b} first step c, {threads} threads"),
                    &c,
                    &cn,
                    1e-12,
                );
            }
        }
    }
}

/// `step` over the `t` steps of a two-layer stack of size `(t, b, i, h)`, in `T`, against two
/// reference forwards (layer 1's input is layer 0's output); returns the states after each step.
fn two_layer_steps<T: Float>(
    rng: &mut Rng,
    cell: CellKind,
    (t, b, i, h): (usize, usize, usize, usize),
    tol: f64,
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut states = vec![];
    // Layer 0 reads x (I wide), layer 1 reads layer 0's h (H wide).
    let p0 = Problem::new(rng, cell, dims(t, b, i, h), Layout::TimeMajor, 1, None, State::Random);
    let (y0, hn0, cn0) = reference(&p0);
    let mut p1 = Problem::new(rng, cell, dims(t, b, h, h), Layout::TimeMajor, 1, None, State::Random);
    p1.x = y0.clone();
    let (y1, hn1, cn1) = reference(&p1);
    let layers = vec![p0.params[0].clone(), p1.params[0].clone()];
    let cat = |a: &Option<Vec<f64>>, b: &Option<Vec<f64>>| a.as_ref().map(|a| [a.clone(), b.clone().unwrap()].concat());
    let mut hs = cat(&p0.h0, &p1.h0);
    let mut cs = cat(&p0.c0, &p1.c0);
    let bh = b * h;
    for s in 0..t {
        let (h2, c2) = run_step::<T>(
            cell,
            &p0.x[s * b * i..(s + 1) * b * i],
            b,
            h,
            &layers,
            hs.as_deref(),
            cs.as_deref(),
        );
        assert_close(
            &format!("{cell:?} step {s} layer 0"),
            &h2[..bh],
            &y0[s * bh..(s + 1) * bh],
            tol,
        );
        assert_close(
            &format!("{cell:?} step {s} layer 1"),
            &h2[bh..],
            &y1[s * bh..(s + 1) * bh],
            tol,
        );
        states.push((h2.clone(), c2.clone()));
        hs = Some(h2);
        cs = cell.has_c().then_some(c2);
    }
    assert_close(
        &format!("{cell:?} final h"),
        hs.as_deref().unwrap(),
        &[hn0, hn1].concat(),
        tol,
    );
    if cell.has_c() {
        assert_close(
            &format!("{cell:?} final c"),
            cs.as_deref().unwrap(),
            &[cn0, cn1].concat(),
            tol,
        );
    }
    states
}

#[test]
fn step_without_state_after_a_larger_step() {
    // A step with no state passed must start from zeros, whatever steps ran before on this thread.
    let mut rng = Rng::new(11);
    for cell in CELLS {
        let big = Problem::new(
            &mut rng,
            cell,
            dims(1, 16, 5, 4),
            Layout::TimeMajor,
            1,
            None,
            State::Random,
        );
        run_step::<f64>(cell, &big.x, 16, 4, &big.params, big.h0.as_deref(), big.c0.as_deref());
        run_step::<f32>(cell, &big.x, 16, 4, &big.params, big.h0.as_deref(), big.c0.as_deref());
        let small = Problem::new(
            &mut rng,
            cell,
            dims(1, 1, 5, 4),
            Layout::TimeMajor,
            1,
            None,
            State::Absent,
        );
        let (_, hn, cn) = reference(&small);
        let (h, c) = run_step::<f64>(cell, &small.x, 1, 4, &small.params, None, None);
        assert_close(
            &format!("{cell:?} f64 step h without state after a larger step"),
            &h,
            &hn,
            1e-12,
        );
        assert_close(
            &format!("{cell:?} f64 step c without state after a larger step"),
            &c,
            &cn,
            1e-12,
        );
        let (h, c) = run_step::<f32>(cell, &small.x, 1, 4, &small.params, None, None);
        assert_close(
            &format!("{cell:?} f32 step h without state after a larger step"),
            &h,
            &hn,
            1e-5,
        );
        assert_close(
            &format!("{cell:?} f32 step c without state after a larger step"),
            &c,
            &cn,
            1e-5,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. 1 thread and 2 threads give bit-identical results
// ---------------------------------------------------------------------------------------------

/// Forward (y, hn, cn) and backward (dx, dh0, dc0, grads) outputs as bit patterns.
fn everything<T: Float>(p: &Problem, dy: &[f64], dhn: &[f64], dcn: Option<&[f64]>) -> Vec<(String, Vec<u64>)> {
    let bits = |v: &[T]| v.iter().map(|a| a.to_f64().to_bits()).collect::<Vec<u64>>();
    let f = run_forward::<T>(p, true);
    let mut out = vec![
        ("y".to_string(), bits(&f.y)),
        ("hn".into(), bits(&f.hn)),
        ("cn".into(), bits(&f.cn)),
    ];
    // Inference forward too (a different code path in the cells).
    let fi = run_forward::<T>(p, false);
    out.push(("y (inference)".into(), bits(&fi.y)));
    let init: Vec<DirParams<f64>> = p
        .params
        .iter()
        .map(|w| w.each_ref().map(|v| vec![0.0; v.len()]))
        .collect();
    let g = run_backward::<T>(p, f.tape.unwrap(), dy, Some(dhn), dcn, &init);
    out.push(("dx".into(), bits(&g.dx)));
    out.push(("dh0".into(), bits(&g.dh0)));
    out.push(("dc0".into(), bits(&g.dc0)));
    for (d, gd) in g.grads.iter().enumerate() {
        for k in 0..4 {
            out.push((format!("d{}[dir {d}]", PARAM_NAMES[k]), bits(&gd[k])));
        }
    }
    out
}

#[test]
fn one_and_two_threads_are_bit_identical() {
    let _guard = lock_threads();
    let mut rng = Rng::new(12);
    let t = 5;
    let mut cases = Vec::new();
    for cell in CELLS {
        // (batch, layout, input, hidden): batch 130 is cut into slices that run on the threads;
        // batches 40 and 3 run one loop whose GEMMs use the threads.
        for (batch, layout, input, hidden) in [
            (130, Layout::BatchFirst, 5, 7),
            (40, Layout::BatchFirst, 6, 7),
            (40, Layout::TimeMajor, 6, 7),
            (40, Layout::TimeMajor, 1, 8),
            (3, Layout::TimeMajor, 6, 7),
        ] {
            let lengths = mixed_lengths(&mut rng, batch, t);
            let p = Problem::new(
                &mut rng,
                cell,
                dims(t, batch, input, hidden),
                layout,
                2,
                Some(lengths),
                State::Random,
            );
            let dy = rng.vec(p.y_len(), 1.0);
            let dhn = rng.vec(p.state_len(), 1.0);
            let dcn = cell.has_c().then(|| rng.vec(p.c_len(), 1.0));
            cases.push((p, dy, dhn, dcn));
        }
    }
    let run_all = |threads: usize| {
        set_num_threads(threads).unwrap();
        cases
            .iter()
            .map(|(p, dy, dhn, dcn)| {
                (
                    everything::<f64>(p, dy, dhn, dcn.as_deref()),
                    everything::<f32>(p, dy, dhn, dcn.as_deref()),
                )
            })
            .collect::<Vec<_>>()
    };
    let one = run_all(1);
    let two = run_all(2);
    let mut failures = Vec::new();
    for (((p, ..), a), b) in cases.iter().zip(&one).zip(&two) {
        for (prec, xa, xb) in [("f64", &a.0, &b.0), ("f32", &a.1, &b.1)] {
            for ((name, va), (_, vb)) in xa.iter().zip(xb) {
                if va != vb {
                    let n = va.iter().zip(vb).filter(|(u, v)| u != v).count();
                    failures.push(format!("{prec} {name}: {n} of {} differ — {}", va.len(), p.describe()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "1 vs 2 threads differ:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 6. Bad arguments return Err, not panic
// ---------------------------------------------------------------------------------------------

/// Records a failure when `f` panics or returns Ok.
fn expect_err<R>(failures: &mut Vec<String>, name: &str, f: impl FnOnce() -> rnnkit::Result<R>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(_)) => failures.push(format!("{name}: returned Ok")),
        Ok(Err(_)) => {}
        Err(_) => failures.push(format!("{name}: panicked")),
    }
}

/// Owned arguments of one forward call, to mutate one at a time.
#[derive(Clone)]
struct FwdArgs {
    layer: Layer,
    x: Vec<f64>,
    params: Vec<DirParams<f64>>,
    h0: Option<Vec<f64>>,
    c0: Option<Vec<f64>>,
    lengths: Option<Vec<usize>>,
    y: Vec<f64>,
    hn: Vec<f64>,
    cn: Vec<f64>,
}

impl FwdArgs {
    fn of(p: &Problem) -> FwdArgs {
        FwdArgs {
            layer: p.layer,
            x: p.x.clone(),
            params: p.params.clone(),
            h0: p.h0.clone(),
            c0: p.c0.clone(),
            lengths: p.lengths.clone(),
            y: vec![0.0; p.y_len()],
            hn: vec![0.0; p.state_len()],
            cn: vec![0.0; p.c_len()],
        }
    }
    fn run(self, train: bool) -> rnnkit::Result<Option<Tape<f64>>> {
        self.run_cached(train, None)
    }
    fn run_cached(mut self, train: bool, cache: Option<&mut WeightCache<f64>>) -> rnnkit::Result<Option<Tape<f64>>> {
        forward(
            &self.layer,
            &self.x,
            &weights_of(&self.params),
            self.h0.as_deref(),
            self.c0.as_deref(),
            self.lengths.as_deref(),
            &mut self.y,
            &mut self.hn,
            &mut self.cn,
            train,
            cache,
        )
    }
}

#[test]
fn forward_rejects_bad_arguments() {
    let mut rng = Rng::new(13);
    let mut failures = Vec::new();
    let (t, b) = (4, 3);
    for cell in CELLS {
        let p = Problem::new(
            &mut rng,
            cell,
            dims(t, b, 3, 2),
            Layout::BatchFirst,
            2,
            Some(vec![4, 1, 2]),
            State::Random,
        );
        let ok = FwdArgs::of(&p);
        assert!(
            ok.clone().run(true).is_ok(),
            "valid arguments rejected: {}",
            p.describe()
        );
        let mut case = |name: &str, edit: &dyn Fn(&mut FwdArgs)| {
            let mut a = ok.clone();
            edit(&mut a);
            expect_err(&mut failures, &format!("{cell:?} forward: {name}"), || a.run(false));
        };
        case("x too short", &|a| {
            a.x.pop();
        });
        case("x too long", &|a| a.x.push(0.0));
        case("x empty", &|a| a.x.clear());
        case("length 0", &|a| a.lengths = Some(vec![4, 0, 2]));
        case("length > T", &|a| a.lengths = Some(vec![4, 5, 2]));
        case("too few lengths", &|a| a.lengths = Some(vec![4, 1]));
        case("too many lengths", &|a| a.lengths = Some(vec![4, 1, 2, 3]));
        case("no lengths at all", &|a| a.lengths = Some(vec![]));
        for k in 0..4 {
            case(&format!("{} too short", PARAM_NAMES[k]), &|a| {
                a.params[1][k].pop();
            });
            case(&format!("{} too long", PARAM_NAMES[k]), &|a| a.params[0][k].push(0.0));
        }
        case("weights for one direction of two", &|a| {
            a.params.pop();
        });
        case("weights for three directions", &|a| a.params.push(a.params[0].clone()));
        case("h0 too short", &|a| {
            a.h0.as_mut().unwrap().pop();
        });
        case("h0 for one direction", &|a| a.h0.as_mut().unwrap().truncate(b * 2));
        if cell.has_c() {
            case("c0 too long", &|a| a.c0.as_mut().unwrap().push(0.0));
            case("cn missing", &|a| a.cn.clear());
        } else {
            case("c0 given", &|a| a.c0 = Some(vec![0.0; 2 * b * 2]));
            case("cn given", &|a| a.cn = vec![0.0; 2 * b * 2]);
        }
        case("y too short", &|a| {
            a.y.pop();
        });
        case("y one direction wide", &|a| a.y.truncate(t * b * 2));
        case("hn too long", &|a| a.hn.push(0.0));
        case("directions 0", &|a| a.layer.directions = 0);
        case("directions 3", &|a| a.layer.directions = 3);
        case("hidden 0", &|a| a.layer.dims.hidden = 0);
        case("input 0", &|a| a.layer.dims.input = 0);
        case("dims disagree with x", &|a| a.layer.dims.input = 4);
        case("seq_len 0", &|a| {
            a.layer.dims.seq_len = 0;
            a.x.clear();
            a.y.clear();
            a.lengths = None;
        });
        case("batch 0", &|a| {
            a.layer.dims.batch = 0;
            a.x.clear();
            a.y.clear();
            a.hn.clear();
            a.cn.clear();
            a.h0 = None;
            a.c0 = None;
            a.lengths = None;
        });
        let mut cache = WeightCache::default();
        expect_err(&mut failures, &format!("{cell:?} forward: a cache with train"), || {
            ok.clone().run_cached(true, Some(&mut cache))
        });
    }
    assert!(
        failures.is_empty(),
        "bad arguments not rejected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn backward_rejects_bad_arguments() {
    let mut rng = Rng::new(14);
    let mut failures = Vec::new();
    for cell in CELLS {
        let p = Problem::new(
            &mut rng,
            cell,
            dims(3, 2, 3, 2),
            Layout::TimeMajor,
            2,
            Some(vec![3, 1]),
            State::Random,
        );
        let sl = p.state_len();
        let dy = vec![0.5; p.y_len()];
        let dhn = vec![0.5; sl];
        let dcn = cell.has_c().then(|| vec![0.5; sl]);
        let zero_grads: Vec<DirParams<f64>> = p
            .params
            .iter()
            .map(|w| w.each_ref().map(|v| vec![0.0; v.len()]))
            .collect();
        #[derive(Clone)]
        struct Args {
            params: Vec<DirParams<f64>>,
            dy: Vec<f64>,
            dhn: Option<Vec<f64>>,
            dcn: Option<Vec<f64>>,
            dx: Vec<f64>,
            dh0: Vec<f64>,
            dc0: Vec<f64>,
            grads: Vec<DirParams<f64>>,
        }
        let ok = Args {
            params: p.params.clone(),
            dy,
            dhn: Some(dhn),
            dcn,
            dx: vec![0.0; p.x.len()],
            dh0: vec![0.0; sl],
            dc0: vec![0.0; p.c_len()],
            grads: zero_grads,
        };
        let run = |mut a: Args| -> rnnkit::Result<()> {
            let tape = FwdArgs::of(&p).run(true).expect("forward").expect("tape");
            let mut grads: Vec<Grads<'_, f64>> = a
                .grads
                .iter_mut()
                .map(|[w_ih, w_hh, b_ih, b_hh]| Grads { w_ih, w_hh, b_ih, b_hh })
                .collect();
            backward(
                &tape,
                &weights_of(&a.params),
                &a.dy,
                a.dhn.as_deref(),
                a.dcn.as_deref(),
                &mut a.dx,
                &mut a.dh0,
                &mut a.dc0,
                &mut grads,
                None,
            )
        };
        assert!(
            run(ok.clone()).is_ok(),
            "valid backward arguments rejected: {}",
            p.describe()
        );
        let mut case = |name: &str, edit: &dyn Fn(&mut Args)| {
            let mut a = ok.clone();
            edit(&mut a);
            expect_err(&mut failures, &format!("{cell:?} backward: {name}"), || run(a));
        };
        case("dy too short", &|a| {
            a.dy.pop();
        });
        case("dhn too long", &|a| a.dhn.as_mut().unwrap().push(0.0));
        if cell.has_c() {
            case("dcn too short", &|a| {
                a.dcn.as_mut().unwrap().pop();
            });
            case("dc0 missing", &|a| a.dc0.clear());
        } else {
            case("dcn given", &|a| a.dcn = Some(vec![0.0; sl]));
            case("dc0 given", &|a| a.dc0 = vec![0.0; sl]);
        }
        case("dx too short", &|a| {
            a.dx.pop();
        });
        case("dh0 too long", &|a| a.dh0.push(0.0));
        case("gradients for one direction", &|a| {
            a.grads.pop();
        });
        for k in 0..4 {
            case(&format!("gradient {} too short", PARAM_NAMES[k]), &|a| {
                a.grads[1][k].pop();
            });
            case(&format!("weight {} too long", PARAM_NAMES[k]), &|a| {
                a.params[0][k].push(0.0)
            });
        }
        case("weights for one direction", &|a| {
            a.params.pop();
        });
    }
    assert!(
        failures.is_empty(),
        "bad arguments not rejected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn step_rejects_bad_arguments() {
    let mut rng = Rng::new(15);
    let mut failures = Vec::new();
    let (b, i, h) = (3, 4, 2);
    for cell in CELLS {
        let gh = cell.gates() * h;
        let layers: Vec<DirParams<f64>> = (0..2)
            .map(|k| {
                let w = if k == 0 { i } else { h };
                [
                    rng.vec(gh * w, 0.5),
                    rng.vec(gh * h, 0.5),
                    rng.vec(gh, 0.5),
                    rng.vec(gh, 0.5),
                ]
            })
            .collect();
        #[derive(Clone)]
        struct Args {
            x: Vec<f64>,
            batch: usize,
            layers: Vec<DirParams<f64>>,
            h: Option<Vec<f64>>,
            c: Option<Vec<f64>>,
            h_out: Vec<f64>,
            c_out: Vec<f64>,
        }
        let n = 2 * b * h;
        let ok = Args {
            x: rng.vec(b * i, 1.0),
            batch: b,
            layers,
            h: Some(rng.vec(n, 0.5)),
            c: cell.has_c().then(|| rng.vec(n, 0.5)),
            h_out: vec![0.0; n],
            c_out: vec![0.0; if cell.has_c() { n } else { 0 }],
        };
        let run = |mut a: Args| {
            step(
                cell,
                &a.x,
                a.batch,
                h,
                &weights_of(&a.layers),
                a.h.as_deref(),
                a.c.as_deref(),
                &mut a.h_out,
                &mut a.c_out,
            )
        };
        assert!(run(ok.clone()).is_ok(), "valid step arguments rejected ({cell:?})");
        let mut case = |name: &str, edit: &dyn Fn(&mut Args)| {
            let mut a = ok.clone();
            edit(&mut a);
            expect_err(&mut failures, &format!("{cell:?} step: {name}"), || run(a));
        };
        case("no layers", &|a| a.layers.clear());
        case("batch 0", &|a| a.batch = 0);
        case("x not whole rows", &|a| {
            a.x.pop();
        });
        case("x rows of the wrong width", &|a| a.x.extend([0.0; 3]));
        case("layer 1 w_ih of input width", &|a| a.layers[1][0] = vec![0.0; gh * i]);
        case("b_hh too short", &|a| {
            a.layers[0][3].pop();
        });
        case("h too short", &|a| {
            a.h.as_mut().unwrap().pop();
        });
        case("h_out for one layer", &|a| a.h_out.truncate(b * h));
        if cell.has_c() {
            case("c too long", &|a| a.c.as_mut().unwrap().push(0.0));
            case("c_out missing", &|a| a.c_out.clear());
        } else {
            case("c given", &|a| a.c = Some(vec![0.0; n]));
        }
    }
    assert!(
        failures.is_empty(),
        "bad arguments not rejected:\n{}",
        failures.join("\n")
    );
}
