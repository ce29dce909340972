//! GRU (PyTorch's nn.GRU, gates r, z, n):
//! `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`,
//! `n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`, `h' = (1 - z) * n + z * h`.

use super::{add_pre, blocks, sigmoid_in_place, Bwd, Cell, Fwd};
use crate::simd::{Float, Isa};

#[derive(Clone, Copy, Default)]
pub struct Gru;

impl Cell for Gru {
    const GATES: usize = 3;
    const HAS_C: bool = false;
    const SAVED: usize = 4; // r, z, n, W_hn h + b_hn
    const SPLIT_DGH: bool = true;

    #[inline(always)]
    fn forward<I: Isa, T: Float>(self, r: Fwd<'_, T>, train: bool) {
        let n = r.h.len();
        let (rz, hn) = r.hw[..3 * n].split_at_mut(2 * n);
        add_pre(rz, &r.xw[..2 * n], &r.b_ih[..2 * n], &r.b_hh[..2 * n]);
        sigmoid_in_place::<I, T>(rz);
        for (v, &b) in hn.iter_mut().zip(&r.b_hh[2 * n..3 * n]) {
            *v += b;
        }
        let (rg, zg) = rz.split_at(n);
        let h = &mut r.h[..n];
        // n, kept in h until the update below.
        for ((((hj, &x), &b), &rj), &hnj) in h
            .iter_mut()
            .zip(&r.xw[2 * n..3 * n])
            .zip(&r.b_ih[2 * n..3 * n])
            .zip(rg)
            .zip(hn.iter())
        {
            *hj = (rj * hnj + (x + b)).tanh::<I>();
        }
        if train {
            let s = &mut r.saved[..4 * n];
            s[..2 * n].copy_from_slice(rz);
            s[2 * n..3 * n].copy_from_slice(h);
            s[3 * n..].copy_from_slice(hn);
        }
        for ((hj, &hp), &z) in h.iter_mut().zip(&r.h_prev[..n]).zip(zg) {
            *hj = z * (hp - *hj) + *hj;
        }
    }

    #[inline(always)]
    fn backward<I: Isa, T: Float>(self, r: Bwd<'_, T>) {
        let n = r.dh.len();
        let [sr, sz, sn, shn] = blocks::<4, T>(r.saved, n);
        let (dy, h_prev) = (&r.dy[..n], &r.h_prev[..n]);
        let (dxr, rest) = r.dgx[..3 * n].split_at_mut(n);
        let (dxz, dxn) = rest.split_at_mut(n);
        let (dhr, rest) = r.dgh[..3 * n].split_at_mut(n);
        let (dhz, dhn) = rest.split_at_mut(n);
        let dh_in = &mut r.dh[..n];
        for j in 0..n {
            let (rg, zg, ng, hn) = (sr[j], sz[j], sn[j], shn[j]);
            let dh = dy[j] + dh_in[j];
            let dan = dh * (T::ONE - zg) * (T::ONE - ng * ng);
            let daz = dh * (h_prev[j] - ng) * zg * (T::ONE - zg);
            let dar = dan * hn * rg * (T::ONE - rg);
            dh_in[j] = dh * zg;
            dxr[j] = dar;
            dxz[j] = daz;
            dxn[j] = dan;
            dhr[j] = dar;
            dhz[j] = daz;
            dhn[j] = dan * rg;
        }
    }
}
