//! The `crmcube` binary: parse arguments, run the command, map errors to exit codes.
//!
//! Memory comes from mimalloc (as in DataFusion's own CLI): it returns the pages of freed
//! tables to the system, where glibc's allocator kept a 10 M-line load at its high-water mark.
//! How it returns them was measured (`perf record` of a load: 21–27 % of all CPU samples were
//! the kernel zeroing pages, `clear_page_erms`, behind page faults):
//! - it is built without transparent huge pages (the `no_thp` feature): each first touch of a
//!   2 MiB huge page zeroed all of it, and a freed one was faulted in and zeroed again;
//! - without a memory bound (`--memory-limit`, `serve --query-memory`) freed pages are given
//!   back lazily (`MADV_FREE`: the kernel takes them when it needs them, and until then the next
//!   table reuses them without a fault) instead of at once (`MADV_DONTNEED`). Under a bound they
//!   go back at once, so that the RSS stays near the bound.
//!
//! Measured back to back at 10 M order lines (`/usr/bin/time`, the same build with and without
//! the feature; a bound of 100,000 MiB to get `MADV_DONTNEED` without limiting anything):
//!
//! | | huge pages, DONTNEED (before) | huge pages, FREE | no huge pages, DONTNEED | no huge pages, FREE |
//! |---|---|---|---|---|
//! | 1 % night | 22.6 s, 3.6 GB | 20.0 s, 3.6 GB | 17.4–18.2 s, 3.2 GB | 18.2–20.3 s, 3.3 GB |
//! | full load | 84.9–85.5 s, 7.1 GB | | 90.4 s, 6.9 GB | 75.3–78.8 s, 8.0–8.2 GB |
//!
//! The full load's peak RSS under `MADV_FREE` counts the pages freed lazily, which the kernel
//! takes back when it needs them. Repeated, the full load varied more than these differences:
//! 75–83 s run by hand and 79–88 s in `cargo bench --bench load`, with the kernel's time from 15
//! to 25 s (this machine's kernel also reclaims cold pages on its own, which lazily freed pages
//! are).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_decommits` (index 5 of `mi_option_t` in mimalloc.h, v2 and v3;
/// the sys crate names no constant for it): 1 purges freed memory with `MADV_DONTNEED`, 0 with
/// `MADV_FREE`.
const PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

fn main() {
    std::process::exit(crmcube::cli::main_with(|bounded| {
        if !bounded {
            // SAFETY: sets a global option of the allocator; mimalloc reads it at each purge.
            unsafe { libmimalloc_sys::mi_option_set(PURGE_DECOMMITS, 0) }
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_decommits_is_the_option_set() {
        // Its documented default is 1; the index names it if setting it reads back.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DECOMMITS), 1);
            libmimalloc_sys::mi_option_set(PURGE_DECOMMITS, 0);
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DECOMMITS), 0);
        }
    }
}
