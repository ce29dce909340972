//! Large work buffers kept from one kernel call to the next.
//!
//! A sweep's biggest buffers (backward's gate gradients, `T * B * G * H` elements, 52 MB for an
//! LSTM at B=64, T=100, H=512; the training tape; the input projection's chunk of 16 steps) would
//! otherwise be allocated fresh by every call: the allocator maps new pages for them and the OS
//! faults each page in and clears it, a few percent of a call. Buffers given back (scratch at the
//! end of a call, a tape when it is dropped) are reused instead, within a bound on the memory held
//! between calls.

use crate::simd::Float;
use std::any::Any;
use std::sync::Mutex;

/// The most bytes kept between calls, and the most buffers.
const KEEP_BYTES: usize = 256 << 20;
const KEEP_COUNT: usize = 8;

/// Kept buffers, each a `Vec<T>` (of either float type) behind `Any`, with its size in bytes.
struct Spare(Vec<(usize, Box<dyn Any + Send>)>);

static SPARE: Mutex<Spare> = Mutex::new(Spare(Vec::new()));

impl Spare {
    fn take<T: Send + 'static>(&mut self, n: usize) -> Vec<T> {
        let best = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, (_, b))| b.downcast_ref::<Vec<T>>().is_some_and(|v| v.capacity() >= n))
            .min_by_key(|(_, (size, _))| *size)
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut v = *self
                    .0
                    .swap_remove(i)
                    .1
                    .downcast::<Vec<T>>()
                    .expect("the type was checked");
                v.clear();
                v
            }
            None => Vec::with_capacity(n),
        }
    }

    fn give<T: Send + 'static>(&mut self, v: Vec<T>) {
        let size = v.capacity() * std::mem::size_of::<T>();
        if size == 0 || size > KEEP_BYTES {
            return;
        }
        // Make room by dropping the smallest buffers, unless they are all bigger than this one.
        self.0.sort_by_key(|&(s, _)| std::cmp::Reverse(s));
        while self.0.len() >= KEEP_COUNT || self.0.iter().map(|&(s, _)| s).sum::<usize>() + size > KEEP_BYTES {
            match self.0.last() {
                Some(&(s, _)) if s <= size => drop(self.0.pop()),
                _ => return,
            }
        }
        self.0.push((size, Box::new(v)));
    }
}

fn spare() -> std::sync::MutexGuard<'static, Spare> {
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

/// An empty vector with room for at least `n` elements: the smallest kept one that fits, if any.
pub fn take<T: Send + 'static>(n: usize) -> Vec<T> {
    spare().take(n)
}

/// A buffer of `n` elements for a pass that writes them through [`ToWrite::ptr`], in a kept
/// buffer if one fits, and is not zeroed: the pass writes every element, or the rows it leaves
/// (padding) are zeroed by [`ToWrite::zero_rows`] (zeroing a training step's whole tape and gate
/// gradients had been 2.25% of an LSTM's training profile at batch 8, and 6% of an RNN's at
/// batch 64 with lengths). Debug builds fill it with NaN first, so that an element missed shows
/// in the results. Its first element starts on [`ALIGN`] bytes, as an [`Aligned`] buffer's: the
/// blocks of a step write their pieces of a row side by side (the tape's, backward's gate
/// gradients), and those then meet on a cache line only where the pieces' own boundaries do, and
/// the vector loads of a row start on one. Against the allocator's 16 bytes, in turns in one
/// process, 2 threads (Intel Xeon): training at B=8, H=256 took 0.95-0.97x the time (LSTM, GRU,
/// RNN), at B=64, H=512 0.97-0.985x; inference at B=64 0.975-0.98x, at B=1 and B=8 0.98-1.00x.
pub struct ToWrite<T> {
    v: Vec<T>,
    off: usize,
    n: usize,
}

impl<T: Float> ToWrite<T> {
    pub fn new(n: usize) -> Self {
        let pad = ALIGN / std::mem::size_of::<T>();
        let mut v = take(n + pad);
        if cfg!(debug_assertions) {
            v.resize(n + pad, T::from_f64(f64::NAN));
            v.clear();
        }
        let off = v.as_ptr().align_offset(ALIGN).min(pad);
        ToWrite { v, off, n }
    }

    /// Where the pass writes.
    pub fn ptr(&mut self) -> *mut T {
        // SAFETY: the capacity holds `off + n` elements.
        unsafe { self.v.as_mut_ptr().add(self.off) }
    }

    /// Zero the rows `rows` of the buffer, seen as rows of `width` elements.
    pub fn zero_rows(&mut self, rows: impl Iterator<Item = usize>, width: usize) {
        for r in rows {
            assert!((r + 1) * width <= self.n, "row {r} of a ToWrite buffer");
            // SAFETY: the row is inside the buffer's capacity (checked), and zero is a valid T.
            unsafe { std::ptr::write_bytes(self.ptr().add(r * width), 0, width) };
        }
    }

    /// The buffer, its `n` elements written.
    ///
    /// # Safety
    /// Every element must have been written, through [`ToWrite::ptr`] or by
    /// [`ToWrite::zero_rows`].
    pub unsafe fn written(mut self) -> Aligned<T> {
        // SAFETY: the capacity holds `off + n` elements: the `off` before the buffer's start
        // are zeroed here, the `n` after it were written (by the caller's promise).
        unsafe {
            std::ptr::write_bytes(self.v.as_mut_ptr(), 0, self.off);
            self.v.set_len(self.off + self.n);
        }
        Aligned {
            v: self.v,
            off: self.off,
            len: self.n,
        }
    }
}

/// Keep a buffer for a later call, within the bounds.
pub fn give<T: Send + 'static>(b: impl Into<Vec<T>>) {
    spare().give(b.into())
}

/// An unwritten buffer's memory, to give back.
impl<T> From<ToWrite<T>> for Vec<T> {
    fn from(b: ToWrite<T>) -> Vec<T> {
        b.v
    }
}

/// Bytes a buffer of [`Aligned`] is aligned to: a cache line, and the width of an AVX-512 load,
/// so that no vector load of a row that starts on a multiple of 16 floats spans two lines.
pub const ALIGN: usize = 64;

/// A zeroed buffer whose first element starts on [`ALIGN`] bytes. The allocator aligns large
/// blocks to 16 bytes only: a packed weight panel's 64-byte rows would then each span two cache
/// lines, and every AVX-512 load of them (half of the AVX2 ones) would be split.
pub struct Aligned<T> {
    v: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Float> Aligned<T> {
    /// `len` zeros (none allocated for 0: nothing is loaded from an empty buffer).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Aligned {
                v: Vec::new(),
                off: 0,
                len,
            };
        }
        let pad = ALIGN / std::mem::size_of::<T>();
        let v = vec![T::ZERO; len + pad];
        let off = v.as_ptr().align_offset(ALIGN).min(pad);
        Aligned { v, off, len }
    }
}

/// A buffer's memory, to give back.
impl<T> From<Aligned<T>> for Vec<T> {
    fn from(b: Aligned<T>) -> Vec<T> {
        b.v
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v[self.off..self.off + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An aligned buffer starts on a 64-byte boundary and holds what it was made of; an empty
    /// one allocates nothing.
    #[test]
    fn aligned_buffers_start_on_a_cache_line() {
        for n in [1, 3, 1000, 100_000] {
            let a = Aligned::<f32>::zeroed(n);
            assert_eq!(a.len(), n);
            assert_eq!(a.as_ptr() as usize % ALIGN, 0, "f32 x {n}");
            assert!(a.iter().all(|&v| v == 0.0));
        }
        let empty = Aligned::<f32>::zeroed(0);
        assert_eq!((empty.len(), empty.v.capacity()), (0, 0));
        let b = Aligned::<f64>::zeroed(7);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&v| v == 0.0));
    }

    /// A buffer to write starts on a 64-byte boundary, and holds what was written there once
    /// written; given back, its memory is handed out again.
    #[test]
    fn buffers_to_write_start_on_a_cache_line() {
        for n in [1, 17, 1000, 100_000] {
            let mut b = ToWrite::<f32>::new(n);
            let p = b.ptr();
            assert_eq!(p as usize % ALIGN, 0, "f32 x {n}");
            for i in 0..n {
                // SAFETY: the buffer holds n elements from `p`.
                unsafe { *p.add(i) = i as f32 };
            }
            // SAFETY: every element was written.
            let a = unsafe { b.written() };
            assert_eq!(a.as_ptr(), p.cast_const());
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as f32), "f32 x {n}");
            let memory = Vec::from(a);
            assert!((p as usize) - (memory.as_ptr() as usize) < ALIGN);
            let mut s = Spare(Vec::new());
            let start = memory.as_ptr();
            s.give(memory);
            let again = s.take::<f32>(n);
            assert_eq!(again.as_ptr(), start, "f32 x {n}");
        }
        let mut d = ToWrite::<f64>::new(9);
        assert_eq!(d.ptr() as usize % ALIGN, 0);
    }

    /// A buffer given back is handed out again, to a request of its type that it fits, the
    /// smallest that fits first; the bounds hold, bigger buffers pushing smaller ones out.
    #[test]
    fn buffers_are_reused_within_bounds() {
        let mut s = Spare(Vec::new());
        let (small, large) = (s.take::<f32>(100), s.take::<f32>(1000));
        let (ps, pl) = (small.as_ptr(), large.as_ptr());
        s.give(large);
        s.give(small);
        assert!(s.take::<f64>(10).capacity() >= 10, "no f64 buffer is kept: a new one");
        let (a, b) = (s.take::<f32>(50), s.take::<f32>(50));
        assert_eq!(a.as_ptr(), ps, "the smallest that fits");
        assert_eq!(b.as_ptr(), pl, "then the next one");
        assert_eq!(s.0.len(), 0);
        s.give(Vec::<f32>::with_capacity(KEEP_BYTES / 4 + 1));
        assert_eq!(s.0.len(), 0, "too big to keep");
        for n in 1..=2 * KEEP_COUNT {
            s.give(Vec::<f64>::with_capacity(n * 64));
        }
        let sizes: Vec<usize> = s.0.iter().map(|&(b, _)| b).collect();
        assert_eq!(sizes.len(), KEEP_COUNT);
        assert!(
            sizes.iter().all(|&b| b > (KEEP_COUNT * 64) * 8),
            "the biggest are kept: {sizes:?}"
        );
        s.give(Vec::<f32>::with_capacity(KEEP_BYTES / 4));
        let total: usize = s.0.iter().map(|&(b, _)| b).sum();
        assert_eq!(total, KEEP_BYTES, "the big one pushed the others out");
        assert_eq!(s.take::<f32>(10).capacity(), KEEP_BYTES / 4);
    }
}
