//! The time loop of every cell: one layer, one or two directions, forward and backward through
//! time.
//!
//! Forward: the input projection is made by the loop's threads, [`PROJ_STEPS`] steps ahead, each
//! its own hidden units' columns; each step is one recurrent GEMM over the sequences still
//! running, then one fused pointwise pass (the cell's).
//! Backward: only `dh_{t-1} = dG_t W_hh` stays in the loop; dW_ih, dW_hh and dx are GEMMs over
//! all T*B rows after it, the bias gradients column sums.
//!
//! Layout. Everything indexed by (time, batch) — x, y, dy, dx and what training keeps — uses the
//! row order of the caller's x ("x-order": row(t, b) = t*st + b*sb), so that the big GEMMs read
//! and write those buffers as they are, without gathers or transposes; with variable lengths
//! whose padding is worth skipping, what the layer makes for itself (x gathered for the input
//! projection, the tape, the gate gradients) holds the valid rows only, packed sequence by
//! sequence (see `Rows`), so that a sequence's steps are consecutive rows there in either layout.
//! The state carried from step to step is compact instead: row r of the state is sequence
//! `perm[r]`, with the sequences sorted by length (longest first) inside each thread's slice, so
//! the sequences still running at a step are a prefix of the slice and the recurrent GEMM does no
//! work past a sequence's end.
//!
//! Threads. When the batch is large enough, it is cut into one slice per thread and each slice
//! runs the whole time loop on its own (no per-step synchronisation); otherwise the threads share
//! each step as a team (`team.rs`), cut into blocks of hidden units. The two directions of a
//! bidirectional layer run side by side.

use crate::buffers::{self, Aligned, ToWrite};
use crate::cells::{Bwd, Cell, CellKind, Fwd};
use crate::error::{Error, Result};
use crate::gemm::{column_blocks, matmul, matmul_packed, matmul_unpacked, unpacked_by_dot, Mat, MatMut, PackedB};
use crate::simd::{dispatch, prefetch, Float, Isa, Kernel};
use crate::team;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Sequences per batch slice, about: a slice runs its own time loop. This slicing depends on the
/// batch size only, never on the thread count, so that results do not change with the number of
/// threads where the products' rounding depends on their row count (the GEMM crates', without
/// the packed kernel). Below two slices' worth, one loop runs and the threads share its steps
/// (see [`Tiles`]), unless [`slice_count`] gives each thread a slice of its own. The slice count
/// is [`balanced`].
const SLICE_ROWS: usize = 64;

/// A count of equal pieces of work (batch slices, unit blocks) made fair to two or four threads:
/// from three on, rounded to the nearest multiple of four (three slices on two threads had left
/// one thread idle for a third of the time loop).
fn balanced(n: usize) -> usize {
    if n >= 3 {
        (n + 1) / 4 * 4
    } else {
        n
    }
}

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
pub struct Tape<T: Float> {
    layer: Layer,
    plan: Plan,
    /// The x-order rows inside the sequences' lengths, when padding is worth skipping.
    valid: Option<Vec<usize>>,
    /// Then, the packed row of each valid x-order row ([`Rows`]).
    at: Option<Vec<usize>>,
    /// A copy of each direction's parameters, to refuse a backward with other ones.
    weights: Vec<Aligned<T>>,
    c0: Option<Vec<T>>,
    dirs: Vec<DirTape<T>>,
}

struct DirTape<T: Float> {
    /// The cell's saved values per (t, b), in the rows of [`Rows`]; in each row, unit block by
    /// unit block (a block's `SAVED` pieces of its width side by side), so that a block of a
    /// step writes and reads its own as one piece.
    saved: Aligned<T>,
    /// x_t then h_{t-1}, side by side in one row per (t, b) ([`Rows`]), zero past a sequence's
    /// length where those rows are kept: what `dW_ih` and `dW_hh` are products with, so that one
    /// GEMM computes both when they share the gate gradients (see `backward_impl`).
    xh: Aligned<T>,
}

/// The tape's big buffers go back to [`buffers`] for the next training step.
impl<T: Float> Drop for DirTape<T> {
    fn drop(&mut self) {
        buffers::give(std::mem::replace(&mut self.saved, Aligned::zeroed(0)));
        buffers::give(std::mem::replace(&mut self.xh, Aligned::zeroed(0)));
    }
}

impl<T: Float> Tape<T> {
    /// The layer this tape was recorded for.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// Refuse parameters other than the ones the forward pass used (compared on up to `threads`
    /// threads): their gradients would be those of a computation that never ran.
    pub fn check_weights(&self, weights: &[Weights<'_, T>], threads: usize) -> Result<()> {
        self.layer.check_weights(weights)?;
        if weights
            .iter()
            .zip(&self.weights)
            .any(|(w, kept)| !same_weights(w, kept, threads))
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
    /// Floating-point operations of a forward over every step (the two products; the backward
    /// does about twice as many).
    fn flops(&self) -> usize {
        2 * self.rows() * (self.dims.input + self.dims.hidden) * self.gh() * self.directions
    }
    /// The width of a row of [`DirTape::xh`]: x_t, then h_{t-1}.
    fn kept_width(&self) -> usize {
        self.dims.input + self.dims.hidden
    }
    /// Where h_{t-1} of row `row` of [`DirTape::xh`] (see [`Rows`]) starts.
    fn kept_h(&self, row: usize) -> usize {
        row * self.kept_width() + self.dims.input
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
            // weight_hh first: the hidden size is read from it, so it is the one to name when its
            // own two sizes disagree.
            expect_len("weight_hh", w.w_hh.len(), gh * h, || format!("({gh}, {h})"))?;
            expect_len("weight_ih", w.w_ih.len(), gh * i, || format!("({gh}, {i})"))?;
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
    /// The sequences of `layer`'s batch dealt into `nslices` slices ([`slice_count`]).
    fn new(layer: &Layer, lengths: Option<&[usize]>, nslices: usize) -> Plan {
        let (batch, seq_len) = (layer.dims.batch, layer.dims.seq_len);
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

    /// The x-order rows of `layer` past the sequences' lengths.
    fn padding<'a>(&'a self, layer: &'a Layer) -> impl Iterator<Item = usize> + 'a {
        let steps = layer.dims.seq_len;
        (self.perm.iter().zip(&self.lens)).flat_map(move |(&b, &len)| (len..steps).map(move |t| layer.row(t, b)))
    }

    /// The most rows a slice has (the most a step's product can have).
    fn max_rows(&self) -> usize {
        self.slices.iter().map(|&(_, n)| n).max().unwrap_or(0)
    }

    /// Run `f(first_row, rows, team_size)` for every slice: the slices in parallel, sharing the
    /// `threads`; or, `led` (see [`led_by_caller`]), one after another on this thread, each with
    /// a team of all of them.
    fn for_each_slice(&self, threads: usize, led: bool, f: impl Fn(usize, usize, usize) + Sync) {
        if led {
            self.slices.iter().for_each(|&(off, n)| f(off, n, threads));
        } else {
            let team = threads.div_ceil(self.slices.len());
            map_items(self.slices.clone(), threads, |_, (off, n)| f(off, n, team));
        }
    }
}

/// How many slices [`Plan`] cuts `layer`'s batch into for sweeps on `threads` threads: one per
/// [`SLICE_ROWS`] sequences; or, for a single-direction layer whose `W_hh` the L2 holds (up to
/// [`ROW_CUT_BYTES`]), one per thread where each gets 3 rows or more. Then each thread runs a
/// time loop of its own, reading all of `W_hh` from its own L2, instead of the threads sharing
/// every step of one loop (a hand-over and a wait per step). The results are the same bit for
/// bit: the slices' products are the packed kernel's (more than
/// [`crate::gemm::DOT_MAX_ROWS`] rows, hence the 3), whose rounding does not depend on the row
/// count, and the input projection is made per sequence. In turns in one process, 2 threads
/// (Intel Xeon, 2 MB of L2 a core), against one loop: inference took 0.6-0.9x the time for LSTM
/// at B=8, H=128, 0.87-0.92x for GRU at B=8-16, H=256, 0.88-0.94x for LSTM at B=8-16, H=256
/// (1 MB of `W_hh`), 0.94-1.0x at B=32-64, 0.96-0.99x for RNN at B=32-64, H=512; training
/// 0.90-0.96x (LSTM), 0.76-0.92x (GRU) at B=8. Past the L2 it lost: 1.02-1.03x for GRU at H=512
/// (3 MB), 1.08-1.56x for LSTM at H=512, B=8-16 (4 MB); and with two directions, which the
/// threads already share, 1.03-1.06x. Not for calls under [`crate::threads::SHORT_CALL_FLOPS`],
/// whose caller yields the cores to the threads while it waits (it is not asleep when they end):
/// a slice's thread then waits for its core, with no other thread to take over its rows as a
/// team's would take over its blocks. RNN inference at B=8, H=256 (157 MFLOP) took 0.57-0.65 ms
/// in some processes and 1.13 ms in others, against 0.88 ms with one shared loop.
fn slice_count<T: Float>(layer: &Layer, threads: usize) -> usize {
    let batch = layer.dims.batch;
    let by_batch = slices_by_batch(batch);
    let own = (threads / layer.directions).min(batch / (crate::gemm::DOT_MAX_ROWS + 1));
    let w_hh_bytes = layer.gh() * layer.dims.hidden * std::mem::size_of::<T>();
    let long = layer.flops() >= crate::threads::SHORT_CALL_FLOPS;
    if own > by_batch && long && w_hh_bytes <= ROW_CUT_BYTES && PackedB::<T>::packs(batch.div_ceil(own), true) {
        own
    } else {
        by_batch
    }
}

/// One slice per [`SLICE_ROWS`] sequences, [`balanced`].
fn slices_by_batch(batch: usize) -> usize {
    balanced((batch / SLICE_ROWS).max(1))
}

/// Hidden units per block of a step: a block computes its units' gates (its columns of the
/// recurrent product) and their pointwise pass, so that the threads of a step share no
/// intermediate result and synchronise once per step. Wide enough for the batch-1 product to fill
/// the kernel's four panels even for one gate.
const UNIT_BLOCK: usize = 64;
/// Blocks a step is cut into at least, where there are rows enough: with few unit blocks (small
/// hidden sizes), the active rows are cut too.
const MIN_BLOCKS: usize = 4;
/// Fewest rows in a row part.
const MIN_PART_ROWS: usize = 16;
/// Up to this many bytes of `W_hh`, the rows are cut in two too (from `2 * MIN_PART_ROWS` rows),
/// so that each of two team members owns whole rows of the state (see [`Tiles::get`]) while
/// reading all of `W_hh`, which its L2 still holds. In turns in one process, 2 threads, B=32-64
/// (Intel Xeon, 2 MB of L2 a core), against unit blocks over all rows: 0.86-0.97x the time at
/// 256 KB-1 MB (LSTM H=256, GRU H=256, RNN H=256-512; inference and training); above it
/// 0.98-1.02x from 1.8 to 4 MB (GRU and LSTM H=384-512) and 1.04x in inference at 16 MB (LSTM
/// H=1024). Like the rest of the cut, it depends on the sizes alone, never on the thread count.
/// Up to the same size a single-direction layer's threads get batch slices of their own
/// ([`slice_count`]).
const ROW_CUT_BYTES: usize = 1 << 20;

/// The hidden units `[u0, u1)` of each unit block: about `UNIT_BLOCK` wide, multiples of 8
/// (a vector) but the last, their count [`balanced`] (H=192 had three blocks, and ran 1.15x
/// faster on two threads than on one). They depend on the hidden size alone, never on the thread
/// count, so that the results do not either.
fn unit_blocks(hidden: usize) -> Vec<(usize, usize)> {
    let nb = balanced((hidden / UNIT_BLOCK).max(1));
    let w = hidden.div_ceil(nb).next_multiple_of(8);
    (0..hidden).step_by(w).map(|u0| (u0, (u0 + w).min(hidden))).collect()
}

/// How a step over the rows of one batch slice is cut into blocks: each unit block (forward) or
/// part (backward, [`bwd_parts`]) times `row_parts` ranges of the active rows.
#[derive(Clone, Copy)]
struct Tiles {
    unit_blocks: usize,
    row_parts: usize,
}

impl Tiles {
    fn new(rows: usize, unit_blocks: usize, w_hh_bytes: usize) -> Tiles {
        let least = if w_hh_bytes <= ROW_CUT_BYTES { 2 } else { 1 };
        let row_parts = MIN_BLOCKS
            .div_ceil(unit_blocks)
            .max(least)
            .min(rows / MIN_PART_ROWS)
            .max(1);
        Tiles { unit_blocks, row_parts }
    }
    fn count(&self) -> usize {
        self.unit_blocks * self.row_parts
    }
    /// Block `j` when `active` rows run: (unit block or part, first row, end row). The blocks of
    /// a row range are next to each other, so that a team member's run of blocks ([`crate::team`])
    /// covers whole rows where rows are cut: its rows of the state are its own to read and write.
    /// With the unit blocks next to each other instead (each member half the weights, every row's
    /// state half the other's), on 2 threads at H=128-136, B=32-64, inference took 1.10-1.14x
    /// the time and training 1.04-1.10x; at H=512, B=64 training took 0.99-1.01x.
    fn get(&self, j: usize, active: usize) -> (usize, usize, usize) {
        let (part, ub) = (j / self.unit_blocks, j % self.unit_blocks);
        (ub, part * active / self.row_parts, (part + 1) * active / self.row_parts)
    }
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

/// The times of steps `[s0, s1)` of a sequence of length `len`, in increasing order: the first
/// and how many (none past the sequence's end). A chunk of [`InputProj`] holds its rows in
/// that order.
#[inline(always)]
fn chunk_times(s0: usize, s1: usize, len: usize, reverse: bool) -> (usize, usize) {
    let e = s1.min(len);
    if e <= s0 {
        return (0, 0);
    }
    (if reverse { len - e } else { s0 }, e - s0)
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
    /// # Safety
    /// `[at, at + len)` must be inside the buffer and written by no one meanwhile.
    #[inline(always)]
    unsafe fn read<'a>(self, at: usize, len: usize) -> &'a [T] {
        std::slice::from_raw_parts(self.0.add(at), len)
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
    cache: Option<&mut WeightCache<T>>,
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
    if train && cache.is_some() {
        return Err(Error::Value(
            "cache is for inference only (a training forward's weights change at every update)".into(),
        ));
    }

    // Led calls have too few rows for slices of their own (see `slice_count`).
    let led = led_by_caller(d.batch.div_ceil(slices_by_batch(d.batch)));
    crate::threads::run(layer.flops(), led, |threads| {
        let plan = Plan::new(layer, lengths, slice_count::<T>(layer, threads));
        // Led, the threads are the sweep teams' members, and the rest runs on the caller's.
        let prepared = cache.and_then(|c| c.get(layer, weights, plan.max_rows(), if led { 1 } else { threads }));
        crate::with_cell!(layer.cell, cell: C => forward_impl::<C, T>(cell, layer, x, weights, prepared, plan, h0, c0, lengths, y, hn, cn, train, threads, led))
    })
}

/// Elements per piece of the weights that the threads copy or compare.
const WEIGHT_PIECE: usize = 16 << 10;

/// One direction's parameters in pieces of at most [`WEIGHT_PIECE`], in order, each paired with
/// its place in a concatenated copy of length `len`; None if the parameters do not have `len`
/// elements in all.
fn pieces<'a, T, K>(w: &Weights<'a, T>, mut kept: K, len: usize) -> Option<Vec<(&'a [T], K)>>
where
    K: Split,
{
    let parts = [w.w_ih, w.w_hh, w.b_ih, w.b_hh];
    if parts.iter().map(|p| p.len()).sum::<usize>() != len {
        return None;
    }
    let mut out = Vec::new();
    for piece in parts.into_iter().flat_map(|p| p.chunks(WEIGHT_PIECE)) {
        let (head, tail) = kept.split(piece.len());
        out.push((piece, head));
        kept = tail;
    }
    Some(out)
}

/// A slice that [`pieces`] cuts (shared or mutable).
trait Split: Sized {
    fn split(self, at: usize) -> (Self, Self);
}
impl<T> Split for &[T] {
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}
impl<T> Split for &mut [T] {
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

/// One direction's parameters, concatenated (aligned: the batch-1 products read `w_hh` from the
/// copy as it is), copied by the threads piece by piece (a 1.5 MB copy on one thread had been 2%
/// of LSTM training at batch 8).
fn weights_copy<T: Float>(w: &Weights<'_, T>, threads: usize) -> Aligned<T> {
    let len = w.w_ih.len() + w.w_hh.len() + w.b_ih.len() + w.b_hh.len();
    let mut out = Aligned::zeroed(len);
    let items = pieces(w, &mut out[..], len).expect("the length is the parameters'");
    map_items(items, threads, |_, (piece, to)| to.copy_from_slice(piece));
    out
}

/// Whether `w` equals the copy `kept`, bit for bit (so that a NaN parameter equals itself),
/// compared as bytes (a `memcmp`, several times faster than element by element), by the threads
/// piece by piece.
fn same_weights<T: Float>(w: &Weights<'_, T>, kept: &[T], threads: usize) -> bool {
    pieces(w, kept, kept.len()).is_some_and(|items| {
        map_items(items, threads, |_, (piece, k)| as_bytes(piece) == as_bytes(k))
            .into_iter()
            .all(|same| same)
    })
}

/// The bytes of a slice of floats.
fn as_bytes<T: Float>(s: &[T]) -> &[u8] {
    // SAFETY: f32 and f64 (the only `Float`s) have no padding, so every byte is initialised.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

/// The x-order rows inside the sequences' lengths, sequence by sequence (each one's steps in time
/// order), when at least a tenth of the rows is padding: the big GEMMs then run on those rows
/// gathered into a dense block (copying them costs a few percent of the GEMMs' time), and a
/// sequence's run of steps is a run of consecutive rows, whatever the layout of x.
fn valid_rows(layer: &Layer, lengths: Option<&[usize]>) -> Option<Vec<usize>> {
    let l = lengths?;
    let total: usize = l.iter().sum();
    if total * 10 > layer.rows() * 9 {
        return None;
    }
    let idx: Vec<usize> = l
        .iter()
        .enumerate()
        .flat_map(|(b, &len)| (0..len).map(move |t| layer.row(t, b)))
        .collect();
    Some(idx)
}

/// The rows `idx` (of width `w`) of `src`, packed.
fn gather<T: Copy + Send + 'static>(src: &[T], idx: &[usize], w: usize) -> Vec<T> {
    let mut out = buffers::take(idx.len() * w);
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

/// Zero the x-order rows (`width` wide) of `buf` past each sequence's length: of y, and of dx.
fn zero_padding<T: Float>(layer: &Layer, plan: &Plan, buf: &mut [T], width: usize) {
    for r in plan.padding(layer) {
        buf[r * width..(r + 1) * width].fill(T::ZERO);
    }
}

/// `f(index, item)` for every item (directions, batch slices, row parts, product tasks), on
/// `threads` threads when there are several items and threads, else in order on this one. The
/// threads take the items one at a time, in order, from a shared counter: inside the pool (a call
/// handed to it) its threads, and from outside it (a call [`led_by_caller`]) this thread with the
/// pool's as helpers (see [`crate::threads::with_caller`]). Inside the pool, rayon's own parallel
/// iterator had been used: it hands each thread runs of consecutive items, split further only
/// when a thread steals, which can leave one thread with the end of a run of uneven tasks (the
/// input projection's 78 at LSTM B=8) while the other waits (the likely cause; not traced). Taken
/// one at a time instead, in turns in one process on two threads (AMD EPYC, AVX2), the projection
/// took 0.84-0.89x the time at B=8 (I=128, H=256) and 0.93x at B=64 (I=H=512), the LSTM's
/// inference call 0.91-0.98x; training calls, whose products mostly run in the GEMM crates'
/// own threading, were unchanged (0.99-1.03x, within the noise).
fn map_items<I: Send, R: Send>(items: Vec<I>, threads: usize, f: impl Fn(usize, I) -> R + Sync) -> Vec<R> {
    if items.len() < 2 || threads < 2 {
        return items.into_iter().enumerate().map(|(d, it)| f(d, it)).collect();
    }
    // Each slot holds its item until one thread takes it, then what `f` made of it. (A panic in
    // `f` reaches the caller, through rayon or `with_caller`, before the slots are read.)
    let slots: Vec<Mutex<(Option<I>, Option<R>)>> = items.into_iter().map(|it| Mutex::new((Some(it), None))).collect();
    let next = AtomicUsize::new(0);
    let work = |_: usize| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = slots.get(i) else { break };
        let item = slot.lock().expect("no panic holds a slot").0.take();
        let out = f(i, item.expect("each item is taken once"));
        slot.lock().expect("no panic holds a slot").1 = Some(out);
    };
    let members = threads.min(slots.len());
    if rayon::current_thread_index().is_some() {
        (0..members).into_par_iter().for_each(work);
    } else {
        crate::threads::with_caller(members, &work);
    }
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .ok()
                .and_then(|(_, out)| out)
                .expect("every item was mapped")
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn forward_impl<C: Cell, T: Float>(
    cell: C,
    layer: &Layer,
    x: &[T],
    weights: &[Weights<'_, T>],
    prepared: Option<&[Prepared<T>]>,
    plan: Plan,
    h0: Option<&[T]>,
    c0: Option<&[T]>,
    lengths: Option<&[usize]>,
    y: &mut [T],
    hn: &mut [T],
    cn: &mut [T],
    train: bool,
    threads: usize,
    led: bool,
) -> Option<Tape<T>> {
    let d = layer.dims;
    let (h, rows, nd) = (d.hidden, layer.rows(), layer.directions);
    let ydim = nd * h;
    let ldk = layer.kept_width();
    zero_padding(layer, &plan, y, ydim);
    // The big GEMMs run over the valid rows only when padding is worth skipping, else over all.
    let valid = valid_rows(layer, lengths);
    let xs: Cow<'_, [T]> = match &valid {
        Some(idx) => Cow::Owned(gather(x, idx, d.input)),
        None => Cow::Borrowed(x),
    };
    let nrows = valid.as_ref().map_or(rows, Vec::len);
    // The packed row of each valid x-order row, for the projection and the tape ([`Rows`]).
    let at = valid.as_ref().map(|idx| {
        let mut at = vec![usize::MAX; rows];
        for (k, &r) in idx.iter().enumerate() {
            at[r] = k;
        }
        at
    });
    let (yp, hnp, cnp) = (Ptr::new(y), Ptr::new(hn), Ptr::new(cn));
    let bh = d.batch * h;
    let units = unit_blocks(h);
    // Led by the caller (see `led_by_caller`), the threads share the directions, each with a
    // sweep team of its share of them, and the rest runs on one.
    let (pool, per_dir) = if led {
        (1, (threads / nd).max(1))
    } else {
        (threads, threads)
    };
    let dirs = map_items(weights.to_vec(), threads, |dir, w| {
        let own;
        let prep = match prepared {
            Some(p) => &p[dir],
            None => {
                own = Prepared::new(&w, C::GATES, d.input, h, &units, plan.max_rows(), pool);
                &own
            }
        };
        let packed = Rows(at.as_deref());
        let project = Projection {
            x: &xs,
            rows: packed,
            input: d.input,
            stride: if at.is_some() { 1 } else { layer.strides().0 },
            steps: if led { d.seq_len } else { PROJ_STEPS },
            w_ih: &prep.w_ih,
        };
        let mut kept = train.then(|| {
            let (saved, mut xh) = (ToWrite::new(nrows * C::SAVED * h), ToWrite::<T>::new(nrows * ldk));
            // x_t into each kept row inside the lengths (the sweep adds h_{t-1} beside it).
            for (b, len) in (0..d.batch).map(|b| (b, lengths.map_or(d.seq_len, |l| l[b]))) {
                for r in (0..len).map(|t| layer.row(t, b)) {
                    // SAFETY: row r of x and its row of the kept buffer are inside them; nothing
                    // else touches the buffer yet.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            x.as_ptr().add(r * d.input),
                            xh.ptr().add(packed.of(r) * ldk),
                            d.input,
                        )
                    };
                }
            }
            (saved, xh)
        });
        let keep = kept.as_mut().map(|(s, p)| (Ptr(s.ptr()), Ptr(p.ptr())));
        let sw = Sweep {
            cell,
            layer,
            plan: &plan,
            units: &units,
            w_hh: &prep.w_hh,
            bias: &prep.bias,
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
        plan.for_each_slice(per_dir, led, |off, n, team| {
            sw.forward_slice(off, n, team, project, h0, c0, out)
        });
        // SAFETY: the sweep wrote every row inside the lengths (see `FwdTile`), and the padding
        // rows, if kept, are zeroed here.
        kept.map(|(mut saved, mut xh)| unsafe {
            saved.zero_rows(packed.padding(&plan, layer), C::SAVED * h);
            xh.zero_rows(packed.padding(&plan, layer), ldk);
            DirTape {
                saved: saved.written(),
                xh: xh.written(),
            }
        })
    });
    train.then(|| Tape {
        layer: *layer,
        plan,
        valid,
        at,
        weights: weights.iter().map(|w| weights_copy(w, pool)).collect(),
        c0: c0.map(<[T]>::to_vec),
        dirs: dirs.into_iter().flatten().collect(),
    })
}

/// One direction's sweep over the batch slices.
struct Sweep<'a, C, T> {
    cell: C,
    layer: &'a Layer,
    plan: &'a Plan,
    /// The hidden units `[u0, u1)` of each unit block ([`unit_blocks`]).
    units: &'a [(usize, usize)],
    /// W_hh packed once per sweep for the per-step products: forward, per unit block, the
    /// block's rows of every gate, transposed (H x G*w); backward, per part ([`bwd_parts`]), its
    /// unit blocks' rows of every gate (G*pw x H).
    w_hh: &'a [PackedB<T>],
    /// Per unit block, forward only: the block's biases, `b_ih` then `b_hh`, each G*w.
    bias: &'a [Vec<T>],
    reverse: bool,
}

impl<C, T> Sweep<'_, C, T> {
    /// The bytes of the layer's W_hh (one direction).
    fn w_hh_bytes(&self) -> usize {
        self.layer.gh() * self.layer.dims.hidden * std::mem::size_of::<T>()
    }
}

/// The rows of `m`, a (G*H x cols) matrix of G gate blocks (row-major), reordered unit block by
/// unit block: for each block `[u0, u1)` of `units`, its rows of every gate in gate order.
fn by_unit_block<T: Float>(m: &[T], gates: usize, h: usize, cols: usize, units: &[(usize, usize)]) -> Vec<T> {
    let mut out = Vec::with_capacity(m.len());
    for &(u0, u1) in units {
        for g in 0..gates {
            out.extend_from_slice(&m[(g * h + u0) * cols..(g * h + u1) * cols]);
        }
    }
    out
}

/// What a forward sweep derives from one direction's weights before its time loop. Its packed
/// blocks keep views of the weights where they were when they were made (see [`PackedB`]).
pub struct Prepared<T> {
    /// Per unit block, the block's rows of every gate of W_ih, transposed (I x G*w), for the
    /// input projection's products ([`Projection`]): packed where the recurrent products are,
    /// read as they are otherwise.
    w_ih: Vec<PackedB<T>>,
    /// See [`Sweep::w_hh`].
    w_hh: Vec<PackedB<T>>,
    /// See [`Sweep::bias`].
    bias: Vec<Vec<T>>,
}

impl<T: Float> Prepared<T> {
    /// The unit blocks on up to `threads` threads.
    fn new(
        w: &Weights<'_, T>,
        gates: usize,
        input: usize,
        h: usize,
        units: &[(usize, usize)],
        max_rows: usize,
        threads: usize,
    ) -> Self {
        let (packs, bias): (Vec<_>, _) = map_items(units.to_vec(), threads, |_, (u0, u1)| {
            // The block's rows of every gate of `m` (G*H x cols), transposed and packed.
            let packed = |m: &[T], cols: usize| {
                let rows = (0..gates).map(|g| Mat::new(&m[(g * h + u0) * cols..], u1 - u0, cols, cols).t());
                PackedB::new(rows.collect(), max_rows)
            };
            let bias = [w.b_ih, w.b_hh]
                .map(|b| by_unit_block(b, gates, h, 1, &[(u0, u1)]))
                .concat();
            ((packed(w.w_ih, input), packed(w.w_hh, h)), bias)
        })
        .into_iter()
        .unzip();
        let (w_ih, w_hh) = packs.into_iter().unzip();
        Prepared { w_ih, w_hh, bias }
    }
}

/// One layer's [`Prepared`] weights kept from one inference forward to the next, with a copy of
/// the weights they came from. Every call compares the caller's weights with the copy, bit for
/// bit (a `memcmp`, much cheaper than packing), and prepares them again when they differ, so
/// that a change of the weights in place is never missed. Packing per call had cost 6% of an
/// LSTM's inference at batch 8 on two threads, 13% on one.
#[derive(Default)]
pub struct WeightCache<T> {
    /// The layer (cell, input and hidden sizes) the entries were made for.
    key: Option<(CellKind, usize, usize)>,
    /// Per direction, the weights' copy ([`weights_copy`]).
    raw: Vec<Aligned<T>>,
    /// Per direction, what was prepared from `raw`. Its packed blocks point into `raw`, which is
    /// never changed while they live.
    prepared: Vec<Prepared<T>>,
    builds: usize,
}

impl<T: Float> WeightCache<T> {
    /// How many times the entries were (re)made: once, then once per change of the weights or
    /// of the layer.
    pub fn builds(&self) -> usize {
        self.builds
    }

    /// The bytes held.
    pub fn nbytes(&self) -> usize {
        let prepared = self.prepared.iter().map(|p| {
            p.w_ih.iter().map(PackedB::packed_len).sum::<usize>()
                + p.w_hh.iter().map(PackedB::packed_len).sum::<usize>()
                + p.bias.iter().map(Vec::len).sum::<usize>()
        });
        (self.raw.iter().map(|r| r.len()).sum::<usize>() + prepared.sum::<usize>()) * std::mem::size_of::<T>()
    }

    /// Drop the entries (the count of builds stays).
    pub fn clear(&mut self) {
        self.prepared.clear();
        self.raw.clear();
        self.key = None;
    }

    /// The prepared weights of `layer` (whose `weights` were checked) for products of up to
    /// `max_rows` rows; None when nothing would be packed for those and the recurrent weights'
    /// rows are as aligned in place as in a copy (the products then read the weights as they
    /// are, and the copy and comparison would cost about what the rest saves). Arrays that
    /// NumPy made (a copied or unpickled layer's) start on 16 bytes: then every vector load of
    /// the dot-product kernel spans two cache lines, and it ran 1.6x slower (55 against 90 GB/s
    /// from L2, Ice Lake): the copy's aligned rows are worth its comparison at every call.
    fn get(
        &mut self,
        layer: &Layer,
        weights: &[Weights<'_, T>],
        max_rows: usize,
        threads: usize,
    ) -> Option<&[Prepared<T>]> {
        let d = layer.dims;
        let row_bytes = d.hidden * std::mem::size_of::<T>();
        let misaligned = |w: &Weights<'_, T>| {
            row_bytes.is_multiple_of(buffers::ALIGN) && !(w.w_hh.as_ptr() as usize).is_multiple_of(buffers::ALIGN)
        };
        if !PackedB::<T>::packs(max_rows, true) && !weights.iter().any(misaligned) {
            return None;
        }
        let key = Some((layer.cell, d.input, d.hidden));
        let same = self.key == key
            && self.raw.len() == weights.len()
            && weights
                .iter()
                .zip(&self.raw)
                .all(|(w, raw)| same_weights(w, raw, threads));
        if !same {
            self.clear();
            self.raw = weights.iter().map(|w| weights_copy(w, threads)).collect();
            let units = unit_blocks(d.hidden);
            let (gh, g) = (layer.gh(), layer.cell.gates());
            self.prepared = self
                .raw
                .iter()
                .map(|raw| {
                    let (w_ih, rest) = raw.split_at(gh * d.input);
                    let (w_hh, rest) = rest.split_at(gh * d.hidden);
                    let (b_ih, b_hh) = rest.split_at(gh);
                    let kept = Weights { w_ih, w_hh, b_ih, b_hh };
                    Prepared::new(&kept, g, d.input, d.hidden, &units, max_rows, threads)
                })
                .collect();
            self.key = key;
            self.builds += 1;
        }
        Some(&self.prepared)
    }
}

/// `active[s]`: how many of a slice's rows (sorted longest first) run step `s`.
fn active_rows(lens: &[usize]) -> Vec<usize> {
    (0..lens[0]).map(|s| lens.partition_point(|&l| l > s)).collect()
}

/// The widest unit block.
fn widest(units: &[(usize, usize)]) -> usize {
    units.iter().map(|&(u0, u1)| u1 - u0).max().unwrap_or(0)
}

/// The rows of what a layer computes per (t, b) besides its outputs (x gathered for the input
/// projection, the training tape, the gate gradients): one per x-order row, or, when padding is
/// skipped, one per valid row only, packed sequence by sequence ([`valid_rows`]), so that the
/// GEMMs over them need neither gathers nor zeroed padding rows, the tape holds no padding, and a
/// sequence's steps are consecutive rows (one product projects a chunk of them, see
/// [`PROJ_STEPS`]).
#[derive(Clone, Copy)]
struct Rows<'a>(Option<&'a [usize]>);

impl<'a> Rows<'a> {
    /// The row of x-order row `xr` (a valid one).
    #[inline(always)]
    fn of(self, xr: usize) -> usize {
        self.0.map_or(xr, |at| at[xr])
    }
    /// The padding rows that such a buffer holds (to be zeroed): none when it holds the valid
    /// rows only.
    fn padding(self, plan: &'a Plan, layer: &'a Layer) -> impl Iterator<Item = usize> + 'a {
        self.0.is_none().then(|| plan.padding(layer)).into_iter().flatten()
    }
}

/// A forward slice's input projection `x W_ih^T` for one chunk of steps ([`PROJ_STEPS`]), its
/// columns by unit block ([`by_unit_block`]): the row of the slice's row `r` at its `l`-th time
/// of the chunk (times in increasing order, so a reverse sweep's steps from the last) is row
/// `l * n + r`. The team makes each chunk at a step of its own after every step of the previous
/// chunk is done, so one chunk's rows are all it holds, whatever the sequence's length.
#[derive(Clone, Copy)]
struct InputProj<T> {
    data: Ptr<T>,
    gh: usize,
    /// Rows of the slice.
    n: usize,
    /// Steps per chunk ([`Projection::steps`]).
    steps: usize,
}

impl<T: Copy> InputProj<T> {
    /// The projection of the slice's row `r` (of length `len`) at step `s`.
    ///
    /// # Safety
    /// The row must have been written, at the team step before the chunk of steps that holds
    /// `s`, and no one may write it meanwhile.
    unsafe fn row<'a>(&self, r: usize, len: usize, s: usize, reverse: bool) -> &'a [T] {
        let s0 = s - s % self.steps;
        let l = time_of(len, s, reverse) - chunk_times(s0, s0 + self.steps, len, reverse).0;
        self.data.read((l * self.n + r) * self.gh, self.gh)
    }
}

/// Sweeps of at most this many rows a step (batch 1 and 2, whose recurrent products read the
/// weights as they are) are led by the calling thread: it runs the call, forward or backward,
/// and the sweeps' teams take it as their first member with the pool's threads as helpers (see
/// `team.rs`), instead of handing the whole call to the pool and waiting. What else runs on the
/// threads is cut into items that the caller and the helpers take in turn ([`map_items`]): the
/// directions, and the backward's weight-gradient and `dx` products in fixed blocks of columns
/// ([`product`]). The forward's input projection is made by the teams in one chunk, at their
/// first step, each block its own unit block's columns from W_ih as it is (see [`Projection`]).
/// In turns in one process against handing the call to the pool (2 threads, T=100, I=H=128,
/// batch 1): LSTM inference 0.82-0.85x the time, GRU 0.85x, RNN 0.97x; training with the
/// forward led 0.94x, then with the backward led too 0.88-0.92x of that (bidirectional
/// 0.82-0.84x); bidirectional inference, the two directions on a thread each, 0.91-1.02x (each
/// direction on both threads in turn had taken 1.13-1.17x).
fn led_by_caller(max_rows: usize) -> bool {
    max_rows <= crate::gemm::DOT_MAX_ROWS
}

/// Time steps per chunk of the input projection. A sweep's team makes it at a step of its own
/// before each chunk of steps, each block its unit block's columns for its rows of the chunk,
/// with the per-unit-block W_ih of [`Prepared`], so that the rows a block reads at its steps were
/// written by its own thread (the block's owner, see `team.rs`) a few steps before, into its own
/// caches. Against one projection of all the steps before the loop (the threads sharing it in
/// tasks of 64 rows and 192 columns), 2 threads (Intel Xeon), in turns in one process: inference
/// at B=8, H=256 took 0.90-0.96x the time (GRU, RNN, LSTM), at B=32, H=256 0.98x, at B=64, H=512
/// 0.975-1.00x; in alternated processes LSTM inference 0.96x at B=64 (0.93x on one thread) and
/// 0.98x at B=8, LSTM training at B=8 0.986x. The outputs are the same, bit for bit. A slice
/// keeps one chunk's projection only ([`InputProj`]): against every step's (AMD EPYC, Zen 4, 1 MB
/// of L2 a core, 32 MB of L3), 0.97-1.00x the time at B=8 and B=64 (LSTM, GRU; alternated
/// processes, 6-8 rounds; B=1 1.00-1.01x), and an LSTM at B=64, T=1000, H=512 added 26 MB to the
/// process's peak memory in inference instead of 517 MB.
const PROJ_STEPS: usize = 16;

/// What a sweep's team projects ([`PROJ_STEPS`]): rows of `x` (the rows of [`Rows`]), `input`
/// wide, times each unit block's rows of W_ih. A sequence's steps are `stride` rows apart (1
/// where the rows are packed or x is batch-first, the batch size where x is time-major).
#[derive(Clone, Copy)]
struct Projection<'a, T> {
    x: &'a [T],
    /// The row of `x` of each x-order row.
    rows: Rows<'a>,
    input: usize,
    stride: usize,
    /// Steps per chunk: [`PROJ_STEPS`], or all of them in one chunk for sweeps
    /// [`led_by_caller`], whose W_ih is read as it is (not packed), by every product.
    steps: usize,
    w_ih: &'a [PackedB<T>],
}

/// Where a forward slice writes.
#[derive(Clone, Copy)]
struct FwdOut<T> {
    y: Ptr<T>,
    ldy: usize,
    hn: Ptr<T>,
    cn: Ptr<T>,
    /// (saved, [x_t h_{t-1}] rows) when training.
    keep: Option<(Ptr<T>, Ptr<T>)>,
}

impl<C: Cell, T: Float> Sweep<'_, C, T> {
    /// The time loop of one batch slice, each step cut into [`Tiles`] that up to `members`
    /// threads share (see `team.rs`). The state is double-buffered: step `s` reads buffer `s % 2`
    /// whole and writes its blocks of the other.
    #[allow(clippy::too_many_arguments)]
    fn forward_slice(
        &self,
        off: usize,
        n: usize,
        members: usize,
        project: Projection<'_, T>,
        h0: Option<&[T]>,
        c0: Option<&[T]>,
        out: FwdOut<T>,
    ) {
        if n == 0 {
            return;
        }
        let h = self.layer.dims.hidden;
        let ch = if C::HAS_C { h } else { 0 };
        let perm = &self.plan.perm[off..off + n];
        let lens = &self.plan.lens[off..off + n];
        // Aligned, so that the blocks' units of a row meet on a cache line only where their
        // unit blocks do (see `team.rs`).
        let mut hs = [Aligned::zeroed(n * h), Aligned::zeroed(n * h)];
        let mut cs = [Aligned::zeroed(n * ch), Aligned::zeroed(n * ch)];
        for (r, &b) in perm.iter().enumerate() {
            if let Some(h0) = h0 {
                hs[0][r * h..(r + 1) * h].copy_from_slice(&h0[b * h..(b + 1) * h]);
            }
            if let Some(c0) = c0 {
                cs[0][r * ch..(r + 1) * ch].copy_from_slice(&c0[b * ch..(b + 1) * ch]);
            }
        }
        let [ha, hb] = &mut hs;
        let [ca, cb] = &mut cs;
        let (hp, cp) = ([Ptr::new(ha), Ptr::new(hb)], [Ptr::new(ca), Ptr::new(cb)]);
        let active = active_rows(lens);
        let tiles = Tiles::new(n, self.units.len(), self.w_hh_bytes());
        let w = widest(self.units);
        // Aligned, as the packed kernel's 64-byte stores of the product land in it.
        let scratch = || Aligned::zeroed(n * C::GATES * w);
        // Team step c * (ps + 1) projects chunk c; the chunk's time steps follow it.
        let ps = project.steps;
        let chunks = lens[0].div_ceil(ps);
        let gh = C::GATES * h;
        // Read through `xw` only, once written.
        let mut xw_buf = ToWrite::<T>::new(ps.min(lens[0]) * n * gh);
        let xw = InputProj {
            data: Ptr(xw_buf.ptr()),
            gh,
            n,
            steps: ps,
        };
        team::run(tiles.count(), members, lens[0] + chunks, scratch, |scratch, j, step| {
            let (c, i) = (step / (ps + 1), step % (ps + 1));
            let s0 = c * ps;
            if i == 0 {
                let (ub, r0, r1) = tiles.get(j, active[s0]);
                let s1 = (s0 + ps).min(lens[0]);
                for r in r0..r1 {
                    self.project(project, xw, ub, (r, perm[r], lens[r]), (s0, s1));
                }
                return;
            }
            let s = s0 + i - 1;
            let (ub, r0, r1) = tiles.get(j, active[s]);
            if r0 < r1 {
                dispatch(FwdTile {
                    sw: self,
                    s,
                    ub,
                    rows: (r0, r1),
                    perm,
                    lens,
                    xw,
                    kept: project.rows,
                    h: (hp[s % 2], hp[(s + 1) % 2]),
                    c: (cp[s % 2], cp[(s + 1) % 2]),
                    scratch,
                    out,
                });
            }
        });
        buffers::give(xw_buf);
    }

    /// Unit block `ub`'s columns of the input projection of the slice's row `r` (sequence `b`,
    /// of length `len`) at steps `[s0, s1)`: one product, the steps' rows being `p.stride` apart
    /// in x and `xw.n` apart in `xw`.
    fn project(
        &self,
        p: Projection<'_, T>,
        xw: InputProj<T>,
        ub: usize,
        (r, b, len): (usize, usize, usize),
        (s0, s1): (usize, usize),
    ) {
        let (t0, m) = chunk_times(s0, s1, len, self.reverse);
        if m == 0 {
            return;
        }
        let k0 = p.rows.of(self.layer.row(t0, b));
        let (u0, u1) = self.units[ub];
        let x = Mat::new(&p.x[k0 * p.input..], m, p.input, p.stride * p.input);
        // SAFETY: these rows of the unit block's columns are inside the buffer, and this block
        // alone writes them, at a team step after the previous chunk's time steps (which read
        // the buffer) and before the time steps that read them.
        let dst = unsafe {
            MatMut::from_raw(
                xw.data.at(r * xw.gh + C::GATES * u0).0,
                m,
                C::GATES * (u1 - u0),
                xw.n * xw.gh,
            )
        };
        matmul_packed(dst, false, x, &p.w_ih[ub]);
    }
}

/// One block of a forward step: the recurrent product for its rows and units, then their
/// pointwise pass.
struct FwdTile<'a, 'w, C, T> {
    sw: &'a Sweep<'w, C, T>,
    s: usize,
    ub: usize,
    rows: (usize, usize),
    perm: &'a [usize],
    lens: &'a [usize],
    xw: InputProj<T>,
    /// The kept buffers' rows ([`Rows`]).
    kept: Rows<'a>,
    /// (input, output) state buffers of the step.
    h: (Ptr<T>, Ptr<T>),
    c: (Ptr<T>, Ptr<T>),
    scratch: &'a mut [T],
    out: FwdOut<T>,
}

impl<C: Cell, T: Float> Kernel for FwdTile<'_, '_, C, T> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self) {
        let sw = self.sw;
        let h = sw.layer.dims.hidden;
        let sv = C::SAVED * h;
        let (out, s) = (self.out, self.s);
        let ((u0, u1), (r0, r1)) = (sw.units[self.ub], self.rows);
        let (w, n) = (u1 - u0, r1 - r0);
        let gw = C::GATES * w;
        let hw = &mut self.scratch[..n * gw];
        // Fetch the rows' input projections (written at the chunk's first team step, maybe
        // pushed out of the nearer caches since) while the product runs: the pointwise pass
        // reads them after it.
        let xrow = |r: usize| sw.layer.row(time_of(self.lens[r], s, sw.reverse), self.perm[r]);
        // Compact row r's inputs to this block, its gates side by side (see `by_unit_block`).
        // SAFETY: the chunk's projection was made before its time steps, and is not written
        // during them.
        let inputs = |r: usize| unsafe { &self.xw.row(r, self.lens[r], s, sw.reverse)[C::GATES * u0..][..gw] };
        for r in r0..r1 {
            prefetch(inputs(r));
        }
        // SAFETY: no one writes the step's input state during the step.
        let h_in = unsafe { self.h.0.read(r0 * h, n * h) };
        matmul_packed(
            MatMut::new(hw, n, gw, gw),
            false,
            Mat::new(h_in, n, h, h),
            &sw.w_hh[self.ub],
        );
        let (b_ih, b_hh) = sw.bias[self.ub].split_at(gw);
        for (i, hw) in hw.chunks_exact_mut(gw).enumerate() {
            let r = r0 + i;
            // The product's stream of weights may have pushed the early fetch out of the nearer
            // caches: fetch the next row's inputs again while this row's pointwise pass runs
            // (the hottest stalled load fell from 16% to 6% of the pass's samples, LSTM B=8).
            if r + 1 < r1 {
                prefetch(inputs(r + 1));
            }
            let (b, len, xr) = (self.perm[r], self.lens[r], xrow(r));
            let xl = inputs(r);
            let h_prev = &h_in[i * h + u0..][..w];
            // SAFETY: this block alone writes units [u0, u1) of row r of the output state, of row
            // xr of the kept buffers and of y, and of row b of hn / cn; no one writes the input
            // state during the step.
            unsafe {
                let (c_prev, c_new): (&[T], &mut [T]) = if C::HAS_C {
                    (self.c.0.read(r * h + u0, w), self.c.1.slice(r * h + u0, w))
                } else {
                    (&[], empty())
                };
                let h_new = self.h.1.slice(r * h + u0, w);
                let saved = match out.keep {
                    Some((sp, xhp)) => {
                        let kr = self.kept.of(xr);
                        xhp.slice(sw.layer.kept_h(kr) + u0, w).copy_from_slice(h_prev);
                        sp.slice(kr * sv + C::SAVED * u0, C::SAVED * w)
                    }
                    None => empty(),
                };
                sw.cell.forward::<I, T>(
                    Fwd {
                        xw: xl,
                        hw,
                        b_ih,
                        b_hh,
                        h_prev,
                        c_prev,
                        h: &mut *h_new,
                        c: &mut *c_new,
                        saved,
                    },
                    out.keep.is_some(),
                );
                out.y.slice(xr * out.ldy + u0, w).copy_from_slice(h_new);
                if len == s + 1 {
                    out.hn.slice(b * h + u0, w).copy_from_slice(h_new);
                    if C::HAS_C {
                        out.cn.slice(b * h + u0, w).copy_from_slice(c_new);
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
    let led = led_by_caller(tape.plan.max_rows());
    crate::threads::run(2 * layer.flops(), led, |threads| {
        // Before anything is written (the weights' comparison is the longest of the checks, and
        // runs on the threads).
        tape.check_weights(weights, threads)?;
        crate::with_cell!(layer.cell, cell: C => backward_impl::<C, T>(cell, tape, weights, dy, dhn, dcn, dx, dh0, dc0, grads, dh_seq, threads, led));
        Ok(())
    })?
}

/// Columns of the gate gradients per block of [`add_bias_grads`].
const BIAS_COLS: usize = 256;

/// `b_ih += ` the column sums of `dgx` and `b_hh += ` those of `dgh` (the same sums when `dgh` is
/// None, the two sides sharing the gate gradients): one pass over each, the columns cut into
/// fixed blocks that the threads share (so that the sums do not depend on the thread count).
fn add_bias_grads<T: Float>(g: &mut Grads<'_, T>, dgx: &[T], dgh: Option<&[T]>, gh: usize, threads: usize) {
    let blocks: Vec<_> = g.b_ih.chunks_mut(BIAS_COLS).zip(g.b_hh.chunks_mut(BIAS_COLS)).collect();
    map_items(blocks, threads, |j, (bi, bh)| {
        let w = bi.len();
        let sums = |m: &[T]| {
            let mut s = [T::ZERO; BIAS_COLS];
            for row in m.chunks_exact(gh) {
                let row = &row[j * BIAS_COLS..][..w];
                s.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            }
            s
        };
        let sx = sums(dgx);
        bi.iter_mut().zip(&sx).for_each(|(a, &b)| *a += b);
        let sh = dgh.map_or(sx, sums);
        bh.iter_mut().zip(&sh).for_each(|(a, &b)| *a += b);
    });
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
    led: bool,
) {
    let layer = &tape.layer;
    let d = layer.dims;
    let (h, gh, rows, nd) = (d.hidden, layer.gh(), layer.rows(), layer.directions);
    let bh = d.batch * h;
    let nrows = tape.valid.as_ref().map_or(rows, Vec::len);
    let (dh0p, dc0p) = (Ptr::new(dh0), Ptr::new(dc0));
    let jobs: Vec<_> = grads.iter_mut().zip(&tape.dirs).collect();
    // Led by the caller (see `led_by_caller`), the threads share the directions, each with its
    // share of them.
    let per_dir = if led { (threads / nd).max(1) } else { threads };
    let dgxs = map_items(jobs, threads, |dir, (g, kept)| {
        let threads = per_dir;
        let w = &weights[dir];
        let mut dgx = ToWrite::new(nrows * gh);
        let mut dgh_all = ToWrite::new(if C::SPLIT_DGH { nrows * gh } else { 0 });
        let units = unit_blocks(h);
        let parts = bwd_parts(units.len());
        // Each part's rows of every gate of W_hh, unit block by unit block (G*pw x H), and their
        // packing (which reads them, so they live as long).
        let w_rows: Vec<Vec<T>> = parts
            .iter()
            .map(|&(b0, b1)| by_unit_block(w.w_hh, C::GATES, h, h, &units[b0..b1]))
            .collect();
        let w_hh = map_items(w_rows.iter().collect(), threads, |_, rows: &Vec<T>| {
            let k = rows.len() / h.max(1);
            PackedB::new(vec![Mat::new(rows, k, h, h)], tape.plan.max_rows())
        });
        let sw = Sweep {
            cell,
            layer,
            plan: &tape.plan,
            units: &units,
            w_hh: &w_hh,
            bias: &[],
            reverse: dir == 1,
        };
        let inp = BwdIn {
            dy: &dy[dir * h..],
            ldy: nd * h,
            dhn: dhn.map(|s| &s[dir * bh..(dir + 1) * bh]),
            dcn: dcn.map(|s| &s[dir * bh..(dir + 1) * bh]),
            c0: tape.c0.as_deref().map(|s| &s[dir * bh..(dir + 1) * bh]),
            kept,
            parts: &parts,
        };
        // Block `dir` of dh0 / dc0 belongs to this direction.
        let out = BwdOut {
            rows: Rows(tape.at.as_deref()),
            dgx: Ptr(dgx.ptr()),
            dgh_all: Ptr(dgh_all.ptr()),
            dh0: dh0p.at(dir * bh),
            dc0: dc0p.at(if C::HAS_C { dir * bh } else { 0 }),
            dh_seq: dh_seq.map(|p| p.at(dir * h)),
        };
        tape.plan
            .for_each_slice(threads, led, |off, n, team| sw.backward_slice(off, n, team, &inp, out));
        // SAFETY: the sweep wrote every row inside the lengths (see `BwdTile`), and the padding
        // rows, if kept, are zeroed here.
        let (dgx, dgh_all) = unsafe {
            dgx.zero_rows(out.rows.padding(&tape.plan, layer), gh);
            dgh_all.zero_rows(out.rows.padding(&tape.plan, layer).filter(|_| C::SPLIT_DGH), gh);
            (dgx.written(), dgh_all.written())
        };
        // Deferred weight gradients: GEMMs over all the (valid) rows.
        let ldk = layer.kept_width();
        let xh = &kept.xh;
        let dgh: &[T] = if C::SPLIT_DGH { &dgh_all } else { &dgx };
        if C::SPLIT_DGH {
            let (x, hprev) = (&xh[..], &xh[d.input..]);
            product(
                MatMut::new(g.w_ih, gh, d.input, d.input),
                true,
                Mat::new(&dgx, nrows, gh, gh).t(),
                Mat::new(x, nrows, d.input, ldk),
                threads,
                led,
            );
            product(
                MatMut::new(g.w_hh, gh, h, h),
                true,
                Mat::new(dgh, nrows, gh, gh).t(),
                Mat::new(hprev, nrows, h, ldk),
                threads,
                led,
            );
        } else {
            // [dW_ih dW_hh] = dG^T [x h_{t-1}], one GEMM instead of two (the gate gradients
            // packed once, a wider product): 7-17% faster than two on LSTM B=8 and B=64 shapes.
            let mut both = ToWrite::new(gh * ldk);
            // SAFETY: without accumulation `matmul` writes every element of its view, which
            // covers the buffer's `gh * ldk` elements.
            let both = unsafe {
                product(
                    MatMut::from_raw(both.ptr(), gh, ldk, ldk),
                    false,
                    Mat::new(&dgx, nrows, gh, gh).t(),
                    Mat::new(xh, nrows, ldk, ldk),
                    threads,
                    led,
                );
                both.written()
            };
            // Added back by the threads, in blocks of rows.
            const ROWS: usize = 64;
            let blocks = g.w_ih.chunks_mut(ROWS * d.input).zip(g.w_hh.chunks_mut(ROWS * h));
            let blocks: Vec<_> = blocks.zip(both.chunks(ROWS * ldk)).collect();
            map_items(blocks, threads, |_, ((wi, wh), from)| {
                let rows = wi.chunks_exact_mut(d.input).zip(wh.chunks_exact_mut(h));
                for ((wi, wh), from) in rows.zip(from.chunks_exact(ldk)) {
                    let (fi, fh) = from.split_at(d.input);
                    wi.iter_mut().zip(fi).for_each(|(a, &b)| *a += b);
                    wh.iter_mut().zip(fh).for_each(|(a, &b)| *a += b);
                }
            });
            buffers::give(both);
        }
        add_bias_grads(g, &dgx, C::SPLIT_DGH.then_some(dgh), gh, threads);
        buffers::give(dgh_all);
        dgx
    });
    let mut dxc = match tape.valid {
        Some(_) => vec![T::ZERO; nrows * d.input],
        None => Vec::new(),
    };
    let dxv: &mut [T] = if tape.valid.is_some() { &mut dxc } else { dx };
    for (dir, dgx) in dgxs.iter().enumerate() {
        product(
            MatMut::new(dxv, nrows, d.input, d.input),
            dir > 0,
            Mat::new(dgx, nrows, gh, gh),
            Mat::new(weights[dir].w_ih, gh, d.input, d.input),
            threads,
            led,
        );
    }
    dgxs.into_iter().for_each(buffers::give);
    if let Some(idx) = &tape.valid {
        // The valid rows from the packed ones, zeros in the others.
        zero_padding(layer, &tape.plan, dx, d.input);
        scatter(dx, idx, d.input, &dxc);
    }
}

/// Columns per block of [`product`] in a led call.
const LED_COLS: usize = 64;

/// `dst (+)= a * b` on up to `threads` threads: by [`matmul`] on the pool's, or, `led` (see
/// [`led_by_caller`]), where the GEMM crates' threading cannot start from outside the pool, in
/// blocks of [`LED_COLS`] columns (the same whatever the thread count, so that the results do not
/// depend on it either) that the caller and the pool's threads take in turn.
fn product<T: Float>(dst: MatMut<T>, accumulate: bool, a: Mat<T>, b: Mat<T>, threads: usize, led: bool) {
    if !led {
        return matmul(dst, accumulate, a, b, threads);
    }
    let blocks = column_blocks(dst, b, LED_COLS);
    map_items(blocks, threads, |_, (d, bb)| matmul(d, accumulate, a, bb, 1));
}

struct BwdIn<'a, T: Float> {
    dy: &'a [T],
    ldy: usize,
    dhn: Option<&'a [T]>,
    dcn: Option<&'a [T]>,
    c0: Option<&'a [T]>,
    kept: &'a DirTape<T>,
    /// The unit blocks `[b0, b1)` of each part ([`bwd_parts`]).
    parts: &'a [(usize, usize)],
}

/// How backward's recurrent product `dL/dh_{t-1} = dG_t W_hh` is cut along its inner dimension
/// (the gate rows of `W_hh`): into parts of consecutive unit blocks, each part's product over its
/// own units' gate gradients giving a partial `dL/dh_{t-1}` (all H columns), the partials added
/// in part order. The block that runs a part's pointwise pass runs its product too, on the gate
/// gradients it has just written; the next step reads, of the other parts' partials, only its
/// own units' columns. Cut instead by the product's columns (each block its units of
/// `dL/dh_{t-1}` over every gate gradient), every block read the whole of `dG_t` (B x G*H), on
/// two threads half of it written by the other core, where a block now reads B x H/2 of the
/// other part's partial. Against that cut, in alternated processes, 2 threads (Intel Xeon,
/// AVX-512), training took 0.96x the time for LSTM at B=8, H=256, 0.97-0.98x for GRU and RNN,
/// 0.92-0.95x for GRU and LSTM at B=1, H=128; at B=64, H=512 0.98-1.02x, on one thread 1.00x.
/// Two parts from two unit blocks on: the cut depends on the hidden size alone, never on the
/// thread count, and so do the results.
fn bwd_parts(unit_blocks: usize) -> Vec<(usize, usize)> {
    let parts = unit_blocks.min(2);
    (0..parts)
        .map(|p| (p * unit_blocks / parts, (p + 1) * unit_blocks / parts))
        .collect()
}

#[derive(Clone, Copy)]
struct BwdOut<'a, T> {
    /// The rows of the tape, `dgx` and `dgh_all`.
    rows: Rows<'a>,
    dgx: Ptr<T>,
    dgh_all: Ptr<T>,
    dh0: Ptr<T>,
    dc0: Ptr<T>,
    /// dL/dh_t out, laid out like `dy` (this direction's column block), if asked for.
    dh_seq: Option<Ptr<T>>,
}

impl<C: Cell, T: Float> Sweep<'_, C, T> {
    /// The backward time loop of one batch slice, cut into blocks of a part ([`bwd_parts`]) by
    /// ranges of rows. Iteration `i` handles step `s = steps - 1 - i`: each block first adds the
    /// parts' partial products of step s+1 to its units of dL/dh_s, then runs their pointwise
    /// pass, which writes its units' gate gradients of step s, and multiplies those by its part of
    /// `W_hh` into its part's partial product of step s, for all H units of its rows
    /// (double-buffered: iteration i reads the partials of buffer `(i + 1) % 2` and writes buffer
    /// `i % 2`). A last iteration finishes dL/dh_0.
    fn backward_slice(&self, off: usize, n: usize, members: usize, inp: &BwdIn<'_, T>, out: BwdOut<'_, T>) {
        if n == 0 {
            return;
        }
        let (h, gh) = (self.layer.dims.hidden, self.layer.gh());
        let ch = if C::HAS_C { h } else { 0 };
        let perm = &self.plan.perm[off..off + n];
        let lens = &self.plan.lens[off..off + n];
        let np = inp.parts.len();
        // Aligned, so that blocks meet on a cache line only where their units do.
        let mut dh = Aligned::zeroed(n * h);
        let mut dc = Aligned::zeroed(n * ch);
        for (r, &b) in perm.iter().enumerate() {
            if let Some(s) = inp.dhn {
                dh[r * h..(r + 1) * h].copy_from_slice(&s[b * h..(b + 1) * h]);
            }
            if let Some(s) = inp.dcn {
                dc[r * ch..(r + 1) * ch].copy_from_slice(&s[b * ch..(b + 1) * ch]);
            }
        }
        // The gate gradients of a step, part by part (each part's rows G*pw wide, its unit
        // blocks side by side), and the partial products, [buffer][part] each n x H.
        let mut dgh = Aligned::zeroed(n * gh);
        let mut partials = [Aligned::zeroed(np * n * h), Aligned::zeroed(np * n * h)];
        let [pa, pb] = &mut partials;
        let partials = [Ptr::new(pa), Ptr::new(pb)];
        let (dh, dc, dgh) = (Ptr::new(&mut dh), Ptr::new(&mut dc), Ptr::new(&mut dgh));
        let zeros = vec![T::ZERO; h];
        let steps = lens[0];
        let active = active_rows(lens);
        let tiles = Tiles::new(n, np, self.w_hh_bytes());
        let w = widest(self.units);
        let scratch = || vec![T::ZERO; 2 * C::GATES * w];
        team::run(tiles.count(), members, steps + 1, scratch, |scratch, j, i| {
            let (part, r0, r1) = tiles.get(j, if i < steps { active[steps - 1 - i] } else { n });
            if r0 < r1 {
                dispatch(BwdTile {
                    sw: self,
                    step: (i < steps).then(|| steps - 1 - i),
                    part,
                    rows: (r0, r1),
                    ran_next: if i > 0 { active[steps - i] } else { 0 },
                    perm,
                    lens,
                    inp,
                    zeros: &zeros,
                    dh,
                    dc,
                    dgh,
                    partials: (partials[(i + 1) % 2], partials[i % 2]),
                    scratch,
                    out,
                });
            }
        });
    }
}

/// One block of a backward iteration.
struct BwdTile<'a, 'w, C, T: Float> {
    sw: &'a Sweep<'w, C, T>,
    /// The step whose pointwise pass this iteration runs (None: the last iteration).
    step: Option<usize>,
    part: usize,
    rows: (usize, usize),
    /// How many rows ran the next step (whose gate gradients reach dL/dh_s through W_hh).
    ran_next: usize,
    perm: &'a [usize],
    lens: &'a [usize],
    inp: &'a BwdIn<'a, T>,
    zeros: &'a [T],
    dh: Ptr<T>,
    dc: Ptr<T>,
    /// This step's gate gradients, part by part (see `backward_slice`).
    dgh: Ptr<T>,
    /// The partial products of the next step (read) and of this one (written), part by part.
    partials: (Ptr<T>, Ptr<T>),
    scratch: &'a mut [T],
    out: BwdOut<'a, T>,
}

impl<C: Cell, T: Float> Kernel for BwdTile<'_, '_, C, T> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self) {
        let sw = self.sw;
        let layer = sw.layer;
        let (h, gh) = (layer.dims.hidden, layer.gh());
        let sv = C::SAVED * h;
        let (inp, out) = (self.inp, self.out);
        let (b0, b1) = inp.parts[self.part];
        let (pu0, pu1) = (sw.units[b0].0, sw.units[b1 - 1].1);
        let (width, kp) = (pu1 - pu0, C::GATES * (pu1 - pu0));
        let (r0, r1) = self.rows;
        let n = self.perm.len();
        let next = self.ran_next.min(r1).saturating_sub(r0);
        // SAFETY (here and below): this block alone touches units [pu0, pu1) of rows [r0, r1) of
        // dh and dc, rows [r0, r1) of its part's gate gradients and of its part's written
        // partials, those units of row kr of dgx and dgh_all, of row xr of dh_seq, and of row b
        // of dh0 / dc0; no one writes the read partials during the iteration.
        unsafe {
            // dL/dh_s += the partial products of step s+1 (one or two parts, see `bwd_parts`),
            // the two added together first.
            for r in r0..r0 + next {
                let dh = self.dh.slice(r * h + pu0, width);
                let first = self.partials.0.read(r * h + pu0, width);
                if inp.parts.len() == 1 {
                    dh.iter_mut().zip(first).for_each(|(a, &p)| *a += p);
                } else {
                    let second = self.partials.0.read((n + r) * h + pu0, width);
                    for ((a, &p), &q) in dh.iter_mut().zip(first).zip(second) {
                        *a += p + q;
                    }
                }
            }
        }
        let Some(s) = self.step else {
            for r in r0..r1 {
                let b = self.perm[r];
                unsafe {
                    out.dh0
                        .slice(b * h + pu0, width)
                        .copy_from_slice(self.dh.read(r * h + pu0, width));
                    if C::HAS_C {
                        out.dc0
                            .slice(b * h + pu0, width)
                            .copy_from_slice(self.dc.read(r * h + pu0, width));
                    }
                }
            }
            return;
        };
        // This part's gate gradients, n x kp at n * G * pu0.
        let dgh_part = self.dgh.at(n * C::GATES * pu0);
        for &(u0, u1) in &sw.units[b0..b1] {
            let (w, gw) = (u1 - u0, C::GATES * (u1 - u0));
            let (dgx, rest) = self.scratch.split_at_mut(gw);
            let dgh = &mut rest[..gw];
            for r in r0..r1 {
                let (b, len) = (self.perm[r], self.lens[r]);
                let xr = layer.row(time_of(len, s, sw.reverse), b);
                // Its row of the tape and the gate gradients.
                let kr = out.rows.of(xr);
                let c_prev: &[T] = if !C::HAS_C {
                    &[]
                } else if s > 0 {
                    let pr = out.rows.of(layer.row(time_of(len, s - 1, sw.reverse), b));
                    &inp.kept.saved[pr * sv + C::SAVED * u0 + C::C_AT * w..][..w]
                } else {
                    inp.c0.map_or(&self.zeros[..w], |c0| &c0[b * h + u0..][..w])
                };
                let saved = &inp.kept.saved[kr * sv + C::SAVED * u0..][..C::SAVED * w];
                let dy = &inp.dy[xr * inp.ldy + u0..][..w];
                unsafe {
                    let dh = self.dh.slice(r * h + u0, w);
                    let dc = if C::HAS_C {
                        self.dc.slice(r * h + u0, w)
                    } else {
                        empty()
                    };
                    if let Some(p) = out.dh_seq {
                        let total = p.slice(xr * inp.ldy + u0, w);
                        for ((t, &y), &d) in total.iter_mut().zip(dy).zip(dh.iter()) {
                            *t = y + d;
                        }
                    }
                    sw.cell.backward::<I, T>(Bwd {
                        dy,
                        dh,
                        dc,
                        saved,
                        h_prev: &inp.kept.xh[layer.kept_h(kr) + u0..][..w],
                        c_prev,
                        dgx: &mut *dgx,
                        dgh: &mut *dgh,
                    });
                    dgh_part.slice(r * kp + C::GATES * (u0 - pu0), gw).copy_from_slice(dgh);
                    for g in 0..C::GATES {
                        let (x, y) = (&dgx[g * w..(g + 1) * w], &dgh[g * w..(g + 1) * w]);
                        out.dgx.slice(kr * gh + g * h + u0, w).copy_from_slice(x);
                        if C::SPLIT_DGH {
                            out.dgh_all.slice(kr * gh + g * h + u0, w).copy_from_slice(y);
                        }
                    }
                }
            }
        }
        // This part's partial product of step s, for every unit of its rows.
        unsafe {
            let written = self.partials.1.at((self.part * n + r0) * h);
            let dst = MatMut::from_raw(written.0, r1 - r0, h, h);
            let a = dgh_part.read(r0 * kp, (r1 - r0) * kp);
            matmul_packed(dst, false, Mat::new(a, r1 - r0, kp, kp), &sw.w_hh[self.part]);
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

/// Check that `layers` are the weights of a stack of single-direction `cell` layers of `hidden`
/// units whose first layer reads `input` features (layer k > 0 reads layer k-1's `hidden`), for
/// steps of `batch` rows.
pub fn check_stack<T>(
    cell: CellKind,
    batch: usize,
    input: usize,
    hidden: usize,
    layers: &[Weights<'_, T>],
) -> Result<()> {
    if layers.is_empty() {
        return Err(Error::Value("step needs the weights of at least one layer".into()));
    }
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
    Ok(())
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
    if batch == 0 || !x.len().is_multiple_of(batch) {
        return Err(Error::Shape(format!(
            "x has {} elements, not a whole number of rows for batch {batch}",
            x.len()
        )));
    }
    let input = x.len() / batch;
    let bh = batch * hidden;
    check_stack(cell, batch, input, hidden, layers)?;
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
    let st = StepArgs {
        batch,
        hidden,
        input,
        layers,
        x,
        h,
        c,
        h_out: Ptr::new(h_out),
        c_out: Ptr::new(c_out),
    };
    let bytes = layers.iter().map(|w| w.w_ih.len() + w.w_hh.len()).sum::<usize>() * std::mem::size_of::<T>();
    let start = since_start();
    let last = LAST_STEP.load(Ordering::Relaxed);
    let burst = last > 0 && start.saturating_sub(last) < STEP_BURST;
    // Up to UNPACKED_DOT_MAX_ROWS rows the products are the dot kernel's, whose rounding of an
    // output does not depend on how the outputs are cut: a step is cut only to be shared.
    // Otherwise the cut depends on the sizes alone, never on the thread count or the timing, and
    // so do the results.
    let dot = unpacked_by_dot::<T>(batch);
    let min_bytes = if dot { step_shared_bytes(batch) } else { STEP_CUT_BYTES };
    let share = burst && bytes >= min_bytes && crate::threads::get_num_threads() > 1;
    let cut = if dot { share } else { bytes >= min_bytes };
    let (whole, blocks) = ([(0, hidden)], if cut { unit_blocks(hidden) } else { Vec::new() });
    let units = if cut { &blocks[..] } else { &whole[..] };
    crate::with_cell!(cell, cell: C => st.run::<C>(cell, units, share));
    LAST_STEP.store(since_start().max(1), Ordering::Relaxed);
    Ok(())
}

/// From how many bytes of weights (all layers) streaming steps of `rows` rows, up to
/// [`crate::gemm::UNPACKED_DOT_MAX_ROWS`], that come in a burst are cut into unit blocks that
/// this thread and the kernel threads share, each thread reading its part of the weights from its
/// own cache. At 1-4 rows a step is mostly the reading of the weights, from L2 when they fit:
/// sharing costs a hand-over each way and pays only when one core's cache no longer holds them
/// all. In turns in one process, batch 1, 2 threads against 1 (Ice Lake, 1.25 MB of L2 a core),
/// the shared step took 1.20x the time (GRU H=128, 384 KB), 1.21x (RNN H=256, 512 KB), 1.10x
/// (LSTM H=128, 512 KB), 0.91-1.03x from 600 to 800 KB, 0.57-0.79x at 968-1152 KB and 0.43x at
/// 1.5-2 MB; at batch 4, 1.16-1.20x at 384-512 KB. From 5 rows the product's share of a step
/// grows: at batch 5-8 sharing took 0.69-0.94x the time from 384 KB. The break-even does not
/// follow the L2's size: with 2 MB of L2 a core (Intel Xeon, AVX-512), batch 1, the shared step
/// took 1.15-2.16x the time up to 600 KB, 0.96-1.05x at 800-864 KB (LSTM, GRU, RNN), 0.83-0.88x
/// at 1.15-1.18 MB and 0.28-0.60x from 1.5 MB.
fn step_shared_bytes(rows: usize) -> usize {
    if rows <= 4 {
        768 << 10
    } else {
        256 << 10
    }
}
/// From this many bytes of weights, steps of more rows (faer's products) are always cut into
/// unit blocks, shared by the threads when they come in a burst. At H=256 (1.5-2 MB of weights)
/// and batch 4-64 the cut cost nothing on one thread (0.97-1.03×) and gained 1.50-1.86× on two;
/// at H=128 (384-512 KB) it cost 5-8% on one thread at batch 4-8 (measured with faer's products
/// at those batches, before the dot kernel took rows 3-8).
const STEP_CUT_BYTES: usize = 1 << 20;
/// A step starting this soon after the previous one ended is in a burst, when the kernel
/// threads are still awake from the previous step. Steps further apart, as in a real-time
/// stream, are not shared: after a 0.5 ms sleep between steps, waking the threads made an LSTM
/// step at H=256 take 71 µs against 59 whole; after 0.1-0.2 ms sleeps or up to 0.3 ms of
/// other work, sharing still gained 6-25%.
const STEP_BURST: u64 = 200_000;
/// The end of the last step, in nanoseconds of [`since_start`] (0: none yet).
static LAST_STEP: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds since the first call (a monotonic clock).
fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What one streaming [`step`] reads and writes.
struct StepArgs<'a, 'w, T> {
    batch: usize,
    hidden: usize,
    input: usize,
    layers: &'a [Weights<'w, T>],
    x: &'a [T],
    h: Option<&'a [T]>,
    c: Option<&'a [T]>,
    /// (L, B, H): layer k's block is written by its step and read by layer k+1's.
    h_out: Ptr<T>,
    c_out: Ptr<T>,
}

impl<T: Float> StepArgs<'_, '_, T> {
    /// Every layer, cut into the blocks of hidden `units` (one block of all units, or
    /// [`unit_blocks`]), on this thread, or shared with the kernel threads (`share`).
    fn run<C: Cell>(&self, cell: C, units: &[(usize, usize)], share: bool) {
        let block = |_: &mut (), j: usize, k: usize| self.block(cell, k, units[j]);
        if share {
            return team::run(
                units.len(),
                crate::threads::get_num_threads(),
                self.layers.len(),
                || (),
                block,
            );
        }
        let _mode = crate::simd::DenormalsFlushed::new(); // as on the kernel threads
        for k in 0..self.layers.len() {
            for j in 0..units.len() {
                block(&mut (), j, k);
            }
        }
    }

    /// Units `[u0, u1)` of layer `k`.
    fn block<C: Cell>(&self, cell: C, k: usize, units: (usize, usize)) {
        let n = (2 * self.batch + 2) * C::GATES * (units.1 - units.0) + (units.1 - units.0);
        with_scratch::<T, _>(n, |scratch| {
            dispatch(StepBlock {
                cell,
                st: self,
                k,
                units,
                scratch,
            })
        })
    }
}

/// Units `[u0, u1)` of layer `k` of a streaming step: the block's rows of every gate of both
/// products, then their pointwise pass.
struct StepBlock<'a, 'w, C, T> {
    cell: C,
    st: &'a StepArgs<'a, 'w, T>,
    k: usize,
    units: (usize, usize),
    /// The block's gates' two projections, its biases (when they are not one piece in the
    /// weights) and a zero state (when a state is missing).
    scratch: &'a mut [T],
}

impl<'a, C: Cell, T: Float> Kernel for StepBlock<'a, '_, C, T> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self) {
        let (st, k) = (self.st, self.k);
        let (hd, batch, bh) = (st.hidden, st.batch, st.batch * st.hidden);
        let ((u0, u1), w) = (self.units, &st.layers[k]);
        let (uw, gw) = (u1 - u0, C::GATES * (u1 - u0));
        let (xw, rest) = self.scratch.split_at_mut(batch * gw);
        let (hw, rest) = rest.split_at_mut(batch * gw);
        let (bias, zeros) = rest.split_at_mut(2 * gw);
        if st.h.is_none() || (C::HAS_C && st.c.is_none()) {
            zeros.fill(T::ZERO);
        }
        // SAFETY: layer k-1 is done (a layer's blocks start after all of the previous layer's) and
        // no one writes it any more.
        let (inp, width) = match k {
            0 => (st.x, st.input),
            _ => (unsafe { st.h_out.read((k - 1) * bh, bh) }, hd),
        };
        let h_prev = st.h.map(|s| &s[k * bh..(k + 1) * bh]);
        // Runs of the weights' rows that the block needs, side by side in its products: one per
        // gate, or a single one when the block holds every unit.
        let (runs, len) = if uw == hd { (1, gw) } else { (C::GATES, uw) };
        for g in 0..runs {
            let (row, col) = (g * hd + u0, g * len);
            matmul_unpacked(
                MatMut::new(&mut xw[col..], batch, len, gw),
                false,
                Mat::new(inp, batch, width, width),
                Mat::new(&w.w_ih[row * width..], len, width, width).t(),
            );
            if let Some(hp) = h_prev {
                matmul_unpacked(
                    MatMut::new(&mut hw[col..], batch, len, gw),
                    false,
                    Mat::new(hp, batch, hd, hd),
                    Mat::new(&w.w_hh[row * hd..], len, hd, hd).t(),
                );
            }
            if uw < hd {
                bias[col..col + len].copy_from_slice(&w.b_ih[row..row + len]);
                bias[gw + col..gw + col + len].copy_from_slice(&w.b_hh[row..row + len]);
            }
        }
        if h_prev.is_none() {
            hw.fill(T::ZERO);
        }
        // A block of every unit reads the biases where they are; a narrower one, its gates' parts
        // gathered side by side.
        let (b_ih, b_hh) = if uw == hd { (w.b_ih, w.b_hh) } else { bias.split_at(gw) };
        let zeros = &zeros[..uw];
        for (r, (xw, hw)) in xw.chunks_exact(gw).zip(hw.chunks_exact_mut(gw)).enumerate() {
            let at = k * bh + r * hd + u0;
            let state = |s: Option<&'a [T]>| s.map_or(zeros, |s| &s[at..at + uw]);
            // SAFETY: this block alone writes units [u0, u1) of layer k's rows of the output state.
            let (h, c) = unsafe {
                (
                    st.h_out.slice(at, uw),
                    if C::HAS_C { st.c_out.slice(at, uw) } else { empty() },
                )
            };
            self.cell.forward::<I, T>(
                Fwd {
                    xw,
                    hw,
                    b_ih,
                    b_hh,
                    h_prev: state(st.h),
                    c_prev: if C::HAS_C { state(st.c) } else { &[] },
                    h,
                    c,
                    saved: empty(),
                },
                false,
            );
        }
    }
}
