//! The scalar types, their vectorisable activation math, and run-time CPU dispatch.
//!
//! The pointwise kernels are written once, as plain loops over slices whose bodies are
//! branch-free (`select` instead of `if`), and compiled three times by [`dispatch`]: for
//! AVX-512, for AVX2+FMA and for the x86-64 baseline. LLVM vectorises each copy for its
//! instruction set; the copy is chosen at run time from the CPU's feature flags, so one wheel
//! runs on any x86-64 and still uses the widest vectors the machine has.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};
use std::sync::OnceLock;

/// A floating-point element type the kernels run on (`f32` or `f64`).
pub trait Float:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Name of the type as NumPy spells it.
    const NAME: &'static str;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Logistic sigmoid `1 / (1 + e^-x)`.
    fn sigmoid<I: Isa>(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh<I: Isa>(self) -> Self;
    /// `max(x, 0)`, propagating NaN.
    #[inline(always)]
    fn relu(self) -> Self {
        if self < Self::ZERO {
            Self::ZERO
        } else {
            self
        }
    }
    /// Columns of a packed GEMM panel (two AVX2 vectors, one AVX-512 vector; see `gemm::PackedB`).
    const PANEL: usize;
    /// The packed GEMM kernel, AVX-512 or AVX2+FMA, as the CPU (and `RNNKIT_SIMD`) allows.
    fn panel_kernel() -> Option<crate::gemm::PanelKernel<Self>>;
    /// The dot-product kernel of `gemm::matmul` for few-row products, under the same condition.
    fn dot_kernel() -> Option<crate::gemm::DotKernel<Self>>;
    /// The dot-product kernel for one row against weights whose rows all start `offset` bytes
    /// past a 64-byte boundary, if there is one for that offset on this CPU (see
    /// `gemm::dot_f32_512_shifted`): the same bits as [`Float::dot_kernel`]'s.
    fn shifted_dot_kernel(_offset: usize) -> Option<crate::gemm::DotKernel<Self>> {
        None
    }
    /// `a * b + c` with one rounding (the FMA instruction).
    fn fused_mul_add(self, b: Self, c: Self) -> Self;
    /// `a * b + c`: fused in the kernel copies for instruction sets with FMA, two operations in
    /// the baseline copy (where a fused multiply-add would be a slow libm call).
    #[inline(always)]
    fn mul_add<I: Isa>(self, b: Self, c: Self) -> Self {
        if I::FMA {
            self.fused_mul_add(b, c)
        } else {
            self * b + c
        }
    }
}

// ---------------------------------------------------------------------------------------------
// float32: polynomial exp / tanh written to vectorise (no branches, no table look-ups).
// Coefficients are the classic minimax fits for these ranges (as in Cephes' expf and tanhf).
// ---------------------------------------------------------------------------------------------

const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds a float in (-2^22, 2^22) to an integer held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` in float32, within 2 ulp over the whole range; saturates to 0 / 2^128-ish at the ends and
/// propagates NaN.
#[inline(always)]
pub fn exp_f32<I: Isa>(x: f32) -> f32 {
    // `clamp` keeps NaN (comparisons with NaN are false), unlike `min`/`max`.
    let x = x.clamp(EXP_LO, EXP_HI);
    let shifted = Float::mul_add::<I>(x, LOG2E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    // Integer n sits in the low bits of `shifted`; move it into the exponent field of 1.0.
    let scale = f32::from_bits((shifted.to_bits() << 23).wrapping_add(0x3f80_0000));
    let r = Float::mul_add::<I>(n, -LN2_LO, Float::mul_add::<I>(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = Float::mul_add::<I>(p, r, 1.398_199_9e-3);
    p = Float::mul_add::<I>(p, r, 8.333_452e-3);
    p = Float::mul_add::<I>(p, r, 4.166_579_6e-2);
    p = Float::mul_add::<I>(p, r, 1.666_666_5e-1);
    p = Float::mul_add::<I>(p, r, 0.5);
    let y = Float::mul_add::<I>(p * r, r, r) + 1.0;
    y * scale
}

/// The |x| where tanh's argument is clamped: past 9.01, tanh(x) rounds to ±1 in float32, and at
/// 9.5 the rational below evaluates to exactly 1 (with fused multiply-adds and without).
const TANH_CLAMP: f32 = 9.5;
/// tanh(x) = x P(x²) / Q(x²) on [-9.5, 9.5]: a rational minimax fit made by `tools/fit_tanh.py`
/// (relative error 0.21 ulp in exact arithmetic; the float32 evaluation adds the rest, see the
/// tests); `P[0] = Q[0] = 1`, so small x come out exact.
const TANH_P: [f32; 7] = [
    1.0,
    1.306_419_1e-1,
    3.081_78e-3,
    1.092_159_2e-5,
    -1.927_929_6e-8,
    4.823_547_8e-11,
    -7.330_836e-14,
];
const TANH_Q: [f32; 4] = [1.0, 4.639_751_6e-1, 2.440_696_6e-2, 2.513_800_6e-4];

/// Horner's rule for `c[0] + c[1] z + ...`.
#[inline(always)]
fn poly<I: Isa, const N: usize>(z: f32, c: &[f32; N]) -> f32 {
    c[..N - 1]
        .iter()
        .rev()
        .fold(c[N - 1], |acc, &ck| Float::mul_add::<I>(acc, z, ck))
}

/// One rational function and one division, no exponential: about three times as fast as
/// `1 - 2 / (e^{2|x|} + 1)` with a polynomial for small |x| (both branches computed, as vector
/// code must). The result is clamped to [-1, 1], which rounding could overshoot near the ends.
#[inline(always)]
fn tanh_f32<I: Isa>(x: f32) -> f32 {
    // `clamp` keeps NaN (comparisons with NaN are false), and -0 stays -0 through the odd form.
    let a = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let z = a * a;
    (a * poly::<I, 7>(z, &TANH_P) / poly::<I, 4>(z, &TANH_Q)).clamp(-1.0, 1.0)
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const PANEL: usize = 16;
    fn panel_kernel() -> Option<crate::gemm::PanelKernel<Self>> {
        #[cfg(target_arch = "x86_64")]
        match level() {
            Level::Avx512 => return Some(crate::gemm::panel_f32_512),
            Level::Avx2 => return Some(crate::gemm::panel_f32),
            Level::Scalar => {}
        }
        None
    }
    fn dot_kernel() -> Option<crate::gemm::DotKernel<Self>> {
        #[cfg(target_arch = "x86_64")]
        match level() {
            Level::Avx512 => return Some(crate::gemm::dot_f32_512),
            Level::Avx2 => return Some(crate::gemm::dot_f32),
            Level::Scalar => {}
        }
        None
    }
    fn shifted_dot_kernel(offset: usize) -> Option<crate::gemm::DotKernel<Self>> {
        #[cfg(target_arch = "x86_64")]
        if level() == Level::Avx512 {
            match offset {
                16 => return Some(crate::gemm::dot_f32_512_shifted::<4>),
                32 => return Some(crate::gemm::dot_f32_512_shifted::<8>),
                48 => return Some(crate::gemm::dot_f32_512_shifted::<12>),
                _ => {}
            }
        }
        let _ = offset;
        None
    }
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn sigmoid<I: Isa>(self) -> Self {
        1.0 / (1.0 + exp_f32::<I>(-self))
    }
    #[inline(always)]
    fn tanh<I: Isa>(self) -> Self {
        tanh_f32::<I>(self)
    }
    #[inline(always)]
    fn fused_mul_add(self, b: Self, c: Self) -> Self {
        f32::mul_add(self, b, c)
    }
}

// float64 is the validation type (gradient checks): it uses the correctly rounded libm
// functions rather than a fast approximation.
impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const PANEL: usize = 8;
    fn panel_kernel() -> Option<crate::gemm::PanelKernel<Self>> {
        #[cfg(target_arch = "x86_64")]
        match level() {
            Level::Avx512 => return Some(crate::gemm::panel_f64_512),
            Level::Avx2 => return Some(crate::gemm::panel_f64),
            Level::Scalar => {}
        }
        None
    }
    fn dot_kernel() -> Option<crate::gemm::DotKernel<Self>> {
        #[cfg(target_arch = "x86_64")]
        if level() >= Level::Avx2 {
            return Some(crate::gemm::dot_f64);
        }
        None
    }
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sigmoid<I: Isa>(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
    #[inline(always)]
    fn tanh<I: Isa>(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn fused_mul_add(self, b: Self, c: Self) -> Self {
        f64::mul_add(self, b, c)
    }
}

// ---------------------------------------------------------------------------------------------
// Run-time dispatch
// ---------------------------------------------------------------------------------------------

/// The instruction-set level the pointwise kernels run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level in use: the best the CPU supports, lowered (never raised) by the environment
/// variable `RNNKIT_SIMD` = `avx2` or `baseline`, which the tests use to compare the paths.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detect();
        let asked = match std::env::var("RNNKIT_SIMD").as_deref() {
            Ok("baseline") | Ok("scalar") => Level::Scalar,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        best.min(asked)
    })
}

/// A piece of pointwise work to compile once per instruction-set level. Implementations mark
/// `run` `#[inline(always)]` (and everything it calls), so that it is compiled inside the
/// `#[target_feature]` function that [`dispatch`] picks.
pub trait Kernel {
    type Output;
    fn run<I: Isa>(self) -> Self::Output;
}

/// What the instruction set of a kernel copy lets the scalar math use (see [`dispatch`]).
pub trait Isa: Copy {
    /// Fused multiply-add.
    const FMA: bool;
}

/// The AVX2 and AVX-512 copies.
#[derive(Clone, Copy)]
pub struct WithFma;
impl Isa for WithFma {
    const FMA: bool = true;
}

/// The x86-64 baseline copy (and other architectures).
#[derive(Clone, Copy)]
pub struct NoFma;
impl Isa for NoFma {
    const FMA: bool = false;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
    k.run::<WithFma>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
    k.run::<WithFma>()
}

/// Run `k` compiled for the best instruction set available (see [`level`]).
#[inline]
pub fn dispatch<K: Kernel>(k: K) -> K::Output {
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level()` only returns Avx512 when the CPU reports every enabled feature.
        Level::Avx512 => unsafe { run_avx512(k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Level::Avx2 => unsafe { run_avx2(k) },
        _ => k.run::<NoFma>(),
    }
}

/// Ask the CPU to bring every cache line of `s` into its caches, without waiting for them: for
/// data a kernel will read after other work that hides the memory latency.
#[inline(always)]
pub fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (p, bytes) = (s.as_ptr().cast::<i8>(), std::mem::size_of_val(s));
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch is only a hint (it never faults), and the address is inside `s`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
}

/// FTZ (bit 15) and DAZ (bit 6) of MXCSR.
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = 0x8040;

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr: u32 = 0;
    // SAFETY: reading MXCSR has no side effect.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
    csr
}

#[cfg(target_arch = "x86_64")]
fn set_mxcsr(csr: u32) {
    // SAFETY: writing MXCSR only changes this thread's floating-point mode.
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack)) };
}

/// Set flush-to-zero and denormals-are-zero for the calling thread (the kernel threads: see
/// `threads.rs`). Denormal arithmetic is up to 100x slower on x86 and the values it would
/// produce are far below what a float32 network can resolve.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    set_mxcsr(mxcsr() | FTZ_DAZ);
}

/// [`flush_denormals`] for as long as the guard lives, for kernels that run on the caller's own
/// thread, whose floating-point mode comes back when it drops.
pub struct DenormalsFlushed {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl DenormalsFlushed {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = mxcsr();
            set_mxcsr(saved | FTZ_DAZ);
            DenormalsFlushed { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        DenormalsFlushed {}
    }
}

impl Drop for DenormalsFlushed {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        set_mxcsr(self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_diff(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.abs().to_bits() + 1) - b32.abs()) as f64;
        (a as f64 - b).abs() / ulp
    }

    fn sweep(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |k| lo + (hi - lo) * (k as f32) / (n as f32))
    }

    // Each check runs for both copies of the math: with fused multiply-adds (here a libm call,
    // with the same results as the FMA instruction of the AVX2 and AVX-512 kernels) and without.

    fn exp_within_2_ulp<I: Isa>() {
        let mut worst = 0.0f64;
        for x in sweep(-87.0, 88.0, 400_000) {
            worst = worst.max(ulp_diff(exp_f32::<I>(x), (x as f64).exp()));
        }
        assert!(worst <= 2.0, "worst exp error {worst} ulp (FMA: {})", I::FMA);
    }

    #[test]
    fn exp_f32_is_within_2_ulp() {
        exp_within_2_ulp::<WithFma>();
        exp_within_2_ulp::<NoFma>();
    }

    // tanh's bound is 6 ulp: its rational form is evaluated in float32 with about a dozen
    // roundings, which add up to at most 5.34 ulp with fused multiply-adds and 5.76 ulp
    // without, measured once over every float32 in [0, 10] (tanh is odd, and is exactly 1 past
    // the clamp at 9.5).
    fn sigmoid_within_4_tanh_within_6_ulp<I: Isa>() {
        let mut worst_s = 0.0f64;
        let mut worst_t = 0.0f64;
        for x in sweep(-30.0, 30.0, 600_000).chain(sweep(-1e-3, 1e-3, 10_000)) {
            let xd = x as f64;
            let s = 1.0 / (1.0 + (-xd).exp());
            worst_s = worst_s.max(ulp_diff(x.sigmoid::<I>(), s));
            worst_t = worst_t.max(ulp_diff(Float::tanh::<I>(x), xd.tanh()));
        }
        assert!(worst_s <= 4.0, "worst sigmoid error {worst_s} ulp (FMA: {})", I::FMA);
        assert!(worst_t <= 6.0, "worst tanh error {worst_t} ulp (FMA: {})", I::FMA);
    }

    #[test]
    fn sigmoid_f32_is_within_4_ulp_and_tanh_within_6() {
        sigmoid_within_4_tanh_within_6_ulp::<WithFma>();
        sigmoid_within_4_tanh_within_6_ulp::<NoFma>();
    }

    fn special<I: Isa>() {
        assert!(exp_f32::<I>(f32::NAN).is_nan());
        assert!(Float::tanh::<I>(f32::NAN).is_nan());
        assert!(f32::NAN.sigmoid::<I>().is_nan());
        assert_eq!(Float::tanh::<I>(f32::INFINITY), 1.0);
        assert_eq!(Float::tanh::<I>(f32::NEG_INFINITY), -1.0);
        assert_eq!(f32::INFINITY.sigmoid::<I>(), 1.0);
        assert!(f32::NEG_INFINITY.sigmoid::<I>() < 1e-37);
        assert_eq!(Float::tanh::<I>(-0.0f32).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn special_values() {
        special::<WithFma>();
        special::<NoFma>();
        assert!(f32::NAN.relu().is_nan());
        assert_eq!((-3.0f32).relu(), 0.0);
    }
}
