//! A team of threads that spin between jobs, for the decode step's many tiny parallel jobs.
//!
//! A decode step hands over ~150 parallel jobs a token, each a few tens of µs of work. Rayon parks idle
//! workers on a futex, and in a VM waking one takes about as long as the job: the product of a 1536×576 Q4_1
//! matrix with one row ran 1.2× faster on two threads than on one. Here the helpers spin for a while after a
//! job (as OpenMP and ggml's thread pools do) and only then sleep, so back-to-back jobs start at once.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it sleeps: longer than the gap between two decode jobs, short
/// enough not to steal a core from other work for long.
const SPIN: Duration = Duration::from_micros(300);

/// One published job: `run(i)` for every task index i < n, claimed through `next`.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

struct Shared {
    /// The current job (a `Job` on the publishing thread's stack), or null.
    job: AtomicPtr<()>,
    /// Bumped for every job, so a helper works on each job once.
    epoch: AtomicUsize,
    /// Helpers holding a pointer to the current job; the publisher waits for zero before it returns.
    active: AtomicUsize,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Team {
    shared: &'static Shared,
    helpers: usize,
    /// One job at a time; callers on other threads wait (the team is process-wide).
    publish: Mutex<()>,
}

impl Team {
    /// The process-wide team: as many threads as rayon's pool (`RAYON_NUM_THREADS`), the caller included.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads().max(1) - 1))
    }

    fn new(helpers: usize) -> Team {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..helpers {
            std::thread::Builder::new()
                .name(format!("introspect-team-{i}"))
                .spawn(move || helper(shared))
                .expect("spawn a kernel thread");
        }
        Team {
            shared,
            helpers,
            publish: Mutex::new(()),
        }
    }

    /// Threads that work on a job, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `f(i)` for every i < n across the team (the calling thread works too) and returns when all are done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers == 0 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let _one_job = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            run: f,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        };
        let s = self.shared;
        s.job.store(&job as *const Job as *mut (), SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work_on(&job);
        while job.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        // No helper may touch `job` once this returns: retract it, then wait out helpers that took it.
        s.job.store(std::ptr::null_mut(), SeqCst);
        while s.active.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
    }
}

fn work_on(job: &Job) {
    loop {
        let i = job.next.fetch_add(1, SeqCst);
        if i >= job.n {
            return;
        }
        (job.run)(i);
        job.done.fetch_add(1, SeqCst);
    }
}

fn helper(s: &'static Shared) {
    let mut seen = s.epoch.load(SeqCst);
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(SeqCst) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
            }
        }
        seen = s.epoch.load(SeqCst);
        // Announce before reading the pointer: the publisher retracts it and then waits for `active` to fall.
        s.active.fetch_add(1, SeqCst);
        let p = s.job.load(SeqCst) as *const Job;
        if !p.is_null() {
            // SAFETY: the publisher keeps the job alive until `active` is zero again (see `Team::run`).
            work_on(unsafe { &*p });
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

/// An output buffer that several tasks of one job write at disjoint offsets.
pub(crate) struct DisjointOut<T = f32>(*mut T, usize);

// SAFETY: tasks only take disjoint slices (see `slice`).
unsafe impl<T: Send> Sync for DisjointOut<T> {}

impl<T> DisjointOut<T> {
    pub(crate) fn new(buf: &mut [T]) -> Self {
        DisjointOut(buf.as_mut_ptr(), buf.len())
    }

    /// The buffer's start, for writers that take disjoint strided parts (a GEMM's columns).
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }

    /// # Safety
    /// No other live slice may overlap `start..end`, and the buffer given to `new` must outlive the slice.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, end: usize) -> &mut [T] {
        assert!(start <= end && end <= self.1, "slice within the buffer");
        std::slice::from_raw_parts_mut(self.0.add(start), end - start)
    }
}

/// A fresh buffer of `n` f32 that `fill` writes whole, not zeroed first: the element-wise kernels' outputs
/// (zeroing them before they were written had been ~7% of a bf16 training step).
///
/// # Safety
/// `fill` writes every one of the n elements.
pub(crate) unsafe fn written_by(
    n: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's promise: all n elements were written.
    unsafe { v.set_len(n) };
    v
}

/// An initialized buffer as one that kernels write without reading (they write only whole f32s).
#[cfg(any(target_arch = "x86_64", test))]
pub(crate) fn as_uninit(dst: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the buffer stays initialized: only f32s are written.
    unsafe { &mut *(dst as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// Floats a team task zeroes: below twice this one thread does it all.
const ZEROES_PER_TASK: usize = 1 << 16;

/// `n` zeros, written by the whole team: an output buffer's zeroing by `vec![0.0; n]` ran on one thread
/// while the other waited, ~8% of a bf16 training step on 2 cores.
pub fn zeroed(n: usize) -> Vec<f32> {
    use std::mem::MaybeUninit;
    if n < 2 * ZEROES_PER_TASK {
        return vec![0.0; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let out = DisjointOut::new(&mut v.spare_capacity_mut()[..n]);
    let team = Team::global();
    let per = n.div_ceil(2 * team.threads()).max(ZEROES_PER_TASK);
    team.run(n.div_ceil(per), &|t| {
        // SAFETY: each task takes its own range.
        let part = unsafe { out.slice(t * per, ((t + 1) * per).min(n)) };
        part.fill(MaybeUninit::new(0.0));
    });
    // SAFETY: the tasks together wrote all n elements.
    unsafe { v.set_len(n) };
    v
}

/// The element-wise sum of equally long buffers, `(p0 + p1) + p2 …` in that order, written once by the
/// whole team into a fresh buffer: the training pass's residual adds and the sums of a block's input
/// gradients (Candle's adds ran on its own pool while this team's helper spun, one pass per pair).
pub fn sum_of(parts: &[&[f32]]) -> Vec<f32> {
    let n = parts.first().map_or(0, |p| p.len());
    assert!(parts.iter().all(|p| p.len() == n), "parts of one length");
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let out = DisjointOut::new(&mut v.spare_capacity_mut()[..n]);
    let per = ZEROES_PER_TASK / 4;
    Team::global().run(n.div_ceil(per), &|t| {
        let (a, b) = (t * per, ((t + 1) * per).min(n));
        // SAFETY: each task takes its own range.
        let dst = unsafe { out.slice(a, b) };
        for (i, d) in dst.iter_mut().enumerate() {
            let mut s = parts[0][a + i];
            for p in &parts[1..] {
                s += p[a + i];
            }
            d.write(s);
        }
    });
    // SAFETY: the tasks together wrote all n elements.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn sum_of_adds_in_order_at_every_size() {
        for n in [0, 5, ZEROES_PER_TASK / 4 + 3, 3 * ZEROES_PER_TASK] {
            let parts: Vec<Vec<f32>> = (0..3)
                .map(|p| (0..n).map(|i| (i * (p + 1)) as f32 * 0.1).collect())
                .collect();
            let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            let s = sum_of(&refs);
            assert_eq!(s.len(), n);
            for (i, v) in s.iter().enumerate() {
                assert_eq!(
                    *v,
                    (parts[0][i] + parts[1][i]) + parts[2][i],
                    "n = {n}, [{i}]"
                );
            }
        }
    }

    #[test]
    fn zeroed_is_all_zeros_at_every_size() {
        for n in [
            0,
            1,
            2 * ZEROES_PER_TASK - 1,
            2 * ZEROES_PER_TASK,
            5 * ZEROES_PER_TASK + 3,
        ] {
            // A freed buffer of non-zeros first, so reused memory would show.
            drop(vec![1.0f32; n]);
            let v = zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0), "n = {n}");
        }
    }

    #[test]
    fn every_task_runs_exactly_once() {
        let team = Team::new(2);
        for n in [0usize, 1, 2, 7, 100] {
            for _ in 0..50 {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                team.run(n, &|i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n = {n}");
            }
            // Let the helpers fall asleep once, so waking them is tested too.
            std::thread::sleep(SPIN * 3);
        }
    }
}
