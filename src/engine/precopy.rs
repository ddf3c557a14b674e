//! The pre-copy round loop (mechanism only: *when* to stop is the policy's call).
//!
//! Why one file of over 600 lines: the round loop and the state it shares with
//! brownout (`Run`: workers, gate, heartbeats, audit) live together; `Run` is to move
//! to its own module.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::cancel::CancelConnector;
use super::control::{ControlLink, Heartbeat, LinkFailure};
use super::gate::GateError;
use super::pipeline::{
    batches_of, run_worker, Batch, Ctl, Shared, WorkerFailure, QUEUE_DEPTH_PER_WORKER,
};
use super::policy::{Decision, PolicySnapshot};
use super::{brownout, setup, Migration, MigrationError, SendError};
use crate::memory::PageSet;
use crate::proof::SampledAudit;
use crate::stats::estimator::{Estimator, FixedCosts, Prediction};
use crate::stats::progress::ProgressMeter;
use crate::stats::{Event, MigrationReport, RoundStats};
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
pub(crate) struct Run<'a> {
    pub m: &'a mut Migration,
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
    pub shared: Arc<Shared>,
    pub tx: Option<Sender<Batch>>,
    pub ctl: Vec<Sender<Ctl>>,
    pub handles: Vec<JoinHandle<()>>,
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
    /// Successful reconnections after a broken connection (setup restarts
    /// included).
    pub reconnects: u32,
    /// Of `reconnects`, the setups started over before round 0.
    pub setup_restarts: u32,
    /// Pages sent again after resumptions.
    pub resent_pages: u64,
}

impl Run<'_> {
    pub(crate) fn emit(&self, e: Event) {
        if let Some(p) = &self.m.progress {
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
        if self.m.cancel.is_cancelled() {
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
                after: self.m.config.brownout_timeout,
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
        let cancel = &self.m.cancel;
        let hb = &self.heartbeat;
        let deadline = self.deadline;
        let progress = &self.m.progress;
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
            let _ = c.try_send(Ctl::RoundEnd(round));
        }
        let stall = self.m.config.peer_timeout * STALL_PEER_TIMEOUTS;
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
    fn progress_after_round(&mut self, round: u32, sent: u64, owed: u64) {
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
        let mem = self.m.memory.clone();
        let gfns = pages
            .iter()
            .take(16)
            .map(|&p| mem.gfn_of(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut to = String::new();
        if !self.tracker_fallback {
            if let Some(old) = self.m.tracker.take() {
                to = format!("{} + hash scan against what was sent", old.name());
                let safe = crate::proof::safe_tracker(old, &self.shared.sent, &mem, 2)?;
                self.m.tracker = Some(safe);
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
            let _ = c.send(Ctl::Finish);
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
        loop {
            if self.handles.iter().all(|h| h.is_finished()) {
                break;
            }
            if Instant::now() >= limit {
                if cut {
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
                self.cut_streams();
                cut = true;
                limit = Instant::now() + JOIN_GRACE;
            }
            std::thread::sleep(Duration::from_millis(2));
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
    pub ctl: Vec<Sender<Ctl>>,
    pub handles: Vec<JoinHandle<()>>,
    pub shutdowns: Arc<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl Workers {
    /// One worker thread per page stream.
    pub(crate) fn spawn(shared: &Arc<Shared>, page_writers: Vec<FrameWriter>) -> Self {
        let streams = page_writers.len();
        let (tx, rx) = crossbeam_channel::bounded(streams * QUEUE_DEPTH_PER_WORKER);
        let shutdowns = Arc::new(
            page_writers
                .iter()
                .map(|w| w.stream().shutdown_handle())
                .collect::<Vec<_>>(),
        );
        let mut ctl = Vec::with_capacity(streams);
        let handles = page_writers
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let sh = shared.clone();
                let rx = rx.clone();
                let (ctx, crx) = crossbeam_channel::bounded(2);
                ctl.push(ctx);
                std::thread::Builder::new()
                    .name(format!("livemig-send{i}"))
                    .spawn(move || run_worker(&sh, i, rx, crx, w))
                    .expect("spawn sender thread")
            })
            .collect();
        Self {
            tx,
            ctl,
            handles,
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

/// Run a whole migration.
pub(crate) fn run(
    mut m: Migration,
    connector: &dyn Connector,
) -> Result<MigrationReport, MigrationError> {
    let started = Instant::now();
    let result = (|| {
        // Wait for a host slot first: nothing has touched the VM or the peer yet.
        let _slot = match m.slots.clone() {
            Some(s) => Some(s.acquire(&m.cancel)?),
            None => None,
        };
        // Setup under cancel: a cancel cuts the streams opened so far, which ends
        // a blocking handshake read at once.
        // A connection lost before round 0 starts the setup over (same token).
        let session = {
            let cancellable = CancelConnector::new(connector, m.cancel.clone());
            setup::establish(&m, &cancellable).map_err(|e| {
                if m.cancel.is_cancelled() {
                    MigrationError::Cancelled
                } else {
                    e
                }
            })?
        };
        let setup::Session {
            control,
            pages: page_writers,
            session: session_id,
            rtt,
            resumable,
            drains,
            restarts: setup_restarts,
        } = session;
        let mut link = ControlLink::new(control.into_stream());
        if m.cancel.is_cancelled() {
            let _ = link.send(
                &ControlMsg::Abort {
                    reason: "cancelled by the operator".into(),
                },
                &[],
            );
            return Err(MigrationError::Cancelled);
        }
        let streams = page_writers.len();
        let spliced = page_writers.iter().filter(|w| w.splices()).count() as u16;
        let shared = Arc::new(
            Shared::new(
                m.memory.clone(),
                streams,
                m.config.codec,
                m.config.zstd_level,
                m.config.mode == super::Mode::Auto,
            )
            .with_delta(m.config.delta, m.config.delta_cache_bytes)
            .with_spliced_streams(spliced),
        );
        let workers = Workers::spawn(&shared, page_writers);
        // The brownout's fixed costs from the model's calibration; the handshake
        // RTT stands for the commit round trip.
        let mut est = Estimator::default();
        est.fixed = FixedCosts::calibrated(
            m.memory.total_bytes(),
            rtt.as_secs_f64(),
            m.config.verify == super::Verify::Full,
            m.config.expected_device_state.as_secs_f64(),
        );
        // Heartbeats in both directions while rounds run (at least four per peer
        // timeout, so one late answer is never taken for silence).
        let interval = m
            .config
            .heartbeat_interval
            .min(m.config.peer_timeout / 4)
            .max(Duration::from_millis(1));
        let heartbeat = Heartbeat::start(link, interval, m.config.peer_timeout);
        let mut audit = SampledAudit::new(m.memory.total_pages(), m.config.audit);
        if let Some(t) = m.tracker.as_mut() {
            // A tracker comparing contents with what was sent audits every page at
            // every harvest: sampling on top of it would find nothing more.
            if t.follow_sent(&shared.sent) {
                audit.disable();
            }
        }
        let resumable = resumable && m.config.reconnect_timeout > Duration::ZERO;
        let sent_round = vec![0; m.memory.total_pages() as usize];
        let mut run = Run {
            m: &mut m,
            connector,
            session_id,
            link: None,
            heartbeat: Some(heartbeat),
            deadline: None,
            shared,
            tx: Some(workers.tx),
            ctl: workers.ctl,
            handles: workers.handles,
            shutdowns: workers.shutdowns,
            history: Vec::new(),
            est,
            started,
            throttle: 0,
            throttle_max: 0,
            meter: ProgressMeter::new(),
            sent_total: 0,
            held_back: 0,
            prediction: (Prediction::default(), 1.0),
            audit,
            tracker_fallback: false,
            resumable,
            drains,
            sent_round,
            unqueued: 0,
            reconnects: setup_restarts,
            setup_restarts,
            resent_pages: 0,
        };
        let r = precopy(&mut run);
        if let Err(e) = &r {
            // Released and in doubt: the destination may run the VM, so it is
            // told nothing (an Abort would mean "discard") and the VM stays paused.
            if !matches!(e, MigrationError::InDoubt { .. }) {
                let reason = match e {
                    MigrationError::Cancelled => "cancelled by the operator".to_string(),
                    e => e.to_string(),
                };
                if let Ok(link) = run.control() {
                    let _ = link.send(&ControlMsg::Abort { reason }, &[]);
                }
            }
            if let Some(hb) = run.heartbeat.take() {
                let _ = hb.stop();
            }
            let _ = run.stop_workers(true, Instant::now());
            if let Some(t) = run.m.tracker.as_mut() {
                let _ = t.stop(&run.m.memory);
            }
            if run.throttle > 0 {
                let _ = run.m.vm.throttle(0);
            }
        }
        r
    })();
    if let Err(e) = &result {
        if let Some(p) = &m.progress {
            p.on_event(&Event::Failed {
                phase: "migration".into(),
                error: e.to_string(),
                source_running: e.source_running(),
            });
        }
    }
    result
}

/// Pages dirtied in `n` consecutive harvests: the last `n - 1` harvests, kept
/// to find hot pages (`hot = dirty ∩ prev[0] ∩ … ∩ prev[n-2]`).
struct HotPages {
    prev: Vec<PageSet>,
    rounds: usize,
}

impl HotPages {
    fn new(pages: u64, rounds: u32) -> Self {
        let keep = (rounds as usize).saturating_sub(1);
        Self {
            prev: (0..keep).map(|_| PageSet::new(pages)).collect(),
            rounds: rounds as usize,
        }
    }
    fn enabled(&self) -> bool {
        self.rounds >= 2
    }
    /// Pages of `dirty` that were also in each of the kept harvests, into `out`.
    fn hot(&self, dirty: &PageSet, out: &mut PageSet) {
        out.clear();
        out.union_with(dirty);
        for p in &self.prev {
            out.intersect_with(p);
        }
    }
    /// Remember `dirty` as the newest harvest.
    fn push(&mut self, dirty: &PageSet) {
        if let Some(mut oldest) = self.prev.pop() {
            oldest.clear();
            oldest.union_with(dirty);
            self.prev.insert(0, oldest);
        }
    }
}

fn precopy(run: &mut Run<'_>) -> Result<MigrationReport, MigrationError> {
    let mem = run.m.memory.clone();
    let pages = mem.total_pages();
    run.emit(Event::Started {
        pages,
        streams: run.handles.len() as u16,
        session: crate::receiver::outcomes::session_to_string(run.session_id),
    });
    if let Some(t) = run.m.tracker.as_mut() {
        t.start(&mem)?;
    }
    // Page sets, reused across rounds:
    // - `to_send`: what this round sends (round 0: everything);
    // - `dirty`: the latest harvest; `prev_dirty`: the one before (for the WWS);
    // - `deferred`: hot pages held back for the final round (owed, not sent);
    // - `owed`: dirty ∪ deferred — everything whose latest version the
    //   destination lacks; brownout sends `owed` ∪ the final harvest.
    let mut to_send = PageSet::full(pages);
    let mut dirty = PageSet::new(pages);
    let mut prev_dirty = PageSet::new(pages);
    let mut deferred = PageSet::new(pages);
    let mut owed = PageSet::new(pages);
    let mut scratch = PageSet::new(pages);
    let mut hot = HotPages::new(pages, run.m.policy.hot_page_rounds());
    let mut round = 0u32;
    let precopy_start = Instant::now();
    loop {
        if run.m.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let c = &run.shared.counters;
        let (p0, z0, b0) = (
            c.pages.load(Ordering::Relaxed),
            c.zero_pages.load(Ordering::Relaxed),
            c.wire_bytes.load(Ordering::Relaxed),
        );
        run.held_back = deferred.count();
        let t0 = Instant::now();
        // Without a tracker the VM is stopped: its memory cannot change.
        let quiescent = run.m.tracker.is_none();
        run.est.expect_round(to_send.count());
        let mut sent = run.send_round(&to_send, round, quiescent);
        while let Err(e) = sent {
            if !run.may_resume(&e) {
                return Err(e);
            }
            // The broken round's pages the destination lacks go again, as a
            // round of their own with a fresh number.
            round = run.resume(round, e, &mut to_send)?;
            sent = run.send_round(&to_send, round, quiescent);
        }
        let dur = t0.elapsed().max(Duration::from_micros(1));
        let c = &run.shared.counters;
        let (p1, z1, b1) = (
            c.pages.load(Ordering::Relaxed),
            c.zero_pages.load(Ordering::Relaxed),
            c.wire_bytes.load(Ordering::Relaxed),
        );
        let secs = dur.as_secs_f64();
        let (sent_pages, wire) = (p1 - p0, b1 - b0);
        // Harvest what was dirtied meanwhile.
        std::mem::swap(&mut dirty, &mut prev_dirty);
        dirty.clear();
        let harvest_start = Instant::now();
        if let Some(t) = run.m.tracker.as_mut() {
            t.harvest(&mem, &mut dirty)?;
        }
        let harvest_s = harvest_start.elapsed().as_secs_f64();
        let missed = run.audit.confirm(&dirty);
        if !missed.is_empty() {
            run.fall_back(round, &missed)?;
        }
        let since_last = secs + harvest_s;
        let dirty_count = dirty.count();
        // Writable working set: dirtied again right after the previous harvest.
        scratch.clear();
        scratch.union_with(&dirty);
        scratch.intersect_with(&prev_dirty);
        let wws = scratch.count();
        // Owed = dirty ∪ deferred. Hot pages stay deferred; a deferred page that
        // cooled down (not dirtied this time) is sent in the next round.
        owed.clear();
        owed.union_with(&dirty);
        owed.union_with(&deferred);
        if hot.enabled() {
            hot.hot(&dirty, &mut deferred);
            hot.push(&dirty);
        }
        to_send.clear();
        to_send.union_with(&owed);
        to_send.subtract(&deferred);
        if to_send.is_empty() && !deferred.is_empty() {
            // Only hot pages are owed: an empty round would measure nothing and
            // make cooled pages look hot again. Send them; the policy decides
            // (throttle or brownout) on the prediction, which counts them anyway.
            deferred.clear();
            to_send.union_with(&owed);
        }
        // Audit a sample of the clean pages; any that differ from what was sent
        // are re-sent now (and confirmed as misses, or not, by the next harvest).
        if run.m.tracker.is_some() {
            for &p in run
                .audit
                .sample(&mem, &run.shared.sent, &owed, sent_pages)?
            {
                owed.insert(p);
                to_send.insert(p);
            }
        }
        let owed_count = owed.count();
        let deferred_count = deferred.count();
        run.est
            .record_round(sent_pages, wire, secs, dirty_count, since_last, harvest_s);
        // The policy judges the prediction with the margin the model's own recent
        // error calls for (see `stats::estimator`).
        let raw = run.est.predict(owed_count);
        let margin = run.est.margin();
        let prediction = raw.with_margin(margin);
        let predicted = prediction.total();
        run.prediction = (raw, margin);
        let stats = RoundStats {
            round,
            pages: sent_pages,
            zero_pages: z1 - z0,
            wire_bytes: wire,
            duration_ms: secs * 1e3,
            bandwidth_bps: wire as f64 / secs,
            dirty_after: dirty_count,
            dirty_rate_pps: dirty_count as f64 / since_last,
            predicted_downtime_ms: predicted * 1e3,
            throttle_percent: run.throttle,
            wws_pages: wws,
            deferred_pages: deferred_count,
            ewma_dirty_rate_pps: run.est.dirty_rate.get().unwrap_or(0.0),
            ewma_bandwidth_bps: run.est.final_bandwidth(),
            harvest_ms: harvest_s * 1e3,
            predicted_fixed_ms: (prediction.fixed_s + prediction.harvest_s) * 1e3,
            predicted_downtime_raw_ms: raw.total() * 1e3,
            prediction_margin: margin,
            prediction_error: run.est.last_error().unwrap_or(0.0),
        };
        run.emit(Event::RoundFinished(stats.clone()));
        run.progress_after_round(round, sent_pages, owed_count);
        run.history.push(stats);
        let mut decision = if run.m.tracker.is_none() {
            Decision::Brownout("the VM is stopped: one pass is complete".into())
        } else {
            decide(
                run,
                round + 1,
                precopy_start,
                owed_count,
                deferred_count,
                0.0,
            )
            .0
        };
        let mut predicted = predicted;
        round += 1;
        // Before pausing, let the destination apply what is in flight (the VM
        // runs meanwhile); then the policy decides again on what is owed now.
        if matches!(decision, Decision::Brownout(_)) && run.drains && run.m.tracker.is_some() {
            match run.drain(round - 1) {
                Ok(answer) => {
                    let dirtied = run.drained(round - 1, &answer);
                    // Still behind: its backlog is at least what it waited.
                    let behind = if answer.applied {
                        0.0
                    } else {
                        answer.waited.as_secs_f64()
                    };
                    let (again, p) = decide(
                        run,
                        round,
                        precopy_start,
                        owed_count + dirtied,
                        deferred_count,
                        behind,
                    );
                    predicted = p;
                    decision = match again {
                        Decision::Brownout(r) => Decision::Brownout(format!(
                            "{r}; after {:.1} ms for the destination to apply round {} (~{dirtied} pages dirtied meanwhile)",
                            answer.waited.as_secs_f64() * 1e3,
                            round - 1
                        )),
                        other => {
                            run.restart_heartbeat()?;
                            other
                        }
                    };
                }
                Err(e) if run.may_resume(&e) => {
                    let mut resend = PageSet::new(pages);
                    round = run.resume(round - 1, e, &mut resend)?;
                    to_send.clear();
                    to_send.union_with(&owed);
                    to_send.union_with(&resend);
                    deferred.clear();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        match decision {
            Decision::Continue => {}
            Decision::Throttle(p) => {
                run.m.vm.throttle(p).map_err(MigrationError::Vm)?;
                run.throttle = p;
                run.throttle_max = run.throttle_max.max(p);
                run.emit(Event::Throttled { percent: p });
            }
            Decision::Brownout(reason) => {
                // The heartbeat hands the control stream back before the pause; a
                // connection that broke meanwhile resumes, and the loop goes on
                // with what is owed plus what the destination lacks.
                if let Err(e) = run.control() {
                    if !run.may_resume(&e) {
                        return Err(e);
                    }
                    let mut resend = PageSet::new(pages);
                    round = run.resume(round - 1, e, &mut resend)?;
                    to_send.clear();
                    to_send.union_with(&owed);
                    to_send.union_with(&resend);
                    deferred.clear();
                    continue;
                }
                // Every deferred page is in `owed`: the final round sends it.
                run.held_back = 0;
                // The final round's set grows by the final harvest; after a
                // break it is what the destination may still lack.
                match brownout::run(run, &mut owed, round, predicted, reason) {
                    // The connection broke before the source released the VM: the
                    // VM runs again, and the rounds go on after resumption.
                    // A destination that is slow to answer (a timeout) is not a
                    // broken connection: the migration fails and the VM runs.
                    Err(e)
                        if run.may_resume(&e) && !matches!(e, MigrationError::TimedOut { .. }) =>
                    {
                        let mut resend = PageSet::new(pages);
                        round = run.resume(round, e, &mut resend)?;
                        to_send.clear();
                        to_send.union_with(&owed);
                        to_send.union_with(&resend);
                        deferred.clear();
                    }
                    r => return r,
                }
            }
            Decision::Abort(reason) => return Err(MigrationError::PolicyAbort(reason)),
        }
    }
}

/// Ask the policy, with the model's prediction for `owed_pages` plus `behind_s`
/// seconds the destination is known to be behind. Returns the decision and the
/// prediction (seconds) it judged.
fn decide(
    run: &mut Run<'_>,
    rounds: u32,
    precopy_start: Instant,
    owed_pages: u64,
    deferred_pages: u64,
    behind_s: f64,
) -> (Decision, f64) {
    let raw = run.est.predict(owed_pages);
    let margin = run.est.margin();
    let predicted = raw.with_margin(margin).total() + behind_s;
    run.prediction = (raw, margin);
    let snap = PolicySnapshot {
        rounds,
        elapsed: precopy_start.elapsed(),
        remaining_pages: owed_pages,
        predicted_downtime: Duration::from_secs_f64(predicted),
        history: &run.history,
        throttle_percent: run.throttle,
        bandwidth_bps: run.est.final_bandwidth(),
        dirty_bytes_per_s: run.est.dirty_bytes_per_s(),
        deferred_pages,
        predicted_downtime_raw: Duration::from_secs_f64(raw.total()),
        prediction_margin: margin,
    };
    (run.m.policy.decide(&snap), predicted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_pages_need_consecutive_harvests() {
        let mut h = HotPages::new(64, 3);
        let set = |pages: &[u64]| {
            let mut s = PageSet::new(64);
            pages.iter().for_each(|&p| s.insert(p));
            s
        };
        let mut out = PageSet::new(64);
        h.hot(&set(&[1, 2, 3]), &mut out);
        assert_eq!(out.count(), 0, "nothing is hot before 3 harvests");
        h.push(&set(&[1, 2, 3]));
        h.push(&set(&[1, 2]));
        h.hot(&set(&[1, 3]), &mut out);
        assert_eq!(out.iter().collect::<Vec<_>>(), vec![1]);
        assert!(!HotPages::new(64, 1).enabled());
    }
}
