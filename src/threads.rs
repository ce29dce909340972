//! The kernel thread pool: its size (`set_num_threads`) and the denormal mode of its threads.
//!
//! Every kernel call runs inside this pool, so rayon work from the sweep and from the GEMM crate
//! shares one set of threads (never more than `num_threads` busy at once); with one thread it runs
//! on the caller's thread, with denormals flushed for the call only, so that the caller's thread
//! keeps its floating-point mode either way.

use crate::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

struct Pool {
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: RwLock<Option<Pool>> = RwLock::new(None);

fn default_threads() -> usize {
    std::env::var("RNNKIT_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build(threads: usize) -> Result<Pool, Error> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("rnnkit-{i}"))
        .start_handler(|_| crate::simd::flush_denormals())
        .build()
        .map_err(|e| Error::Value(format!("could not start {threads} kernel threads: {e}")))?;
    Ok(Pool {
        threads,
        pool: Arc::new(pool),
    })
}

fn current() -> Result<(usize, Arc<rayon::ThreadPool>), Error> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Ok((p.threads, p.pool.clone()));
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(build(default_threads())?);
    }
    let p = slot.as_ref().expect("pool was just built");
    Ok((p.threads, p.pool.clone()))
}

/// Use `n` threads for the kernels from now on (1 = no threading).
pub fn set_num_threads(n: usize) -> Result<(), Error> {
    if n == 0 {
        return Err(Error::Value("num_threads must be at least 1".into()));
    }
    let pool = build(n)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(pool);
    Ok(())
}

/// The number of threads the kernels use: `RNNKIT_NUM_THREADS`, else the CPUs available.
pub fn get_num_threads() -> usize {
    current().map_or(1, |(n, _)| n)
}

/// How long the kernel threads stay awake after a call, waiting for the next one.
const LINGER: Duration = Duration::from_micros(1000);

/// Kernel calls started so far: a lingering thread stops waiting when this changes.
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// Run `f(threads)` on the kernel pool (with one thread, on the calling thread).
///
/// Afterwards the pool's threads stay awake (yielding) for up to [`LINGER`] before rayon lets
/// them sleep, as OpenMP's and ONNX Runtime's pools do: a sleeping thread can take milliseconds
/// to wake (1-4 ms on the 2-core VM of the README), longer than a whole call at batch 1, so
/// without this the second core would sit out most of a stream of short calls (a training
/// step's forward and backward are two).
pub fn run<R: Send>(f: impl FnOnce(usize) -> R + Send) -> Result<R, Error> {
    let (threads, pool) = current()?;
    if threads == 1 {
        // Nothing to share: run on the caller's thread, without waking a pool thread.
        let _mode = crate::simd::DenormalsFlushed::new();
        return Ok(f(1));
    }
    let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    let out = pool.install(|| f(threads));
    pool.spawn_broadcast(move |_| {
        let end = Instant::now() + LINGER;
        // Yielding, not spinning: the caller's thread, back in Python between two calls, gets the
        // core whenever it wants it.
        while CALLS.load(Ordering::Relaxed) == call && Instant::now() < end {
            std::thread::yield_now();
        }
    });
    Ok(out)
}
