//! The pre-copy round loop (mechanism only: *when* to stop is the policy's call).
//!
//! The state the loop shares with brownout, drain and resumption is
//! [`super::run::PrecopyRun`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cancel::CancelConnector;
use super::control::{ControlLink, Heartbeat};
use super::pipeline::SendState;
use super::policy::{Decision, PolicySnapshot};
use super::run::{PrecopyRun, Workers};
use super::{brownout, setup, Migration, MigrationError};
use crate::memory::PageSet;
use crate::proof::SampledAudit;
use crate::stats::estimator::{Estimator, FixedCosts, Prediction};
use crate::stats::host_load;
use crate::stats::progress::ProgressMeter;
use crate::stats::{Event, MigrationReport, RoundStats};
use crate::transport::Connector;
use crate::wire::ControlMsg;

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
        // A loopback peer is a destination on this host, sharing its CPUs.
        let peer_on_this_host = page_writers
            .first()
            .and_then(|w| w.stream().peer_addr())
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|a| a.ip().is_loopback());
        let shared = Arc::new(
            SendState::new(
                m.memory.clone(),
                streams,
                m.config.codec,
                m.config.zstd_level,
                m.config.mode == super::Mode::Auto,
            )
            .with_delta(m.config.delta, m.config.delta_cache_bytes)
            .with_spliced_streams(spliced)
            .with_peer_on_this_host(peer_on_this_host),
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
        let mut run = PrecopyRun {
            migration: &mut m,
            connector,
            session_id,
            link: None,
            heartbeat: Some(heartbeat),
            deadline: None,
            shared,
            tx: Some(workers.tx),
            ctl: workers.ctl,
            handles: workers.handles,
            exited: workers.exited,
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
            unwritten: 0,
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
            if let Some(t) = run.migration.tracker.as_mut() {
                let _ = t.stop(&run.migration.memory);
            }
            if run.throttle > 0 {
                let _ = run.migration.vm.throttle(0);
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

fn precopy(run: &mut PrecopyRun<'_>) -> Result<MigrationReport, MigrationError> {
    let mem = run.migration.memory.clone();
    let pages = mem.total_pages();
    run.emit(Event::Started {
        pages,
        streams: run.handles.len() as u16,
        session: crate::receiver::outcomes::session_to_string(run.session_id),
    });
    if let Some(t) = run.migration.tracker.as_mut() {
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
    let mut hot = HotPages::new(pages, run.migration.policy.hot_page_rounds());
    let mut round = 0u32;
    let precopy_start = Instant::now();
    loop {
        if run.migration.cancel.is_cancelled() {
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
        let quiescent = run.migration.tracker.is_none();
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
        if let Some(t) = run.migration.tracker.as_mut() {
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
        if run.migration.tracker.is_some() {
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
        let mut decision = if run.migration.tracker.is_none() {
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
        if matches!(decision, Decision::Brownout(_))
            && run.drains
            && run.migration.tracker.is_some()
        {
            match run.drain(round - 1) {
                Ok(mut answer) => {
                    // Our workers and the destination are idle now: what else runs
                    // on this host competes with the brownout's hand-offs (the
                    // destination looked at its own before answering). The VM runs
                    // on while this is looked at.
                    let looked = Instant::now();
                    let busy_here = host_load::host_is_busy();
                    let busy = busy_here || answer.host_busy;
                    run.est.fixed.observe_host_load(busy);
                    answer.vm_ran += looked.elapsed();
                    let dirtied = run.drained(round - 1, &answer);
                    run.est
                        .fixed
                        .observe_round_trip(answer.round_trip.as_secs_f64());
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
                            "{r}; after {:.1} ms for the destination to apply round {} (~{dirtied} pages dirtied meanwhile){}",
                            answer.waited.as_secs_f64() * 1e3,
                            round - 1,
                            match (busy_here, answer.host_busy) {
                                (true, true) => "; other processes keep both hosts' CPUs busy: one stalled wake-up budgeted",
                                (true, false) => "; other processes keep the source host's CPUs busy: one stalled wake-up budgeted",
                                (false, true) => "; other processes keep the destination host's CPUs busy: one stalled wake-up budgeted",
                                (false, false) => "",
                            }
                        )),
                        other => {
                            run.restart_heartbeat()?;
                            other
                        }
                    };
                }
                Err(e) if run.may_resume(&e) => {
                    round = resume_owed(run, round - 1, e, &owed, &mut to_send, &mut deferred)?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        match decision {
            Decision::Continue => {}
            Decision::Throttle(p) => {
                run.migration.vm.throttle(p).map_err(MigrationError::Vm)?;
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
                    round = resume_owed(run, round - 1, e, &owed, &mut to_send, &mut deferred)?;
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
                        round = resume_owed(run, round, e, &owed, &mut to_send, &mut deferred)?;
                    }
                    r => return r,
                }
            }
            Decision::Abort(reason) => return Err(MigrationError::PolicyAbort(reason)),
        }
    }
}

/// Resume after a broken connection (rounds up to `last_round` were sent): the
/// next round sends what is owed plus what the destination lacks, and nothing is
/// deferred. Returns the round to go on with.
fn resume_owed(
    run: &mut PrecopyRun<'_>,
    last_round: u32,
    e: MigrationError,
    owed: &PageSet,
    to_send: &mut PageSet,
    deferred: &mut PageSet,
) -> Result<u32, MigrationError> {
    let mut resend = PageSet::new(owed.capacity());
    let round = run.resume(last_round, e, &mut resend)?;
    to_send.clear();
    to_send.union_with(owed);
    to_send.union_with(&resend);
    deferred.clear();
    Ok(round)
}

/// Ask the policy, with the model's prediction for `owed_pages` plus `behind_s`
/// seconds the destination is known to be behind. Returns the decision and the
/// prediction (seconds) it judged.
fn decide(
    run: &mut PrecopyRun<'_>,
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
        margin_measured: run.est.margin_measured(),
    };
    (run.migration.policy.decide(&snap), predicted)
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
