//! Allocator settings for the training step.
//!
//! The binaries use mimalloc. By default it returns freed memory to the OS 1 s after
//! it was freed (10 s for its arenas), so the activations a training step frees in its
//! backward are unmapped and the next step's forward faults them in again: the kernel
//! zeroes every new page (`clear_page_erms` was 14% of a SmolLM2 f32 step in `perf`;
//! the GEMMs writing fresh outputs took the faults). A training step reuses the same
//! sizes every step, so keeping freed memory mapped costs nothing at peak RSS (the peak
//! is reached every step anyway) and measured +3-8% tokens/s (BENCHMARKS.md, round 2).

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (mimalloc.h: the 16th entry).
/// libmimalloc-sys 0.1.49 names only the older options.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped for a minute before mimalloc may return it to the OS (a
/// long-lived `serve` still shrinks when idle). `MIMALLOC_PURGE_DELAY` set by the user
/// wins. Does nothing when the linked mimalloc is not v3 (`mi_version` 3xxyy; the option index differs in v2).
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: plain FFI calls into mimalloc's option table; valid at any time.
    unsafe {
        if (30_000..40_000).contains(&libmimalloc_sys::mi_version()) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 60_000);
        }
    }
}
