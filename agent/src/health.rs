//! Liveness and readiness state behind `/healthz` and `/readyz`.
//!
//! Liveness is the process answering at all. Readiness is a latch: it flips once, after the
//! first successful sync (agent) or self-test run (`selftest --serve`), and never flips back,
//! so a transient watch error does not take the pod out of its Service and restart a scrape
//! gap; the metrics themselves say how fresh the data is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared readiness latch. Clones share the same state.
#[derive(Clone, Debug, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// Marks the process ready; later calls are no-ops.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latch_is_shared_by_clones_and_stays_set() {
        let h = Health::new();
        let seen_by_server = h.clone();
        assert!(!seen_by_server.is_ready());
        h.mark_ready();
        h.mark_ready();
        assert!(seen_by_server.is_ready());
    }
}
