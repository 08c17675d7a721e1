//! Threads across cells: one process-wide rayon pool sized by `set_threads` or `CLOAKBEAM_NATIVE_THREADS`.
//!
//! A batch runs on the pool only when it is large enough to pay for the hand-off
//! (`PARALLEL_MIN_CELLS` cells, or `PARALLEL_MIN_BYTES` of values); below that it stays on the calling
//! thread. Work is split into contiguous cell ranges, each owning a disjoint slice of the output, so the
//! result is byte-for-byte the same whatever the thread count (nonces aside, which are random).

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Batches with at least this many cells run on the thread pool.
pub const PARALLEL_MIN_CELLS: usize = 8192;
/// ... or with at least this many bytes of values (and two cells or more).
pub const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// A failed cell: what went wrong (a fixed code, never content) and its row.
#[derive(Clone, Copy, Debug)]
pub struct Fail {
    pub code: &'static str,
    pub row: usize,
}

struct Pool {
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    /// The process that started the pool's threads: a forked child (multiprocessing, Beam and Dask
    /// workers) inherits the pool object but not its threads, and must build its own.
    pid: u32,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn default_threads() -> usize {
    if let Ok(v) = std::env::var("CLOAKBEAM_NATIVE_THREADS") {
        if let Ok(n) = v.trim().parse::<usize>() {
            if n >= 1 {
                return n;
            }
        }
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn build(threads: usize) -> Pool {
    let pool = if threads > 1 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cloakbeam-native-{i}"))
            .build()
            .ok()
            .map(Arc::new)
    } else {
        None
    };
    Pool { threads: if pool.is_some() { threads } else { 1 }, pool, pid: std::process::id() }
}

/// Set the number of kernel threads (0: the default, `CLOAKBEAM_NATIVE_THREADS` or the CPU count).
pub fn set_threads(n: usize) -> usize {
    let n = if n == 0 { default_threads() } else { n };
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if g.as_ref().map(|p| (p.threads, p.pid)) != Some((n, std::process::id())) {
        let old = g.take();
        if old.as_ref().is_some_and(|p| p.pid != std::process::id()) {
            std::mem::forget(old); // inherited across fork: its threads are not ours to stop
        }
        *g = Some(build(n));
    }
    g.as_ref().map(|p| p.threads).unwrap_or(1)
}

fn current() -> (usize, Option<Arc<rayon::ThreadPool>>) {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match g.as_ref() {
        None => *g = Some(build(default_threads())),
        Some(p) if p.pid != pid => {
            let threads = p.threads;
            // The inherited pool's threads do not exist here: forget it (never join it) and start anew.
            std::mem::forget(g.take());
            *g = Some(build(threads));
        }
        Some(_) => {}
    }
    let p = g.as_ref().unwrap();
    (p.threads, p.pool.clone())
}

/// The number of threads kernels use for large batches.
pub fn threads() -> usize {
    current().0
}

/// Zero a freshly allocated output slice and view it as bytes. Done inside each chunk, so the first touch
/// of a large output (page faults, zeroing) is spread over the threads instead of preceding them.
fn zeroed(buf: &mut [MaybeUninit<u8>]) -> &mut [u8] {
    // SAFETY: every byte is written (zero) before the slice is viewed as initialized `u8`.
    unsafe {
        std::ptr::write_bytes(buf.as_mut_ptr(), 0, buf.len());
        &mut *(buf as *mut [MaybeUninit<u8>] as *mut [u8])
    }
}

/// Run `f` over the cells `0..n`, giving each call a cell range and that range's slice of `out`
/// (zeroed first). `start(i)` is where cell `i`'s output begins in `out` (`start(n)` is `out.len()`).
/// Returns the failure with the lowest row, if any.
pub fn run_chunks<F>(n: usize, value_bytes: usize, out: &mut [MaybeUninit<u8>], start: &(dyn Fn(usize) -> usize + Sync), f: F) -> Result<(), Fail>
where
    F: Fn(Range<usize>, &mut [u8]) -> Result<(), Fail> + Sync,
{
    let (threads, pool) = current();
    let big = n >= PARALLEL_MIN_CELLS || (value_bytes >= PARALLEL_MIN_BYTES && n >= 2);
    let pool = match pool {
        Some(p) if big && threads > 1 => p,
        _ => return f(0..n, zeroed(out)),
    };
    let k = (threads * 4).min(n).max(1);
    let mut parts: Vec<(Range<usize>, &mut [MaybeUninit<u8>])> = Vec::with_capacity(k);
    let mut rest = out;
    let mut consumed = 0usize;
    for c in 0..k {
        let (a, b) = (n * c / k, n * (c + 1) / k);
        let end = start(b);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(end - consumed);
        consumed = end;
        rest = tail;
        parts.push((a..b, head));
    }
    let errors: Vec<Fail> = pool.install(|| {
        parts
            .into_par_iter()
            .filter_map(|(r, o)| f(r, zeroed(o)).err())
            .collect()
    });
    match errors.into_iter().min_by_key(|e| e.row) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
