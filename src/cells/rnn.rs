//! Elman RNN: `h' = act(W_ih x + b_ih + W_hh h + b_hh)`, act = tanh or relu (PyTorch's nn.RNN).

use super::{pre_activations, Bwd, Cell, Fwd};
use crate::simd::{Float, Isa};
use std::marker::PhantomData;

/// An activation and its derivative expressed through its output.
pub trait Activation: Copy + Send + Sync + Default {
    fn f<I: Isa, T: Float>(x: T) -> T;
    /// f'(x) given y = f(x).
    fn df_from_y<T: Float>(y: T) -> T;
}

#[derive(Clone, Copy, Default)]
pub struct Tanh;
#[derive(Clone, Copy, Default)]
pub struct Relu;

impl Activation for Tanh {
    #[inline(always)]
    fn f<I: Isa, T: Float>(x: T) -> T {
        x.tanh::<I>()
    }
    #[inline(always)]
    fn df_from_y<T: Float>(y: T) -> T {
        T::ONE - y * y
    }
}

impl Activation for Relu {
    #[inline(always)]
    fn f<I: Isa, T: Float>(x: T) -> T {
        x.relu()
    }
    #[inline(always)]
    fn df_from_y<T: Float>(y: T) -> T {
        if y > T::ZERO {
            T::ONE
        } else {
            T::ZERO
        }
    }
}

#[derive(Clone, Copy, Default)]
pub struct Rnn<A>(PhantomData<A>);

impl<A: Activation> Cell for Rnn<A> {
    const GATES: usize = 1;
    const HAS_C: bool = false;
    const SAVED: usize = 1; // h_t

    #[inline(always)]
    fn forward<I: Isa, T: Float>(self, r: Fwd<'_, T>, train: bool) {
        let n = r.h.len();
        let pre = pre_activations(&mut r.hw[..n], None, &r.xw[..n], &r.b_ih[..n], &r.b_hh[..n]);
        for (h, &a) in r.h.iter_mut().zip(pre.iter()) {
            *h = A::f::<I, T>(a);
        }
        if train {
            r.saved[..n].copy_from_slice(r.h);
        }
    }

    #[inline(always)]
    fn backward<I: Isa, T: Float>(self, r: Bwd<'_, T>) {
        let n = r.dh.len();
        let (dy, h) = (&r.dy[..n], &r.saved[..n]);
        let (dgx, dgh) = (&mut r.dgx[..n], &mut r.dgh[..n]);
        for j in 0..n {
            let da = (dy[j] + r.dh[j]) * A::df_from_y(h[j]);
            dgx[j] = da;
            dgh[j] = da;
            r.dh[j] = T::ZERO;
        }
    }
}
