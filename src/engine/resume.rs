//! Resuming a session whose connection broke during the rounds (source side;
//! docs/PROTOCOL.md, "Resumption").
//!
//! The VM keeps running and the tracker keeps tracking. The round loop's
//! [`PrecopyRun::resume`] stops the workers and the heartbeat, reconnects through the
//! migration's `Connector` (every listed address, in order) with exponential
//! backoff until [`MigrationConfig::reconnect_timeout`], and sends `Resume` with a
//! fresh round number. The destination answers which pages it holds from the
//! rounds it had not completed; every page the source last queued in such a round
//! and the destination does not hold as that round's copy is sent again, as the
//! resumed round. Pages dirtied meanwhile are in the tracker's next harvest, as
//! always. The memory digest at commit proves the result either way: a page the
//! destination claimed to hold but did not would change it.
//!
//! [`MigrationConfig::reconnect_timeout`]: super::MigrationConfig::reconnect_timeout

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::control::{ControlLink, Heartbeat};
use super::run::{PrecopyRun, Workers};
use super::{setup, CancelToken, MigrationError};
use crate::memory::PageSet;
use crate::stats::Event;
use crate::wire::resume::HeldRun;

/// First pause between reconnection attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Whether `e`, met during the rounds, is a lost connection the session can
/// resume from (as opposed to a refusal, a protocol violation, a cancel, or a
/// failure of the source itself).
pub fn is_lost_connection(e: &MigrationError) -> bool {
    match e {
        MigrationError::Transport { source, .. } => source.is_link_loss(),
        MigrationError::PageStreamLost { .. } | MigrationError::TimedOut { .. } => true,
        _ => false,
    }
}

/// The reconnection budget of one lost connection: attempts, the backoff
/// between them, and the error once the budget is spent. Used by resumption
/// and by a setup that starts over ([`super::setup::establish`]).
pub(crate) struct Retry {
    budget: Duration,
    give_up: Instant,
    backoff: Duration,
    /// Attempts made so far.
    pub attempts: u32,
}

impl Retry {
    /// A budget of `budget` from now.
    pub fn new(budget: Duration) -> Self {
        Self {
            budget,
            give_up: Instant::now() + budget,
            backoff: FIRST_BACKOFF,
            attempts: 0,
        }
    }

    /// Time left for another attempt, `None` once the budget is spent.
    pub fn left(&self) -> Option<Duration> {
        Some(self.give_up.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    /// Wait out the backoff (never past the budget) in slices, so a cancel is
    /// seen at once; the next wait is twice as long, up to [`MAX_BACKOFF`].
    pub fn back_off(&mut self, cancel: &CancelToken) {
        let wake = Instant::now()
            + self
                .backoff
                .min(self.give_up.saturating_duration_since(Instant::now()));
        while Instant::now() < wake && !cancel.is_cancelled() {
            std::thread::sleep(Duration::from_millis(10).min(wake - Instant::now()));
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The error that ends the attempts: `cause` broke the connection, `last`
    /// is the last attempt's error (none: no attempt fitted in the budget).
    pub fn failed(&self, cause: MigrationError, last: Option<MigrationError>) -> MigrationError {
        MigrationError::ReconnectFailed {
            attempts: self.attempts,
            after: self.budget,
            cause: Box::new(cause),
            last: Box::new(last.unwrap_or(MigrationError::TimedOut {
                what: "a chance to reconnect",
                after: self.budget,
            })),
        }
    }
}

impl PrecopyRun<'_> {
    /// Whether the round loop may resume after `e`.
    pub(crate) fn may_resume(&self, e: &MigrationError) -> bool {
        self.resumable && self.deadline.is_none() && is_lost_connection(e)
    }

    /// Reconnect after `cause` broke round `cut_round`, and set `to_send` to the
    /// pages the destination lacks from the rounds it did not complete. Returns
    /// the round to send them in. Fails (the VM still running) when the
    /// reconnection budget runs out, the destination refuses, or on cancel.
    pub(crate) fn resume(
        &mut self,
        cut_round: u32,
        cause: MigrationError,
        to_send: &mut PageSet,
    ) -> Result<u32, MigrationError> {
        self.emit(Event::Reconnecting {
            phase: "rounds".into(),
            round: cut_round,
            error: cause.to_string(),
        });
        // Stop everything of the broken connection: the heartbeat (its control
        // stream is dropped with it) and the workers (their streams cut).
        if let Some(hb) = self.heartbeat.take() {
            let _ = hb.stop();
        }
        self.link = None;
        self.stop_workers(true, Instant::now())?;
        let round = cut_round + 1;
        let mut retry = Retry::new(self.migration.config.reconnect_timeout);
        let mut last = None;
        let back = loop {
            if self.migration.cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let Some(left) = retry.left() else {
                return Err(retry.failed(cause, last));
            };
            retry.attempts += 1;
            let reply = left.min(self.migration.config.peer_timeout);
            match setup::reconnect(
                self.migration,
                self.connector,
                self.session_id,
                round,
                reply,
            ) {
                Ok(back) => break back,
                Err(e) if is_lost_connection(&e) => last = Some(e),
                // Refused (the destination no longer holds the session) or a
                // broken protocol: no point in trying again.
                Err(e) => return Err(retry.failed(cause, Some(e))),
            }
            retry.back_off(&self.migration.cancel);
        };
        let attempts = retry.attempts;
        let held = self.resend_set(back.complete_rounds, &back.held, to_send);
        // Only pages written whole before the break go again: the broken round's
        // pages never queued, and those queued but left in the queue or cut
        // mid-write, go now for the first time. Every round before the broken one
        // was written whole (its gate passed), so what was queued and not written
        // since the last break is this break's.
        let written = self.shared.counters.pages.load(Ordering::Relaxed);
        let unwritten = self
            .sent_total
            .saturating_sub(written)
            .saturating_sub(self.unwritten);
        self.unwritten += unwritten;
        let resent = to_send
            .count()
            .saturating_sub(self.unqueued)
            .saturating_sub(unwritten);
        self.shared.reopen(to_send.iter());
        let workers = Workers::spawn(&self.shared, back.pages);
        self.tx = Some(workers.tx);
        self.ctl = workers.ctl;
        self.handles = workers.handles;
        self.exited = workers.exited;
        self.shutdowns = workers.shutdowns;
        let interval = self
            .migration
            .config
            .heartbeat_interval
            .min(self.migration.config.peer_timeout / 4)
            .max(Duration::from_millis(1));
        self.heartbeat = Some(Heartbeat::start(
            ControlLink::new(back.control.into_stream()),
            interval,
            self.migration.config.peer_timeout,
        ));
        self.reconnects += 1;
        self.resent_pages += resent;
        self.emit(Event::Resumed {
            round,
            attempts,
            held_pages: held,
            resent_pages: resent,
        });
        Ok(round)
    }

    /// Into `out`: every page last queued in round `complete_rounds` or later
    /// that `held` does not list with that same round. Returns the pages of those
    /// rounds the destination holds.
    fn resend_set(&self, complete_rounds: u32, held: &[HeldRun], out: &mut PageSet) -> u64 {
        out.clear();
        let mut runs = held.iter().peekable();
        let mut kept = 0u64;
        for (page, &round) in self.sent_round.iter().enumerate() {
            if round < complete_rounds {
                continue;
            }
            let page = page as u64;
            while runs.peek().is_some_and(|r| r.end() <= page) {
                runs.next();
            }
            match runs.peek() {
                Some(r) if r.first <= page && r.round == round => kept += 1,
                _ => out.insert(page),
            }
        }
        kept
    }
}
