//! Giving freed heap back to the system after a storm of connections. Opening a socket
//! borrows buffers for its handshake (hyper's read and write buffers, the upgrade's
//! futures) that are freed once it is served; a storm of thousands leaves that memory free
//! inside the heap, where it still counts as the process's resident memory, and closing
//! thousands of sockets does the same with their state. The sweeper asks the allocator to
//! return free pages after such a storm, so resident memory follows what is live. And at
//! start the allocator keeps one arena per core instead of glibc's up to eight
//! ([`limit_arenas`]).

use std::sync::atomic::{AtomicBool, Ordering};

/// Connections opened or closed since the last trim that make the sweeper trim again.
pub const AFTER_CHURN: u64 = 1024;

/// When the heap is due a trim: after [`AFTER_CHURN`] connections came or went.
#[derive(Debug, Default)]
pub struct Trim {
    opened: u64,
    live: usize,
}

impl Trim {
    /// `opened`: connections ever opened; `live`: open now. True (and the counts taken as
    /// the new reference) once enough came or went since the last trim.
    pub fn due(&mut self, opened: u64, live: usize) -> bool {
        let opens = opened.saturating_sub(self.opened);
        let closes = (opens + self.live as u64).saturating_sub(live as u64);
        if opens + closes < AFTER_CHURN {
            return false;
        }
        self.opened = opened;
        self.live = live;
        true
    }
}

/// A trim is running: no other starts until it ends (each holds the
/// allocator's arena locks in turn; several at once would stall allocation).
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Returns the heap's free pages to the system off the runtime (glibc's `malloc_trim`,
/// which walks the allocator's free lists: a few milliseconds; elsewhere nothing). Nothing
/// when one is running already.
pub fn release_free_heap() {
    if RUNNING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::task::spawn_blocking(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: `malloc_trim` takes no pointers and locks each arena it trims: it is safe
        // to call from any thread at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        RUNNING.store(false, Ordering::Release);
    });
}

/// Caps glibc's malloc arenas at `cores` (the runtime's worker threads), unless
/// `MALLOC_ARENA_MAX` says otherwise. glibc gives each thread that allocates an arena of its
/// own, up to eight per core; a socket's objects, made on whichever thread ran its upgrade,
/// spread over many arenas whose free space no other arena can use. Two arenas on this
/// repository's 2-core machine: an idle widget 1.98–2.00 → 1.88–1.90 KiB at 15,000, CPU per
/// delivery and per decision unchanged (docs/benchmarks.md). Call before any thread starts.
pub fn limit_arenas(cores: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let n = libc::c_int::try_from(cores.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `mallopt` takes no pointers; it is called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, n);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = cores;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_is_due_after_a_storm_of_opens_or_closes_not_before() {
        let mut t = Trim::default();
        let n = AFTER_CHURN as usize;
        assert!(!t.due(1000, 1000), "1000 opened");
        assert!(t.due(AFTER_CHURN, n), "1024 opened");
        assert!(!t.due(AFTER_CHURN, n), "nothing since");
        assert!(!t.due(AFTER_CHURN + 10, n + 10));
        // 10 more opened, then all but 10 closed: 1034 came or went.
        assert!(t.due(AFTER_CHURN + 10, 10), "a storm of closes");
        assert!(!t.due(AFTER_CHURN + 10, 10));
        // Opened and closed in between: both count.
        assert!(t.due(AFTER_CHURN + 10 + 512, 10), "512 opened and closed");
    }
}
