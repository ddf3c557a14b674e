//! The drain before the pause: the source asks the destination to answer once it
//! has applied every round sent (`Drain` / `Drained`, capability `drain`).
//!
//! The source's rounds end when their pages are written to the sockets, not when
//! the destination has applied them. Between the two sit the socket buffers (tens
//! of MiB on a fast link) and, into fresh destination memory, the page faults of
//! everything not yet written. Paused onto that backlog, the VM would wait for it
//! inside the downtime, and no prediction made from the source's send rate covers
//! it. So before pausing, the source waits (its VM still running) for the
//! destination to catch up, and the policy decides again on a prediction that
//! counts what the VM is expected to have dirtied meanwhile (see `precopy`).

use std::time::{Duration, Instant};

use super::control::{ControlLink, Heartbeat};
use super::run::PrecopyRun;
use super::MigrationError;
use crate::stats::Event;
use crate::wire::{ControlMsg, ProtocolViolation};

/// The destination's answer to `Drain`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainAnswer {
    /// Every page of the rounds sent is applied.
    pub applied: bool,
    /// How long the source waited, from sending `Drain` to the answer.
    pub waited: Duration,
    /// The round trip itself: `waited` less the destination's own wait for its
    /// rounds (what it reported), i.e. the time both sides' threads took to pass
    /// the question and the answer on this host right now.
    pub round_trip: Duration,
    /// How long the VM ran from the drain's start (taking the control stream
    /// back from the heartbeat thread included) to the answer: what it dirtied
    /// meanwhile joins the final set.
    pub vm_ran: Duration,
    /// The destination found its host's CPUs busy with other processes.
    pub host_busy: bool,
}

/// How long one read waits before the cancel flag is looked at again.
const SLICE: Duration = Duration::from_millis(20);

/// The destination answers within its own bounded wait (one second at most);
/// this is what the source allows beyond its peer timeout before giving up.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

impl PrecopyRun<'_> {
    /// Send `Drain { round }` and wait for `Drained`. The heartbeat thread must be
    /// stopped (the link is the caller's).
    pub(crate) fn drain(&mut self, round: u32) -> Result<DrainAnswer, MigrationError> {
        const PHASE: &str = "drain";
        let deadline_after = self.migration.config.peer_timeout + ANSWER_GRACE;
        let cancel = self.migration.cancel.clone();
        let started = Instant::now();
        let link = self.control()?;
        let t = Instant::now();
        link.send(&ControlMsg::Drain { round }, &[])
            .map_err(|source| MigrationError::Transport {
                phase: PHASE,
                source,
            })?;
        let deadline = t + deadline_after;
        loop {
            if cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::TimedOut {
                    what: "the destination's answer to Drain",
                    after: deadline_after,
                });
            }
            match link.poll(left.min(SLICE)) {
                Ok(None) => {}
                // Answers to heartbeats sent before the link was handed back.
                Ok(Some((ControlMsg::Heartbeat { .. }, _))) => {}
                Ok(Some((
                    ControlMsg::Drained {
                        round: r,
                        applied,
                        waited_us,
                        host_busy,
                    },
                    _,
                ))) if r == round => {
                    let waited = t.elapsed();
                    return Ok(DrainAnswer {
                        applied,
                        waited,
                        round_trip: waited.saturating_sub(Duration::from_micros(waited_us)),
                        vm_ran: started.elapsed(),
                        host_busy,
                    });
                }
                Ok(Some((ControlMsg::Error { message }, _))) => {
                    return Err(MigrationError::Remote(message.into()))
                }
                Ok(Some((other, _))) => {
                    return Err(MigrationError::Protocol {
                        phase: PHASE,
                        violation: ProtocolViolation::Unexpected {
                            expected: "drained",
                            got: other.name(),
                        },
                    })
                }
                Err(source) => {
                    return Err(MigrationError::Transport {
                        phase: PHASE,
                        source,
                    })
                }
            }
        }
    }

    /// Pages the VM is expected to have dirtied during the drain (the model's
    /// dirty rate × the time the VM ran since the drain began), reported in
    /// `Event::Drained`. They are not harvested here: the final harvest (or the
    /// next round's) collects them, so the tracker and the sampled audit keep
    /// their cadence of one harvest per round.
    pub(crate) fn drained(&mut self, round: u32, answer: &DrainAnswer) -> u64 {
        let rate = self.est.dirty_rate.get().unwrap_or(0.0);
        let expected = (rate * answer.vm_ran.as_secs_f64()).ceil() as u64;
        self.emit(Event::Drained {
            round,
            applied: answer.applied,
            waited_ms: answer.waited.as_secs_f64() * 1e3,
            expected_dirty_pages: expected,
        });
        expected
    }

    /// Hand the control stream back to a heartbeat thread (the rounds go on).
    pub(crate) fn restart_heartbeat(&mut self) -> Result<(), MigrationError> {
        self.control()?;
        let link: ControlLink = self.link.take().ok_or(MigrationError::Protocol {
            phase: "control",
            violation: ProtocolViolation::ControlLost("no control stream to hand back"),
        })?;
        let c = &self.migration.config;
        let interval = c
            .heartbeat_interval
            .min(c.peer_timeout / 4)
            .max(Duration::from_millis(1));
        self.heartbeat = Some(Heartbeat::start(link, interval, c.peer_timeout));
        Ok(())
    }
}
