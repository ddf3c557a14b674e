//! The receiver's round gate: no stream applies round r+1 before every stream
//! finished round r (mirrors the sender's barrier).
//!
//! The gate also keeps the streams consistent with each other, because the
//! receiver's unsafe page writes rely on it (see `apply.rs`): every stream must
//! report the same round, a round beyond `max_rounds` is refused, and a stream that
//! ends (`StreamEnd`) fixes the number of rounds for all of them. A stream still
//! waiting for a round that the ended stream will never finish fails at once with
//! an error naming the ended stream, instead of waiting forever.

use std::sync::{Condvar, Mutex};

/// Why a stream could not pass the gate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// Another stream failed (or the control stream aborted).
    #[error("aborted")]
    Aborted,
    /// A round end for a round other than the one in progress.
    #[error("round end {got} arrived while round {current} is in progress")]
    OutOfOrder {
        /// The stream's round.
        got: u32,
        /// The gate's round.
        current: u32,
    },
    /// The source ran more rounds than this receiver allows.
    #[error("round {round} exceeds this receiver's limit of {max} rounds")]
    TooManyRounds {
        /// The round that ended.
        round: u32,
        /// The limit.
        max: u32,
    },
    /// A stream ended while this one still runs rounds.
    #[error("page stream {stream} ended after {rounds} round(s) while this stream still sends round {round}")]
    StreamEnded {
        /// The stream that ended.
        stream: u16,
        /// Rounds it completed.
        rounds: u32,
        /// The round this stream is in.
        round: u32,
    },
    /// A stream ended after a different number of rounds than another.
    #[error("page stream {stream} ended after {rounds} round(s), page stream {other} after {other_rounds}")]
    EndMismatch {
        /// This stream.
        stream: u16,
        /// Its rounds.
        rounds: u32,
        /// The stream that ended first.
        other: u16,
        /// Its rounds.
        other_rounds: u32,
    },
    /// A stream ended before completing any round (the final round comes first).
    #[error("page stream {0} ended before any round was complete")]
    EndBeforeFinalRound(u16),
}

#[derive(Debug)]
struct State {
    round: u32,
    arrived: usize,
    aborted: bool,
    /// The first stream that ended, and the rounds it completed.
    ended: Option<(u16, u32)>,
    ended_count: usize,
}

/// Abortable round barrier for `n` streams.
#[derive(Debug)]
pub struct RoundGate {
    n: usize,
    max_rounds: u32,
    state: Mutex<State>,
    cv: Condvar,
}

impl RoundGate {
    /// Gate for `n` streams, starting at round 0, allowing rounds `0..max_rounds`.
    pub fn new(n: usize, max_rounds: u32) -> Self {
        Self {
            n,
            // Stamps store `round + 1` in a u32 (see `apply::claim_pages`).
            max_rounds: max_rounds.min(u32::MAX - 1),
            state: Mutex::new(State {
                round: 0,
                arrived: 0,
                aborted: false,
                ended: None,
                ended_count: 0,
            }),
            cv: Condvar::new(),
        }
    }

    /// This stream finished `round`; wait for the others. Err if aborted, if the
    /// round is not the one in progress, if it is past the limit, or if a stream
    /// ended so that this round can never complete.
    pub fn arrive(&self, round: u32) -> Result<(), GateError> {
        let mut s = self.state.lock().expect("gate lock");
        if s.aborted {
            return Err(GateError::Aborted);
        }
        if round != s.round {
            return Err(GateError::OutOfOrder {
                got: round,
                current: s.round,
            });
        }
        if round >= self.max_rounds {
            return Err(GateError::TooManyRounds {
                round,
                max: self.max_rounds,
            });
        }
        if let Some((stream, rounds)) = s.ended {
            return Err(GateError::StreamEnded {
                stream,
                rounds,
                round,
            });
        }
        s.arrived += 1;
        if s.arrived == self.n {
            s.round += 1;
            s.arrived = 0;
            self.cv.notify_all();
            return Ok(());
        }
        while s.round == round && !s.aborted && s.ended.is_none() {
            s = self.cv.wait(s).expect("gate lock");
        }
        if s.aborted {
            return Err(GateError::Aborted);
        }
        match s.ended {
            Some((stream, rounds)) if s.round == round => Err(GateError::StreamEnded {
                stream,
                rounds,
                round,
            }),
            _ => Ok(()),
        }
    }

    /// Stream `stream` sent `StreamEnd` after completing `rounds` rounds. Valid
    /// only after at least one round and with the same count as every other
    /// stream; waiters of a round that can no longer complete are woken and fail.
    pub fn end(&self, stream: u16, rounds: u32) -> Result<(), GateError> {
        let mut s = self.state.lock().expect("gate lock");
        if s.aborted {
            return Err(GateError::Aborted);
        }
        if rounds == 0 {
            return Err(GateError::EndBeforeFinalRound(stream));
        }
        match s.ended {
            Some((other, other_rounds)) if other_rounds != rounds => {
                return Err(GateError::EndMismatch {
                    stream,
                    rounds,
                    other,
                    other_rounds,
                })
            }
            Some(_) => {}
            None => s.ended = Some((stream, rounds)),
        }
        s.ended_count += 1;
        // Anyone waiting now waits for a round this stream will never finish.
        self.cv.notify_all();
        Ok(())
    }

    /// Wake every waiter with an error.
    pub fn abort(&self) {
        self.state.lock().expect("gate lock").aborted = true;
        self.cv.notify_all();
    }

    /// Open the gate again for a resumed session: every stream starts at `round`
    /// (the source's fresh round number), nothing aborted or ended. Call only
    /// when no stream is inside the gate (every applier has stopped).
    pub fn reopen(&self, round: u32) {
        let mut s = self.state.lock().expect("gate lock");
        *s = State {
            round,
            arrived: 0,
            aborted: false,
            ended: None,
            ended_count: 0,
        };
    }

    /// Wait until every stream completed `round` (and so every round before it),
    /// at most until `deadline`. True when it did; false when the deadline came
    /// first, or the gate aborted or a stream ended (the page streams' own errors
    /// report those).
    pub fn wait_completed(&self, round: u32, deadline: std::time::Instant) -> bool {
        let mut s = self.state.lock().expect("gate lock");
        loop {
            if s.round > round {
                return true;
            }
            if s.aborted || s.ended.is_some() {
                return false;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.cv.wait_timeout(s, left).expect("gate lock").0;
        }
    }

    /// Rounds completed by all streams.
    pub fn rounds_done(&self) -> u32 {
        self.state.lock().expect("gate lock").round
    }

    /// Whether every stream ended (after the same number of rounds).
    #[cfg(test)]
    pub fn all_ended(&self) -> bool {
        self.state.lock().expect("gate lock").ended_count == self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn wait_completed_returns_when_the_round_completes_or_at_the_deadline() {
        let g = Arc::new(RoundGate::new(2, 10));
        let soon = || std::time::Instant::now() + Duration::from_millis(30);
        assert!(!g.wait_completed(0, soon()), "nothing arrived: times out");
        let g2 = g.clone();
        let t = std::thread::spawn(move || g2.arrive(0));
        let g3 = g.clone();
        let t2 = std::thread::spawn(move || g3.arrive(0));
        assert!(g.wait_completed(0, std::time::Instant::now() + Duration::from_secs(10)));
        t.join().unwrap().unwrap();
        t2.join().unwrap().unwrap();
        assert!(!g.wait_completed(1, soon()), "round 1 has not completed");
        g.abort();
        assert!(!g.wait_completed(1, std::time::Instant::now() + Duration::from_secs(10)));
    }

    /// Both streams of a two-stream gate finish `round`.
    fn pass(g: &Arc<RoundGate>, round: u32) {
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.arrive(round));
        g.arrive(round).unwrap();
        h.join().unwrap().unwrap();
    }

    #[test]
    fn stream_end_wakes_a_waiter_with_an_error_naming_it() {
        let g = Arc::new(RoundGate::new(2, 100));
        pass(&g, 0);
        let g2 = g.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(g2.arrive(1)).unwrap());
        // Stream 1 ends after one round while stream 0 waits at round 1 (whether
        // it already waits or arrives just after, it must fail the same way).
        g.end(1, 1).unwrap();
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiter returns instead of hanging");
        let e = r.unwrap_err();
        assert_eq!(
            e,
            GateError::StreamEnded {
                stream: 1,
                rounds: 1,
                round: 1
            }
        );
        assert!(e.to_string().contains("page stream 1 ended"), "{e}");
    }

    #[test]
    fn stream_ends_must_follow_a_round_and_agree() {
        let g = Arc::new(RoundGate::new(2, 100));
        assert_eq!(g.end(0, 0), Err(GateError::EndBeforeFinalRound(0)));
        pass(&g, 0);
        pass(&g, 1);
        g.end(0, 2).unwrap();
        assert_eq!(
            g.end(1, 1),
            Err(GateError::EndMismatch {
                stream: 1,
                rounds: 1,
                other: 0,
                other_rounds: 2
            })
        );
        assert!(!g.all_ended());
        g.end(1, 2).unwrap();
        assert!(g.all_ended());
    }

    #[test]
    fn rounds_are_bounded_and_ordered() {
        let g = RoundGate::new(1, 2);
        assert_eq!(
            g.arrive(1),
            Err(GateError::OutOfOrder { got: 1, current: 0 })
        );
        g.arrive(0).unwrap();
        g.arrive(1).unwrap();
        assert_eq!(
            g.arrive(2),
            Err(GateError::TooManyRounds { round: 2, max: 2 })
        );
    }
}
