//! The only doorway to the GEMM crates: strided matrix views and `dst (+)= a * b`.
//!
//! Two crates, each where it was measured faster on the shapes an RNN uses (see the README):
//! `faer` for products of a few rows (one time step of a small batch) and for those whose `a` is
//! row-major (the all-steps input projection, `dx`), `gemm` for those whose `a` is column-major
//! (the weight gradients, `dgates^T x`).

use crate::buffers::Aligned;
use crate::simd::Float;
use rayon::prelude::*;

/// A read-only strided matrix view: element (i, j) lives at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct Mat<T> {
    ptr: *const T,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

/// A writable strided matrix view.
pub struct MatMut<T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

// SAFETY: the views are plain pointers that the callers of `matmul` keep valid and, for `MatMut`,
// unaliased while the product runs; the GEMM crate reads and writes them from its worker threads.
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}
unsafe impl<T: Send> Send for MatMut<T> {}

impl<T> Mat<T> {
    /// Columns `[j0, j0 + w)` (no copy).
    fn cols_at(&self, j0: usize, w: usize) -> Self {
        Mat {
            ptr: self.ptr.wrapping_offset(j0 as isize * self.cs),
            cols: w,
            ..*self
        }
    }
    /// `rows x cols` row-major matrix with leading dimension `ld` over `s` (checked to fit).
    pub fn new(s: &[T], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(cols <= ld || rows <= 1, "leading dimension");
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * ld + cols <= s.len(),
            "matrix out of bounds"
        );
        Mat {
            ptr: s.as_ptr(),
            rows,
            cols,
            rs: ld as isize,
            cs: 1,
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl<T> MatMut<T> {
    /// Columns `[j0, j0 + w)`, a view of its own (the caller hands disjoint blocks out).
    fn cols_at(&self, j0: usize, w: usize) -> Self {
        MatMut {
            ptr: self.ptr.wrapping_offset(j0 as isize * self.cs),
            rows: self.rows,
            cols: w,
            rs: self.rs,
            cs: self.cs,
        }
    }
    /// `rows x cols` row-major matrix with leading dimension `ld` over `s` (checked to fit).
    pub fn new(s: &mut [T], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(cols <= ld || rows <= 1, "leading dimension");
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * ld + cols <= s.len(),
            "matrix out of bounds"
        );
        MatMut {
            ptr: s.as_mut_ptr(),
            rows,
            cols,
            rs: ld as isize,
            cs: 1,
        }
    }
    /// # Safety
    /// `ptr` must address a `rows x cols` matrix with leading dimension `ld` that nothing else
    /// touches while the view is used (the sweep hands disjoint rows to its threads this way).
    pub unsafe fn from_raw(ptr: *mut T, rows: usize, cols: usize, ld: usize) -> Self {
        MatMut {
            ptr,
            rows,
            cols,
            rs: ld as isize,
            cs: 1,
        }
    }
}

/// Products with at most this many rows go to faer (single-threaded: it is at its best there,
/// and at batch 1 the two crates tie).
const FAER_MAX_ROWS: usize = 32;
/// Products of at most this many rows with a `b` whose columns are contiguous (`x W^T` with `W`
/// row-major) go to the dot-product kernel: it reads `W` once per row, with no packing.
pub(crate) const DOT_MAX_ROWS: usize = 2;

/// Column width of the blocks a few-row product is cut into.
const FAER_COL_BLOCK: usize = 128;
/// Multiply-adds from which a few-row product runs its column blocks on the threads.
const PAR_MACS: usize = 1 << 18;

/// `dst (+)= a * b` by faer, for f32 and f64 (the only `Float`s).
fn faer_matmul<T: Float>(dst: MatMut<T>, accumulate: bool, a: &Mat<T>, b: &Mat<T>, par: faer::Par) {
    use std::any::TypeId;
    // SAFETY: T is the type it is compared with, so the casts are identities; the views' bounds
    // were checked when they were built.
    unsafe {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            faer_impl::<f32, T>(dst, accumulate, a, b, 1.0, par);
        } else {
            assert!(TypeId::of::<T>() == TypeId::of::<f64>(), "Float is f32 or f64");
            faer_impl::<f64, T>(dst, accumulate, a, b, 1.0, par);
        }
    }
}

/// # Safety
/// `F` must be the element type behind the views, which must be in bounds.
unsafe fn faer_impl<F: faer::traits::ComplexField, T>(
    dst: MatMut<T>,
    accumulate: bool,
    a: &Mat<T>,
    b: &Mat<T>,
    one: F,
    par: faer::Par,
) {
    let d = faer::MatMut::<F>::from_raw_parts_mut(dst.ptr.cast(), a.rows, b.cols, dst.rs, dst.cs);
    let l = faer::MatRef::<F>::from_raw_parts(a.ptr.cast(), a.rows, a.cols, a.rs, a.cs);
    let r = faer::MatRef::<F>::from_raw_parts(b.ptr.cast(), b.rows, b.cols, b.rs, b.cs);
    let acc = if accumulate {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    faer::linalg::matmul::matmul(d, acc, l, r, one, par);
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), on up to `threads` threads of the
/// current rayon pool (1: the calling thread only). Without `accumulate`, `dst` is written and
/// never read, so it may be uninitialised memory.
pub fn matmul<T: Float>(dst: MatMut<T>, accumulate: bool, a: Mat<T>, b: Mat<T>, threads: usize) {
    assert!(
        a.rows == dst.rows && b.cols == dst.cols && a.cols == b.rows,
        "matmul shapes"
    );
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    // SAFETY: (i, j) is inside the view.
                    unsafe { *dst.ptr.offset(i as isize * dst.rs + j as isize * dst.cs) = T::ZERO };
                }
            }
        }
        return;
    }
    if dst.rows <= DOT_MAX_ROWS && dot(&dst, accumulate, &a, &b) {
        return;
    }
    if (2..=FAER_MAX_ROWS).contains(&dst.rows) {
        // Fixed blocks of columns, the same whatever the thread count (so that the results do not
        // depend on it), run on the threads when the product is large enough to pay for them.
        let macs = dst.rows * dst.cols * a.cols;
        let blocks = column_blocks(dst, b, FAER_COL_BLOCK);
        let run = |(d, bb): (MatMut<T>, Mat<T>)| faer_matmul(d, accumulate, &a, &bb, faer::Par::Seq);
        if threads > 1 && blocks.len() > 1 && macs >= PAR_MACS {
            blocks.into_par_iter().for_each(run);
        } else {
            blocks.into_iter().for_each(run);
        }
        return;
    }
    if a.cs == 1 {
        // Row-major `a` (the input projection, dx): faer made whole sweeps 4-9% faster than the
        // gemm crate did, or left them unchanged. With `a` column-major (the weight gradients,
        // below) it was slower: 74 against 96 GFLOP/s on LSTM B=64's shape at 2 threads.
        let par = if threads > 1 {
            faer::Par::rayon(threads)
        } else {
            faer::Par::Seq
        };
        faer_matmul(dst, accumulate, &a, &b, par);
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the views were checked to fit their slices when built (or promised by `from_raw`),
    // and the shapes agree. gemm computes dst = alpha*dst + beta*a*b.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            a.cols,
            dst.ptr,
            dst.cs,
            dst.rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// The product `dst (+)= a * b` cut into blocks of `width` columns (the last narrower): each
/// block's view of `dst`, a view of its own, and of `b`.
pub(crate) fn column_blocks<T>(dst: MatMut<T>, b: Mat<T>, width: usize) -> Vec<(MatMut<T>, Mat<T>)> {
    (0..b.cols)
        .step_by(width)
        .map(|j0| {
            let w = width.min(b.cols - j0);
            (dst.cols_at(j0, w), b.cols_at(j0, w))
        })
        .collect()
}

/// Products of at most this many rows go to the dot-product kernel in [`matmul_unpacked`]. Against
/// faer, which packs `b` in every call: LSTM and GRU streaming steps (H = I = 64 and 256, two
/// threads, medians in one process, in turns) took 0.51-0.66x the time at batch 3-4, 0.83-0.94x
/// at batch 8, and 1.05-1.14x at batch 16.
pub(crate) const UNPACKED_DOT_MAX_ROWS: usize = 8;

/// `dst (+)= a * b` on the calling thread, for a `b` used once, as a streaming step's weights:
/// by the dot-product kernel, which reads `b` as it is, when `b` is a row-major matrix
/// transposed (`x W^T`), `a` has at most `UNPACKED_DOT_MAX_ROWS` (8) rows and the CPU has the
/// kernel; by [`matmul`] otherwise.
pub fn matmul_unpacked<T: Float>(dst: MatMut<T>, accumulate: bool, a: Mat<T>, b: Mat<T>) {
    assert!(
        a.rows == dst.rows && b.cols == dst.cols && a.cols == b.rows,
        "matmul shapes"
    );
    if dst.rows == 0 || dst.cols == 0 || !unpacked_by_dot::<T>(dst.rows) || !dot(&dst, accumulate, &a, &b) {
        matmul(dst, accumulate, a, b, 1);
    }
}

/// Whether [`matmul_unpacked`] multiplies `rows` row-major rows by the dot-product kernel, whose
/// rounding of an output does not depend on how the outputs are cut.
pub(crate) fn unpacked_by_dot<T: Float>(rows: usize) -> bool {
    rows <= UNPACKED_DOT_MAX_ROWS && T::dot_kernel().is_some()
}

/// `dst (+)= a * b` by the dot-product kernel (shapes checked, none empty), if `a`, `dst` and
/// `b`'s transpose are row-major and the CPU has the kernel; false, with nothing done, if not.
/// One row against weights whose rows all start off a cache line by the same amount goes to the
/// kernel for that offset, when there is one ([`Float::shifted_dot_kernel`]): the same bits.
fn dot<T: Float>(dst: &MatMut<T>, accumulate: bool, a: &Mat<T>, b: &Mat<T>) -> bool {
    let Some(mut kernel) = T::dot_kernel().filter(|_| a.cs == 1 && b.rs == 1 && dst.cs == 1) else {
        return false;
    };
    let offset = b.ptr as usize % 64;
    if offset != 0 && dst.rows == 1 && (b.cs as usize * std::mem::size_of::<T>()).is_multiple_of(64) {
        kernel = T::shifted_dot_kernel(offset).unwrap_or(kernel);
    }
    let args = DotArgs {
        m: dst.rows,
        k: a.cols,
        n: dst.cols,
        x: a.ptr,
        ldx: a.rs as usize,
        w: b.ptr,
        ldw: b.cs as usize,
        y: dst.ptr,
        ldy: dst.rs as usize,
        accumulate,
    };
    // SAFETY: the m x k matrix behind `a`, the n x k one behind `b` and the m x n one behind
    // `dst` are inside their views.
    unsafe { kernel(&args) };
    true
}

/// A matrix `B` (k x n) packed once for the many products `A * B` that share it: the recurrent
/// weights, multiplied by the state at every time step of a sweep. The GEMM crates repack `B`
/// inside every call, which at one step per call costs as much as the product for small batches.
///
/// `B` is given as column blocks side by side (views of the same `k` rows), so that a thread's
/// share of the gate columns (one block per gate, see `sweep.rs`) is one product without a copy.
///
/// Packed layout: panels of [`Float::PANEL`] columns (two AVX2 vectors, one AVX-512 vector), each
/// panel's k rows contiguous, the last panel padded with zeros. The product is computed by a
/// register-blocked kernel: with AVX2+FMA, up to six rows of `A` against one panel (twelve
/// accumulators); with AVX-512, up to eight rows against three panels (24). Each element of the
/// result is summed over k in order, so that the result depends neither on the row count, nor on
/// how the columns are split, nor on which of the two kernels ran. Without AVX2+FMA it falls
/// back to [`matmul`] on each block.
pub struct PackedB<T> {
    parts: Vec<Mat<T>>,
    k: usize,
    n: usize,
    data: Aligned<T>,
}

// SAFETY: `parts` are read-only views of weights that outlive the sweep using this packing.
unsafe impl<T: Sync> Send for PackedB<T> {}
unsafe impl<T: Sync> Sync for PackedB<T> {}

impl<T: Float> PackedB<T> {
    /// Pack the column blocks `parts` (all with the same row count), side by side, for products
    /// of up to `max_rows` rows of `A`. Products of at most `DOT_MAX_ROWS` (2) rows with blocks
    /// whose columns are contiguous go to the dot-product kernel, which reads `B` as it is: then
    /// nothing is packed (packing had been 7.5% of a batch-1 LSTM sweep's profile).
    pub fn new(parts: Vec<Mat<T>>, max_rows: usize) -> Self {
        let k = parts.first().map_or(0, |b| b.rows);
        assert!(
            parts.iter().all(|b| b.rows == k),
            "PackedB blocks must have the same rows"
        );
        let n = parts.iter().map(|b| b.cols).sum::<usize>();
        let nr = T::PANEL;
        let mut data = Aligned::zeroed(0);
        if Self::packs(max_rows, parts.iter().all(|b| b.rs == 1)) {
            data = Aligned::zeroed(n.div_ceil(nr) * k * nr);
            // Where each column starts and its row stride; a panel is filled row by row, reading
            // its columns side by side.
            let cols: Vec<(*const T, isize)> = parts
                .iter()
                .flat_map(|b| (0..b.cols).map(move |j| (b.ptr.wrapping_offset(j as isize * b.cs), b.rs)))
                .collect();
            for (panel, cols) in data.chunks_exact_mut(k * nr).zip(cols.chunks(nr)) {
                for (r, dst) in panel.chunks_exact_mut(nr).enumerate() {
                    for (d, &(ptr, rs)) in dst.iter_mut().zip(cols) {
                        // SAFETY: row r of the column is inside its view.
                        *d = unsafe { *ptr.offset(r as isize * rs) };
                    }
                }
            }
        }
        PackedB { parts, k, n, data }
    }

    /// The columns of the blocks side by side.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// The elements packed (none when the products read the blocks as they are).
    pub fn packed_len(&self) -> usize {
        self.data.len()
    }

    /// Whether a packing for products of up to `max_rows` rows holds packed panels, for blocks
    /// whose columns are `contiguous` or not; if not, its products read the blocks as they are.
    pub fn packs(max_rows: usize, contiguous: bool) -> bool {
        let dot = max_rows <= DOT_MAX_ROWS && T::dot_kernel().is_some() && contiguous;
        T::panel_kernel().is_some() && !dot
    }
}

/// What the packed kernel reads and writes: `c[0..m, panel columns] (+)= a[0..m, 0..k] * B`,
/// `a` and `c` row-major with leading dimensions `lda`, `ldc`.
pub struct PanelArgs<T> {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a: *const T,
    pub lda: usize,
    pub b: *const T,
    pub c: *mut T,
    pub ldc: usize,
    pub accumulate: bool,
}

/// The packed kernel; unsafe: the pointers of `PanelArgs` must be valid for the shapes it gives,
/// and no one else may touch `c` meanwhile.
pub type PanelKernel<T> = unsafe fn(&PanelArgs<T>);

/// `dst (+)= a * B` with `B` packed, on the calling thread (the sweep splits the work itself).
pub fn matmul_packed<T: Float>(dst: MatMut<T>, accumulate: bool, a: Mat<T>, b: &PackedB<T>) {
    assert!(
        a.rows == dst.rows && b.n == dst.cols && a.cols == b.k,
        "matmul_packed shapes"
    );
    let kernel = match T::panel_kernel() {
        Some(kernel) if !b.data.is_empty() && a.cs == 1 && dst.cs == 1 => kernel,
        _ => {
            let mut j0 = 0;
            for part in &b.parts {
                matmul(dst.cols_at(j0, part.cols), accumulate, a, *part, 1);
                j0 += part.cols;
            }
            return;
        }
    };
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    let args = PanelArgs {
        m: dst.rows,
        k: a.cols,
        n: dst.cols,
        a: a.ptr,
        lda: a.rs as usize,
        b: b.data.as_ptr(),
        c: dst.ptr,
        ldc: dst.rs as usize,
        accumulate,
    };
    // SAFETY: the shapes were checked and `dst` is this call's to write.
    unsafe { kernel(&args) }
}

// SAFETY: the raw pointers are only dereferenced under the contract of `PanelKernel`.
unsafe impl<T: Sync> Sync for PanelArgs<T> {}

/// The AVX2+FMA packed kernels for f32 (8 lanes) and f64 (4 lanes).
#[cfg(target_arch = "x86_64")]
macro_rules! panel_kernel {
    ($name:ident, $t:ty, $v:ty, $lanes:expr, $zero:ident, $set1:ident, $load:ident, $store:ident, $add:ident, $fma:ident) => {
        #[target_feature(enable = "avx2,fma")]
        pub(crate) unsafe fn $name(g: &PanelArgs<$t>) {
            use std::arch::x86_64::*;
            const NR: usize = 2 * $lanes;

            /// Rows `[0, MR)` of `a` times `NP` consecutive panels from `bp`.
            #[inline(always)]
            unsafe fn micro<const MR: usize, const NP: usize>(
                g: &PanelArgs<$t>,
                a: *const $t,
                c: *mut $t,
                bp: *const $t,
                w: usize,
            ) {
                unsafe {
                    let mut accs = [[[$zero(); 2]; NP]; MR];
                    for p in 0..g.k {
                        let mut bv = [[$zero(); 2]; NP];
                        for (j, b) in bv.iter_mut().enumerate() {
                            let src = bp.add(j * g.k * NR + p * NR);
                            *b = [$load(src), $load(src.add($lanes))];
                        }
                        for (i, acc_i) in accs.iter_mut().enumerate() {
                            let av: $v = $set1(*a.add(i * g.lda + p));
                            for j in 0..NP {
                                acc_i[j][0] = $fma(av, bv[j][0], acc_i[j][0]);
                                acc_i[j][1] = $fma(av, bv[j][1], acc_i[j][1]);
                            }
                        }
                    }
                    for (i, acc_i) in accs.iter().enumerate() {
                        for (j, v) in acc_i.iter().enumerate() {
                            let row = c.add(i * g.ldc + j * NR);
                            let cols = w.saturating_sub(j * NR).min(NR);
                            if cols == NR {
                                let (mut lo, mut hi) = (v[0], v[1]);
                                if g.accumulate {
                                    lo = $add(lo, $load(row));
                                    hi = $add(hi, $load(row.add($lanes)));
                                }
                                $store(row, lo);
                                $store(row.add($lanes), hi);
                            } else {
                                let mut tmp = [0.0 as $t; NR];
                                $store(tmp.as_mut_ptr(), v[0]);
                                $store(tmp.as_mut_ptr().add($lanes), v[1]);
                                for (l, &t) in tmp.iter().enumerate().take(cols) {
                                    *row.add(l) = if g.accumulate { *row.add(l) + t } else { t };
                                }
                            }
                        }
                    }
                }
            }

            unsafe {
                let p1 = g.n.div_ceil(NR);
                let mut p = 0;
                // One row (a batch-1 sweep): four panels at a time, for eight accumulators.
                while g.m == 1 && p + 4 <= p1 {
                    micro::<1, 4>(g, g.a, g.c.add(p * NR), g.b.add(p * g.k * NR), g.n - p * NR);
                    p += 4;
                }
                for p in p..p1 {
                    let (bp, c, w) = (g.b.add(p * g.k * NR), g.c.add(p * NR), (g.n - p * NR).min(NR));
                    // Blocks of six rows; a remainder of seven or eight rows goes as four and
                    // the rest, so that no block is left with too few accumulators to keep the
                    // FMA units busy.
                    let mut i = 0;
                    while g.m - i >= 6 {
                        let (a, c) = (g.a.add(i * g.lda), c.add(i * g.ldc));
                        if matches!(g.m - i, 7 | 8) {
                            micro::<4, 1>(g, a, c, bp, w);
                            i += 4;
                        } else {
                            micro::<6, 1>(g, a, c, bp, w);
                            i += 6;
                        }
                    }
                    let (a, c) = (g.a.add(i * g.lda), c.add(i * g.ldc));
                    match g.m - i {
                        5 => micro::<5, 1>(g, a, c, bp, w),
                        4 => micro::<4, 1>(g, a, c, bp, w),
                        3 => micro::<3, 1>(g, a, c, bp, w),
                        2 => micro::<2, 1>(g, a, c, bp, w),
                        1 => micro::<1, 1>(g, a, c, bp, w),
                        _ => {}
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
panel_kernel!(
    panel_f32,
    f32,
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_fmadd_ps
);
#[cfg(target_arch = "x86_64")]
panel_kernel!(
    panel_f64,
    f64,
    __m256d,
    4,
    _mm256_setzero_pd,
    _mm256_set1_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_add_pd,
    _mm256_fmadd_pd
);

/// The AVX-512 packed kernels, on the same packed layout: a panel row is one 512-bit vector. With
/// 32 vector registers the register block is up to eight rows of `A` against three panels, or up
/// to six rows against four (24 accumulators, against 12 for AVX2), which halves the loads of `A`
/// and `B` per multiply-add. Each output is still one chain of FMAs over k in order from zero, as
/// in the AVX2 kernel, so both give the same bits.
#[cfg(target_arch = "x86_64")]
macro_rules! panel_kernel_512 {
    ($name:ident, $t:ty, $lanes:expr, $mask:ty, $zero:ident, $set1:ident, $load:ident, $maskz_load:ident, $mask_store:ident, $add:ident, $fma:ident) => {
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(crate) unsafe fn $name(g: &PanelArgs<$t>) {
            use std::arch::x86_64::*;
            const NR: usize = $lanes;
            /// How many panel rows ahead each panel is fetched into L1. A group of three panels
            /// over k = 512 is 96 KB, more than L1, so every row block reads its panels from L2;
            /// fetched 32 rows (2 KB) ahead, LSTM inference at B=64, H=512 took 0.89-0.98x the
            /// time it took without (four measurements in turns in one process, Ice Lake), and
            /// 0.94-0.98x at B=8, H=256; 16 and 64 rows ahead were no better on the whole.
            const PREFETCH: usize = 32;

            /// Rows `[0, MR)` of `a` times `NP` consecutive panels from `bp`, `w` columns left.
            #[inline(always)]
            unsafe fn micro<const MR: usize, const NP: usize>(
                g: &PanelArgs<$t>,
                a: *const $t,
                c: *mut $t,
                bp: *const $t,
                w: usize,
            ) {
                unsafe {
                    let mut accs = [[$zero(); NP]; MR];
                    for p in 0..g.k {
                        let mut bv = [$zero(); NP];
                        for (j, b) in bv.iter_mut().enumerate() {
                            *b = $load(bp.add(j * g.k * NR + p * NR));
                        }
                        for j in 0..NP {
                            let ahead = bp.wrapping_add(j * g.k * NR + (p + PREFETCH) * NR);
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        }
                        for (i, acc_i) in accs.iter_mut().enumerate() {
                            let av = $set1(*a.add(i * g.lda + p));
                            for (acc, b) in acc_i.iter_mut().zip(&bv) {
                                *acc = $fma(av, *b, *acc);
                            }
                        }
                    }
                    for (i, acc_i) in accs.iter().enumerate() {
                        for (j, &v) in acc_i.iter().enumerate() {
                            let row = c.add(i * g.ldc + j * NR);
                            let cols = (w - j * NR).min(NR);
                            let mask: $mask = if cols == NR { !0 } else { (1 << cols) - 1 };
                            let v = if g.accumulate {
                                $add(v, $maskz_load(mask, row))
                            } else {
                                v
                            };
                            $mask_store(row, mask, v);
                        }
                    }
                }
            }

            /// Every row of `a` against the `NP` panels from panel `p`.
            #[inline(always)]
            unsafe fn panels<const NP: usize>(g: &PanelArgs<$t>, p: usize) {
                unsafe {
                    let (bp, c, w) = (g.b.add(p * g.k * NR), g.c.add(p * NR), g.n - p * NR);
                    let mut i = 0;
                    while g.m - i >= 8 {
                        micro::<8, NP>(g, g.a.add(i * g.lda), c.add(i * g.ldc), bp, w);
                        i += 8;
                    }
                    let (a, c) = (g.a.add(i * g.lda), c.add(i * g.ldc));
                    match g.m - i {
                        7 => micro::<7, NP>(g, a, c, bp, w),
                        6 => micro::<6, NP>(g, a, c, bp, w),
                        5 => micro::<5, NP>(g, a, c, bp, w),
                        4 => micro::<4, NP>(g, a, c, bp, w),
                        3 => micro::<3, NP>(g, a, c, bp, w),
                        2 => micro::<2, NP>(g, a, c, bp, w),
                        1 => micro::<1, NP>(g, a, c, bp, w),
                        _ => {}
                    }
                }
            }

            unsafe {
                let p1 = g.n.div_ceil(NR);
                let mut p = 0;
                // Three panels at a time from seven rows up (24 accumulators at eight), four below.
                if g.m >= 7 {
                    while p + 3 <= p1 {
                        panels::<3>(g, p);
                        p += 3;
                    }
                } else {
                    while p + 4 <= p1 {
                        panels::<4>(g, p);
                        p += 4;
                    }
                }
                match p1 - p {
                    3 => panels::<3>(g, p),
                    2 => panels::<2>(g, p),
                    1 => panels::<1>(g, p),
                    _ => {}
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
panel_kernel_512!(
    panel_f32_512,
    f32,
    16,
    __mmask16,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_maskz_loadu_ps,
    _mm512_mask_storeu_ps,
    _mm512_add_ps,
    _mm512_fmadd_ps
);
#[cfg(target_arch = "x86_64")]
panel_kernel_512!(
    panel_f64_512,
    f64,
    8,
    __mmask8,
    _mm512_setzero_pd,
    _mm512_set1_pd,
    _mm512_loadu_pd,
    _mm512_maskz_loadu_pd,
    _mm512_mask_storeu_pd,
    _mm512_add_pd,
    _mm512_fmadd_pd
);

/// What the dot-product kernel reads and writes: `y[i][j] (+)= x[i] . w[j]` for the `m` rows of a
/// row-major `x` (leading dimension `ldx`) and the `n` rows of a row-major `w` (`ldw`), all of
/// length `k`; `y` is row-major with leading dimension `ldy`.
pub struct DotArgs<T> {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub x: *const T,
    pub ldx: usize,
    pub w: *const T,
    pub ldw: usize,
    pub y: *mut T,
    pub ldy: usize,
    pub accumulate: bool,
}

/// The dot-product kernel; unsafe: the pointers of `DotArgs` must be valid for its shapes.
pub type DotKernel<T> = unsafe fn(&DotArgs<T>);

/// The dot-product kernels, for `x W^T` with `W` stored row-major, as a streaming step
/// multiplies its input and state by the weights: `W` is read once, in order, with no packing
/// (the weights may change between calls), each block of its rows against every row of `x`.
/// Each output's products are summed in vector lanes, in order of k, and the lanes then by a tree
/// of adds (`$tree`, which the vector versions `$sums_m1` and `$sums4` follow, for `$m1` and four
/// rows of `w` at a time), the same tree whatever the block: an output's value depends neither on
/// the row counts nor on how the outputs are cut. The AVX2 and AVX-512 kernels have different
/// lane counts and trees, so their results differ in the last bits.
///
/// The AVX-512 kernel takes eight rows of `w` at a time against one row of `x` (sixteen ran slower
/// at k = 256). On Ice Lake, with 64-byte-aligned weights, against the AVX2 kernel (ten rounds in
/// turns in one process, two threads): streaming steps at H=64 and 256, LSTM 0.84x and 0.83x the
/// time, GRU 0.94x and 0.78x, RNN 1.08x and 0.89x; batch-1 sequences (H=128) 0.80-0.86x.
#[cfg(target_arch = "x86_64")]
macro_rules! dot_kernel {
    ($name:ident, $features:literal, $t:ty, $v:ty, $lanes:expr, $m1:expr, $zero:ident, $load:ident, $fma:ident, $store:ident, $sums_m1:ident, $sums4:ident, $tree:expr) => {
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(g: &DotArgs<$t>) {
            use std::arch::x86_64::*;

            /// Outputs `(i0 + i, j0 + r)`, `i < M`, `r < R`: R rows of `w` against M rows of `x`,
            /// R * M independent FMA chains.
            #[inline(always)]
            unsafe fn block<const R: usize, const M: usize>(g: &DotArgs<$t>, i0: usize, j0: usize) {
                unsafe {
                    let mut acc = [[$zero(); R]; M];
                    let body = g.k - g.k % $lanes;
                    for p in (0..body).step_by($lanes) {
                        let mut wv = [$zero(); R];
                        for (r, w) in wv.iter_mut().enumerate() {
                            *w = $load(g.w.add((j0 + r) * g.ldw + p));
                        }
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let xv: $v = $load(g.x.add((i0 + i) * g.ldx + p));
                            for (a, w) in acc.iter_mut().zip(&wv) {
                                *a = $fma(*w, xv, *a);
                            }
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        let (x, y) = (g.x.add((i0 + i) * g.ldx), g.y.add((i0 + i) * g.ldy + j0));
                        let mut sums = [0.0 as $t; R];
                        if R == $m1 {
                            $sums_m1(acc, sums.as_mut_ptr());
                        } else if R == 4 {
                            $sums4(acc, sums.as_mut_ptr());
                        } else {
                            for (s, a) in sums.iter_mut().zip(acc) {
                                let mut lanes = [0.0 as $t; $lanes];
                                $store(lanes.as_mut_ptr(), *a);
                                *s = $tree(lanes);
                            }
                        }
                        finish_row(g, body, x, y, j0, sums);
                    }
                }
            }

            /// Rows `[j0, j0 + R)` of `w` against every row of `x`, two rows at a time (eight
            /// chains at R = 4). Blocks of three rows, twelve chains, ran at 0.69-0.93x the speed
            /// with k of 256 and 512 (one thread, 3-32 rows; at k = 64, 0.70-1.38x).
            #[inline(always)]
            unsafe fn rows<const R: usize>(g: &DotArgs<$t>, j0: usize) {
                unsafe {
                    let mut i = 0;
                    while g.m - i >= 2 {
                        block::<R, 2>(g, i, j0);
                        i += 2;
                    }
                    if i < g.m {
                        block::<R, 1>(g, i, j0);
                    }
                }
            }

            unsafe {
                let mut j = 0;
                if g.m == 1 {
                    // One row of x: a vector's width of w's rows at a time, as many chains.
                    while j + $m1 <= g.n {
                        block::<{ $m1 }, 1>(g, 0, j);
                        j += $m1;
                    }
                }
                while j + 4 <= g.n {
                    rows::<4>(g, j);
                    j += 4;
                }
                while j < g.n {
                    rows::<1>(g, j);
                    j += 1;
                }
            }
        }
    };
}

/// The end of the dot-product kernels' outputs `(i, j0 + r)` from their lane sums: the products
/// past the vectors' part of k (`body`), in order, then the store (or add) at `y`, row `i` of `y`
/// from column `j0`; `x` is row `i` of `x`.
///
/// # Safety
/// The pointers of `g` must be valid for its shapes, `x` and `y` rows of them.
#[inline(always)]
unsafe fn finish_row<T: Float, const R: usize>(
    g: &DotArgs<T>,
    body: usize,
    x: *const T,
    y: *mut T,
    j0: usize,
    sums: [T; R],
) {
    for (r, mut sum) in sums.into_iter().enumerate() {
        // SAFETY: (j0 + r, p) is inside w, p inside x's row, r inside y's row (the caller's shapes).
        unsafe {
            for p in body..g.k {
                sum += *g.w.add((j0 + r) * g.ldw + p) * *x.add(p);
            }
            let y = y.add(r);
            *y = if g.accumulate { *y + sum } else { sum };
        }
    }
}

/// [`dot_f32_512`] for one row of `x` against weights whose rows all start `S` floats past a
/// 64-byte boundary (NumPy aligns its arrays to 16 bytes only, so an unpickled layer's weights
/// start 4, 8 or 12 floats past one), with the same bits. Its loads of the weights are aligned,
/// each vector 16 elements of a row from `S` before a multiple of 16, and `x` is loaded at the
/// same elements (one load for eight rows); the lanes outside the row are loaded as zeros, which
/// add nothing exactly. Lane `l` then sums the products that [`dot_f32_512`]'s lane
/// `(l - S) mod 16` sums, in the same order, so rotating the lanes back before the same tree of
/// adds gives the same result. The rows past the last whole block of eight go to
/// [`dot_f32_512`]. Streaming steps of unpickled layers at batch 1, whose loads spanned two
/// cache lines, took 1.19-1.86x the time of the same layers' aligned steps (H=64-384, one
/// thread, in turns in one process); with this kernel 0.99-1.31x (with aligned loads joined
/// two by two by `valignd` instead, the same bits, 1.00-1.39x).
///
/// # Safety
/// As [`dot_f32_512`], with `g.m == 1`, `g.w` `S` floats past a 64-byte boundary and `g.ldw` a
/// multiple of 16; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn dot_f32_512_shifted<const S: i32>(g: &DotArgs<f32>) {
    use std::arch::x86_64::*;
    const R: usize = 8;
    let body = g.k - g.k % 16;
    let blocks = g.n - g.n % R;
    if body == 0 {
        // SAFETY: the caller's contract.
        return unsafe { dot_f32_512(g) };
    }
    // The lanes of the first vector that hold a row's elements (from S), and of the last (to S).
    let (head, tail): (__mmask16, __mmask16) = (!((1u16 << S) - 1), (1u16 << S) - 1);
    // SAFETY: the caller's contract: vector q of a row holds its elements [16q - S, 16q + 16 - S),
    // loaded from a 64-byte boundary; the lanes outside [0, body) are masked off (not read).
    unsafe {
        // (The first vectors start before x and before w's first row: wrapping arithmetic.)
        let x = g.x.wrapping_sub(S as usize);
        for j0 in (0..blocks).step_by(R) {
            let w = |r: usize| g.w.wrapping_add((j0 + r) * g.ldw).wrapping_sub(S as usize);
            let mut acc = [_mm512_setzero_ps(); R];
            for p in (0..=body).step_by(16) {
                let mask = match p {
                    0 => head,
                    _ if p == body => tail,
                    _ => !0,
                };
                let xv = _mm512_maskz_loadu_ps(mask, x.wrapping_add(p));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_maskz_load_ps(mask, w(r).wrapping_add(p)), xv, *acc);
                }
            }
            // Lane l back to lane (l - S) mod 16. (For S = 4, 8 and 12 the tree below adds the
            // same pairs either way, so this only keeps the lanes where the tree expects them.)
            let acc = acc.map(|a| {
                let a = _mm512_castps_si512(a);
                _mm512_castsi512_ps(_mm512_alignr_epi32::<S>(a, a))
            });
            let mut sums = [0.0f32; R];
            lane_sums8_f32_512(&acc, sums.as_mut_ptr());
            finish_row(g, body, g.x, g.y.add(j0), j0, sums);
        }
        if blocks < g.n {
            let rest = DotArgs {
                n: g.n - blocks,
                w: g.w.add(blocks * g.ldw),
                y: g.y.add(blocks),
                ..*g
            };
            dot_f32_512(&rest);
        }
    }
}

/// The lane sums of eight f32 vectors, stored at `out[0..8]` (`out[r]`: the sum of `a[r]`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lane_sums8_f32(a: &[std::arch::x86_64::__m256], out: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: AVX is enabled in the kernel that inlines this; `out` holds eight elements.
    unsafe {
        // Pairwise sums within 128-bit halves, twice: lanes (r0..r3 | r0..r3) of rows 0-3 and 4-7.
        let q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        // Low halves plus high halves.
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps(q0, q1, 0x20),
            _mm256_permute2f128_ps(q0, q1, 0x31),
        );
        _mm256_storeu_ps(out, sums);
    }
}

/// The lane sums of four f32 vectors, stored at `out[0..4]`: the tree of [`lane_sums8_f32`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lane_sums4_f32(a: &[std::arch::x86_64::__m256], out: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: AVX is enabled in the kernel that inlines this; `out` holds four elements.
    unsafe {
        let q = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
    }
}

/// The lane sums of four f64 vectors (a full vector's width of them), stored at `out[0..4]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lane_sums4_f64(a: &[std::arch::x86_64::__m256d], out: *mut f64) {
    use std::arch::x86_64::*;
    // SAFETY: AVX is enabled in the kernel that inlines this; `out` holds four elements.
    unsafe {
        let (h0, h1) = (_mm256_hadd_pd(a[0], a[1]), _mm256_hadd_pd(a[2], a[3]));
        let sums = _mm256_add_pd(
            _mm256_permute2f128_pd(h0, h1, 0x20),
            _mm256_permute2f128_pd(h0, h1, 0x31),
        );
        _mm256_storeu_pd(out, sums);
    }
}

/// The sum of `lanes` by a fixed tree of adds: with `HALVES` (the AVX-512 kernel's), the upper
/// half of the lanes onto the lower, then the upper half of those, ... (folding halves takes the
/// fewest shuffles across 512-bit vectors); without (the AVX2 kernels'), adjacent lanes, then
/// adjacent pairs of those, ...
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_tree<T: Float, const L: usize, const HALVES: bool>(mut lanes: [T; L]) -> T {
    let mut n = L;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            let (a, b) = if HALVES { (l, l + n) } else { (2 * l, 2 * l + 1) };
            lanes[l] = lanes[a] + lanes[b];
        }
    }
    lanes[0]
}

/// One level of [`lane_tree`] with `HALVES` for the rows of two vectors of f32 whose rows are
/// `w` lanes wide (16, 8 or 4), `w / 2` after: the rows of `x` then those of `y`, in order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fold_f32<const W: usize>(
    x: std::arch::x86_64::__m512,
    y: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F is enabled in the kernel that inlines this.
    unsafe {
        match W {
            // One row each: quarters 0-1 of x and y plus quarters 2-3.
            16 => _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y)),
            // Two rows each, a half wide: quarters 0, 2 plus 1, 3.
            8 => _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y)),
            // A row per quarter in x and in y: lanes 0-1 of each quarter plus lanes 2-3.
            _ => _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y)),
        }
    }
}

/// The last level of [`lane_tree`] with `HALVES` for the rows of `e0` and `e1`, whose quarter q
/// holds two-lane sums of rows q and q + 4 (of `e0`), or q + 8 and q + 12 (of `e1`, repeating
/// `e0` if there are only eight or four rows): the sums, rows in order from lane 0.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn last_fold_f32(e0: std::arch::x86_64::__m512, e1: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F is enabled in the kernel that inlines this.
    unsafe {
        // Quarter q: the sums of rows q, q + 4, q + 8, q + 12.
        let s = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(e0, e1), _mm512_shuffle_ps::<0xDD>(e0, e1));
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, s)
    }
}

/// The lane sums of eight f32 vectors by [`lane_tree`] with `HALVES`, stored at `out[0..8]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lane_sums8_f32_512(a: &[std::arch::x86_64::__m512], out: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F is enabled in the kernel that inlines this; `out` holds eight elements.
    unsafe {
        let h: [__m512; 4] = std::array::from_fn(|i| fold_f32::<16>(a[2 * i], a[2 * i + 1]));
        let e = fold_f32::<4>(fold_f32::<8>(h[0], h[1]), fold_f32::<8>(h[2], h[3]));
        _mm256_storeu_ps(out, _mm512_castps512_ps256(last_fold_f32(e, e)));
    }
}

/// The lane sums of four f32 vectors by [`lane_tree`] with `HALVES`, stored at `out[0..4]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lane_sums4_f32_512(a: &[std::arch::x86_64::__m512], out: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F is enabled in the kernel that inlines this; `out` holds four elements.
    unsafe {
        let q = fold_f32::<8>(fold_f32::<16>(a[0], a[1]), fold_f32::<16>(a[2], a[3]));
        let e = fold_f32::<4>(q, q);
        _mm_storeu_ps(out, _mm512_castps512_ps128(last_fold_f32(e, e)));
    }
}

#[cfg(target_arch = "x86_64")]
dot_kernel!(
    dot_f32_512,
    "avx512f,avx2,fma",
    f32,
    __m512,
    16,
    8,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps,
    lane_sums8_f32_512,
    lane_sums4_f32_512,
    lane_tree::<f32, 16, true>
);
#[cfg(target_arch = "x86_64")]
dot_kernel!(
    dot_f32,
    "avx2,fma",
    f32,
    __m256,
    8,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps,
    lane_sums8_f32,
    lane_sums4_f32,
    lane_tree::<f32, 8, false>
);
#[cfg(target_arch = "x86_64")]
dot_kernel!(
    dot_f64,
    "avx2,fma",
    f64,
    __m256d,
    4,
    4,
    _mm256_setzero_pd,
    _mm256_loadu_pd,
    _mm256_fmadd_pd,
    _mm256_storeu_pd,
    lane_sums4_f64,
    lane_sums4_f64,
    lane_tree::<f64, 4, false>
);

#[cfg(test)]
mod tests {
    use super::*;

    /// How `check_one` computes the product.
    #[derive(Clone, Copy, PartialEq)]
    enum Via {
        /// `matmul_packed`, `B` given as three column blocks of uneven widths (some empty when
        /// n is small).
        Packed,
        /// `matmul` with `a` row-major.
        Rows,
        /// `matmul` with `a` column-major (a transposed view, as the weight gradients use).
        Cols,
        /// `matmul_unpacked` (the dot-product kernel at every row count).
        Unpacked,
    }

    /// `n` test values in [-1/2, 1/2): element i is `(i * p mod q) / q - 1/2`, about.
    fn filled<T: Float>(n: usize, p: usize, q: usize) -> Vec<T> {
        (0..n)
            .map(|i| T::from_f64(((i * p % q) as f64 - (q / 2) as f64) / q as f64))
            .collect()
    }

    /// A pool of two threads shared by the tests, so that `matmul` can run on two threads.
    fn two_threads() -> &'static rayon::ThreadPool {
        static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
        POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap())
    }

    /// `c (+)= a * b` against a plain triple loop in f64, on 1 and 2 threads, whose results must
    /// be bitwise the same.
    fn check_one<T: Float>(m: usize, k: usize, n: usize, tol: f64, via: Via) {
        let a: Vec<T> = filled(m * k, 7, 13);
        let a_at = |i: usize, p: usize| if via == Via::Cols { a[p * m + i] } else { a[i * k + p] };
        let bt: Vec<T> = filled(n * k, 5, 11);
        let b = Mat::new(&bt, n, k, k).t(); // B is (k x n), column stride k
        let (j1, j2) = (n / 3, n / 3 + n / 2);
        // Packed once, and only for the packed path.
        let pb = (via == Via::Packed)
            .then(|| PackedB::new(vec![b.cols_at(0, j1), b.cols_at(j1, j2 - j1), b.cols_at(j2, n - j2)], m));
        for accumulate in [false, true] {
            let init: Vec<T> = (0..m * n).map(|i| T::from_f64(i as f64 * 0.01)).collect();
            let results = [1, 2].map(|threads| {
                let mut c = init.clone();
                let dst = MatMut::new(&mut c, m, n, n);
                match via {
                    Via::Packed => {
                        let pb = pb.as_ref().expect("packed for Via::Packed");
                        matmul_packed(dst, accumulate, Mat::new(&a, m, k, k), pb)
                    }
                    Via::Rows => two_threads().install(|| matmul(dst, accumulate, Mat::new(&a, m, k, k), b, threads)),
                    Via::Cols => {
                        two_threads().install(|| matmul(dst, accumulate, Mat::new(&a, k, m, m).t(), b, threads))
                    }
                    Via::Unpacked => matmul_unpacked(dst, accumulate, Mat::new(&a, m, k, k), b),
                }
                c
            });
            let [c, c2] = &results;
            assert!(
                c.iter()
                    .zip(c2)
                    .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits()),
                "m={m} k={k} n={n}: 1 and 2 threads differ"
            );
            for i in 0..m {
                for j in 0..n {
                    let mut want = if accumulate { init[i * n + j].to_f64() } else { 0.0 };
                    for p in 0..k {
                        want += a_at(i, p).to_f64() * bt[j * k + p].to_f64();
                    }
                    let got = c[i * n + j].to_f64();
                    let ok = (got - want).abs() <= tol * (1.0 + want.abs());
                    assert!(ok, "m={m} k={k} n={n} ({i},{j}): {got} vs {want}");
                }
            }
        }
    }

    /// Every row remainder of the AVX2 kernel's six-row blocks and of the AVX-512 kernel's
    /// eight-row ones, column counts around the panel width and the AVX-512 kernel's groups of
    /// three and four panels, the batch-1 four-panel path, a transposed `B` view, both
    /// accumulate modes.
    fn check<T: Float>(tol: f64) {
        for m in [1, 2, 5, 6, 7, 8, 9, 13, 14, 17] {
            for k in [1, 3, 17] {
                for n in [1, 5, 8, 16, 17, 33, 49, 64, 70, 130] {
                    check_one::<T>(m, k, n, tol, Via::Packed);
                }
            }
        }
        check_one::<T>(7, 64, 600, tol, Via::Packed);
    }

    /// The products of the dot-product kernel (a transposed row-major `b`): `matmul`'s few-row
    /// ones, row counts up to and past `DOT_MAX_ROWS`, and `matmul_unpacked`'s, up to and past
    /// `UNPACKED_DOT_MAX_ROWS`; k around the vector width, n around its blocks of rows.
    #[test]
    fn dot_products_match_a_plain_loop() {
        for (via, rows) in [
            (Via::Rows, 1..=DOT_MAX_ROWS + 1),
            (Via::Unpacked, 1..=UNPACKED_DOT_MAX_ROWS + 1),
        ] {
            for m in rows {
                for k in [0, 1, 3, 8, 9, 15, 16, 17, 33, 64] {
                    for n in [1, 3, 4, 5, 9, 13, 40] {
                        check_one::<f32>(m, k, n, 1e-5, via);
                        check_one::<f64>(m, k, n, 1e-13, via);
                    }
                }
            }
        }
    }

    /// Each dot-product kernel this CPU runs (not only the one `matmul` picks) against a plain
    /// loop, and each output the same bits whatever the block it is computed in: all rows of `x`
    /// against all of `w`, or one row against a range of `w`'s rows. Row and column counts cover
    /// every block height of the kernels and their leftovers, k the vector widths and the tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_dot_kernel_matches_a_plain_loop_in_any_block() {
        fn run<T: Float>(
            kernel: DotKernel<T>,
            (m, k, n): (usize, usize, usize),
            x: &[T],
            w: &[T],
            y: &mut [T],
            acc: bool,
        ) {
            let args = DotArgs {
                m,
                k,
                n,
                x: x.as_ptr(),
                ldx: k,
                w: w.as_ptr(),
                ldw: k,
                y: y.as_mut_ptr(),
                ldy: n,
                accumulate: acc,
            };
            // SAFETY: the buffers hold the shapes of `args`; the CPU has the kernel's instructions
            // (checked by the caller).
            unsafe { kernel(&args) };
        }
        fn check<T: Float>(kernel: DotKernel<T>, name: &str, tol: f64) {
            for m in 1..=7 {
                for k in [1, 7, 16, 17, 33, 64, 130] {
                    for n in [1, 3, 4, 7, 8, 9, 13, 16, 17, 40] {
                        let (x, w): (Vec<T>, Vec<T>) = (filled(m * k, 7, 13), filled(n * k, 5, 11));
                        for acc in [false, true] {
                            let init: Vec<T> = (0..m * n).map(|i| T::from_f64(i as f64 * 0.01)).collect();
                            let mut all = init.clone();
                            run(kernel, (m, k, n), &x, &w, &mut all, acc);
                            for i in 0..m {
                                for j in 0..n {
                                    let mut want = if acc { init[i * n + j].to_f64() } else { 0.0 };
                                    for p in 0..k {
                                        want += x[i * k + p].to_f64() * w[j * k + p].to_f64();
                                    }
                                    let got = all[i * n + j].to_f64();
                                    assert!(
                                        (got - want).abs() <= tol * (1.0 + want.abs()),
                                        "{name} m={m} k={k} n={n}"
                                    );
                                }
                                for (j0, cols) in [(0, n), (n / 3, n - n / 3), (n - 1, 1)] {
                                    let mut one: Vec<T> = init[i * n + j0..][..cols].to_vec();
                                    run(kernel, (1, k, cols), &x[i * k..], &w[j0 * k..], &mut one, acc);
                                    let same = one
                                        .iter()
                                        .zip(&all[i * n + j0..])
                                        .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits());
                                    assert!(same, "{name} m={m} k={k} n={n}: row {i}, columns {j0}..{}", j0 + cols);
                                }
                            }
                        }
                    }
                }
            }
        }
        let level = crate::simd::level();
        if level >= crate::simd::Level::Avx2 {
            check::<f32>(dot_f32, "dot_f32", 1e-5);
            check::<f64>(dot_f64, "dot_f64", 1e-13);
        }
        if level >= crate::simd::Level::Avx512 {
            check::<f32>(dot_f32_512, "dot_f32_512", 1e-5);
        }
    }

    /// Values of magnitudes from 1e-3 to 1e3, so that sums in another order round differently.
    fn varied(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * 10f32.powi(i as i32 % 7 - 3)
            })
            .collect()
    }

    /// The shifted AVX-512 kernel, on weights whose rows start 4, 8 or 12 floats past a 64-byte
    /// boundary, gives the same bits as the plain one: k around the vector width (under 16 it
    /// hands the product to the plain kernel), n around its blocks of eight rows, rows as long as
    /// k or padded to the next multiple of 16; and so does `matmul_unpacked`, which picks it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn shifted_dot_kernel_gives_the_plain_kernels_bits() {
        if crate::simd::level() < crate::simd::Level::Avx512 {
            eprintln!("shifted_dot_kernel_gives_the_plain_kernels_bits: no AVX-512 on this CPU, nothing to compare");
            return;
        }
        for shift in [4usize, 8, 12] {
            let kernel = f32::shifted_dot_kernel(4 * shift).expect("a kernel for 16, 32 and 48 bytes");
            for k in [7usize, 16, 17, 33, 64, 130] {
                let ldw = k.next_multiple_of(16);
                for n in [1, 7, 8, 9, 16, 17, 40] {
                    // w's rows from `shift` floats past a 64-byte boundary, in a buffer that ends
                    // with its last row.
                    let len = shift + (n - 1) * ldw + k;
                    let mut buf = Aligned::<f32>::zeroed(len);
                    buf.copy_from_slice(&varied(len, 1));
                    let w = &buf[shift..];
                    let x = varied(k, 2);
                    for accumulate in [false, true] {
                        let [plain, shifted] = [dot_f32_512 as DotKernel<f32>, kernel].map(|kernel| {
                            let mut y: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
                            let args = DotArgs {
                                m: 1,
                                k,
                                n,
                                x: x.as_ptr(),
                                ldx: k,
                                w: w.as_ptr(),
                                ldw,
                                y: y.as_mut_ptr(),
                                ldy: n,
                                accumulate,
                            };
                            // SAFETY: the buffers hold the shapes of `args`; the CPU has AVX-512F
                            // and w's rows start `shift` floats past a 64-byte boundary.
                            unsafe { kernel(&args) };
                            y
                        });
                        let same = plain.iter().zip(&shifted).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "shift={shift} k={k} n={n} accumulate={accumulate}");
                        // Through matmul_unpacked, which picks the kernel for the weights' offset.
                        let mut y: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
                        matmul_unpacked(
                            MatMut::new(&mut y, 1, n, n),
                            accumulate,
                            Mat::new(&x, 1, k, k),
                            Mat::new(w, n, k, ldw).t(),
                        );
                        let same = plain.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "matmul_unpacked shift={shift} k={k} n={n} accumulate={accumulate}"
                        );
                    }
                }
            }
        }
    }

    /// Products past the few-row paths, large enough to run on both threads, with `a`
    /// row-major (faer) and column-major (the gemm crate).
    #[test]
    fn large_products_match_a_plain_loop() {
        for via in [Via::Rows, Via::Cols] {
            for (m, k, n) in [(33, 17, 40), (100, 64, 130), (257, 96, 300)] {
                check_one::<f32>(m, k, n, 1e-5, via);
                check_one::<f64>(m, k, n, 1e-13, via);
            }
        }
    }

    #[test]
    fn packed_product_matches_a_plain_loop() {
        check::<f32>(1e-5);
        check::<f64>(1e-13);
    }

    /// The AVX-512 and AVX2 packed kernels give the same bits (each output is one FMA chain over
    /// k in order in both), at every row remainder of both kernels' blocks and panel counts
    /// around their groups, so the AVX-512 kernel is checked against the plain loop through
    /// `packed_product_matches_a_plain_loop` and the AVX2 kernel with it on machines with both.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panel_kernels_agree() {
        fn check<T: Float>(kernels: [PanelKernel<T>; 2]) {
            for m in [1, 2, 3, 5, 6, 7, 8, 9, 15, 16, 17, 25] {
                for k in [1, 5, 33] {
                    for n in [1, 15, 16, 17, 40, 48, 49, 64, 65, 100, 130] {
                        let (a, bt): (Vec<T>, Vec<T>) = (filled(m * k, 7, 23), filled(n * k, 5, 19));
                        let pb = PackedB::new(vec![Mat::new(&bt, n, k, k).t()], m.max(DOT_MAX_ROWS + 1));
                        for accumulate in [false, true] {
                            let [c0, c1] = kernels.map(|kernel| {
                                let mut c: Vec<T> = (0..m * n).map(|i| T::from_f64(i as f64 * 0.01)).collect();
                                let args = PanelArgs {
                                    m,
                                    k,
                                    n,
                                    a: a.as_ptr(),
                                    lda: k,
                                    b: pb.data.as_ptr(),
                                    c: c.as_mut_ptr(),
                                    ldc: n,
                                    accumulate,
                                };
                                // SAFETY: the buffers hold the shapes of `args`; the CPU has the
                                // kernels' instruction sets (checked by the caller).
                                unsafe { kernel(&args) };
                                c
                            });
                            let same = c0
                                .iter()
                                .zip(&c1)
                                .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits());
                            assert!(same, "m={m} k={k} n={n} accumulate={accumulate}");
                        }
                    }
                }
            }
        }
        if crate::simd::level() < crate::simd::Level::Avx512 {
            eprintln!("panel_kernels_agree: no AVX-512 on this CPU (or RNNKIT_SIMD lowers it), nothing to compare");
            return;
        }
        check::<f32>([panel_f32, panel_f32_512]);
        check::<f64>([panel_f64, panel_f64_512]);
    }
}
