//! The sender's round gate: the round loop waits until every page-stream worker
//! wrote its `RoundEnd`, with a deadline, and any worker failure (an error or a
//! panic) aborts the wait at once. Workers never block on it, so a worker that
//! died cannot leave the loop waiting for a missing party.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State {
    /// Workers that finished the current round.
    arrived: usize,
    aborted: bool,
}

/// Why [`SendGate::wait`] returned without every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateError {
    /// A worker failed ([`SendGate::abort`]).
    Aborted,
    /// `stop` asked to stop waiting (cancel, a peer gone silent).
    Stopped,
    /// No worker arrived and no byte moved for the stall limit.
    Stalled(Duration),
}

/// Round gate for `n` workers.
#[derive(Debug)]
pub struct SendGate {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
    poll: Duration,
}

/// How often a waiting round loop looks at its stop condition and progress.
const POLL: Duration = Duration::from_millis(20);

impl SendGate {
    /// A gate for `n` workers.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            state: Mutex::new(State {
                arrived: 0,
                aborted: false,
            }),
            cv: Condvar::new(),
            poll: POLL,
        }
    }

    /// A gate that looks at its stop condition every `poll` (tests).
    #[cfg(test)]
    fn with_poll(n: usize, poll: Duration) -> Self {
        Self {
            poll,
            ..Self::new(n)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker finished the round (never blocks).
    pub fn arrive(&self) {
        let mut s = self.lock();
        s.arrived += 1;
        self.cv.notify_all();
    }

    /// Wake the waiter with an error; later waits fail at once.
    pub fn abort(&self) {
        self.lock().aborted = true;
        self.cv.notify_all();
    }

    /// Make ready for new workers after a resumption: nobody arrived, not aborted.
    /// Call only when no worker of the old streams runs.
    pub fn reopen(&self) {
        let mut s = self.lock();
        s.arrived = 0;
        s.aborted = false;
    }

    /// Wait until every worker arrived, then open the next round. Gives up when
    /// aborted, when `stop()` says so, or when `progress()` (a counter of bytes
    /// written) stays unchanged for `stall` and no worker arrives meanwhile.
    pub fn wait(
        &self,
        stall: Duration,
        mut stop: impl FnMut() -> bool,
        mut progress: impl FnMut() -> u64,
    ) -> Result<(), GateError> {
        let mut s = self.lock();
        let mut last = (progress(), s.arrived, Instant::now());
        loop {
            // Checked under the lock right before each wait: a worker arriving
            // while the lock was let go (for `stop` and `progress`) is seen here,
            // not missed until the next poll.
            if s.aborted {
                return Err(GateError::Aborted);
            }
            if s.arrived >= self.n {
                s.arrived = 0;
                return Ok(());
            }
            s = self
                .cv
                .wait_timeout(s, self.poll)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if s.aborted || s.arrived >= self.n {
                continue;
            }
            drop(s);
            if stop() {
                return Err(GateError::Stopped);
            }
            let p = progress();
            s = self.lock();
            if p != last.0 || s.arrived != last.1 {
                last = (p, s.arrived, Instant::now());
            } else if last.2.elapsed() >= stall {
                return Err(GateError::Stalled(stall));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn opens_when_all_arrive_and_resets() {
        let g = Arc::new(SendGate::new(2));
        for _ in 0..2 {
            let g2 = g.clone();
            std::thread::spawn(move || g2.arrive());
        }
        g.wait(Duration::from_secs(5), || false, || 0)
            .expect("every worker arrived");
        g.arrive();
        assert_eq!(
            g.wait(Duration::from_millis(60), || false, || 0),
            Err(GateError::Stalled(Duration::from_millis(60))),
            "one of two workers is not a full round"
        );
    }

    #[test]
    fn abort_and_stop_end_the_wait() {
        let g = Arc::new(SendGate::new(3));
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.wait(Duration::from_secs(30), || false, || 0));
        std::thread::sleep(Duration::from_millis(30));
        g.abort();
        assert_eq!(h.join().unwrap(), Err(GateError::Aborted));
        let g = SendGate::new(1);
        assert_eq!(
            g.wait(Duration::from_secs(30), || true, || 0),
            Err(GateError::Stopped)
        );
    }

    #[test]
    fn a_worker_arriving_while_the_waiter_polls_is_not_missed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // One worker arrives and wakes the waiter; the last one arrives while the
        // waiter has let go of the lock (here: inside `stop`). A waiter that then
        // slept on the condition variable without looking again would wait out a
        // whole poll (a minute here).
        let g = Arc::new(SendGate::with_poll(2, Duration::from_secs(60)));
        let first_arriving = Arc::new(AtomicBool::new(false));
        let first = {
            let (g, flag) = (g.clone(), first_arriving.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                flag.store(true, Ordering::SeqCst);
                g.arrive();
            })
        };
        let t = Instant::now();
        let mut last_arrived = false;
        let r = g.wait(
            Duration::from_secs(120),
            || {
                if first_arriving.load(Ordering::SeqCst) && !last_arrived {
                    last_arrived = true;
                    g.arrive();
                }
                false
            },
            || 0,
        );
        first.join().unwrap();
        assert_eq!(r, Ok(()));
        assert!(last_arrived, "the last worker arrived inside `stop`");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the waiter missed the arrival and slept for {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn progress_defers_the_stall() {
        let g = SendGate::new(1);
        let mut n = 0u64;
        let t = Instant::now();
        let r = g.wait(
            Duration::from_millis(50),
            || t.elapsed() > Duration::from_millis(300),
            || {
                n += 1;
                n
            },
        );
        assert_eq!(r, Err(GateError::Stopped), "bytes kept moving: no stall");
    }
}
