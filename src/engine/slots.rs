//! Per-host migration slots: at most N migrations run at once (Hyper-V's default
//! is 2); further requests wait in FIFO order.
//!
//! A ticket lock on a counting semaphore: each request takes the next ticket, and
//! a request may start only when its ticket is the oldest waiting one and a slot is
//! free, so no request overtakes an older one. Waiting honours the migration's
//! [`CancelToken`]: a cancelled request leaves the queue without ever running.
//!
//! Bandwidth sharing between concurrent migrations is left to TCP: each migration
//! has its own streams and TCP's congestion control shares a link fairly between
//! flows with the same RTT (`livemig bench --concurrent N` measures it).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{CancelToken, MigrationError};

#[derive(Debug)]
struct State {
    limit: usize,
    running: usize,
    next_ticket: u64,
    queue: VecDeque<u64>,
}

/// A host's migration slots. Share one `Arc<HostSlots>` between migrations.
#[derive(Debug)]
pub struct HostSlots {
    state: Mutex<State>,
    cv: Condvar,
}

/// Hyper-V's default number of simultaneous live migrations per host.
pub const DEFAULT_HOST_SLOTS: usize = 2;

impl Default for HostSlots {
    fn default() -> Self {
        Self::new(DEFAULT_HOST_SLOTS)
    }
}

impl HostSlots {
    /// At most `limit` (≥ 1) migrations at once.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                limit: limit.max(1),
                running: 0,
                next_ticket: 0,
                queue: VecDeque::new(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Migrations running now.
    pub fn running(&self) -> usize {
        self.state.lock().expect("slots lock").running
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.state.lock().expect("slots lock").queue.len()
    }

    /// Wait (FIFO) for a slot; `Err(Cancelled)` if `cancel` fires while waiting.
    pub fn acquire(self: &Arc<Self>, cancel: &CancelToken) -> Result<SlotGuard, MigrationError> {
        let mut st = self.state.lock().expect("slots lock");
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(ticket);
        loop {
            if cancel.is_cancelled() {
                st.queue.retain(|&t| t != ticket);
                drop(st);
                self.cv.notify_all();
                return Err(MigrationError::Cancelled);
            }
            if st.queue.front() == Some(&ticket) && st.running < st.limit {
                st.queue.pop_front();
                st.running += 1;
                drop(st);
                // The next in line may also fit.
                self.cv.notify_all();
                return Ok(SlotGuard {
                    slots: self.clone(),
                });
            }
            // Wake periodically to notice cancellation (the token has no waker).
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .expect("slots lock")
                .0;
        }
    }
}

/// A held slot; released on drop.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Arc<HostSlots>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().expect("slots lock");
        st.running -= 1;
        drop(st);
        self.slots.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_serves_in_order() {
        let c = CancelToken::new();
        let two = Arc::new(HostSlots::new(2));
        let (_a, _b) = (two.acquire(&c).unwrap(), two.acquire(&c).unwrap());
        assert_eq!(two.running(), 2);

        let slots = Arc::new(HostSlots::new(1));
        let held = slots.acquire(&c).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..3 {
            // Enqueue one at a time so tickets are taken in order i = 0, 1, 2.
            let before = slots.waiting();
            let (s, o, c) = (slots.clone(), order.clone(), c.clone());
            waiters.push(std::thread::spawn(move || {
                let g = s.acquire(&c).unwrap();
                o.lock().unwrap().push(i);
                drop(g);
            }));
            while slots.waiting() == before {
                std::thread::yield_now();
            }
        }
        assert_eq!(slots.running(), 1);
        drop(held);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(slots.running(), 0);
    }

    #[test]
    fn cancelled_waiter_leaves_the_queue() {
        let slots = Arc::new(HostSlots::new(1));
        let c = CancelToken::new();
        let held = slots.acquire(&c).unwrap();
        let cancel = CancelToken::new();
        let s = slots.clone();
        let c2 = cancel.clone();
        let w = std::thread::spawn(move || s.acquire(&c2).map(|_| ()));
        while slots.waiting() == 0 {
            std::thread::yield_now();
        }
        cancel.cancel();
        assert!(matches!(w.join().unwrap(), Err(MigrationError::Cancelled)));
        assert_eq!(slots.waiting(), 0);
        drop(held);
        assert!(slots.acquire(&c).is_ok());
    }
}
