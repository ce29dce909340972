//! LSTM (PyTorch's nn.LSTM, gates i, f, g, o):
//! `c' = f*c + i*g`, `h' = o*tanh(c')`, with i, f, o sigmoid and g tanh of
//! `W_ih x + b_ih + W_hh h + b_hh`.

use super::{blocks, pre_activations, sigmoid_in_place, tanh_in_place, Bwd, Cell, Fwd};
use crate::simd::{Float, Isa};

#[derive(Clone, Copy, Default)]
pub struct Lstm;

impl Cell for Lstm {
    const GATES: usize = 4;
    const HAS_C: bool = true;
    const SAVED: usize = 5; // i, f, g, o (activated), c_t
    const C_AT: usize = 4;

    #[inline(always)]
    fn forward<I: Isa, T: Float>(self, r: Fwd<'_, T>, train: bool) {
        let n = r.h.len();
        // Training computes the gates in the tape, where backward reads them.
        let (tape, sc) = r.saved.split_at_mut(if train { 4 * n } else { 0 });
        let into = train.then_some(tape);
        let gates = pre_activations(
            &mut r.hw[..4 * n],
            into,
            &r.xw[..4 * n],
            &r.b_ih[..4 * n],
            &r.b_hh[..4 * n],
        );
        let (ifg, o) = gates.split_at_mut(3 * n);
        let (i_f, g) = ifg.split_at_mut(2 * n);
        sigmoid_in_place::<I, T>(i_f);
        tanh_in_place::<I, T>(g);
        sigmoid_in_place::<I, T>(o);
        let (i, f) = i_f.split_at(n);
        let (c_prev, c, h) = (&r.c_prev[..n], &mut r.c[..n], &mut r.h[..n]);
        for ((((cj, &cp), &fj), &ij), &gj) in c.iter_mut().zip(c_prev).zip(f).zip(i).zip(g.iter()) {
            *cj = fj * cp + ij * gj;
        }
        for ((hj, &cj), &oj) in h.iter_mut().zip(c.iter()).zip(o.iter()) {
            *hj = oj * cj.tanh::<I>();
        }
        if train {
            sc[..n].copy_from_slice(c);
        }
    }

    #[inline(always)]
    fn backward<I: Isa, T: Float>(self, r: Bwd<'_, T>) {
        let n = r.dh.len();
        let [si, sf, sg, so, sc] = blocks::<5, T>(r.saved, n);
        let (dh, dc, c_prev) = (&mut r.dh[..n], &mut r.dc[..n], &r.c_prev[..n]);
        let (dxi, rest) = r.dgx[..4 * n].split_at_mut(n);
        let (dxf, rest) = rest.split_at_mut(n);
        let (dxg, dxo) = rest.split_at_mut(n);
        for (d, &y) in dh.iter_mut().zip(&r.dy[..n]) {
            *d = y + *d;
        }
        // tanh(c_t), kept in the o block until it becomes dL/d(o's pre-activation).
        for (t, &c) in dxo.iter_mut().zip(sc) {
            *t = c.tanh::<I>();
        }
        for (((d, &h), &o), &t) in dc.iter_mut().zip(dh.iter()).zip(so).zip(dxo.iter()) {
            *d += h * o * (T::ONE - t * t);
        }
        for ((t, &h), &o) in dxo.iter_mut().zip(dh.iter()).zip(so) {
            *t = h * *t * o * (T::ONE - o);
        }
        for (((d, &c), &g), &i) in dxi.iter_mut().zip(dc.iter()).zip(sg).zip(si) {
            *d = c * g * i * (T::ONE - i);
        }
        for (((d, &c), &cp), &f) in dxf.iter_mut().zip(dc.iter()).zip(c_prev).zip(sf) {
            *d = c * cp * f * (T::ONE - f);
        }
        for (((d, &c), &i), &g) in dxg.iter_mut().zip(dc.iter()).zip(si).zip(sg) {
            *d = c * i * (T::ONE - g * g);
        }
        for (d, &f) in dc.iter_mut().zip(sf) {
            *d = *d * f;
        }
        dh.fill(T::ZERO);
        r.dgh[..4 * n].copy_from_slice(&r.dgx[..4 * n]);
    }
}
