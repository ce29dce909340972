//! Step-synchronised work for the time loop: a step is cut into a fixed number of blocks, the
//! blocks of a step need every block of the previous step done, and the threads of a team share
//! the blocks with one synchronisation per step (a counter of blocks done) instead of a fork and
//! a join per product and per pointwise pass.
//!
//! Each member owns a run of consecutive blocks and runs them step after step, so that its share
//! of the weights stays in its own cache, and so that the rows it writes meet another member's at
//! one boundary only (a cache line two cores write in turn); a member done with its own blocks
//! takes those of the step that no one has claimed yet. So the loop never waits for a thread that
//! the OS has not scheduled (a sleeping thread can take milliseconds to wake on a VM) and balances
//! itself when one core runs slower: every block is claimed exactly once, by a thread that is
//! running, and a thread only waits for blocks already claimed, which makes the scheme free of
//! deadlocks whatever the pool does.
//! The work function must not use the rayon pool itself (a member waiting in a nested rayon call
//! could be handed another member's loop).

use rayon::prelude::*;
use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins on a counter between yields of the CPU (for when there are more threads than cores).
const SPINS: u32 = 1 << 12;

/// A counter on a cache line of its own (the members write them from different cores).
#[repr(align(128))]
struct Counter(AtomicUsize);

impl Counter {
    fn new() -> Self {
        Counter(AtomicUsize::new(0))
    }
}

struct Team {
    blocks: usize,
    members: usize,
    /// `claims[j]`: the next step whose block `j` is free to claim.
    claims: Vec<Counter>,
    /// Blocks done over all steps.
    done: Counter,
    /// A block panicked: the others stop waiting and the panic reaches the caller.
    failed: AtomicBool,
}

/// Run `work(scratch, block, step)` for every block of every step, steps in order, on up to
/// `members` threads. `init` makes each member's scratch.
///
/// Called from a thread of a rayon pool (the kernel pool's, in the calls handed to it), the
/// members are that pool's threads. Called from outside one, the calling thread is member 0 and
/// starts at once, with no hand-off to the pool and back to wait for, and the pool's threads join
/// as helpers (see [`crate::threads::with_caller`]): for calls short enough that the hand-offs
/// would count, and so that no third thread (a caller waiting for the pool) competes with the
/// members for the cores.
pub fn run<S>(
    blocks: usize,
    members: usize,
    steps: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize, usize) + Sync,
) {
    let team = Team::new(blocks, members);
    let member = |p: usize| team.member(p, steps, &mut init(), &work);
    if team.members == 1 {
        member(0);
    } else if rayon::current_thread_index().is_some() {
        (0..team.members).into_par_iter().for_each(member);
    } else {
        crate::threads::with_caller(team.members, &member);
    }
}

/// Marks the team failed if dropped during a panic.
struct Guard<'a>(&'a AtomicBool);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

impl Team {
    fn new(blocks: usize, members: usize) -> Team {
        Team {
            blocks,
            members: members.clamp(1, blocks.max(1)),
            claims: (0..blocks).map(|_| Counter::new()).collect(),
            done: Counter::new(),
            failed: AtomicBool::new(false),
        }
    }

    fn member<S>(&self, p: usize, steps: usize, scratch: &mut S, work: &impl Fn(&mut S, usize, usize)) {
        let mut take = |j: usize, s: usize| {
            let free = self.claims[j]
                .0
                .compare_exchange(s, s + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
            if free {
                let guard = Guard(&self.failed);
                work(scratch, j, s);
                drop(guard);
                self.done.0.fetch_add(1, Ordering::Release);
            }
        };
        // Its own blocks first, then whatever the others have not claimed yet.
        let own = self.owned(p);
        let order: Vec<usize> = own
            .clone()
            .chain((0..self.blocks).filter(|j| !own.contains(j)))
            .collect();
        for s in 0..steps {
            if !self.wait_done(s * self.blocks) {
                return;
            }
            for &j in &order {
                take(j, s);
            }
        }
    }

    /// The blocks member `p` owns: the `p`-th of `members` runs of consecutive blocks, as even
    /// as they divide. Owning every `members`-th block instead had two members' blocks meet at
    /// every boundary; in turns in one process, 2 threads (Intel Xeon, AVX-512), consecutive
    /// blocks together with cache-line-aligned state buffers took 0.90-1.01x the time on the
    /// LSTM, GRU and RNN at B=1 and B=8, training and inference; the ownership alone 0.97x on LSTM
    /// training at B=64, 1.005x on inference.
    fn owned(&self, p: usize) -> std::ops::Range<usize> {
        p * self.blocks / self.members..(p + 1) * self.blocks / self.members
    }

    /// Wait until `target` blocks are done, with what they wrote visible. False if a block
    /// panicked instead.
    fn wait_done(&self, target: usize) -> bool {
        let mut spins = 0;
        while self.done.0.load(Ordering::Acquire) < target {
            if self.failed.load(Ordering::Relaxed) {
                return false;
            }
            pause(&mut spins);
        }
        true
    }
}

/// One turn of a wait loop: a spin hint, and now and then a yield.
#[inline]
fn pause(spins: &mut u32) {
    *spins += 1;
    if spins.is_multiple_of(SPINS) {
        std::thread::yield_now();
    } else {
        spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Every block of every step runs once, after every block of the previous step, with one
    /// member, with as many members as blocks, with more members than blocks, and with more
    /// members than the pool has threads; from a thread of the pool, and led from outside it
    /// (with the kernel pool's two threads as helpers).
    #[test]
    fn blocks_run_once_in_step_order() {
        crate::threads::set_num_threads(2).unwrap();
        let cases = [
            (1, 1, 1),
            (3, 1, 1),
            (4, 2, 2),
            (2, 2, 2),
            (2, 5, 5),
            (7, 3, 3),
            (4, 4, 1),
        ];
        for ((blocks, members, threads), led) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let steps = 50;
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let log = Mutex::new(Vec::new());
            let finished: Vec<AtomicUsize> = (0..blocks).map(|_| AtomicUsize::new(0)).collect();
            let install = |f: &(dyn Fn() + Sync)| if led { f() } else { pool.install(f) };
            install(&|| {
                run(
                    blocks,
                    members,
                    steps,
                    || (),
                    |_, j, s| {
                        for f in &finished {
                            assert!(f.load(Ordering::SeqCst) >= s, "block {j} of step {s} started early");
                        }
                        log.lock().unwrap().push((s, j));
                        finished[j].fetch_add(1, Ordering::SeqCst);
                    },
                )
            });
            let mut log = log.into_inner().unwrap();
            log.sort_unstable();
            let want: Vec<_> = (0..steps).flat_map(|s| (0..blocks).map(move |j| (s, j))).collect();
            assert_eq!(
                log, want,
                "blocks={blocks} members={members} threads={threads} led={led}"
            );
        }
    }

    /// The members' runs of blocks cover every block once, in order, as even as they divide.
    #[test]
    fn owned_runs_cover_the_blocks() {
        for blocks in 1..=9 {
            for members in 1..=12 {
                let team = Team::new(blocks, members);
                let runs: Vec<_> = (0..team.members).map(|p| team.owned(p)).collect();
                let all: Vec<usize> = runs.iter().cloned().flatten().collect();
                assert_eq!(
                    all,
                    (0..blocks).collect::<Vec<_>>(),
                    "blocks={blocks} members={members}"
                );
                let sizes = runs.iter().map(|r| r.len());
                assert!(sizes.clone().min().unwrap() >= 1, "blocks={blocks} members={members}");
                assert!(sizes.clone().max().unwrap() - sizes.min().unwrap() <= 1);
            }
        }
    }

    /// A panicking block reaches the caller instead of leaving the other members waiting, from a
    /// thread of the pool and led from outside it.
    #[test]
    fn a_panic_ends_the_team() {
        crate::threads::set_num_threads(2).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (led, failing) in [(false, 0), (false, 1), (true, 0), (true, 1)] {
            let team = || {
                run(
                    2,
                    2,
                    100,
                    || (),
                    |_, j, s| {
                        assert!(!(j == failing && s == 10), "boom");
                    },
                )
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if led {
                    team()
                } else {
                    pool.install(team)
                }
            }));
            assert!(result.is_err(), "led={led} failing={failing}");
        }
    }
}
