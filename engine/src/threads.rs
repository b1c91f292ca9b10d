//! How the engine's CPU work splits between threads: torch's own OpenMP team (libgomp, found in
//! the process at run time), so one set of threads stays on the cores, the one torch's ops use.
//!
//! [`split_rows`] runs one share of rows per thread. Called alone, each call is one OpenMP
//! parallel region: libgomp wakes the team, and its threads go back to sleep between regions. A
//! decode step makes ~200 such calls a token (every projection, attention, the head), and on the
//! small CPUs here the wake-ups cost more than the second thread gains (issue 26: 2 threads
//! decoded slower than 1). [`one_region`] runs a whole step inside one parallel region instead:
//! the calling thread runs the step, and the team's other threads wait for its shares spinning on
//! an atomic, the way llama.cpp's thread pool runs a graph, so a split costs a store and a load.

use std::cell::{Cell, UnsafeCell};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// torch's own OpenMP runtime (libgomp), found in the process at run time: splitting our kernels
/// over its team of threads keeps one set of threads on the cores, the one torch's ops use (a
/// second pool would compete with its spinning threads).
struct Omp {
    parallel: GompParallel,
    thread_num: OmpInt,
    num_threads: OmpInt,
}

/// `GOMP_parallel(fn, data, num_threads, flags)`.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
/// `omp_get_thread_num()`, `omp_get_num_threads()`.
type OmpInt = unsafe extern "C" fn() -> c_int;

fn omp() -> Option<&'static Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    OMP.get_or_init(|| {
        extern "C" {
            fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        }
        let find = |name: &std::ffi::CStr| {
            // SAFETY: RTLD_DEFAULT (null) searches the process' global symbols.
            let p = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (parallel, thread_num, num_threads) = (
            find(c"GOMP_parallel")?,
            find(c"omp_get_thread_num")?,
            find(c"omp_get_num_threads")?,
        );
        // SAFETY: libgomp's ABI for these three functions.
        unsafe {
            Some(Omp {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
                thread_num: std::mem::transmute::<*mut c_void, OmpInt>(thread_num),
                num_threads: std::mem::transmute::<*mut c_void, OmpInt>(num_threads),
            })
        }
    })
    .as_ref()
}

/// The pool that takes all but the first share of a split where no OpenMP runtime is found
/// (torch's thread count − 1 threads; `None` with one thread).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = torch_threads();
        (threads > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads - 1)
                    .thread_name(|i| format!("tessera-intdot-{i}"))
                    .build()
                    .ok()
            })
            .flatten()
    })
    .as_ref()
}

fn torch_threads() -> usize {
    (tch::get_num_threads().max(1) as usize).min(256)
}

/// What one OpenMP thread of [`split_rows`] runs.
struct Shares<'a> {
    f: &'a (dyn Fn(usize, usize) + Sync),
    rows: usize,
    align: usize,
    omp: &'static Omp,
    /// The first panic of a share: caught on its OpenMP thread (unwinding out of an `extern "C"`
    /// function aborts the process) and resumed on the caller's once all shares are done.
    panic: Mutex<Option<Payload>>,
}

extern "C" fn run_share(data: *mut c_void) {
    // SAFETY: `split_rows` passes a `Shares` that outlives the parallel region.
    let s = unsafe { &*(data as *const Shares) };
    let (t, n) = unsafe {
        (
            (s.omp.thread_num)() as usize,
            (s.omp.num_threads)() as usize,
        )
    };
    let (first, k) = share(s.rows, s.align, t, n);
    if k > 0 {
        let run = std::panic::AssertUnwindSafe(|| (s.f)(first, k));
        if let Err(payload) = std::panic::catch_unwind(run) {
            let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(payload);
        }
    }
}

/// Runs `f(first, n)` over `0..rows` in one share per thread (shares are multiples of `align`
/// rows) and returns when all are done: on torch's OpenMP team (the calling thread takes the
/// first share), else on a small pool.
pub fn split_rows(rows: usize, align: usize, f: impl Fn(usize, usize) + Sync) {
    let region = REGION.with(Cell::get);
    if !region.is_null() {
        // SAFETY: set by `run_team` on this thread while its region lives.
        return unsafe { &*region }.split(rows, align, &f);
    }
    let threads = torch_threads();
    if threads <= 1 || rows < 2 * align {
        return f(0, rows);
    }
    if let Some(omp) = omp() {
        let shares = Shares {
            f: &f,
            rows,
            align,
            omp,
            panic: Mutex::new(None),
        };
        // SAFETY: libgomp runs `run_share` on `threads` threads, the caller among them, and
        // returns after all of them; `shares` lives until then. `run_share` never unwinds.
        unsafe {
            (omp.parallel)(
                run_share,
                &shares as *const Shares as *mut c_void,
                threads as c_uint,
                0,
            )
        };
        let panic = shares.panic.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(payload) = panic {
            // A fault in a share is the caller's (the engine thread's step fails, the process
            // lives).
            std::panic::resume_unwind(payload);
        }
        return;
    }
    let per = rows.div_ceil(threads).div_ceil(align) * align;
    match pool() {
        Some(pool) if per < rows => pool.in_place_scope(|scope| {
            let f = &f;
            for first in (per..rows).step_by(per) {
                scope.spawn(move |_| f(first, per.min(rows - first)));
            }
            f(0, per);
        }),
        _ => f(0, rows),
    }
}

/// A panic caught on a thread of the team, resumed on the caller's.
type Payload = Box<dyn std::any::Any + Send>;

/// One split posted by the thread running a [`one_region`] body to the team's other threads.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize, usize) + Sync),
    rows: usize,
    align: usize,
}

/// The state a [`one_region`] shares between its threads.
struct Region {
    /// The team's size (libgomp may give fewer threads than asked).
    threads: AtomicUsize,
    /// Bumped once per job posted, and once more to end the region.
    epoch: AtomicUsize,
    /// The current job: written by the body's thread before it bumps `epoch`, read by the others
    /// after they see the bump.
    job: UnsafeCell<Option<Job>>,
    /// Threads still running the current job's shares.
    pending: AtomicUsize,
    done: AtomicBool,
    panic: Mutex<Option<Payload>>,
}

// SAFETY: `job` is written only by the body's thread while no other reads it (between a job's
// end, `pending` at zero, and the next bump of `epoch`), and read by the others only after the
// bump (acquire) that published it.
unsafe impl Sync for Region {}

impl Region {
    fn catch(&self, run: impl FnOnce()) {
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(payload);
        }
    }

    /// Thread `t`'s share of `job`.
    fn run_share(&self, job: Job, t: usize) {
        let threads = self.threads.load(Ordering::Relaxed);
        let (first, n) = share(job.rows, job.align, t, threads);
        if n > 0 {
            // SAFETY: the body's thread keeps the closure alive until `pending` reaches zero.
            let f = unsafe { &*job.f };
            self.catch(|| f(first, n));
        }
    }

    /// Runs `f` split over the team (on the body's thread): posts it, runs share 0, waits for
    /// the others' shares, resumes a panic of any.
    fn split(&self, rows: usize, align: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let others = self.threads.load(Ordering::Relaxed) - 1;
        // SAFETY: only the lifetime is erased: the closure outlives the job (we wait below).
        let f: *const (dyn Fn(usize, usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Job { f, rows, align };
        // SAFETY: no other thread reads `job` now (see `Region`'s `Sync`).
        unsafe { *self.job.get() = Some(job) };
        self.pending.store(others, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Release);
        self.run_share(job, 0);
        let mut spins = 0u32;
        while self.pending.load(Ordering::Acquire) != 0 {
            wait(&mut spins);
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
    }

    /// What the team's other threads run: each job's share as it is posted, until the end.
    fn serve(&self, t: usize) {
        let mut seen = 0;
        loop {
            let mut spins = 0u32;
            let epoch = loop {
                let e = self.epoch.load(Ordering::Acquire);
                if e != seen {
                    break e;
                }
                wait(&mut spins);
            };
            seen = epoch;
            if self.done.load(Ordering::Acquire) {
                return;
            }
            // SAFETY: published by the bump just seen; not written again before `pending` is 0.
            let job = unsafe { (*self.job.get()).expect("a job is posted before the bump") };
            self.run_share(job, t);
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }
}

/// One turn of a spin wait: a pause, and after a while a `sched_yield` each turn, so a waiting
/// thread gives its core to whatever is runnable when the one it waits for was descheduled.
fn wait(spins: &mut u32) {
    if *spins < 20_000 {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Rows `first .. first + n` of thread `t` of `threads` (shares are multiples of `align`).
fn share(rows: usize, align: usize, t: usize, threads: usize) -> (usize, usize) {
    let per = rows.div_ceil(threads.max(1)).div_ceil(align) * align;
    let first = (t * per).min(rows);
    (first, per.min(rows - first))
}

thread_local! {
    /// The region whose body runs on this thread, if any.
    static REGION: Cell<*const Region> = const { Cell::new(std::ptr::null()) };
}

/// What every thread of a [`one_region`] gets: the region, and the body (thread 0's).
struct Team<'a, R> {
    region: Region,
    body: Cell<Option<Box<dyn FnOnce() -> R + 'a>>>,
    out: Cell<Option<R>>,
}

extern "C" fn run_team<R>(data: *mut c_void) {
    // SAFETY: `one_region` passes a `Team<R>` that outlives the parallel region; `body` and
    // `out` are touched by thread 0 only.
    let team = unsafe { &*(data as *const Team<R>) };
    let omp = omp().expect("a region runs on libgomp");
    let t = unsafe { (omp.thread_num)() } as usize;
    if t != 0 {
        return team.region.serve(t);
    }
    let region = &team.region;
    let threads = unsafe { (omp.num_threads)() } as usize;
    region.threads.store(threads.max(1), Ordering::Relaxed);
    if threads > 1 {
        REGION.with(|r| r.set(region));
    }
    let body = team.body.take().expect("thread 0 runs the body once");
    region.catch(|| team.out.set(Some(body())));
    REGION.with(|r| r.set(std::ptr::null()));
    region.done.store(true, Ordering::Release);
    region.epoch.fetch_add(1, Ordering::Release);
}

/// Runs `body` on this thread inside one parallel region of torch's team: every [`split_rows`]
/// it makes (on this thread) is shared with the team's threads, which wait spinning between
/// splits instead of sleeping. With one thread, no OpenMP runtime, or already inside a region,
/// it is `body()`. torch ops inside `body` run on this thread alone (nested regions are serial),
/// so a body should be made of splits: a fused decode step.
pub fn one_region<R>(body: impl FnOnce() -> R) -> R {
    let inside = REGION.with(|r| !r.get().is_null());
    let threads = torch_threads();
    let Some(omp) = omp().filter(|_| threads > 1 && !inside) else {
        return body();
    };
    let team = Team {
        region: Region {
            threads: AtomicUsize::new(1),
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            done: AtomicBool::new(false),
            panic: Mutex::new(None),
        },
        body: Cell::new(Some(Box::new(body))),
        out: Cell::new(None),
    };
    // SAFETY: libgomp runs `run_team` on the team, this thread as thread 0, and returns after
    // all of them; `team` lives until then. `run_team` never unwinds (the body's panic is
    // caught, and every share's).
    unsafe {
        (omp.parallel)(
            run_team::<R>,
            &team as *const Team<R> as *mut c_void,
            threads as c_uint,
            0,
        )
    };
    let panic = team
        .region
        .panic
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(payload) = panic {
        std::panic::resume_unwind(payload);
    }
    team.out.into_inner().expect("the body ran")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;

    /// Each row's count of visits and the threads that ran shares, over `splits` splits of
    /// `rows` rows (aligned by `align`).
    fn visit(splits: usize, rows: usize, align: usize) -> (Vec<usize>, usize) {
        let counts: Vec<AtomicUsize> = (0..rows).map(|_| AtomicUsize::new(0)).collect();
        let threads = Mutex::new(HashSet::new());
        for _ in 0..splits {
            split_rows(rows, align, |first, n| {
                assert_eq!(first % align, 0, "shares start aligned");
                threads.lock().unwrap().insert(std::thread::current().id());
                for c in &counts[first..first + n] {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let counts = counts.into_iter().map(AtomicUsize::into_inner).collect();
        (counts, threads.into_inner().unwrap().len())
    }

    #[test]
    fn a_region_runs_every_split_over_every_row_once_on_the_team() {
        tch::set_num_threads(2);
        let caller = std::thread::current().id();
        let (counts, threads) = one_region(|| {
            assert_eq!(
                std::thread::current().id(),
                caller,
                "the body runs on the caller"
            );
            visit(500, 37, 1)
        });
        assert!(counts.iter().all(|&c| c == 500), "{counts:?}");
        let team = if omp().is_some() { 2 } else { 1 };
        assert_eq!(threads, team, "shares ran on the team's threads");
        for rows in [0, 1, 7, 8, 64, 65] {
            let (counts, _) = one_region(|| visit(3, rows, 8));
            assert!(counts.iter().all(|&c| c == 3), "{rows} rows: {counts:?}");
        }
        // A region inside a region is its body; torch ops inside one run (on one thread).
        let (inner, product) = one_region(|| {
            let inner = one_region(|| visit(2, 10, 1).0);
            let a = tch::Tensor::arange(64 * 64, (tch::Kind::Float, tch::Device::Cpu));
            let a = a.view([64, 64]) / 4096.0;
            (inner, a.matmul(&a).sum(tch::Kind::Double).double_value(&[]))
        });
        assert_eq!(inner, vec![2; 10]);
        let a = tch::Tensor::arange(64 * 64, (tch::Kind::Float, tch::Device::Cpu)).view([64, 64])
            / 4096.0;
        let want = a.matmul(&a).sum(tch::Kind::Double).double_value(&[]);
        assert!(
            (product - want).abs() <= 1e-9 * want.abs(),
            "{product} vs {want}"
        );
    }

    #[test]
    fn a_panic_in_a_regions_share_or_body_reaches_the_caller_and_the_team_lives_on() {
        tch::set_num_threads(2);
        for bad in [0, 60] {
            let caught = std::panic::catch_unwind(|| {
                one_region(|| {
                    visit(3, 64, 4);
                    split_rows(64, 4, |first, n| {
                        if (first..first + n).contains(&bad) {
                            panic!("share with row {bad}");
                        }
                    });
                    unreachable!("the split's panic ends the body");
                })
            });
            let payload = caught.expect_err("the panic reaches the caller");
            assert_eq!(
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_default(),
                format!("share with row {bad}")
            );
        }
        let caught = std::panic::catch_unwind(|| one_region(|| panic!("in the body")));
        assert!(caught.is_err());
        assert!(REGION.with(|r| r.get().is_null()), "the region is gone");
        assert_eq!(one_region(|| visit(2, 64, 4).0), vec![2; 64]);
    }

    #[test]
    fn a_panic_in_any_share_reaches_the_caller_and_the_process_lives() {
        tch::set_num_threads(2);
        for bad in [0, 60] {
            let caught = std::panic::catch_unwind(|| {
                split_rows(64, 4, |first, n| {
                    if (first..first + n).contains(&bad) {
                        panic!("share with row {bad}");
                    }
                })
            });
            let payload = caught.expect_err("the panic reaches the caller");
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert_eq!(message, format!("share with row {bad}"));
        }
        // The team still works afterwards.
        let sum = std::sync::atomic::AtomicUsize::new(0);
        split_rows(64, 4, |_, n| {
            sum.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 64);
    }
}
