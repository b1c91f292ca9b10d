//! The process's allocator, and handing freed memory back to the system.
//!
//! libtorch allocates every CPU tensor with `posix_memalign` and frees it as soon as the tensor
//! goes. Under glibc's malloc (the default build) a training step's churn of megabyte tensors
//! stays in the process: glibc raises its mmap threshold to the largest block freed so far, so
//! later tensors come from the heap, which fragments (measured: a packed SmolLM2 trainer's RSS
//! held ~0.44 GB of freed memory at the end of a backward). Asking glibc to return memory as it
//! goes (`MALLOC_MMAP_THRESHOLD_` of 1 MiB, `MALLOC_TRIM_THRESHOLD_`) halves training speed, every
//! tensor then paying its page faults. [`release_free_memory`] returns it at chosen points
//! instead: the trainer calls it between the phases of a recomputed step and when a job ends.
//!
//! With the `jemalloc` feature, jemalloc is the allocator of the whole process: linked
//! unprefixed, its `malloc`, `free`, `posix_memalign`, ... are the executable's, which come first
//! in the dynamic linker's lookup, so libtorch's and libstdc++'s calls bind to them too
//! ([`serves_libtorch`] checks that). It keeps freed pages in size-classed runs for reuse, and a
//! packed trainer peaked at ~0.93 GB at the same speed. It is not the default: serving under it
//! peaked at 2030-2149 MiB against 1369-1370 under glibc (bench_engine, packed SmolLM2, 1 and 32
//! streams, six alternating runs each), and single-stream decode measured a median 72 against 80
//! tokens/s (ranges 60-83 and 61-84).

#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`MALLOC_CONF` in the environment still overrides them).
///
/// * `dirty_decay_ms:-1,muzzy_decay_ms:-1`: freed pages stay for reuse instead of going back to
///   the system on a timer. With the default 10 s decay a packed trainer's step re-faulted its
///   pages and trained ~20% slower (55 against 70 tokens/s on SmolLM2, 2 threads); Tessera hands
///   them back itself when a job ends ([`release_free_memory`]).
/// * `oversize_threshold:0`: no separate arena for blocks of 8 MiB and more (attention scores,
///   logits, a dequantised head), so they reuse the same runs as the rest: ~100 MiB lower peak.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static malloc_conf: Option<&'static u8> =
    Some(&b"dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0\0"[0]);

/// The allocator serving this process: `"jemalloc"` when jemalloc's `posix_memalign` is the one
/// the dynamic linker hands libraries (so libtorch's tensors live in it), `"system"` otherwise.
pub fn name() -> &'static str {
    if serves_libtorch() {
        "jemalloc"
    } else {
        "system"
    }
}

/// Whether a shared library (libtorch, which allocates tensors with `posix_memalign`) calling
/// `posix_memalign` or `free` reaches jemalloc: the symbols the dynamic linker resolves first in
/// the global scope are jemalloc's.
pub fn serves_libtorch() -> bool {
    #[cfg(all(feature = "jemalloc", target_os = "linux"))]
    {
        let lookup = |name: &std::ffi::CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads the loaded
            // objects' symbol tables.
            unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) as usize }
        };
        lookup(c"posix_memalign") == tikv_jemalloc_sys::posix_memalign as *const () as usize
            && lookup(c"free") == tikv_jemalloc_sys::free as *const () as usize
    }
    #[cfg(not(all(feature = "jemalloc", target_os = "linux")))]
    {
        false
    }
}

/// Hands the memory the allocator keeps for reuse back to the system: jemalloc's dirty and muzzy
/// pages of every arena, or glibc's free heap pages (`malloc_trim`). Called after a training job,
/// whose activations and dequantised layers are gone. Costs a page fault per page on next use,
/// so not for a hot path.
pub fn release_free_memory() {
    #[cfg(all(feature = "jemalloc", target_os = "linux"))]
    {
        // MALLCTL_ARENAS_ALL: "arena.<i>.purge" for every arena at once.
        let name = c"arena.4096.purge";
        // SAFETY: a NUL-terminated control name with no value read or written.
        let r = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if r != 0 {
            tracing::debug!(error = r, "jemalloc did not purge its free pages");
        }
    }
    #[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks glibc's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process (Linux), in bytes.
    #[cfg(target_os = "linux")]
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[cfg(all(feature = "jemalloc", target_os = "linux"))]
    #[test]
    fn libtorch_allocates_through_jemalloc() {
        assert!(
            serves_libtorch(),
            "libraries would bind to another allocator"
        );
        assert_eq!(name(), "jemalloc");
        // A tensor's buffer is a jemalloc allocation: jemalloc knows its size (at least the
        // tensor's bytes), which it could not for memory from another allocator.
        let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
        let ptr = t.data_ptr();
        // SAFETY: `ptr` is the start of the tensor's live storage, allocated by libtorch's CPU
        // allocator (posix_memalign), which the assertion above shows is jemalloc's.
        let usable = unsafe { tikv_jemalloc_sys::malloc_usable_size(ptr) };
        assert!(usable >= 4 << 20, "usable size {usable}");
    }

    #[cfg(all(feature = "jemalloc", target_os = "linux"))]
    #[test]
    fn our_options_are_the_ones_jemalloc_runs_with() {
        let read = |name: &std::ffi::CStr| {
            let mut value: isize = 0;
            let mut len = std::mem::size_of::<isize>();
            // SAFETY: reads one ssize_t/size_t option into `value`, whose size `len` gives.
            let r = unsafe {
                tikv_jemalloc_sys::mallctl(
                    name.as_ptr(),
                    &mut value as *mut isize as *mut std::ffi::c_void,
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                )
            };
            assert_eq!(r, 0, "{name:?}");
            value
        };
        if std::env::var_os("MALLOC_CONF").is_none() {
            assert_eq!(read(c"opt.dirty_decay_ms"), -1);
            assert_eq!(read(c"opt.muzzy_decay_ms"), -1);
            assert_eq!(read(c"opt.oversize_threshold"), 0);
        }
    }

    #[cfg(not(feature = "jemalloc"))]
    #[test]
    fn the_default_build_runs_on_the_system_allocator() {
        assert!(!serves_libtorch());
        assert_eq!(name(), "system");
    }

    /// Freed tensors' pages go back to the system when asked, and live tensors keep their values.
    #[cfg(target_os = "linux")]
    #[test]
    fn freed_memory_goes_back_to_the_system() {
        let kept = tch::Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
        // glibc serves blocks above its mmap threshold with mmap (returned at free); freeing one
        // such block raises the threshold past it, as a trainer's first step does.
        drop(tch::Tensor::ones(
            [2 << 20],
            (tch::Kind::Float, tch::Device::Cpu),
        ));
        // Many mid-sized tensors (below glibc's mmap threshold once it has risen), written so
        // their pages are resident, then freed in an order that leaves holes below live ones.
        let mut live = Vec::new();
        let mut freed = Vec::new();
        for i in 0..192 {
            let t = tch::Tensor::ones([64 << 10], (tch::Kind::Float, tch::Device::Cpu));
            if i % 16 == 15 {
                live.push(t);
            } else {
                freed.push(t);
            }
        }
        drop(freed);
        let before = rss();
        release_free_memory();
        let after = rss();
        // 180 freed tensors of 256 KiB: at least a third of those 45 MiB must leave.
        assert!(
            before.saturating_sub(after) >= 15 << 20,
            "resident {before} before, {after} after release"
        );
        assert_eq!(
            kept.sum(tch::Kind::Double).double_value(&[]),
            (1 << 20) as f64
        );
        drop(live);
    }
}
