//! The only doorway to the GEMM crates: strided matrix views and `dst (+)= a * b`.
//!
//! Two crates, each where it was measured faster on the shapes an RNN uses (see the README):
//! `faer` for products of a few rows (one time step of a small batch), `gemm` for the rest (the
//! all-steps input projection, the weight gradients, large batches).

use crate::simd::{dispatch, Float, Kernel};
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

/// Column width of the blocks a few-row product is cut into.
const FAER_COL_BLOCK: usize = 128;
/// Multiply-adds from which a few-row product runs its column blocks on the threads.
const PAR_MACS: usize = 1 << 18;

/// `dst (+)= a * b` by faer, for f32 and f64 (the only `Float`s).
fn faer_matmul<T: Float>(dst: MatMut<T>, accumulate: bool, a: &Mat<T>, b: &Mat<T>) {
    use std::any::TypeId;
    // SAFETY: T is the type it is compared with, so the casts are identities; the views' bounds
    // were checked when they were built.
    unsafe {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            faer_impl::<f32, T>(dst.ptr.cast(), dst.rs, dst.cs, accumulate, a, b, 1.0);
        } else {
            assert!(TypeId::of::<T>() == TypeId::of::<f64>(), "Float is f32 or f64");
            faer_impl::<f64, T>(dst.ptr.cast(), dst.rs, dst.cs, accumulate, a, b, 1.0);
        }
    }
}

/// # Safety
/// `F` must be the element type behind the views, which must be in bounds.
unsafe fn faer_impl<F: faer::traits::ComplexField, T>(
    dst: *mut F,
    rs: isize,
    cs: isize,
    accumulate: bool,
    a: &Mat<T>,
    b: &Mat<T>,
    one: F,
) {
    let d = faer::MatMut::<F>::from_raw_parts_mut(dst, a.rows, b.cols, rs, cs);
    let l = faer::MatRef::<F>::from_raw_parts(a.ptr.cast(), a.rows, a.cols, a.rs, a.cs);
    let r = faer::MatRef::<F>::from_raw_parts(b.ptr.cast(), b.rows, b.cols, b.rs, b.cs);
    let acc = if accumulate {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    faer::linalg::matmul::matmul(d, acc, l, r, one, faer::Par::Seq);
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), on up to `threads` threads of the
/// current rayon pool (1: the calling thread only).
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
    if (2..=FAER_MAX_ROWS).contains(&dst.rows) {
        // Fixed blocks of columns, the same whatever the thread count (so that the results do not
        // depend on it), run on the threads when the product is large enough to pay for them.
        let blocks: Vec<_> = (0..dst.cols)
            .step_by(FAER_COL_BLOCK)
            .map(|j0| {
                let w = FAER_COL_BLOCK.min(dst.cols - j0);
                (dst.cols_at(j0, w), b.cols_at(j0, w))
            })
            .collect();
        let run = |(d, bb): (MatMut<T>, Mat<T>)| faer_matmul(d, accumulate, &a, &bb);
        if threads > 1 && blocks.len() > 1 && dst.rows * dst.cols * a.cols >= PAR_MACS {
            blocks.into_par_iter().for_each(run);
        } else {
            blocks.into_iter().for_each(run);
        }
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

/// `out[j] += sum_i m[i][j]` over the rows of a row-major `rows x cols` matrix.
pub fn add_column_sums<T: Float>(out: &mut [T], m: &[T], cols: usize) {
    for row in m.chunks_exact(cols) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// Columns of a [`Packed`] panel: the accumulators [`row_times_packed`] keeps in registers.
const PANEL: usize = 64;

/// A matrix `B` (k x n) copied once into panels of `PANEL` columns, each panel's rows contiguous
/// (the last panel padded with zeros), for the products `x * B` of one row `x` that a batch-1
/// sweep does at every step: read in this order, `B` streams from cache with no per-step
/// packing, about 1.7x faster than the GEMM crates on (1 x 128) * (128 x 512).
pub struct Packed<T> {
    k: usize,
    n: usize,
    data: Vec<T>,
}

impl<T: Float> Packed<T> {
    pub fn new(b: Mat<T>) -> Self {
        let (k, n) = (b.rows, b.cols);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![T::ZERO; panels * k * PANEL];
        for (p, panel) in data.chunks_exact_mut(k * PANEL).enumerate() {
            for (r, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (l, d) in dst.iter_mut().enumerate().take(n.saturating_sub(p * PANEL)) {
                    // SAFETY: (r, p*PANEL + l) is inside the view (l < n - p*PANEL).
                    *d = unsafe { *b.ptr.offset(r as isize * b.rs + (p * PANEL + l) as isize * b.cs) };
                }
            }
        }
        Packed { k, n, data }
    }
}

/// `y (+)= x * B` for one row `x` (length k) and a packed `B` (k x n).
pub fn row_times_packed<T: Float>(y: &mut [T], accumulate: bool, x: &[T], b: &Packed<T>) {
    assert!(x.len() == b.k && y.len() == b.n, "row_times_packed shapes");
    dispatch(RowTimesPacked { y, accumulate, x, b });
}

struct RowTimesPacked<'a, T> {
    y: &'a mut [T],
    accumulate: bool,
    x: &'a [T],
    b: &'a Packed<T>,
}

impl<T: Float> Kernel for RowTimesPacked<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let k = self.b.k;
        for (panel, y) in self.b.data.chunks_exact(k * PANEL).zip(self.y.chunks_mut(PANEL)) {
            let mut acc = [T::ZERO; PANEL];
            for (row, &xr) in panel.chunks_exact(PANEL).zip(self.x) {
                let row: &[T; PANEL] = row.try_into().expect("panel row");
                for l in 0..PANEL {
                    acc[l] += xr * row[l];
                }
            }
            if self.accumulate {
                for (d, &v) in y.iter_mut().zip(&acc) {
                    *d += v;
                }
            } else {
                y.copy_from_slice(&acc[..y.len()]);
            }
        }
    }
}
