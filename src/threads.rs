//! The kernel thread pool: its size (`set_num_threads`) and the denormal mode of its threads.
//!
//! Every kernel call runs inside this pool, so rayon work from the sweep and from the GEMM crate
//! shares one set of threads (never more than `num_threads` busy at once); with one thread, and
//! for calls too small to share ([`small_call_flops`]), it runs on the caller's thread, with
//! denormals flushed for the call only, so that the caller's thread keeps its floating-point mode
//! either way.

use crate::error::Error;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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

/// Use `n` threads for the kernels from now on (1 = no threading). The pool is kept when it
/// already has `n` threads, so that setting the count a caller wants before each call costs
/// nothing (a new pool's threads start cold).
pub fn set_num_threads(n: usize) -> Result<(), Error> {
    if n == 0 {
        return Err(Error::Value("num_threads must be at least 1".into()));
    }
    if POOL
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|p| p.threads == n)
    {
        return Ok(());
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

/// Calls of fewer floating-point operations run on the calling thread alone: handing them to
/// the pool and sharing their steps costs more than the second core gives back. Batch-1
/// forwards over 100 steps, 2 threads, on the calling thread against the pool (in turns in one
/// process, Ice Lake): RNN H=64 0.56x the time, H=96 0.78x, H=128 (6.6 million) 0.88x, GRU
/// H=64 0.74x, LSTM H=64 0.81x; at 11-13 million (GRU H=96, RNN batch 2 H=128) they were level.
/// Results do not depend on the thread count, so neither on this.
const SMALL_CALL_FLOPS: usize = 8_000_000;

/// The threshold of [`small_call_flops`], once read (`usize::MAX`: not yet).
static SMALL_CALL: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Calls of fewer floating-point operations than this run on the calling thread alone:
/// `RNNKIT_SMALL_CALL_FLOPS` (0: every call goes to the pool), else 8 million.
pub fn small_call_flops() -> usize {
    match SMALL_CALL.load(Ordering::Relaxed) {
        usize::MAX => {
            let n = std::env::var("RNNKIT_SMALL_CALL_FLOPS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(SMALL_CALL_FLOPS);
            SMALL_CALL.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// Set the threshold of [`small_call_flops`] (0: every call goes to the pool).
pub fn set_small_call_flops(n: usize) {
    SMALL_CALL.store(n, Ordering::Relaxed);
}

/// Run `f(threads)`, a call of about `flops` floating-point operations, on the kernel pool (with
/// one thread, or under [`small_call_flops`], on the calling thread).
///
/// Afterwards the pool's threads stay awake (yielding) for up to `LINGER` before rayon lets
/// them sleep, as OpenMP's and ONNX Runtime's pools do: a sleeping thread can take milliseconds
/// to wake (1-4 ms on the 2-core VM of the README), longer than a whole call at batch 1, so
/// without this the second core would sit out most of a stream of short calls (a training
/// step's forward and backward are two).
///
/// With `led`, `f(threads)` runs on the calling thread whatever its size, for a call whose
/// parallel parts start from there ([`with_caller`]: teams, items taken in turn), with the
/// caller as their first member and the pool's threads as helpers: no hand-off to the pool and
/// back, and no third thread, a caller waiting for the pool, competing with them for the cores.
/// Such a call must not hand work to the GEMM crates' threading, which needs the pool's context.
pub fn run<R: Send>(flops: usize, led: bool, f: impl FnOnce(usize) -> R + Send) -> Result<R, Error> {
    let (threads, pool) = current()?;
    let shared = threads > 1 && flops >= small_call_flops();
    if !shared || led {
        // Nothing to share, or teams led from here: run on the caller's thread, without waking
        // a pool thread for the call itself.
        let _mode = crate::simd::DenormalsFlushed::new();
        return Ok(f(if shared { threads } else { 1 }));
    }
    let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    let yielding = if flops < SHORT_CALL_FLOPS {
        SHORT_CALL_YIELD
    } else {
        YIELD
    };
    let out = on_pool(&pool, yielding, || f(threads));
    linger(&pool, call);
    Ok(out)
}

/// Keep the pool's threads awake for up to [`LINGER`] after call number `call` (see [`run`]).
fn linger(pool: &rayon::ThreadPool, call: usize) {
    pool.spawn_broadcast(move |_| {
        let end = Instant::now() + LINGER;
        // Yielding, not spinning: the caller's thread, back in Python between two calls, gets the
        // core whenever it wants it.
        while CALLS.load(Ordering::Relaxed) == call && Instant::now() < end {
            std::thread::yield_now();
        }
    });
}

/// A helper job of [`with_caller`]: not started, running, or done (or cancelled).
const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

#[derive(Default)]
struct Helper {
    state: std::sync::atomic::AtomicU8,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// Run `work(0)` on the calling thread and `work(1)` ... `work(members - 1)` on the kernel pool's
/// threads (as many as it has), for work that uses no rayon inside. No hand-off to the pool and
/// back is waited for: the caller starts at once, and a helper that has not started by the time
/// the caller's part returns is cancelled, so `work` must get everything done whichever of the
/// members 1.. run (as the members of a team in `team.rs` do, each taking what the others have not).
/// Without a pool (its threads could not start), the caller does all the work as member 0.
pub fn with_caller(members: usize, work: &(dyn Fn(usize) + Sync)) {
    let _mode = crate::simd::DenormalsFlushed::new(); // as on the pool's threads
    let Ok((threads, pool)) = current() else {
        work(0);
        return;
    };
    let helpers: Vec<Arc<Helper>> = (1..members.min(threads)).map(|_| Arc::default()).collect();
    if helpers.is_empty() {
        work(0);
        return;
    }
    let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    // SAFETY: a helper calls `work` only after moving its state from PENDING to RUNNING, and the
    // caller does not return before every helper's state is DONE: it moves PENDING ones to DONE
    // itself (then their jobs never call `work`) and waits for RUNNING ones to set DONE after
    // their last use of `work`. So `work` outlives every use, as a scoped spawn would ensure.
    let shared: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(work) };
    for (i, helper) in helpers.iter().enumerate() {
        let (helper, caller) = (helper.clone(), std::thread::current());
        pool.spawn(move || {
            if helper
                .state
                .compare_exchange(PENDING, RUNNING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| shared(i + 1))) {
                    *helper.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(panic);
                }
                helper.state.store(DONE, Ordering::Release);
                caller.unpark();
            }
        });
    }
    let mine = catch_unwind(AssertUnwindSafe(|| work(0)));
    for helper in &helpers {
        let cancelled = helper
            .state
            .compare_exchange(PENDING, DONE, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if !cancelled {
            wait_until(YIELD, || helper.state.load(Ordering::Acquire) == DONE);
        }
    }
    linger(&pool, call);
    let theirs = helpers
        .iter()
        .find_map(|h| h.panic.lock().unwrap_or_else(|e| e.into_inner()).take());
    if let Some(panic) = mine.err().or(theirs) {
        resume_unwind(panic);
    }
}

/// How long the caller spins, then yields, waiting for [`on_pool`]'s job before it sleeps.
const SPIN: Duration = Duration::from_micros(3);
const YIELD: Duration = Duration::from_micros(50);
/// Calls of fewer floating-point operations than this (about 2 ms of work or less) are waited
/// for yielding up to [`SHORT_CALL_YIELD`], so that their caller is not asleep when they end.
/// Against sleeping after [`YIELD`] for every call, batch-1 calls over 100 steps (H=128, two
/// threads, in turns in one process, runs of 8 and 10 rounds) took 0.85-0.88x the time for LSTM
/// and GRU inference, 0.90-0.95x for LSTM training, 0.81-0.90x for RNN training and 0.90-1.00x
/// for GRU training (calls left unchanged moved by up to 9% in the same runs). Longer calls
/// sleep after [`YIELD`]: yielding through every call, those of a few milliseconds (GRU at batch
/// 8) had taken 0.99-1.13x the time, the caller taking turns on the cores with the two threads
/// of the call's team. (Batch-1 and 2 forwards have since been led by the caller instead, see
/// `led_by_caller` in `sweep.rs`: 0.82-0.85x the time again for LSTM and GRU inference.) For the
/// same reason, shorter calls keep one time loop shared by the team (`slice_count` in `sweep.rs`).
pub(crate) const SHORT_CALL_FLOPS: usize = 200_000_000;
const SHORT_CALL_YIELD: Duration = Duration::from_millis(2);

/// `pool.install(f)` from a thread outside the pool, with a cheaper wait for the result.
///
/// `install` puts the caller to sleep on a condition variable at once, and waking it costs
/// 10-14 µs on the 2-core VM of the README: more than a streaming step's whole work. Here the
/// caller spins for [`SPIN`] (the end of a short job), then yields its core to the pool's threads
/// until `yielding` ([`YIELD`], or [`SHORT_CALL_YIELD`] for short calls; spinning longer took a
/// core from them: 181 against 115 µs for a 2-thread job of 110 µs), then sleeps until the job
/// wakes it. A trivial job came back in 1.2 µs against 13 µs, a 2-thread job of 20 µs in 19
/// against 26 µs.
fn on_pool<R: Send>(pool: &rayon::ThreadPool, yielding: Duration, f: impl FnOnce() -> R + Send) -> R {
    if pool.current_thread_index().is_some() {
        // Already on one of its threads: run here (waiting would hold up the thread the job may
        // be queued on).
        return pool.install(f);
    }
    let done = AtomicBool::new(false);
    let out = Mutex::new(None);
    let caller = std::thread::current();
    let job = || {
        let result = catch_unwind(AssertUnwindSafe(f));
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        // The caller may return, and free `done` and `out`, as soon as it sees the flag: the
        // handle to wake it is the job's own copy.
        let waker = caller.clone();
        done.store(true, Ordering::Release);
        waker.unpark();
    };
    let job: Box<dyn FnOnce() + Send + '_> = Box::new(job);
    // SAFETY: the job borrows `f`, `done`, `out` and `caller` from this frame, and this function
    // does not return (nor unwind: nothing below panics) before the job has set `done`, its last
    // use of them; so the borrows outlive every use, as a scoped spawn would ensure.
    let job: Box<dyn FnOnce() + Send + 'static> = unsafe { std::mem::transmute(job) };
    pool.spawn(job);
    wait_until(yielding, || done.load(Ordering::Acquire));
    match out.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(Ok(r)) => r,
        Some(Err(panic)) => resume_unwind(panic),
        None => unreachable!("the job stores its result before it sets `done`"),
    }
}

/// Wait for `done()` on the calling thread: spinning for [`SPIN`], yielding until `yielding` has
/// passed, then asleep, woken by an `unpark` of this thread from whatever makes `done()` true.
fn wait_until(yielding: Duration, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        let waited = start.elapsed();
        if waited < SPIN {
            std::hint::spin_loop();
        } else if waited < yielding {
            std::thread::yield_now();
        } else {
            // Woken by the `unpark` (or spuriously: the loop checks again).
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With two threads, a call under the small-call threshold runs on the calling thread with
    /// one thread, and one at or over it on the pool with two; with the threshold at 0, every
    /// call goes to the pool. A led call runs on the calling thread, with two threads from the
    /// threshold.
    #[test]
    fn small_calls_run_on_the_calling_thread() {
        set_num_threads(2).unwrap();
        let on_pool = |flops, led| run(flops, led, |t| (rayon::current_thread_index().is_some(), t)).unwrap();
        set_small_call_flops(1000);
        assert_eq!(on_pool(999, false), (false, 1));
        assert_eq!(on_pool(1000, false), (true, 2));
        assert_eq!(on_pool(999, true), (false, 1));
        assert_eq!(on_pool(1000, true), (false, 2));
        set_small_call_flops(0);
        assert_eq!(on_pool(0, false), (true, 2));
        set_small_call_flops(SMALL_CALL_FLOPS);
    }

    /// Setting the count the pool already has keeps the pool.
    #[test]
    fn the_same_count_keeps_the_pool() {
        set_num_threads(2).unwrap();
        let (_, before) = current().unwrap();
        set_num_threads(2).unwrap();
        let (n, after) = current().unwrap();
        assert_eq!(n, 2);
        assert!(Arc::ptr_eq(&before, &after), "a new pool was built");
    }

    /// The job runs on a pool thread and its result and writes through borrows reach the caller,
    /// for a job shorter than the spin, one within the yields and one past them (the caller
    /// sleeps); a panic in the job reaches the caller; a call from a pool thread runs in place.
    #[test]
    fn on_pool_returns_the_job_result_and_its_panic() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for wait in [Duration::ZERO, Duration::from_micros(20), Duration::from_millis(3)] {
            let mut seen = vec![0usize; 3];
            let index = on_pool(&pool, YIELD, || {
                std::thread::sleep(wait);
                seen.iter_mut().enumerate().for_each(|(i, s)| *s = i + 1);
                rayon::current_thread_index()
            });
            assert!(index.is_some(), "ran off the pool (wait {wait:?})");
            assert_eq!(seen, [1, 2, 3], "wait {wait:?}");
        }
        let panic = catch_unwind(AssertUnwindSafe(|| on_pool(&pool, YIELD, || panic!("boom")))).unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
        // The pool still serves calls after a panic.
        assert_eq!(on_pool(&pool, SHORT_CALL_YIELD, || 7), 7);
        let nested = on_pool(&pool, YIELD, || on_pool(&pool, YIELD, rayon::current_thread_index));
        assert!(nested.is_some());
    }

    /// Member 0 runs on the calling thread; a helper either runs before `with_caller` returns or
    /// never; a panic of either member reaches the caller.
    #[test]
    fn with_caller_runs_member_0_here_and_helpers_before_it_returns() {
        set_num_threads(2).unwrap();
        let caller = std::thread::current().id();
        for wait_for_helper in [false, true] {
            let runs = [AtomicUsize::new(0), AtomicUsize::new(0)];
            with_caller(2, &|p| {
                if p == 0 {
                    assert_eq!(std::thread::current().id(), caller);
                    let end = Instant::now() + Duration::from_secs(5);
                    while wait_for_helper && runs[1].load(Ordering::SeqCst) == 0 && Instant::now() < end {
                        std::thread::yield_now();
                    }
                } else {
                    assert_ne!(std::thread::current().id(), caller);
                }
                runs[p].fetch_add(1, Ordering::SeqCst);
            });
            let seen = runs.each_ref().map(|r| r.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(20));
            let later = runs.each_ref().map(|r| r.load(Ordering::SeqCst));
            assert_eq!(seen, later, "a helper ran after with_caller returned");
            assert_eq!(seen[0], 1);
            assert!(seen[1] <= 1);
            if wait_for_helper {
                assert_eq!(seen[1], 1);
            }
        }
        for failing in [0, 1] {
            let helper_ran = AtomicBool::new(false);
            let panic = catch_unwind(AssertUnwindSafe(|| {
                with_caller(2, &|p| {
                    if p == 1 {
                        helper_ran.store(true, Ordering::SeqCst);
                    } else {
                        while !helper_ran.load(Ordering::SeqCst) {
                            std::thread::yield_now();
                        }
                    }
                    assert!(p != failing, "member {p} failed");
                })
            }))
            .unwrap_err();
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(message, format!("member {failing} failed"));
        }
    }
}
