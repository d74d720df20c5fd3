//! The binary's global allocator: jemalloc with one arena and a background
//! thread that purges unused pages within about a second (see `main.rs` for
//! the evidence), or, built with one of the `alloc-*` features, a candidate
//! `benches/rss_return.rs` compares it with.
//!
//! Why these jemalloc settings (`_rjem_malloc_conf`, read at its first
//! allocation; `_RJEM_MALLOC_CONF` in the environment overrides them):
//! - `background_thread:true`: an idle relay (every client gone) makes no
//!   allocations that would drive jemalloc's decay; its background thread
//!   purges anyway, so closed clients' memory goes back to the system;
//! - `dirty_decay_ms:1000,muzzy_decay_ms:0`: freed pages are returned
//!   (`MADV_DONTNEED`, which lowers RSS at once; `MADV_FREE` does not until
//!   the kernel needs the memory) about a second after they fall idle;
//! - `narenas:1`: the hub builds frames on whichever tokio worker it runs
//!   on and the writers free them on theirs; with an arena per thread,
//!   memory freed in one arena is not reused by the next allocation in the
//!   other, and under 1,000 stalled readers the peak was up to 2.5× the
//!   outbox budget (docs/memory-bench.md). The thread caches in front of the
//!   arena keep its lock off the common path.
//!
//! Only the binary installs an allocator; the library, its tests and the
//! benches use the default one.

// The candidates, should several features be on (`--all-features`):
// mimalloc, else glibc (plus the trim thread with `alloc-trim`).

/// The allocator type.
#[cfg(not(any(feature = "alloc-glibc", feature = "alloc-trim", feature = "alloc-mimalloc")))]
pub(crate) type Allocator = tikv_jemallocator::Jemalloc;
/// The allocator.
#[cfg(not(any(feature = "alloc-glibc", feature = "alloc-trim", feature = "alloc-mimalloc")))]
pub(crate) const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;

/// The allocator type (candidate: glibc malloc).
#[cfg(all(any(feature = "alloc-glibc", feature = "alloc-trim"), not(feature = "alloc-mimalloc")))]
pub(crate) type Allocator = std::alloc::System;
/// The allocator.
#[cfg(all(any(feature = "alloc-glibc", feature = "alloc-trim"), not(feature = "alloc-mimalloc")))]
pub(crate) const ALLOCATOR: Allocator = std::alloc::System;

/// The allocator type (candidate: mimalloc).
#[cfg(feature = "alloc-mimalloc")]
pub(crate) type Allocator = mimalloc::MiMalloc;
/// The allocator.
#[cfg(feature = "alloc-mimalloc")]
pub(crate) const ALLOCATOR: Allocator = mimalloc::MiMalloc;

/// A `const char *` for jemalloc to read.
#[cfg(not(any(feature = "alloc-glibc", feature = "alloc-trim", feature = "alloc-mimalloc")))]
#[repr(transparent)]
pub(crate) struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to an immutable, 'static C string.
#[cfg(not(any(feature = "alloc-glibc", feature = "alloc-trim", feature = "alloc-mimalloc")))]
unsafe impl Sync for MallocConf {}

/// jemalloc's options (the prefixed build's `malloc_conf`).
#[cfg(not(any(feature = "alloc-glibc", feature = "alloc-trim", feature = "alloc-mimalloc")))]
#[export_name = "_rjem_malloc_conf"]
pub(crate) static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// Starts what the allocator needs besides itself: for the `alloc-trim`
/// candidate, a thread calling `malloc_trim(0)` every second; nothing
/// otherwise.
pub(crate) fn start() {
    #[cfg(feature = "alloc-trim")]
    std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        })
        .map(drop)
        .unwrap_or_else(|err| eprintln!("walcast: cannot start the malloc-trim thread: {err}"));
}
