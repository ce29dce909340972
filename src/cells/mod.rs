//! The recurrent cells: each one's gate count and its fused pointwise math, forward and backward
//! side by side. The time loop (`sweep.rs`) is shared by all of them; a new cell is a new file
//! here plus one line in [`with_cell!`](crate::with_cell).
//!
//! Every routine works on one batch row over one block of hidden units, of width `H` below (the
//! hidden size when the step is one block); gate blocks follow PyTorch's order, each `H` wide.

pub mod gru;
pub mod lstm;
pub mod rnn;

use crate::simd::{Float, Isa};

/// One row of the forward pointwise pass of a time step.
pub struct Fwd<'a, T> {
    /// `W_ih x_t` for this row (no bias), `GATES * H`.
    pub xw: &'a [T],
    /// `W_hh h_{t-1}` for this row (no bias), `GATES * H`; scratch: the cell may overwrite it.
    pub hw: &'a mut [T],
    pub b_ih: &'a [T],
    pub b_hh: &'a [T],
    pub h_prev: &'a [T],
    /// Previous cell state (empty unless [`Cell::HAS_C`]).
    pub c_prev: &'a [T],
    pub h: &'a mut [T],
    /// New cell state (empty unless [`Cell::HAS_C`]).
    pub c: &'a mut [T],
    /// What backward needs, `SAVED` pieces of the row's width side by side (written only when
    /// training; empty otherwise).
    pub saved: &'a mut [T],
}

/// One row of the backward pointwise pass of a time step.
pub struct Bwd<'a, T> {
    /// dL/dy_t from the layer's output at this step.
    pub dy: &'a [T],
    /// In: dL/dh_t reaching this step through the recurrence. Out: the part of dL/dh_{t-1}
    /// that does not go through `W_hh` (zero for cells without a direct path).
    pub dh: &'a mut [T],
    /// In: dL/dc_t from later steps; out: dL/dc_{t-1} (empty unless [`Cell::HAS_C`]).
    pub dc: &'a mut [T],
    /// What forward saved at this step.
    pub saved: &'a [T],
    pub h_prev: &'a [T],
    pub c_prev: &'a [T],
    /// Out: dL/d(input-side pre-activations), `GATES * H`, for dW_ih, db_ih and dx.
    pub dgx: &'a mut [T],
    /// Out: dL/d(recurrent-side pre-activations), `GATES * H`, for dW_hh, db_hh and dh_{t-1}.
    pub dgh: &'a mut [T],
}

/// A recurrent cell's pointwise math.
pub trait Cell: Copy + Send + Sync {
    /// Number of gate blocks of width H in `W_ih` / `W_hh`.
    const GATES: usize;
    /// Carries a cell state `c` beside `h` (LSTM).
    const HAS_C: bool;
    /// Saved values per hidden unit per step for backward.
    const SAVED: usize;
    /// Where `c_t` sits in the saved row (in units of H), when `HAS_C`.
    const C_AT: usize = 0;
    /// The recurrent-side gate gradient differs from the input-side one (GRU's reset gate
    /// applies to `W_hn h` only), so the sweep must keep both.
    const SPLIT_DGH: bool = false;

    /// The forward pointwise pass, in the kernel copy `I` (see `simd::dispatch`).
    fn forward<I: Isa, T: Float>(self, r: Fwd<'_, T>, train: bool);
    fn backward<I: Isa, T: Float>(self, r: Bwd<'_, T>);
}

/// The cells the library knows, as named in the Python API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellKind {
    RnnTanh,
    RnnRelu,
    Lstm,
    Gru,
}

impl CellKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "rnn_tanh" => CellKind::RnnTanh,
            "rnn_relu" => CellKind::RnnRelu,
            "lstm" => CellKind::Lstm,
            "gru" => CellKind::Gru,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            CellKind::RnnTanh => "rnn_tanh",
            CellKind::RnnRelu => "rnn_relu",
            CellKind::Lstm => "lstm",
            CellKind::Gru => "gru",
        }
    }
    pub fn gates(self) -> usize {
        crate::with_cell!(self, C => C::GATES)
    }
    pub fn has_c(self) -> bool {
        crate::with_cell!(self, C => C::HAS_C)
    }
}

/// Run `$body` with `$C` bound to the cell type of `$kind` (and `$c`, if given, to its value).
/// This is where cells are registered.
#[macro_export]
macro_rules! with_cell {
    ($kind:expr, $C:ident => $body:expr) => {
        $crate::with_cell!($kind, _cell: $C => $body)
    };
    ($kind:expr, $c:ident : $C:ident => $body:expr) => {
        match $kind {
            $crate::cells::CellKind::RnnTanh => {
                type $C = $crate::cells::rnn::Rnn<$crate::cells::rnn::Tanh>;
                let $c = <$C>::default();
                $body
            }
            $crate::cells::CellKind::RnnRelu => {
                type $C = $crate::cells::rnn::Rnn<$crate::cells::rnn::Relu>;
                let $c = <$C>::default();
                $body
            }
            $crate::cells::CellKind::Lstm => {
                type $C = $crate::cells::lstm::Lstm;
                let $c = $crate::cells::lstm::Lstm;
                $body
            }
            $crate::cells::CellKind::Gru => {
                type $C = $crate::cells::gru::Gru;
                let $c = $crate::cells::gru::Gru;
                $body
            }
        }
    };
}

/// The `G` gate blocks of width `n` at the start of `s`.
#[inline(always)]
pub(crate) fn blocks<const G: usize, T>(s: &[T], n: usize) -> [&[T]; G] {
    std::array::from_fn(|k| &s[k * n..(k + 1) * n])
}

// The pointwise passes below are single loops over at most five slices, zipped: a shape LLVM
// reliably turns into SIMD code (one long loop over many indexed slices is not).

/// `xw[q] + b_ih[q] + (hw[q] + b_hh[q])`: the gates' pre-activations, over `hw` or, when
/// training, straight into the tape (`into`, where the cell then activates them: no copy of the
/// gates to the tape afterwards). Returns where they are.
#[inline(always)]
pub(crate) fn pre_activations<'a, T: Float>(
    hw: &'a mut [T],
    into: Option<&'a mut [T]>,
    xw: &[T],
    b_ih: &[T],
    b_hh: &[T],
) -> &'a mut [T] {
    match into {
        None => {
            for (((h, &x), &bi), &bh) in hw.iter_mut().zip(xw).zip(b_ih).zip(b_hh) {
                *h = x + bi + (*h + bh);
            }
            hw
        }
        Some(out) => {
            for ((((o, &h), &x), &bi), &bh) in out.iter_mut().zip(&*hw).zip(xw).zip(b_ih).zip(b_hh) {
                *o = x + bi + (h + bh);
            }
            out
        }
    }
}

#[inline(always)]
pub(crate) fn sigmoid_in_place<I: Isa, T: Float>(s: &mut [T]) {
    for v in s {
        *v = v.sigmoid::<I>();
    }
}

#[inline(always)]
pub(crate) fn tanh_in_place<I: Isa, T: Float>(s: &mut [T]) {
    for v in s {
        *v = v.tanh::<I>();
    }
}
