//! GRU (PyTorch's nn.GRU, gates r, z, n):
//! `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`,
//! `n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`, `h' = (1 - z) * n + z * h`.

use super::{blocks, pre_activations, sigmoid_in_place, Bwd, Cell, Fwd};
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
        // Training computes r, z and W_hn h + b_hn in the tape, where backward reads them.
        let (tape_rz, rest) = r.saved.split_at_mut(if train { 2 * n } else { 0 });
        let (tape_n, tape_hn) = rest.split_at_mut(if train { n } else { 0 });
        let (rz, hw_n) = r.hw[..3 * n].split_at_mut(2 * n);
        let rz = pre_activations(
            rz,
            train.then_some(tape_rz),
            &r.xw[..2 * n],
            &r.b_ih[..2 * n],
            &r.b_hh[..2 * n],
        );
        sigmoid_in_place::<I, T>(rz);
        let b_hn = &r.b_hh[2 * n..3 * n];
        let hn: &[T] = if train {
            let out = &mut tape_hn[..n];
            for ((o, &v), &b) in out.iter_mut().zip(&*hw_n).zip(b_hn) {
                *o = v + b;
            }
            out
        } else {
            for (v, &b) in hw_n.iter_mut().zip(b_hn) {
                *v += b;
            }
            hw_n
        };
        let (rg, zg) = rz.split_at(n);
        let h = &mut r.h[..n];
        // n, kept in h until the update below.
        for ((((hj, &x), &b), &rj), &hnj) in h
            .iter_mut()
            .zip(&r.xw[2 * n..3 * n])
            .zip(&r.b_ih[2 * n..3 * n])
            .zip(rg)
            .zip(hn)
        {
            *hj = (rj * hnj + (x + b)).tanh::<I>();
        }
        if train {
            tape_n.copy_from_slice(h);
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
