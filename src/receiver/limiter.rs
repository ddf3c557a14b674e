//! Per-host limit on simultaneous incoming migrations (Hyper-V's default is 2).
//!
//! One [`HostLimiter`] is shared (in an `Arc`) by every [`super::Receiver`] on a
//! host. A receiver takes a [`Permit`] at handshake, before anything is allocated,
//! and holds it until `run` returns; beyond the limit it refuses the source with
//! `RefuseCode::HostBusy`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Hyper-V's default number of simultaneous live migrations per host.
pub const DEFAULT_MAX_INCOMING: usize = 2;

/// Counts a host's active incoming migrations.
#[derive(Debug)]
pub struct HostLimiter {
    limit: usize,
    active: AtomicUsize,
}

impl Default for HostLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_INCOMING)
    }
}

impl HostLimiter {
    /// A limiter allowing `limit` simultaneous incoming migrations.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            active: AtomicUsize::new(0),
        }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Incoming migrations now in progress.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Take a slot, or `None` when the host is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }
}

/// One incoming migration's slot; released on drop.
#[derive(Debug)]
pub struct Permit(Arc<HostLimiter>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_and_release() {
        let l = Arc::new(HostLimiter::new(2));
        let a = l.try_acquire().expect("first");
        let b = l.try_acquire().expect("second");
        assert!(l.try_acquire().is_none());
        assert_eq!(l.active(), 2);
        drop(a);
        let c = l.try_acquire().expect("slot freed");
        drop((b, c));
        assert_eq!(l.active(), 0);
    }
}
