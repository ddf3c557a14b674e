//! The receiver's round gate: no stream applies round r+1 before every stream
//! finished round r (mirrors the sender's barrier).

use std::sync::{Condvar, Mutex};

#[derive(Debug)]
struct State {
    round: u32,
    arrived: usize,
    aborted: bool,
}

/// Abortable round barrier for `n` streams.
#[derive(Debug)]
pub struct RoundGate {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl RoundGate {
    /// Gate for `n` streams, starting at round 0.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            state: Mutex::new(State {
                round: 0,
                arrived: 0,
                aborted: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// This stream finished `round`; wait for the others. Err if aborted or if the
    /// round is not the one in progress.
    pub fn arrive(&self, round: u32) -> Result<(), &'static str> {
        let mut s = self.state.lock().expect("gate lock");
        if s.aborted {
            return Err("aborted");
        }
        if round != s.round {
            return Err("round end out of order");
        }
        s.arrived += 1;
        if s.arrived == self.n {
            s.round += 1;
            s.arrived = 0;
            self.cv.notify_all();
            return Ok(());
        }
        while s.round == round && !s.aborted {
            s = self.cv.wait(s).expect("gate lock");
        }
        if s.aborted {
            Err("aborted")
        } else {
            Ok(())
        }
    }

    /// Wake every waiter with an error.
    pub fn abort(&self) {
        self.state.lock().expect("gate lock").aborted = true;
        self.cv.notify_all();
    }

    /// Rounds completed by all streams.
    pub fn rounds_done(&self) -> u32 {
        self.state.lock().expect("gate lock").round
    }
}
