//! The time loop of every cell: one layer, one or two directions, forward and backward through
//! time.
//!
//! Forward: the input projection of all time steps is one GEMM before the loop; each step is one
//! recurrent GEMM over the sequences still running, then one fused pointwise pass (the cell's).
//! Backward: only `dh_{t-1} = dG_t W_hh` stays in the loop; dW_ih, dW_hh and dx are GEMMs over
//! all T*B rows after it, the bias gradients column sums.
//!
//! Layout. Everything indexed by (time, batch) — x, y, dy, dx and what training keeps — uses the
//! row order of the caller's x ("x-order": row(t, b) = t*st + b*sb), so that the big GEMMs read
//! and write those buffers as they are, without gathers or transposes. The state carried from step
//! to step is compact instead: row r of the state is sequence `perm[r]`, with the sequences sorted
//! by length (longest first) inside each thread's slice, so the sequences still running at a step
//! are a prefix of the slice and the recurrent GEMM does no work past a sequence's end.
//!
//! Threads. When the batch is large enough, it is cut into one slice per thread and each slice
//! runs the whole time loop on its own (single-threaded GEMMs, no per-step synchronisation);
//! otherwise one loop runs and the GEMMs use the threads. The two directions of a bidirectional
//! layer run side by side.

use crate::cells::{Bwd, Cell, CellKind, Fwd};
use crate::error::{Error, Result};
use crate::gemm::{add_column_sums, matmul, matmul_packed, Mat, MatMut, PackedB};
use crate::simd::{dispatch, Float, Kernel};
use rayon::prelude::*;
use std::borrow::Cow;

/// Sequences per batch slice: a slice runs its own time loop. The slicing depends on the batch
/// size only, never on the thread count, so that results do not change with the number of
/// threads (the GEMM crate's rounding depends on the row count of a product). Below two slices'
/// worth, one loop runs and each step's GEMM is threaded instead, which is as fast once a step's
/// GEMM is large, and results do not depend on the GEMM's thread count.
const SLICE_ROWS: usize = 64;

/// Sizes of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub seq_len: usize,
    pub batch: usize,
    pub input: usize,
    pub hidden: usize,
}

/// The order of the (time, batch) rows of x, y, dy and dx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// (batch, time, features)
    BatchFirst,
    /// (time, batch, features)
    TimeMajor,
}

/// One direction's parameters, in PyTorch's layout: `w_ih` (G*H, I), `w_hh` (G*H, H), biases G*H.
#[derive(Clone, Copy)]
pub struct Weights<'a, T> {
    pub w_ih: &'a [T],
    pub w_hh: &'a [T],
    pub b_ih: &'a [T],
    pub b_hh: &'a [T],
}

/// One direction's parameter gradients (same shapes as [`Weights`]); backward adds to them.
pub struct Grads<'a, T> {
    pub w_ih: &'a mut [T],
    pub w_hh: &'a mut [T],
    pub b_ih: &'a mut [T],
    pub b_hh: &'a mut [T],
}

/// One recurrent layer: a cell type, its sizes, the row layout and 1 or 2 directions.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub cell: CellKind,
    pub dims: Dims,
    pub layout: Layout,
    pub directions: usize,
}

/// What a training forward keeps for backward. Consumed by [`backward`].
pub struct Tape<T> {
    layer: Layer,
    plan: Plan,
    /// The input: the rows of `valid` when it is set, else all rows with the steps past each
    /// sequence's length zeroed.
    x: Vec<T>,
    /// The x-order rows inside the sequences' lengths, when padding is worth skipping.
    valid: Option<Vec<usize>>,
    /// A copy of each direction's parameters, to refuse a backward with other ones.
    weights: Vec<Vec<T>>,
    c0: Option<Vec<T>>,
    dirs: Vec<DirTape<T>>,
}

struct DirTape<T> {
    /// The cell's saved values per (t, b), x-order.
    saved: Vec<T>,
    /// h_{t-1} per (t, b), x-order (zero past a sequence's length).
    hprev: Vec<T>,
}

impl<T: Float> Tape<T> {
    /// The layer this tape was recorded for.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// Refuse parameters other than the ones the forward pass used: their gradients would be
    /// those of a computation that never ran.
    pub fn check_weights(&self, weights: &[Weights<'_, T>]) -> Result<()> {
        self.layer.check_weights(weights)?;
        if weights
            .iter()
            .zip(&self.weights)
            .any(|(w, kept)| !same_weights(w, kept))
        {
            return Err(Error::Value(
                "the parameters changed between this forward and its backward (update them after \
                 backward, or run forward again)"
                    .into(),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn expect_len(name: &str, got: usize, want: usize, shape: impl FnOnce() -> String) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!(
            "{name} has {got} elements; expected shape {} ({want} elements)",
            shape()
        )));
    }
    Ok(())
}

impl Layer {
    fn gh(&self) -> usize {
        self.cell.gates() * self.dims.hidden
    }
    fn rows(&self) -> usize {
        self.dims.seq_len * self.dims.batch
    }
    /// (t stride, b stride) of x-order rows.
    fn strides(&self) -> (usize, usize) {
        match self.layout {
            Layout::BatchFirst => (1, self.dims.seq_len),
            Layout::TimeMajor => (self.dims.batch, 1),
        }
    }
    fn row(&self, t: usize, b: usize) -> usize {
        let (st, sb) = self.strides();
        t * st + b * sb
    }
    fn seq_shape(&self, features: usize) -> String {
        let d = &self.dims;
        match self.layout {
            Layout::BatchFirst => format!("({}, {}, {features})", d.batch, d.seq_len),
            Layout::TimeMajor => format!("({}, {}, {features})", d.seq_len, d.batch),
        }
    }
    fn state_shape(&self) -> String {
        format!("({}, {}, {})", self.directions, self.dims.batch, self.dims.hidden)
    }

    fn check_dims(&self) -> Result<()> {
        let d = &self.dims;
        if d.seq_len == 0 || d.batch == 0 {
            return Err(Error::Shape(format!(
                "x must have at least one time step and one sequence; got seq_len={}, batch={}",
                d.seq_len, d.batch
            )));
        }
        if d.input == 0 || d.hidden == 0 {
            return Err(Error::Shape(format!(
                "input_size and hidden_size must be at least 1; got {} and {}",
                d.input, d.hidden
            )));
        }
        if self.directions != 1 && self.directions != 2 {
            return Err(Error::Value(format!(
                "directions must be 1 or 2; got {}",
                self.directions
            )));
        }
        Ok(())
    }

    fn check_weights<T>(&self, weights: &[Weights<'_, T>]) -> Result<()> {
        if weights.len() != self.directions {
            return Err(Error::Value(format!(
                "expected weights for {} direction(s); got {}",
                self.directions,
                weights.len()
            )));
        }
        let (gh, i, h) = (self.gh(), self.dims.input, self.dims.hidden);
        for w in weights {
            expect_len("weight_ih", w.w_ih.len(), gh * i, || format!("({gh}, {i})"))?;
            expect_len("weight_hh", w.w_hh.len(), gh * h, || format!("({gh}, {h})"))?;
            expect_len("bias_ih", w.b_ih.len(), gh, || format!("({gh},)"))?;
            expect_len("bias_hh", w.b_hh.len(), gh, || format!("({gh},)"))?;
        }
        Ok(())
    }

    fn check_state<T>(&self, name: &str, s: Option<&[T]>) -> Result<()> {
        let n = self.directions * self.dims.batch * self.dims.hidden;
        match s {
            Some(s) => expect_len(name, s.len(), n, || self.state_shape()),
            None => Ok(()),
        }
    }

    fn check_lengths(&self, lengths: Option<&[usize]>) -> Result<()> {
        let Some(l) = lengths else { return Ok(()) };
        let d = &self.dims;
        if l.len() != d.batch {
            return Err(Error::Shape(format!(
                "lengths has {} entries; expected one per sequence ({})",
                l.len(),
                d.batch
            )));
        }
        if let Some((b, &v)) = l.iter().enumerate().find(|(_, &v)| v == 0 || v > d.seq_len) {
            return Err(Error::Value(format!(
                "lengths[{b}] = {v} is out of range; every length must be in 1..={}",
                d.seq_len
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Plan: the batch permutation and the threads' slices
// ---------------------------------------------------------------------------------------------

struct Plan {
    /// Compact row r holds sequence perm[r].
    perm: Vec<usize>,
    /// Length of the sequence in compact row r.
    lens: Vec<usize>,
    /// (first compact row, row count) of each slice; rows sorted by length, longest first.
    slices: Vec<(usize, usize)>,
}

impl Plan {
    fn new(batch: usize, seq_len: usize, lengths: Option<&[usize]>) -> Plan {
        let nslices = (batch / SLICE_ROWS).max(1);
        let mut order: Vec<usize> = (0..batch).collect();
        if let Some(l) = lengths {
            order.sort_by_key(|&b| std::cmp::Reverse(l[b]));
        }
        // Deal the sequences round-robin, longest first, so that the slices get similar work.
        let mut perm = Vec::with_capacity(batch);
        let mut slices = Vec::with_capacity(nslices);
        for s in 0..nslices {
            let start = perm.len();
            perm.extend(order.iter().skip(s).step_by(nslices));
            slices.push((start, perm.len() - start));
        }
        let lens = perm.iter().map(|&b| lengths.map_or(seq_len, |l| l[b])).collect();
        Plan { perm, lens, slices }
    }

    fn gemm_threads(&self, threads: usize) -> usize {
        threads.div_ceil(self.slices.len())
    }

    /// Run `f(first_row, rows, gemm_threads)` for every slice, the slices in parallel.
    fn for_each_slice(&self, threads: usize, f: impl Fn(usize, usize, usize) + Sync) {
        let gt = self.gemm_threads(threads);
        map_items(self.slices.clone(), threads, |_, (off, n)| f(off, n, gt));
    }
}

/// A step's pointwise pass is split across the threads from this many gate values on (below,
/// waking a thread costs more than it saves).
const PAR_POINTWISE: usize = 1 << 12;

/// Run a step's pointwise pass `f(r0, r1, row blocks)` over the active rows: in one part, or,
/// when the step is large, in one part per thread. `bufs` are per-row buffers (buffer, row
/// width), handed to each part as its own rows. Rows are independent, so the split does not
/// change the results.
fn split_rows<T: Send, const N: usize>(
    active: usize,
    gh: usize,
    threads: usize,
    bufs: [(&mut [T], usize); N],
    f: impl Fn(usize, usize, [&mut [T]; N]) + Sync,
) {
    let parts = if active * gh >= PAR_POINTWISE {
        threads.min(active).max(1)
    } else {
        1
    };
    let mut rest = bufs.map(|(b, w)| (&mut b[..active * w], w));
    let mut jobs = Vec::with_capacity(parts);
    for p in 0..parts {
        let (r0, r1) = (p * active / parts, (p + 1) * active / parts);
        let blocks = std::array::from_fn(|k| {
            let (buf, w) = &mut rest[k];
            let (head, tail) = std::mem::take(buf).split_at_mut((r1 - r0) * *w);
            *buf = tail;
            head
        });
        jobs.push((r0, r1, blocks));
    }
    map_items(jobs, threads, |_, (r0, r1, b)| f(r0, r1, b));
}

/// The time index of step `s` of a sequence of length `len`.
#[inline(always)]
fn time_of(len: usize, s: usize, reverse: bool) -> usize {
    if reverse {
        len - 1 - s
    } else {
        s
    }
}

/// A raw pointer handed to the threads, each of which touches only its own rows.
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
// SAFETY: see the type's doc: writers through it never overlap.
unsafe impl<T: Send> Send for Ptr<T> {}
unsafe impl<T: Send> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    fn new(s: &mut [T]) -> Self {
        Ptr(s.as_mut_ptr())
    }
    /// The pointer `n` elements on (a sub-block of the same buffer).
    fn at(self, n: usize) -> Self {
        Ptr(self.0.wrapping_add(n))
    }
    /// # Safety
    /// `[at, at + len)` must be inside the buffer and touched by no one else meanwhile.
    #[inline(always)]
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// A zero-width placeholder for the state a cell does not have.
fn empty<'a, T>() -> &'a mut [T] {
    &mut []
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

/// Run one layer forward. `x` is (T*B, I) in `layer.layout` row order; `y` (T*B, D*H) in the
/// same order; `hn` and `cn` (D, B, H) (`cn` empty unless LSTM). With `train`, returns the tape
/// that [`backward`] needs.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Float>(
    layer: &Layer,
    x: &[T],
    weights: &[Weights<'_, T>],
    h0: Option<&[T]>,
    c0: Option<&[T]>,
    lengths: Option<&[usize]>,
    y: &mut [T],
    hn: &mut [T],
    cn: &mut [T],
    train: bool,
) -> Result<Option<Tape<T>>> {
    layer.check_dims()?;
    let (d, nd) = (layer.dims, layer.directions);
    expect_len("x", x.len(), layer.rows() * d.input, || layer.seq_shape(d.input))?;
    layer.check_weights(weights)?;
    layer.check_state("h0", h0)?;
    let has_c = layer.cell.has_c();
    if has_c {
        layer.check_state("c0", c0)?;
    } else if c0.is_some() {
        return Err(Error::Value(format!(
            "c0 is only for LSTM layers, not {}",
            layer.cell.name()
        )));
    }
    layer.check_lengths(lengths)?;
    expect_len("y", y.len(), layer.rows() * nd * d.hidden, || {
        layer.seq_shape(nd * d.hidden)
    })?;
    expect_len("hn", hn.len(), nd * d.batch * d.hidden, || layer.state_shape())?;
    expect_len("cn", cn.len(), if has_c { nd * d.batch * d.hidden } else { 0 }, || {
        layer.state_shape()
    })?;

    crate::threads::run(
        |threads| crate::with_cell!(layer.cell, cell: C => forward_impl::<C, T>(cell, layer, x, weights, h0, c0, lengths, y, hn, cn, train, threads)),
    )
}

/// One direction's parameters, concatenated.
fn weights_copy<T: Float>(w: &Weights<'_, T>) -> Vec<T> {
    [w.w_ih, w.w_hh, w.b_ih, w.b_hh].concat()
}

/// Whether `w` equals the copy `kept`, bit for bit (so that a NaN parameter equals itself).
fn same_weights<T: Float>(w: &Weights<'_, T>, kept: &[T]) -> bool {
    let parts = [w.w_ih, w.w_hh, w.b_ih, w.b_hh];
    parts.iter().map(|p| p.len()).sum::<usize>() == kept.len()
        && parts
            .iter()
            .flat_map(|p| p.iter())
            .zip(kept)
            .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
}

/// The x-order rows inside the sequences' lengths, in increasing order, when at least a tenth
/// of the rows is padding: the big GEMMs then run on those rows gathered into a dense block
/// (copying them costs a few percent of the GEMMs' time).
fn valid_rows(layer: &Layer, lengths: Option<&[usize]>) -> Option<Vec<usize>> {
    let l = lengths?;
    let total: usize = l.iter().sum();
    if total * 10 > layer.rows() * 9 {
        return None;
    }
    let mut idx: Vec<usize> = l
        .iter()
        .enumerate()
        .flat_map(|(b, &len)| (0..len).map(move |t| layer.row(t, b)))
        .collect();
    idx.sort_unstable();
    Some(idx)
}

/// The rows `idx` (of width `w`) of `src`, packed.
fn gather<T: Copy>(src: &[T], idx: &[usize], w: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(idx.len() * w);
    for &r in idx {
        out.extend_from_slice(&src[r * w..(r + 1) * w]);
    }
    out
}

/// The packed rows of `src` put back at rows `idx` (of width `w`) of `dst`.
fn scatter<T: Copy>(dst: &mut [T], idx: &[usize], w: usize, src: &[T]) {
    for (k, &r) in idx.iter().enumerate() {
        dst[r * w..(r + 1) * w].copy_from_slice(&src[k * w..(k + 1) * w]);
    }
}

/// Zero the (D*H wide) rows of `buf` past each sequence's length.
fn zero_padding<T: Float>(layer: &Layer, lengths: Option<&[usize]>, buf: &mut [T], width: usize) {
    let Some(l) = lengths else { return };
    for (b, &len) in l.iter().enumerate() {
        for t in len..layer.dims.seq_len {
            let r = layer.row(t, b);
            buf[r * width..(r + 1) * width].fill(T::ZERO);
        }
    }
}

/// `f(index, item)` for every item (directions, batch slices, row parts), on the pool's threads
/// when there are several items and threads, else in order on this one.
fn map_items<I: Send, R: Send>(items: Vec<I>, threads: usize, f: impl Fn(usize, I) -> R + Sync) -> Vec<R> {
    if items.len() > 1 && threads > 1 {
        items.into_par_iter().enumerate().map(|(d, it)| f(d, it)).collect()
    } else {
        items.into_iter().enumerate().map(|(d, it)| f(d, it)).collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_impl<C: Cell, T: Float>(
    cell: C,
    layer: &Layer,
    x: &[T],
    weights: &[Weights<'_, T>],
    h0: Option<&[T]>,
    c0: Option<&[T]>,
    lengths: Option<&[usize]>,
    y: &mut [T],
    hn: &mut [T],
    cn: &mut [T],
    train: bool,
    threads: usize,
) -> Option<Tape<T>> {
    let d = layer.dims;
    let (h, gh, rows, nd) = (d.hidden, layer.gh(), layer.rows(), layer.directions);
    let plan = Plan::new(d.batch, d.seq_len, lengths);
    let ydim = nd * h;
    zero_padding(layer, lengths, y, ydim);
    // The big GEMMs run over the valid rows only when padding is worth skipping, else over all.
    let valid = valid_rows(layer, lengths);
    let xs: Cow<'_, [T]> = match &valid {
        Some(idx) => Cow::Owned(gather(x, idx, d.input)),
        None if train => {
            let mut k = x.to_vec();
            zero_padding(layer, lengths, &mut k, d.input);
            Cow::Owned(k)
        }
        None => Cow::Borrowed(x),
    };
    let nrows = valid.as_ref().map_or(rows, Vec::len);
    let (yp, hnp, cnp) = (Ptr::new(y), Ptr::new(hn), Ptr::new(cn));
    let bh = d.batch * h;
    let dirs = map_items(weights.to_vec(), threads, |dir, w| {
        let mut xw = vec![T::ZERO; nrows * gh];
        matmul(
            MatMut::new(&mut xw, nrows, gh, gh),
            false,
            Mat::new(&xs, nrows, d.input, d.input),
            Mat::new(w.w_ih, gh, d.input, d.input).t(),
            threads,
        );
        if let Some(idx) = &valid {
            let mut full = vec![T::ZERO; rows * gh];
            scatter(&mut full, idx, gh, &xw);
            xw = full;
        }
        let mut tape = train.then(|| DirTape {
            saved: vec![T::ZERO; rows * C::SAVED * h],
            hprev: vec![T::ZERO; rows * h],
        });
        let keep = tape.as_mut().map(|t| (Ptr::new(&mut t.saved), Ptr::new(&mut t.hprev)));
        let w_hh = PackedB::new(Mat::new(w.w_hh, gh, h, h).t());
        let sw = Sweep {
            cell,
            layer,
            plan: &plan,
            w: &w,
            w_hh: &w_hh,
            reverse: dir == 1,
        };
        // Direction `dir` owns columns [dir*H, (dir+1)*H) of y and block `dir` of hn / cn; the
        // slices own disjoint rows of them.
        let out = FwdOut {
            y: yp.at(dir * h),
            ldy: ydim,
            hn: hnp.at(dir * bh),
            cn: cnp.at(if C::HAS_C { dir * bh } else { 0 }),
            keep,
        };
        let h0 = h0.map(|s| &s[dir * bh..(dir + 1) * bh]);
        let c0 = c0.map(|s| &s[dir * bh..(dir + 1) * bh]);
        plan.for_each_slice(threads, |off, n, gt| sw.forward_slice(off, n, gt, &xw, h0, c0, out));
        tape
    });
    train.then(|| Tape {
        layer: *layer,
        plan,
        x: xs.into_owned(),
        valid,
        weights: weights.iter().map(weights_copy).collect(),
        c0: c0.map(<[T]>::to_vec),
        dirs: dirs.into_iter().flatten().collect(),
    })
}

/// One direction's sweep over the batch slices.
struct Sweep<'a, C, T> {
    cell: C,
    layer: &'a Layer,
    plan: &'a Plan,
    w: &'a Weights<'a, T>,
    /// W_hh packed once per sweep for the per-step products: W_hh^T forward, W_hh backward.
    w_hh: &'a PackedB<T>,
    reverse: bool,
}

/// Where a forward slice writes.
#[derive(Clone, Copy)]
struct FwdOut<T> {
    y: Ptr<T>,
    ldy: usize,
    hn: Ptr<T>,
    cn: Ptr<T>,
    /// (saved, hprev) when training.
    keep: Option<(Ptr<T>, Ptr<T>)>,
}

impl<C: Cell, T: Float> Sweep<'_, C, T> {
    #[allow(clippy::too_many_arguments)]
    fn forward_slice(
        &self,
        off: usize,
        n: usize,
        gt: usize,
        xw: &[T],
        h0: Option<&[T]>,
        c0: Option<&[T]>,
        out: FwdOut<T>,
    ) {
        if n == 0 {
            return;
        }
        let (h, gh) = (self.layer.dims.hidden, self.layer.gh());
        let ch = if C::HAS_C { h } else { 0 };
        let perm = &self.plan.perm[off..off + n];
        let lens = &self.plan.lens[off..off + n];
        let mut ha = vec![T::ZERO; n * h];
        let mut hb = vec![T::ZERO; n * h];
        let mut ca = vec![T::ZERO; n * ch];
        let mut cb = vec![T::ZERO; n * ch];
        let mut hw = vec![T::ZERO; n * gh];
        for (r, &b) in perm.iter().enumerate() {
            if let Some(h0) = h0 {
                ha[r * h..(r + 1) * h].copy_from_slice(&h0[b * h..(b + 1) * h]);
            }
            if let Some(c0) = c0 {
                ca[r * ch..(r + 1) * ch].copy_from_slice(&c0[b * ch..(b + 1) * ch]);
            }
        }
        let mut active = n;
        for s in 0..lens[0] {
            while lens[active - 1] <= s {
                active -= 1;
            }
            matmul_packed(
                MatMut::new(&mut hw, active, gh, gh),
                false,
                Mat::new(&ha, active, h, h),
                self.w_hh,
                gt,
            );
            split_rows(
                active,
                gh,
                gt,
                [(&mut hb, h), (&mut cb, ch), (&mut hw, gh)],
                |r0, r1, [hb, cb, hw]| {
                    dispatch(FwdStep {
                        sw: self,
                        s,
                        perm: &perm[r0..r1],
                        lens: &lens[r0..r1],
                        active: r1 - r0,
                        xw,
                        hw,
                        ha: &ha[r0 * h..r1 * h],
                        ca: &ca[r0 * ch..r1 * ch],
                        hb,
                        cb,
                        out,
                    })
                },
            );
            std::mem::swap(&mut ha, &mut hb);
            std::mem::swap(&mut ca, &mut cb);
        }
    }
}

/// The pointwise part of one forward step, over the active rows of a slice.
struct FwdStep<'a, 'w, C, T> {
    sw: &'a Sweep<'w, C, T>,
    s: usize,
    perm: &'a [usize],
    lens: &'a [usize],
    active: usize,
    xw: &'a [T],
    hw: &'a mut [T],
    ha: &'a [T],
    ca: &'a [T],
    hb: &'a mut [T],
    cb: &'a mut [T],
    out: FwdOut<T>,
}

impl<C: Cell, T: Float> Kernel for FwdStep<'_, '_, C, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let sw = self.sw;
        let (h, gh) = (sw.layer.dims.hidden, sw.layer.gh());
        let ch = if C::HAS_C { h } else { 0 };
        let sv = C::SAVED * h;
        let out = self.out;
        let rows = self.hb.chunks_exact_mut(h).zip(self.hw.chunks_exact_mut(gh));
        let mut cb_rows = self.cb.chunks_exact_mut(ch.max(1));
        for (r, (h_new, hw)) in rows.enumerate().take(self.active) {
            let (b, len) = (self.perm[r], self.lens[r]);
            let xr = sw.layer.row(time_of(len, self.s, sw.reverse), b);
            let c_new: &mut [T] = if C::HAS_C {
                cb_rows.next().expect("c row")
            } else {
                empty()
            };
            let h_prev = &self.ha[r * h..(r + 1) * h];
            // SAFETY: row xr of the kept buffers belongs to this (t, b) only.
            let saved = match out.keep {
                Some((sp, hp)) => unsafe {
                    hp.slice(xr * h, h).copy_from_slice(h_prev);
                    sp.slice(xr * sv, sv)
                },
                None => empty(),
            };
            sw.cell.forward(
                Fwd {
                    xw: &self.xw[xr * gh..(xr + 1) * gh],
                    hw,
                    b_ih: sw.w.b_ih,
                    b_hh: sw.w.b_hh,
                    h_prev,
                    c_prev: &self.ca[r * ch..(r + 1) * ch],
                    h: &mut *h_new,
                    c: &mut *c_new,
                    saved,
                },
                out.keep.is_some(),
            );
            // SAFETY: y row xr (this direction's columns) and hn / cn row b belong to this
            // sequence only.
            unsafe {
                out.y.slice(xr * out.ldy, h).copy_from_slice(h_new);
                if len == self.s + 1 {
                    out.hn.slice(b * h, h).copy_from_slice(h_new);
                    if C::HAS_C {
                        out.cn.slice(b * h, h).copy_from_slice(c_new);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Backpropagate through the layer of `tape` (which can be used again: the caller decides when
/// it is spent). `dy` is (T*B, D*H) in the layer's row order;
/// `dhn`, `dcn` the gradients of the final states (D, B, H). Writes `dx` (T*B, I), `dh0` and
/// `dc0` (D, B, H; `dc0` empty unless LSTM) and adds the parameter gradients to `grads`.
/// If given, `dh_seq` (shaped like `dy`) receives dL/dh_t at every step: `dy` plus what reaches
/// h_t through the recurrence (zero at padded steps), the quantity that vanishes or explodes.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    tape: &Tape<T>,
    weights: &[Weights<'_, T>],
    dy: &[T],
    dhn: Option<&[T]>,
    dcn: Option<&[T]>,
    dx: &mut [T],
    dh0: &mut [T],
    dc0: &mut [T],
    grads: &mut [Grads<'_, T>],
    dh_seq: Option<&mut [T]>,
) -> Result<()> {
    let layer = tape.layer;
    let (d, nd) = (layer.dims, layer.directions);
    layer.check_weights(weights)?;
    if weights
        .iter()
        .zip(&tape.weights)
        .any(|(w, kept)| !same_weights(w, kept))
    {
        return Err(Error::Value(
            "the parameters changed between this forward and its backward (update them after backward, \
             or run forward again)"
                .into(),
        ));
    }
    expect_len("dy", dy.len(), layer.rows() * nd * d.hidden, || {
        layer.seq_shape(nd * d.hidden)
    })?;
    layer.check_state("dhn", dhn)?;
    let has_c = layer.cell.has_c();
    if has_c {
        layer.check_state("dcn", dcn)?;
    } else if dcn.is_some() {
        return Err(Error::Value(format!(
            "dcn is only for LSTM layers, not {}",
            layer.cell.name()
        )));
    }
    expect_len("dx", dx.len(), layer.rows() * d.input, || layer.seq_shape(d.input))?;
    if let Some(s) = &dh_seq {
        expect_len("dh_seq", s.len(), dy.len(), || layer.seq_shape(nd * d.hidden))?;
    }
    expect_len("dh0", dh0.len(), nd * d.batch * d.hidden, || layer.state_shape())?;
    expect_len(
        "dc0",
        dc0.len(),
        if has_c { nd * d.batch * d.hidden } else { 0 },
        || layer.state_shape(),
    )?;
    if grads.len() != nd {
        return Err(Error::Value(format!(
            "expected gradients for {nd} direction(s); got {}",
            grads.len()
        )));
    }
    let gw: Vec<Weights<'_, T>> = grads
        .iter()
        .map(|g| Weights {
            w_ih: g.w_ih,
            w_hh: g.w_hh,
            b_ih: g.b_ih,
            b_hh: g.b_hh,
        })
        .collect();
    layer
        .check_weights(&gw)
        .map_err(|e| Error::Shape(format!("gradient buffer: {e}")))?;

    let dh_seq = dh_seq.map(|s| {
        s.fill(T::ZERO); // padded steps are never written
        Ptr::new(s)
    });
    crate::threads::run(
        |threads| crate::with_cell!(layer.cell, cell: C => backward_impl::<C, T>(cell, tape, weights, dy, dhn, dcn, dx, dh0, dc0, grads, dh_seq, threads)),
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_impl<C: Cell, T: Float>(
    cell: C,
    tape: &Tape<T>,
    weights: &[Weights<'_, T>],
    dy: &[T],
    dhn: Option<&[T]>,
    dcn: Option<&[T]>,
    dx: &mut [T],
    dh0: &mut [T],
    dc0: &mut [T],
    grads: &mut [Grads<'_, T>],
    dh_seq: Option<Ptr<T>>,
    threads: usize,
) {
    let layer = &tape.layer;
    let d = layer.dims;
    let (h, gh, rows, nd) = (d.hidden, layer.gh(), layer.rows(), layer.directions);
    let bh = d.batch * h;
    let nrows = tape.valid.as_ref().map_or(rows, Vec::len);
    let (dh0p, dc0p) = (Ptr::new(dh0), Ptr::new(dc0));
    let jobs: Vec<_> = grads.iter_mut().zip(&tape.dirs).collect();
    let dgxs = map_items(jobs, threads, |dir, (g, kept)| {
        let w = &weights[dir];
        let mut dgx = vec![T::ZERO; rows * gh];
        let mut dgh_all = if C::SPLIT_DGH {
            vec![T::ZERO; rows * gh]
        } else {
            Vec::new()
        };
        let w_hh = PackedB::new(Mat::new(w.w_hh, gh, h, h));
        let sw = Sweep {
            cell,
            layer,
            plan: &tape.plan,
            w,
            w_hh: &w_hh,
            reverse: dir == 1,
        };
        let inp = BwdIn {
            dy: &dy[dir * h..],
            ldy: nd * h,
            dhn: dhn.map(|s| &s[dir * bh..(dir + 1) * bh]),
            dcn: dcn.map(|s| &s[dir * bh..(dir + 1) * bh]),
            c0: tape.c0.as_deref().map(|s| &s[dir * bh..(dir + 1) * bh]),
            kept,
        };
        // Block `dir` of dh0 / dc0 belongs to this direction.
        let out = BwdOut {
            dgx: Ptr::new(&mut dgx),
            dgh_all: Ptr::new(&mut dgh_all),
            dh0: dh0p.at(dir * bh),
            dc0: dc0p.at(if C::HAS_C { dir * bh } else { 0 }),
            dh_seq: dh_seq.map(|p| p.at(dir * h)),
        };
        tape.plan
            .for_each_slice(threads, |off, n, gt| sw.backward_slice(off, n, gt, &inp, out));
        // Deferred weight gradients: one GEMM each over all the (valid) rows.
        let (dgx, dgh_all, hprev) = match &tape.valid {
            Some(idx) => (
                gather(&dgx, idx, gh),
                if C::SPLIT_DGH {
                    gather(&dgh_all, idx, gh)
                } else {
                    Vec::new()
                },
                Cow::Owned(gather(&kept.hprev, idx, h)),
            ),
            None => (dgx, dgh_all, Cow::Borrowed(&kept.hprev[..])),
        };
        let dgh: &[T] = if C::SPLIT_DGH { &dgh_all } else { &dgx };
        matmul(
            MatMut::new(g.w_ih, gh, d.input, d.input),
            true,
            Mat::new(&dgx, nrows, gh, gh).t(),
            Mat::new(&tape.x, nrows, d.input, d.input),
            threads,
        );
        matmul(
            MatMut::new(g.w_hh, gh, h, h),
            true,
            Mat::new(dgh, nrows, gh, gh).t(),
            Mat::new(&hprev, nrows, h, h),
            threads,
        );
        add_column_sums(g.b_ih, &dgx, gh);
        add_column_sums(g.b_hh, dgh, gh);
        dgx
    });
    let mut dxc = match tape.valid {
        Some(_) => vec![T::ZERO; nrows * d.input],
        None => Vec::new(),
    };
    let dxv: &mut [T] = if tape.valid.is_some() { &mut dxc } else { dx };
    for (dir, dgx) in dgxs.iter().enumerate() {
        matmul(
            MatMut::new(dxv, nrows, d.input, d.input),
            dir > 0,
            Mat::new(dgx, nrows, gh, gh),
            Mat::new(weights[dir].w_ih, gh, d.input, d.input),
            threads,
        );
    }
    if let Some(idx) = &tape.valid {
        dx.fill(T::ZERO);
        scatter(dx, idx, d.input, &dxc);
    }
}

struct BwdIn<'a, T> {
    dy: &'a [T],
    ldy: usize,
    dhn: Option<&'a [T]>,
    dcn: Option<&'a [T]>,
    c0: Option<&'a [T]>,
    kept: &'a DirTape<T>,
}

#[derive(Clone, Copy)]
struct BwdOut<T> {
    dgx: Ptr<T>,
    dgh_all: Ptr<T>,
    dh0: Ptr<T>,
    dc0: Ptr<T>,
    /// dL/dh_t out, laid out like `dy` (this direction's column block), if asked for.
    dh_seq: Option<Ptr<T>>,
}

impl<C: Cell, T: Float> Sweep<'_, C, T> {
    fn backward_slice(&self, off: usize, n: usize, gt: usize, inp: &BwdIn<'_, T>, out: BwdOut<T>) {
        if n == 0 {
            return;
        }
        let (h, gh) = (self.layer.dims.hidden, self.layer.gh());
        let ch = if C::HAS_C { h } else { 0 };
        let perm = &self.plan.perm[off..off + n];
        let lens = &self.plan.lens[off..off + n];
        let mut dh = vec![T::ZERO; n * h];
        let mut dc = vec![T::ZERO; n * ch];
        let mut dgh = vec![T::ZERO; n * gh];
        let zeros = vec![T::ZERO; h];
        for (r, &b) in perm.iter().enumerate() {
            if let Some(s) = inp.dhn {
                dh[r * h..(r + 1) * h].copy_from_slice(&s[b * h..(b + 1) * h]);
            }
            if let Some(s) = inp.dcn {
                dc[r * ch..(r + 1) * ch].copy_from_slice(&s[b * ch..(b + 1) * ch]);
            }
        }
        let mut active = 0;
        for s in (0..lens[0]).rev() {
            while active < n && lens[active] > s {
                active += 1;
            }
            split_rows(
                active,
                gh,
                gt,
                [(&mut dh, h), (&mut dc, ch), (&mut dgh, gh)],
                |r0, r1, [dh, dc, dgh]| {
                    dispatch(BwdStep {
                        sw: self,
                        s,
                        perm: &perm[r0..r1],
                        lens: &lens[r0..r1],
                        active: r1 - r0,
                        inp,
                        zeros: &zeros,
                        dh,
                        dc,
                        dgh,
                        out,
                    })
                },
            );
            matmul_packed(
                MatMut::new(&mut dh, active, h, h),
                true,
                Mat::new(&dgh, active, gh, gh),
                self.w_hh,
                gt,
            );
        }
        for (r, &b) in perm.iter().enumerate() {
            // SAFETY: row b of dh0 / dc0 belongs to this sequence only.
            unsafe {
                out.dh0.slice(b * h, h).copy_from_slice(&dh[r * h..(r + 1) * h]);
                if C::HAS_C {
                    out.dc0.slice(b * h, h).copy_from_slice(&dc[r * h..(r + 1) * h]);
                }
            }
        }
    }
}

/// The pointwise part of one backward step, over the active rows of a slice.
struct BwdStep<'a, 'w, C, T> {
    sw: &'a Sweep<'w, C, T>,
    s: usize,
    perm: &'a [usize],
    lens: &'a [usize],
    active: usize,
    inp: &'a BwdIn<'a, T>,
    zeros: &'a [T],
    dh: &'a mut [T],
    dc: &'a mut [T],
    dgh: &'a mut [T],
    out: BwdOut<T>,
}

impl<C: Cell, T: Float> Kernel for BwdStep<'_, '_, C, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let sw = self.sw;
        let layer = sw.layer;
        let (h, gh) = (layer.dims.hidden, layer.gh());
        let sv = C::SAVED * h;
        let (inp, out, s) = (self.inp, self.out, self.s);
        let mut dc_rows = self.dc.chunks_exact_mut(if C::HAS_C { h } else { 1 });
        let rows = self.dh.chunks_exact_mut(h).zip(self.dgh.chunks_exact_mut(gh));
        for (r, (dh, dgh)) in rows.enumerate().take(self.active) {
            let (b, len) = (self.perm[r], self.lens[r]);
            let xr = layer.row(time_of(len, s, sw.reverse), b);
            let (dc, c_prev): (&mut [T], &[T]) = if C::HAS_C {
                let c_prev = if s > 0 {
                    let pr = layer.row(time_of(len, s - 1, sw.reverse), b);
                    &inp.kept.saved[pr * sv + C::C_AT * h..][..h]
                } else {
                    inp.c0.map_or(self.zeros, |c0| &c0[b * h..(b + 1) * h])
                };
                (dc_rows.next().expect("dc row"), c_prev)
            } else {
                (empty(), &[])
            };
            let dy = &inp.dy[xr * inp.ldy..][..h];
            if let Some(p) = out.dh_seq {
                // SAFETY: this direction's block of row xr belongs to this (t, b) only.
                let total = unsafe { p.slice(xr * inp.ldy, h) };
                for ((t, &y), &d) in total.iter_mut().zip(dy).zip(dh.iter()) {
                    *t = y + d;
                }
            }
            // SAFETY: row xr of dgx belongs to this (t, b) only.
            let dgx = unsafe { out.dgx.slice(xr * gh, gh) };
            sw.cell.backward(Bwd {
                dy,
                dh,
                dc,
                saved: &inp.kept.saved[xr * sv..(xr + 1) * sv],
                h_prev: &inp.kept.hprev[xr * h..(xr + 1) * h],
                c_prev,
                dgx,
                dgh,
            });
            if C::SPLIT_DGH {
                // SAFETY: as for dgx.
                unsafe { out.dgh_all.slice(xr * gh, gh).copy_from_slice(dgh) };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming: one time step of a stack of layers
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// Scratch for [`step`]'s two projections, kept per thread so that a step allocates nothing.
    static STEP_SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on a scratch slice of `n` elements of `T` owned by this thread (holding whatever
/// the previous call left there).
fn with_scratch<T: Float, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    STEP_SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        let words = (n * std::mem::size_of::<T>()).div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0.0);
        }
        // SAFETY: T is f32 or f64 (the only `Float`s): any bit pattern is valid, the f64 buffer is
        // aligned for both and holds at least n elements of T.
        let s = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), n) };
        f(s)
    })
}

/// One time step of a stack of single-direction layers, for streaming inference.
///
/// `x` is (B, I), the state size is `hidden`; `layers[k]` the weights of layer k (layer k > 0 reads the h of layer k-1);
/// `h` and `c` the state (L, B, H) (`c` only for LSTM, zeros if None); writes the new state to
/// `h_out` / `c_out` (L, B, H). The output of the step is the last layer's block of `h_out`.
#[allow(clippy::too_many_arguments)]
pub fn step<T: Float>(
    cell: CellKind,
    x: &[T],
    batch: usize,
    hidden: usize,
    layers: &[Weights<'_, T>],
    h: Option<&[T]>,
    c: Option<&[T]>,
    h_out: &mut [T],
    c_out: &mut [T],
) -> Result<()> {
    let nl = layers.len();
    if nl == 0 {
        return Err(Error::Value("step needs the weights of at least one layer".into()));
    }
    if batch == 0 || x.len() % batch != 0 {
        return Err(Error::Shape(format!(
            "x has {} elements, not a whole number of rows for batch {batch}",
            x.len()
        )));
    }
    let input = x.len() / batch;
    let bh = batch * hidden;
    for (k, w) in layers.iter().enumerate() {
        let layer = Layer {
            cell,
            dims: Dims {
                seq_len: 1,
                batch,
                input: if k == 0 { input } else { hidden },
                hidden,
            },
            layout: Layout::TimeMajor,
            directions: 1,
        };
        layer.check_dims()?;
        layer
            .check_weights(std::slice::from_ref(w))
            .map_err(|e| Error::Shape(format!("layer {k}: {e}")))?;
    }
    let state = |name: &str, s: Option<&[T]>| match s {
        Some(s) => expect_len(name, s.len(), nl * bh, || format!("({nl}, {batch}, {hidden})")),
        None => Ok(()),
    };
    state("h", h)?;
    expect_len("h_out", h_out.len(), nl * bh, || format!("({nl}, {batch}, {hidden})"))?;
    if cell.has_c() {
        state("c", c)?;
        expect_len("c_out", c_out.len(), nl * bh, || format!("({nl}, {batch}, {hidden})"))?;
    } else if c.is_some() {
        return Err(Error::Value(format!("c is only for LSTM layers, not {}", cell.name())));
    }
    crate::with_cell!(cell, cell: C => step_impl::<C, T>(cell, x, batch, hidden, layers, h, c, h_out, c_out));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn step_impl<C: Cell, T: Float>(
    cell: C,
    x: &[T],
    batch: usize,
    hidden: usize,
    layers: &[Weights<'_, T>],
    h: Option<&[T]>,
    c: Option<&[T]>,
    h_out: &mut [T],
    c_out: &mut [T],
) {
    let (gh, bh) = (C::GATES * hidden, batch * hidden);
    let ch = if C::HAS_C { hidden } else { 0 };
    with_scratch::<T, _>(2 * batch * gh + hidden, |scratch| {
        let (xw, rest) = scratch.split_at_mut(batch * gh);
        let (hw, zeros) = rest.split_at_mut(batch * gh);
        zeros.fill(T::ZERO);
        for (k, w) in layers.iter().enumerate() {
            let (done, now) = h_out.split_at_mut(k * bh);
            let (inp, width): (&[T], usize) = if k == 0 {
                (x, x.len() / batch)
            } else {
                (&done[(k - 1) * bh..], hidden)
            };
            let h_new = &mut now[..bh];
            let h_prev = h.map(|s| &s[k * bh..(k + 1) * bh]);
            matmul(
                MatMut::new(xw, batch, gh, gh),
                false,
                Mat::new(inp, batch, width, width),
                Mat::new(w.w_ih, gh, width, width).t(),
                1,
            );
            match h_prev {
                Some(hp) => matmul(
                    MatMut::new(hw, batch, gh, gh),
                    false,
                    Mat::new(hp, batch, hidden, hidden),
                    Mat::new(w.w_hh, gh, hidden, hidden).t(),
                    1,
                ),
                None => hw.fill(T::ZERO),
            }
            let c_new = if C::HAS_C {
                &mut c_out[k * bh..(k + 1) * bh]
            } else {
                &mut [][..]
            };
            dispatch(StepRows {
                cell,
                hidden,
                ch,
                xw,
                hw,
                w,
                h_prev,
                c_prev: c.map(|s| &s[k * bh..(k + 1) * bh]),
                zeros,
                h_new,
                c_new,
            });
        }
    });
}

/// The pointwise part of [`step`] for one layer.
struct StepRows<'a, C, T> {
    cell: C,
    hidden: usize,
    ch: usize,
    xw: &'a [T],
    hw: &'a mut [T],
    w: &'a Weights<'a, T>,
    h_prev: Option<&'a [T]>,
    c_prev: Option<&'a [T]>,
    zeros: &'a [T],
    h_new: &'a mut [T],
    c_new: &'a mut [T],
}

impl<C: Cell, T: Float> Kernel for StepRows<'_, C, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let (hd, ch) = (self.hidden, self.ch);
        let gh = C::GATES * hd;
        let mut c_rows = self.c_new.chunks_exact_mut(ch.max(1));
        let rows = self.h_new.chunks_exact_mut(hd).zip(self.hw.chunks_exact_mut(gh));
        for (r, (h, hw)) in rows.enumerate() {
            let c: &mut [T] = if C::HAS_C {
                c_rows.next().expect("c row")
            } else {
                empty()
            };
            self.cell.forward(
                Fwd {
                    xw: &self.xw[r * gh..(r + 1) * gh],
                    hw,
                    b_ih: self.w.b_ih,
                    b_hh: self.w.b_hh,
                    h_prev: self.h_prev.map_or(self.zeros, |s| &s[r * hd..(r + 1) * hd]),
                    c_prev: if C::HAS_C {
                        self.c_prev.map_or(self.zeros, |s| &s[r * hd..(r + 1) * hd])
                    } else {
                        &[]
                    },
                    h,
                    c,
                    saved: empty(),
                },
                false,
            );
        }
    }
}
