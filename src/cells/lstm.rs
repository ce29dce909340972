//! LSTM (PyTorch's nn.LSTM, gates i, f, g, o):
//! `c' = f*c + i*g`, `h' = o*tanh(c')`, with i, f, o sigmoid and g tanh of
//! `W_ih x + b_ih + W_hh h + b_hh`.

use super::{blocks, gate_sums, Bwd, Cell, Fwd};
use crate::simd::Float;

#[derive(Clone, Copy, Default)]
pub struct Lstm;

impl Cell for Lstm {
    const GATES: usize = 4;
    const HAS_C: bool = true;
    const SAVED: usize = 5; // i, f, g, o (activated), c_t
    const C_AT: usize = 4;

    #[inline(always)]
    fn forward<T: Float>(self, r: Fwd<'_, T>, train: bool) {
        let n = r.h.len();
        let [pi, pf, pg, po] = gate_sums::<4, T>(&r, n);
        let pre = |p: [&[T]; 4], j: usize| p[0][j] + p[1][j] + (p[2][j] + p[3][j]);
        let (c_prev, c, h) = (&r.c_prev[..n], &mut r.c[..n], &mut r.h[..n]);
        if train {
            let s = &mut r.saved[..5 * n];
            let (gates, sc) = s.split_at_mut(4 * n);
            let (si, rest) = gates.split_at_mut(n);
            let (sf, rest) = rest.split_at_mut(n);
            let (sg, so) = rest.split_at_mut(n);
            for j in 0..n {
                let i = pre(pi, j).sigmoid();
                let f = pre(pf, j).sigmoid();
                let g = pre(pg, j).tanh();
                let o = pre(po, j).sigmoid();
                let cj = f.mul_add(c_prev[j], i * g);
                c[j] = cj;
                h[j] = o * cj.tanh();
                si[j] = i;
                sf[j] = f;
                sg[j] = g;
                so[j] = o;
                sc[j] = cj;
            }
        } else {
            for j in 0..n {
                let i = pre(pi, j).sigmoid();
                let f = pre(pf, j).sigmoid();
                let g = pre(pg, j).tanh();
                let o = pre(po, j).sigmoid();
                let cj = f.mul_add(c_prev[j], i * g);
                c[j] = cj;
                h[j] = o * cj.tanh();
            }
        }
    }

    #[inline(always)]
    fn backward<T: Float>(self, r: Bwd<'_, T>) {
        let n = r.dh.len();
        let [si, sf, sg, so, sc] = blocks::<5, T>(r.saved, n);
        let (dy, c_prev, dc) = (&r.dy[..n], &r.c_prev[..n], &mut r.dc[..n]);
        let (dxi, rest) = r.dgx[..4 * n].split_at_mut(n);
        let (dxf, rest) = rest.split_at_mut(n);
        let (dxg, dxo) = rest.split_at_mut(n);
        let (dhi, rest) = r.dgh[..4 * n].split_at_mut(n);
        let (dhf, rest) = rest.split_at_mut(n);
        let (dhg, dho) = rest.split_at_mut(n);
        let dh_in = &mut r.dh[..n];
        for j in 0..n {
            let (i, f, g, o) = (si[j], sf[j], sg[j], so[j]);
            let dh = dy[j] + dh_in[j];
            let tc = sc[j].tanh();
            let dct = dc[j] + dh * o * (T::ONE - tc * tc);
            let dai = dct * g * i * (T::ONE - i);
            let daf = dct * c_prev[j] * f * (T::ONE - f);
            let dag = dct * i * (T::ONE - g * g);
            let dao = dh * tc * o * (T::ONE - o);
            dc[j] = dct * f;
            dh_in[j] = T::ZERO;
            dxi[j] = dai;
            dxf[j] = daf;
            dxg[j] = dag;
            dxo[j] = dao;
            dhi[j] = dai;
            dhf[j] = daf;
            dhg[j] = dag;
            dho[j] = dao;
        }
    }
}
