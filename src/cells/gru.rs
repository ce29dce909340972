//! GRU (PyTorch's nn.GRU, gates r, z, n):
//! `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`,
//! `n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`, `h' = (1 - z) * n + z * h`.

use super::{blocks, gate_sums, Bwd, Cell, Fwd};
use crate::simd::Float;

#[derive(Clone, Copy, Default)]
pub struct Gru;

impl Cell for Gru {
    const GATES: usize = 3;
    const HAS_C: bool = false;
    const SAVED: usize = 4; // r, z, n, W_hn h + b_hn
    const SPLIT_DGH: bool = true;

    #[inline(always)]
    fn forward<T: Float>(self, r: Fwd<'_, T>, train: bool) {
        let n = r.h.len();
        let [pr, pz, [xn, bin, hn_, bhn]] = gate_sums::<3, T>(&r, n);
        let (h_prev, h) = (&r.h_prev[..n], &mut r.h[..n]);
        let mut step = |j: usize| {
            let rg = (pr[0][j] + pr[1][j] + (pr[2][j] + pr[3][j])).sigmoid();
            let zg = (pz[0][j] + pz[1][j] + (pz[2][j] + pz[3][j])).sigmoid();
            let hn = hn_[j] + bhn[j];
            let ng = rg.mul_add(hn, xn[j] + bin[j]).tanh();
            h[j] = zg.mul_add(h_prev[j] - ng, ng);
            (rg, zg, ng, hn)
        };
        if train {
            let s = &mut r.saved[..4 * n];
            let (sr, rest) = s.split_at_mut(n);
            let (sz, rest) = rest.split_at_mut(n);
            let (sn, shn) = rest.split_at_mut(n);
            for j in 0..n {
                let (rg, zg, ng, hn) = step(j);
                sr[j] = rg;
                sz[j] = zg;
                sn[j] = ng;
                shn[j] = hn;
            }
        } else {
            for j in 0..n {
                step(j);
            }
        }
    }

    #[inline(always)]
    fn backward<T: Float>(self, r: Bwd<'_, T>) {
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
