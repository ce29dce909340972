//! rnnkit: fused, multithreaded CPU kernels for recurrent networks (RNN, LSTM, GRU), forward and
//! backpropagation through time, usable from Rust and (with the default `python` feature) from
//! Python as `rnnkit._core`.
//!
//! The entry points are [`sweep::forward`] and [`sweep::backward`], which run one layer (one or
//! two directions) over a whole batch of sequences.

mod buffers;
pub mod cells;
pub mod error;
pub mod gemm;
pub mod simd;
pub mod sweep;
mod team;
pub mod threads;

#[cfg(feature = "python")]
mod python;

pub use cells::CellKind;
pub use error::{Error, Result};
pub use sweep::{backward, forward, Dims, Grads, Layer, Layout, Tape, Weights};
pub use threads::{get_num_threads, set_num_threads, set_small_call_flops};
