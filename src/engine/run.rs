//! The state one pre-copy run shares between the round loop (`precopy`), the
//! brownout, the drain and resumption: the migration, its control stream and
//! heartbeats, the page-stream workers, the estimator and the audit
//! ([`PrecopyRun`]), with the operations on them that more than one phase uses.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::control::{ControlLink, Heartbeat, LinkFailure};
use super::gate::GateError;
use super::pipeline::{
    batches_of, run_worker, Batch, SendState, WorkerCommand, WorkerFailure, QUEUE_DEPTH_PER_WORKER,
};
use super::{Migration, MigrationError, SendError};
use crate::memory::PageSet;
use crate::proof::SampledAudit;
use crate::stats::estimator::{Estimator, Prediction};
use crate::stats::progress::ProgressMeter;
use crate::stats::{Event, RoundStats};
use crate::transport::framed::FrameWriter;
use crate::transport::Connector;
use crate::wire::control::SessionId;
use crate::wire::{ControlMsg, ProtocolViolation, MAX_BATCH_PAGES};

/// How long workers get to exit after their streams were cut.
const JOIN_GRACE: Duration = Duration::from_secs(2);
/// The gate gives up when no batch completed for this many peer timeouts (a
/// stalled peer is normally caught sooner, by the streams' own deadlines).
const STALL_PEER_TIMEOUTS: u32 = 4;

/// Everything the loop and brownout share.
pub(crate) struct PrecopyRun<'a> {
    pub migration: &'a mut Migration,
    /// Where the destination is (outcome queries reconnect through it).
    pub connector: &'a dyn Connector,
    /// Session id.
    pub session_id: SessionId,
    /// The control stream, when no heartbeat thread holds it.
    pub link: Option<ControlLink>,
    /// The heartbeat thread (it holds the control stream while rounds run).
    pub heartbeat: Option<Heartbeat>,
    /// Every wait gives up at this instant (set at pause: the brownout deadline).
    pub deadline: Option<Instant>,
    pub shared: Arc<SendState>,
    pub tx: Option<Sender<Batch>>,
    pub ctl: Vec<Sender<WorkerCommand>>,
    pub handles: Vec<JoinHandle<()>>,
    /// Disconnected once every worker's thread has ended (see [`Workers`]).
    pub exited: Receiver<()>,
    pub shutdowns: Arc<Vec<Box<dyn Fn() + Send + Sync>>>,
    pub history: Vec<RoundStats>,
    pub est: Estimator,
    pub started: Instant,
    pub throttle: u8,
    pub throttle_max: u8,
    /// Monotone progress (see [`crate::stats::progress`]).
    pub meter: ProgressMeter,
    /// Pages sent so far, all rounds.
    pub sent_total: u64,
    /// Pages owed besides the round being sent (deferred hot pages).
    pub held_back: u64,
    /// The last prediction before its margin, and the margin the policy judged it with.
    pub prediction: (Prediction, f64),
    /// The sampled audit of clean pages against what was sent.
    pub audit: SampledAudit,
    /// The tracker was replaced by a safe one after the audit caught a miss.
    pub tracker_fallback: bool,
    /// The destination can resume the session after a broken connection.
    pub resumable: bool,
    /// The destination answers `Drain` before the brownout.
    pub drains: bool,
    /// Per page: the round that last queued it (every page of a round is marked
    /// when the round starts). After a broken connection, the pages of rounds the
    /// destination did not complete are sent again unless it holds exactly that
    /// round's copy (see [`super::resume`]).
    pub sent_round: Vec<u32>,
    /// Pages of the last round that were never queued (its sending stopped early).
    pub unqueued: u64,
    /// Pages queued but never written whole to a stream, over every broken
    /// connection so far: batches left in the queue or cut mid-write.
    pub unwritten: u64,
    /// Successful reconnections after a broken connection (setup restarts
    /// included).
    pub reconnects: u32,
    /// Of `reconnects`, the setups started over before round 0.
    pub setup_restarts: u32,
    /// Pages written again after resumptions: written whole before the break
    /// but not held by the destination.
    pub resent_pages: u64,
}

impl PrecopyRun<'_> {
    pub(crate) fn emit(&self, e: Event) {
        if let Some(p) = &self.migration.progress {
            p.on_event(&e);
        }
    }

    /// Stop the heartbeat thread (if running) and take the control stream back.
    pub(crate) fn control(&mut self) -> Result<&mut ControlLink, MigrationError> {
        if let Some(hb) = self.heartbeat.take() {
            let (link, failure) = hb.stop();
            self.link = link;
            if let Some(f) = failure {
                return Err(link_error(f));
            }
        }
        self.link.as_mut().ok_or(MigrationError::Protocol {
            phase: "control",
            violation: ProtocolViolation::ControlLost("heartbeat thread died"),
        })
    }

    /// Why waiting stopped: cancel, heartbeat failure or the brownout deadline.
    fn stop_reason(&mut self) -> Option<MigrationError> {
        if self.migration.cancel.is_cancelled() {
            return Some(MigrationError::Cancelled);
        }
        if self.heartbeat.as_ref().is_some_and(|h| h.has_failed()) {
            return Some(self.control().err().unwrap_or(MigrationError::Protocol {
                phase: "rounds",
                violation: ProtocolViolation::ControlLost(
                    "the heartbeat thread stopped without a reason",
                ),
            }));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(MigrationError::BrownoutTimeout {
                after: self.migration.config.brownout_timeout,
            });
        }
        None
    }

    /// Queue every page of `set` for round `round`, then gate the round.
    pub(crate) fn send_round(
        &mut self,
        set: &PageSet,
        round: u32,
        quiescent: bool,
    ) -> Result<(), MigrationError> {
        let total = set.count();
        for p in set.iter() {
            self.sent_round[p as usize] = round;
        }
        let Some(tx) = self.tx.as_ref() else {
            return Err(MigrationError::Send(SendError::WorkersStopped));
        };
        let mut sent = 0u64;
        let mut since_event = 0u64;
        let shared = &self.shared;
        let cancel = &self.migration.cancel;
        let hb = &self.heartbeat;
        let deadline = self.deadline;
        let progress = &self.migration.progress;
        let meter = &mut self.meter;
        let (sent_before, held_back, started) = (self.sent_total, self.held_back, self.started);
        let mut stop = None;
        batches_of(
            &shared.memory,
            set.iter(),
            round,
            quiescent,
            MAX_BATCH_PAGES,
            |b| {
                if cancel.is_cancelled() {
                    stop = Some(MigrationError::Cancelled);
                    return false;
                }
                if shared.failed.load(Ordering::Relaxed) {
                    return false;
                }
                let n = b.pages();
                shared.tuner.tick();
                // Queue with a bounded wait: a stuck worker, a cancel or a silent
                // peer must not leave the loop blocked on a full queue.
                let mut b = b;
                loop {
                    match tx.send_timeout(b, Duration::from_millis(20)) {
                        Ok(()) => break,
                        Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                            if cancel.is_cancelled()
                                || shared.failed.load(Ordering::Relaxed)
                                || hb.as_ref().is_some_and(|h| h.has_failed())
                                || deadline.is_some_and(|d| Instant::now() >= d)
                            {
                                return false;
                            }
                            b = back;
                        }
                        Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
                    }
                }
                sent += n;
                since_event += n;
                if since_event >= 16384 {
                    since_event = 0;
                    if let Some(p) = progress {
                        let sent_total = sent_before + sent;
                        let remaining = total - sent + held_back;
                        p.on_event(&Event::Progress {
                            round,
                            sent,
                            total,
                            sent_total,
                            remaining,
                            fraction: meter.update(sent_total, remaining),
                            wire_bytes: shared.counters.wire_bytes.load(Ordering::Relaxed),
                            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                        });
                    }
                }
                true
            },
        );
        self.sent_total += sent;
        self.unqueued = total - sent;
        if let Some(e) = stop {
            return Err(e);
        }
        self.check_workers()?;
        if let Some(e) = self.stop_reason() {
            return Err(e);
        }
        for c in &self.ctl {
            // A healthy worker has taken the previous marker before passing the
            // gate, so there is always room; a stuck one shows up at the gate.
            let _ = c.try_send(WorkerCommand::RoundEnd(round));
        }
        let stall = self.migration.config.peer_timeout * STALL_PEER_TIMEOUTS;
        let shared = self.shared.clone();
        let mut stopped = None;
        let r = shared.gate.wait(
            stall,
            || {
                stopped = self.stop_reason();
                stopped.is_some()
            },
            || shared.counters.wire_bytes.load(Ordering::Relaxed),
        );
        match r {
            Ok(()) => self.check_workers(),
            Err(GateError::Aborted) => {
                self.check_workers()?;
                Err(MigrationError::Send(SendError::GateAborted))
            }
            Err(GateError::Stopped) => Err(stopped.unwrap_or(MigrationError::Cancelled)),
            Err(GateError::Stalled(after)) => Err(MigrationError::TimedOut {
                what: "page streams (no batch completed)",
                after,
            }),
        }
    }

    /// Emit a progress event after a harvest: `owed` pages are still to be sent.
    pub(crate) fn progress_after_round(&mut self, round: u32, sent: u64, owed: u64) {
        let fraction = self.meter.update(self.sent_total, owed);
        self.emit(Event::Progress {
            round,
            sent,
            total: sent,
            sent_total: self.sent_total,
            remaining: owed,
            fraction,
            wire_bytes: self.shared.counters.wire_bytes.load(Ordering::Relaxed),
            elapsed_ms: self.started.elapsed().as_secs_f64() * 1e3,
        });
    }

    /// The audit confirmed tracker misses (`pages`, already re-sent): report them
    /// and continue with a tracker that compares every page with what was sent.
    pub(crate) fn fall_back(&mut self, round: u32, pages: &[u64]) -> Result<(), MigrationError> {
        let mem = self.migration.memory.clone();
        let gfns = pages
            .iter()
            .take(16)
            .map(|&p| mem.gfn_of(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut to = String::new();
        if !self.tracker_fallback {
            if let Some(old) = self.migration.tracker.take() {
                to = format!("{} + hash scan against what was sent", old.name());
                let safe = crate::proof::safe_tracker(old, &self.shared.sent, &mem, 2)?;
                self.migration.tracker = Some(safe);
            }
            self.tracker_fallback = true;
            self.audit.disable();
        }
        self.emit(Event::TrackerMiss {
            round,
            pages: pages.len() as u64,
            gfns,
            fallback: to,
        });
        Ok(())
    }

    pub(crate) fn check_workers(&self) -> Result<(), MigrationError> {
        match self.shared.failure() {
            None => Ok(()),
            Some(WorkerFailure::Lost { stream, source }) => {
                Err(MigrationError::PageStreamLost { stream, source })
            }
            Some(WorkerFailure::Failed { stream, source }) => {
                Err(MigrationError::Send(SendError::Stream { stream, source }))
            }
            Some(WorkerFailure::Panicked { stream, message }) => {
                Err(MigrationError::WorkerPanicked { stream, message })
            }
        }
    }

    /// Ask every worker to end its stream (after the final round).
    pub(crate) fn finish_workers(&mut self) {
        for c in &self.ctl {
            let _ = c.send(WorkerCommand::Finish);
        }
    }

    /// Stop workers: on failure cut their streams first. Waits for them until
    /// `deadline` (then cuts the streams) plus a short grace; a worker still
    /// running after that is left behind (it holds only shared references) and
    /// reported.
    pub(crate) fn stop_workers(
        &mut self,
        abort: bool,
        deadline: Instant,
    ) -> Result<(), MigrationError> {
        if abort {
            self.cut_streams();
        }
        self.tx.take();
        self.ctl.clear();
        let mut cut = abort;
        let mut limit = if abort {
            Instant::now() + JOIN_GRACE
        } else {
            deadline
        };
        // Woken the moment the last worker ends (not polled: this wait is inside
        // the downtime after the final round, and a 2 ms poll cost 2.2 ms there).
        // Workers left behind by an earlier stop hold their senders still.
        while !self.handles.is_empty() {
            match self.exited.recv_deadline(limit) {
                Err(RecvTimeoutError::Disconnected) => break,
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) if cut => {
                    let stuck = self.handles.iter().filter(|h| !h.is_finished()).count();
                    self.handles.clear();
                    return Err(MigrationError::TimedOut {
                        what: if stuck == 1 {
                            "a page worker's exit"
                        } else {
                            "the page workers' exit"
                        },
                        after: JOIN_GRACE,
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.cut_streams();
                    cut = true;
                    limit = Instant::now() + JOIN_GRACE;
                }
            }
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        Ok(())
    }

    /// Shut every page stream down (unblocks their writers).
    pub(crate) fn cut_streams(&self) {
        for s in self.shutdowns.iter() {
            s();
        }
    }
}

/// The page-stream workers of one connection: their batch queue, control
/// channels, threads and the handles that cut their streams.
pub(crate) struct Workers {
    pub tx: Sender<Batch>,
    pub ctl: Vec<Sender<WorkerCommand>>,
    pub handles: Vec<JoinHandle<()>>,
    /// Each worker thread holds a sender of this channel until it ends (returns
    /// or unwinds), so the receiver is disconnected once all have ended: a wait
    /// for their exit that wakes at once, with a deadline.
    pub exited: Receiver<()>,
    pub shutdowns: Arc<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl Workers {
    /// One worker thread per page stream.
    pub(crate) fn spawn(shared: &Arc<SendState>, page_writers: Vec<FrameWriter>) -> Self {
        let streams = page_writers.len();
        let (tx, rx) = crossbeam_channel::bounded(streams * QUEUE_DEPTH_PER_WORKER);
        let shutdowns = Arc::new(
            page_writers
                .iter()
                .map(|w| w.stream().shutdown_handle())
                .collect::<Vec<_>>(),
        );
        let mut ctl = Vec::with_capacity(streams);
        let (alive, exited) = crossbeam_channel::bounded::<()>(0);
        let handles = page_writers
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let sh = shared.clone();
                let rx = rx.clone();
                let (ctx, crx) = crossbeam_channel::bounded(2);
                ctl.push(ctx);
                let alive = alive.clone();
                std::thread::Builder::new()
                    .name(format!("livemig-send{i}"))
                    .spawn(move || {
                        let _alive = alive;
                        run_worker(&sh, i, rx, crx, w)
                    })
                    .expect("spawn sender thread")
            })
            .collect();
        Self {
            tx,
            ctl,
            handles,
            exited,
            shutdowns,
        }
    }
}

/// The migration error for a heartbeat failure.
pub(crate) fn link_error(f: LinkFailure) -> MigrationError {
    match f {
        LinkFailure::Silent(after) => MigrationError::TimedOut {
            what: "the peer (destination) on the control stream: no heartbeat answer",
            after,
        },
        LinkFailure::Transport(source) => MigrationError::Transport {
            phase: "rounds",
            source,
        },
        LinkFailure::Unexpected(ControlMsg::Error { message }) => {
            MigrationError::Remote(message.into())
        }
        LinkFailure::Unexpected(other) => MigrationError::Protocol {
            phase: "rounds",
            violation: ProtocolViolation::Unexpected {
                expected: "heartbeat answers on the control stream",
                got: other.name(),
            },
        },
    }
}
