//! Brownout: pause → final harvest → final pages → device state → digest → commit
//! (`Commit` → `Prepared` → participants' `release` → `Released` → `Committed`).
//!
//! Why over 600 lines: the switchover is one ordered sequence (pause, final harvest,
//! final pages, device state, digest, commit, post-switchover audit) with the
//! rollback of every step beside it, so that the split-brain argument can be checked
//! in one place; the ownership state machine itself is in `commit.rs`.
//!
//! The handoff follows [`SourceState`] (docs/PROTOCOL.md, "Commit and ownership").
//! Until `Released` is sent, any failure (a timeout, the brownout deadline, a
//! cancel, a bad or missing `Prepared`) resumes the source VM and rolls back every
//! participant that saved. After it, a `Veto`/`Error` answer means the destination
//! discarded (roll back, resume); a lost, late or garbled answer puts the source in
//! doubt: it asks the destination ([`commit::resolve`]) and, without a final
//! answer, stays paused and reports [`MigrationError::InDoubt`].
//!
//! Why one file of over 600 lines: it holds the whole paused phase, in the order it
//! runs (pause, final pages, device state, commit exchange, in-doubt queries, post-
//! switchover audit), so the source state machine reads top to bottom in one place.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::commit::{self, SourceEvent, SourceState};
use super::control::ControlLink;
use super::error::peer_veto;
use super::run::PrecopyRun;
use super::{DoubtReason, MigrationError, Verify};
use crate::device::envelope;
use crate::memory::PageSet;
use crate::proof::MemoryDigest;
use crate::stats::{DowntimeBreakdown, Event, MigrationReport, PostAudit, RoundStats};
use crate::wire::control::SessionOutcome;
use crate::wire::{ControlMsg, ProtocolViolation};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How long one read of the control stream waits before the cancel flag and the
/// deadlines are looked at again (an arriving frame ends the wait at once).
const SLICE: Duration = Duration::from_millis(20);

/// Cuts the control and page streams at the brownout deadline unless disarmed
/// first, so no write or read of the brownout can outlast it.
struct Watchdog {
    state: Arc<Mutex<(bool, bool)>>, // (disarmed, fired)
    wake: Option<crossbeam_channel::Sender<()>>,
}

impl Watchdog {
    fn arm(deadline: Instant, cut: Vec<Box<dyn Fn() + Send + Sync>>) -> Self {
        let state = Arc::new(Mutex::new((false, false)));
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let st = state.clone();
        std::thread::Builder::new()
            .name("livemig-brownout-deadline".into())
            .spawn(move || {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(left) {
                    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                    if !s.0 {
                        s.1 = true;
                        cut.iter().for_each(|c| c());
                    }
                }
            })
            .expect("spawn brownout deadline thread");
        Self {
            state,
            wake: Some(tx),
        }
    }

    /// Disarm; returns whether it had already fired (streams cut).
    fn disarm(&mut self) -> bool {
        let fired = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = true;
            s.1
        };
        if let Some(w) = self.wake.take() {
            let _ = w.try_send(());
        }
        fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// The next control message that is not a late heartbeat answer, waiting until
/// `until`; `cancellable`: a cancel ends the wait. `Ok(None)`: the deadline passed.
fn next_reply(
    link: &mut ControlLink,
    until: Instant,
    cancel: Option<&super::CancelToken>,
) -> Result<Option<ControlMsg>, MigrationError> {
    loop {
        if cancel.is_some_and(|c| c.is_cancelled()) {
            return Err(MigrationError::Cancelled);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match link.poll(left.min(SLICE)) {
            Ok(Some((ControlMsg::Heartbeat { .. }, _))) => {}
            Ok(Some((m, _))) => return Ok(Some(m)),
            Ok(None) => {}
            Err(source) => {
                return Err(MigrationError::Transport {
                    phase: "commit",
                    source,
                })
            }
        }
    }
}

/// Brown out and switch over. `set` holds the pages dirty at the last harvest.
pub(crate) fn run(
    run: &mut PrecopyRun<'_>,
    set: &mut PageSet,
    final_round: u32,
    predicted_s: f64,
    reason: String,
) -> Result<MigrationReport, MigrationError> {
    // The heartbeat thread hands the control stream back before the pause, so its
    // reaction time is not part of the downtime.
    run.control()?;
    let mut state = SourceState::Running;
    let mut bd = DowntimeBreakdown::default();
    let t_pause = Instant::now();
    if let Err(error) = run.migration.vm.pause() {
        // A partial pause (some vCPUs stopped) must not leave the VM half-stopped.
        let resume_error = run.migration.vm.resume().err();
        return Err(MigrationError::PauseFailed {
            error,
            resume_error,
        });
    }
    state = state.on(SourceEvent::Paused);
    // Each later part of the breakdown runs from the end of the one before, so
    // that every instant of the downtime is counted in one of them.
    let mark = Instant::now();
    bd.pause_ms = ms(mark - t_pause);
    let deadline = t_pause + run.migration.config.brownout_timeout;
    run.deadline = Some(deadline);
    let mut cut: Vec<Box<dyn Fn() + Send + Sync>> = Vec::new();
    if let Some(l) = &run.link {
        cut.push(l.stream().shutdown_handle());
    }
    let pages = run.shutdowns.clone();
    cut.push(Box::new(move || pages.iter().for_each(|c| c())));
    let mut watchdog = Watchdog::arm(deadline, cut);
    let mut saved = 0usize;
    let mut sw = Switchover {
        bd,
        tracker_misses: 0,
        final_pages: 0,
        digest: MemoryDigest::default(),
        mark,
        resolved_by_query: false,
    };
    let r = paused(
        run,
        set,
        final_round,
        predicted_s,
        &reason,
        &mut sw,
        &mut saved,
        &mut state,
        &mut watchdog,
    );
    let timed_out = watchdog.disarm();
    run.deadline = None;
    if r.is_err() && state != SourceState::InDoubt {
        // Before `Released` this resumes; after it, the source is in doubt.
        state = state.on(SourceEvent::Failed);
    }
    let r = match r {
        Err(e) if state == SourceState::InDoubt => {
            // Released, then no answer: learn the outcome from the destination.
            // The old control stream is of no more use; closing it lets a
            // destination still waiting on it (for `OutcomeKnown`, after a late
            // `Committed`) stop at once and answer the queries.
            if let Some(l) = run.link.take() {
                l.stream().shutdown();
            }
            let cfg = &run.migration.config;
            let learned = commit::resolve(
                run.connector,
                run.session_id,
                cfg.reply_timeout,
                Instant::now() + cfg.outcome_timeout,
            );
            match learned {
                Ok(o) => {
                    state = state.on(SourceEvent::Learned(o));
                    if o == SessionOutcome::Committed {
                        sw.resolved_by_query = true;
                        Ok(())
                    } else {
                        Err(MigrationError::DiscardedAfterBreak { cause: Box::new(e) })
                    }
                }
                Err(why) => {
                    state = state.on(SourceEvent::GaveUp);
                    Err(MigrationError::InDoubt {
                        session: run.session_id,
                        reason: DoubtReason::Unanswered {
                            broke: Box::new(e),
                            asked: why,
                        },
                    })
                }
            }
        }
        Err(e) => {
            // A deadline cut is the root cause of whatever error it provoked.
            Err(if timed_out && state == SourceState::Resumed {
                MigrationError::BrownoutTimeout {
                    after: run.migration.config.brownout_timeout,
                }
            } else {
                e
            })
        }
        Ok(()) => Ok(()),
    };
    match state {
        SourceState::Committed => Ok(finish(run, sw, final_round, predicted_s, reason, t_pause)),
        SourceState::Resumed => {
            let e = r.err().unwrap_or(MigrationError::Protocol {
                phase: "commit",
                violation: ProtocolViolation::NoOutcome("switchover"),
            });
            // The source VM must survive: undo device saves, resume.
            for p in run.migration.participants.iter_mut().take(saved) {
                p.rolled_back();
            }
            if let Err(error) = run.migration.vm.resume() {
                return Err(MigrationError::ResumeFailed {
                    error,
                    cause: Box::new(e),
                });
            }
            Err(e)
        }
        // Unresolved (or, defensively, any non-terminal state): stay paused.
        _ => Err(r.err().unwrap_or(MigrationError::InDoubt {
            session: run.session_id,
            reason: DoubtReason::Stopped(state),
        })),
    }
}

/// What the switchover measured, for the report.
struct Switchover {
    bd: DowntimeBreakdown,
    tracker_misses: u64,
    final_pages: u64,
    digest: MemoryDigest,
    /// Where the breakdown's current part started (the previous one's end).
    mark: Instant,
    resolved_by_query: bool,
}

impl Switchover {
    /// Milliseconds since the current part of the breakdown started; the next
    /// part starts now.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let part = ms(now - self.mark);
        self.mark = now;
        part
    }
}

#[allow(clippy::too_many_arguments)]
fn paused(
    run: &mut PrecopyRun<'_>,
    set: &mut PageSet,
    final_round: u32,
    predicted_s: f64,
    reason: &str,
    sw: &mut Switchover,
    saved: &mut usize,
    state: &mut SourceState,
    watchdog: &mut Watchdog,
) -> Result<(), MigrationError> {
    let mem = run.migration.memory.clone();
    if let Some(t) = run.migration.tracker.as_mut() {
        // Harvest apart from the owed pages: the audit's suspects (owed already)
        // are confirmed against what this harvest reports.
        let mut fresh = PageSet::new(mem.total_pages());
        t.harvest(&mem, &mut fresh)?;
        let missed = run.audit.confirm(&fresh);
        if !missed.is_empty() {
            run.emit(Event::TrackerMiss {
                round: final_round,
                pages: missed.len() as u64,
                gfns: missed
                    .iter()
                    .take(16)
                    .map(|&p| mem.gfn_of(p))
                    .collect::<Result<_, _>>()?,
                fallback: String::new(),
            });
        }
        set.union_with(&fresh);
    }
    let mut tracker_misses = 0;
    if run.migration.config.verify == Verify::Full {
        for p in crate::proof::stale_pages(&mem, &run.shared.sent, 2)? {
            if !set.contains(p) {
                tracker_misses += 1;
                set.insert(p);
            }
        }
    }
    sw.tracker_misses = tracker_misses;
    sw.bd.final_harvest_ms = sw.lap();
    let final_pages = set.count();
    sw.final_pages = final_pages;
    run.emit(Event::Brownout {
        round: final_round,
        pages: final_pages,
        predicted_downtime_ms: predicted_s * 1e3,
        reason: reason.to_string(),
    });
    let to_dest = |phase| move |source| MigrationError::Transport { phase, source };
    run.control()?
        .send(&ControlMsg::Brownout { final_round }, &[])
        .map_err(to_dest("brownout"))?;

    // Final pages, then close the page streams.
    let t_pages = Instant::now();
    let (b0, p0) = (
        run.shared
            .counters
            .wire_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        run.shared
            .counters
            .pages
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    run.send_round(set, final_round, true)?;
    run.finish_workers();
    let deadline = run.deadline.unwrap_or_else(Instant::now);
    run.stop_workers(false, deadline)?;
    run.check_workers()?;
    if run.migration.cancel.is_cancelled() {
        return Err(MigrationError::Cancelled);
    }
    sw.bd.final_pages_ms = sw.lap();
    let wire_final = run
        .shared
        .counters
        .wire_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        - b0;
    let pages_final = run
        .shared
        .counters
        .pages
        .load(std::sync::atomic::Ordering::Relaxed)
        - p0;
    run.history.push(RoundStats {
        round: final_round,
        pages: pages_final,
        wire_bytes: wire_final,
        duration_ms: sw.bd.final_pages_ms,
        bandwidth_bps: wire_final as f64 / t_pages.elapsed().as_secs_f64().max(1e-9),
        throttle_percent: run.throttle,
        ..Default::default()
    });

    // Device state, in participant order.
    let mut entries = Vec::with_capacity(run.migration.participants.len());
    for p in run.migration.participants.iter_mut() {
        let t = Instant::now();
        let mut blob = Vec::new();
        *saved += 1;
        p.save(&mut blob)?;
        sw.bd
            .participants
            .push((p.id().to_string(), ms(t.elapsed()), blob.len() as u64));
        entries.push(envelope::Entry {
            id: p.id().to_string(),
            version: p.version(),
            blob,
        });
    }
    let env = envelope::encode(&entries);
    sw.bd.device_state_bytes = env.len() as u64;
    run.control()?
        .send(&ControlMsg::DeviceState, &env)
        .map_err(to_dest("device state"))?;
    run.emit(Event::DeviceState {
        participants: entries.len(),
        bytes: env.len() as u64,
    });
    sw.bd.device_state_ms = sw.lap();

    // The running digest of everything sent (the workers have stopped), then commit.
    let digest = run.shared.sent.digest();
    sw.digest = digest;
    sw.bd.digest_ms = sw.lap();
    let commit = ControlMsg::Commit {
        digest,
        pages: mem.total_pages(),
        rounds: final_round + 1,
    };
    run.control()?
        .send(&commit, &[])
        .map_err(to_dest("commit"))?;
    *state = state.on(SourceEvent::CommitSent);
    // Two-step commit (see `ControlMsg::Prepared`): the destination validates
    // everything and answers `Prepared`; only then do the source's devices let go
    // (switch-port step 5), and the destination restores after `Released`.
    let reply_until = (Instant::now() + run.migration.config.reply_timeout)
        .min(run.deadline.unwrap_or_else(Instant::now));
    let cancel = run.migration.cancel.clone();
    let reply = next_reply(run.control()?, reply_until, Some(&cancel))?;
    // The brownout deadline covers pause → Prepared: a Prepared that arrives
    // after the streams were cut does not count.
    if watchdog.disarm() {
        return Err(MigrationError::BrownoutTimeout {
            after: run.migration.config.brownout_timeout,
        });
    }
    match reply {
        Some(ControlMsg::Prepared { .. }) => *state = state.on(SourceEvent::Prepared),
        None if run.deadline.is_some_and(|d| reply_until >= d) => {
            return Err(MigrationError::BrownoutTimeout {
                after: run.migration.config.brownout_timeout,
            })
        }
        None => {
            return Err(MigrationError::TimedOut {
                what: "the destination's prepared answer",
                after: run.migration.config.reply_timeout,
            })
        }
        Some(other) => return Err(refusal(other)),
    }
    if cancel.is_cancelled() {
        return Err(MigrationError::Cancelled);
    }
    let t_release = Instant::now();
    for p in run.migration.participants.iter_mut() {
        if let Err(e) = p.release() {
            let _ = run.control()?.send(
                &ControlMsg::Abort {
                    reason: format!("source device release failed: {e}"),
                },
                &[],
            );
            return Err(e.into());
        }
    }
    sw.bd.release_ms = ms(t_release.elapsed());
    // Ownership leaves the source as it starts writing `Released`: even a failed
    // write may have delivered it, so from here no failure resumes the source
    // without the destination's word (a refusal, or a "discarded" outcome).
    *state = state.on(SourceEvent::ReleasedSent);
    run.control()?
        .send(&ControlMsg::Released, &[])
        .map_err(to_dest("commit"))?;
    let until = Instant::now() + run.migration.config.reply_timeout;
    let reply = next_reply(run.control()?, until, None);
    match reply {
        Ok(Some(ControlMsg::Committed {
            verify_us,
            restore_us,
            participants_us,
        })) => {
            *state = state.on(SourceEvent::Committed);
            let session = run.session_id;
            let _ = run
                .control()?
                .send(&ControlMsg::OutcomeKnown { session }, &[]);
            sw.bd.commit_ms = sw.lap();
            sw.bd.dest_verify_ms = verify_us as f64 / 1e3;
            sw.bd.dest_restore_ms = restore_us as f64 / 1e3;
            sw.bd.dest_participants = participants_us
                .into_iter()
                .map(|(id, us)| (id, us as f64 / 1e3))
                .collect();
            Ok(())
        }
        Ok(Some(m @ (ControlMsg::Veto { .. } | ControlMsg::Error { .. }))) => {
            // The destination discarded after a failed restore: tell it we know.
            *state = state.on(SourceEvent::Refused);
            let session = run.session_id;
            let _ = run
                .control()?
                .send(&ControlMsg::OutcomeKnown { session }, &[]);
            Err(refusal(m))
        }
        Ok(Some(other)) => {
            *state = state.on(SourceEvent::Failed);
            Err(MigrationError::Protocol {
                phase: "commit",
                violation: ProtocolViolation::Unexpected {
                    expected: "committed, veto or error after released",
                    got: other.name(),
                },
            })
        }
        Ok(None) => {
            *state = state.on(SourceEvent::Failed);
            Err(MigrationError::TimedOut {
                what: "the destination's committed answer",
                after: run.migration.config.reply_timeout,
            })
        }
        Err(e) => {
            *state = state.on(SourceEvent::Failed);
            Err(e)
        }
    }
}

/// The error for a destination's answer other than the expected one.
fn refusal(m: ControlMsg) -> MigrationError {
    match m {
        ControlMsg::Veto {
            participant,
            reason,
        } => MigrationError::Vetoed(peer_veto(participant, reason)),
        ControlMsg::Error { message } => MigrationError::Remote(message.into()),
        other => MigrationError::Protocol {
            phase: "commit",
            violation: ProtocolViolation::Unexpected {
                expected: "prepared, veto or error",
                got: other.name(),
            },
        },
    }
}

/// The destination runs the VM: finish the source's side and report.
fn finish(
    run: &mut PrecopyRun<'_>,
    mut sw: Switchover,
    final_round: u32,
    predicted_s: f64,
    reason: String,
    t_pause: Instant,
) -> MigrationReport {
    let mem = run.migration.memory.clone();
    if sw.resolved_by_query {
        // The commit ended with the outcome learned by query, now.
        sw.bd.commit_ms = sw.lap();
    }
    // The downtime ends where its last part did: with the destination's word.
    let downtime = sw.mark - t_pause;
    let Switchover {
        bd,
        tracker_misses,
        final_pages,
        digest,
        resolved_by_query,
        ..
    } = sw;
    // Committed: the VM now runs on the destination.
    for p in run.migration.participants.iter_mut() {
        p.committed();
    }
    if let Some(t) = run.migration.tracker.as_mut() {
        let _ = t.stop(&mem);
    }
    let total = run.started.elapsed();
    // The audit after switchover, outside the downtime: the paused source against
    // what was sent. The source VM stays paused until `run` returns. Without a
    // tracker the VM was stopped throughout: its memory cannot have changed.
    let (post_audit, audit_ok) =
        if run.migration.config.post_audit && run.migration.tracker.is_some() {
            match post_switchover_audit(run) {
                Ok(a) => {
                    let ok = a.mismatches == 0;
                    (Some(a), ok)
                }
                Err(e) => {
                    // Committed already: an audit that cannot run is reported, not a
                    // reason to undo the switchover.
                    run.emit(Event::Failed {
                        phase: "post-switchover audit".into(),
                        error: e.to_string(),
                        source_running: false,
                    });
                    (None, false)
                }
            }
        } else {
            (None, true)
        };
    let c = &run.shared.counters;
    let wire = c.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let cfg = &run.migration.config;
    let report = MigrationReport {
        memory_bytes: mem.total_bytes(),
        mode: cfg.mode.name().into(),
        streams: cfg.streams,
        tracker: run
            .migration
            .tracker
            .as_ref()
            .map_or("none".into(), |t| t.name().into()),
        codec: cfg.codec.name().into(),
        spliced_streams: run.shared.spliced_streams,
        image_read: run.shared.image_read,
        rounds: final_round + 1,
        total_ms: ms(total),
        downtime_ms: ms(downtime),
        predicted_downtime_ms: predicted_s * 1e3,
        predicted_downtime_raw_ms: run.prediction.0.total() * 1e3,
        prediction_margin: run.prediction.1,
        downtime_breakdown: bd.clone(),
        bytes_on_wire: wire,
        pages_sent: c.pages.load(std::sync::atomic::Ordering::Relaxed),
        zero_pages: c.zero_pages.load(std::sync::atomic::Ordering::Relaxed),
        delta_pages: c.delta_pages.load(std::sync::atomic::Ordering::Relaxed),
        delta_bytes_saved: c
            .delta_bytes_saved
            .load(std::sync::atomic::Ordering::Relaxed),
        final_pages,
        guest_gib_per_s: mem.total_bytes() as f64 / (1u64 << 30) as f64 / total.as_secs_f64(),
        wire_gbit_per_s: wire as f64 * 8.0 / 1e9 / total.as_secs_f64(),
        transfer_wire_gbit_per_s: {
            let bytes: u64 = run.history.iter().map(|r| r.wire_bytes).sum();
            let ms: f64 = run.history.iter().map(|r| r.duration_ms).sum();
            if ms > 0.0 {
                bytes as f64 * 8.0 / 1e6 / ms
            } else {
                0.0
            }
        },
        converged: reason.starts_with("converged") || reason.starts_with("the VM is stopped"),
        verified: audit_ok,
        verify: match cfg.verify {
            Verify::Digest => "digest".into(),
            Verify::Full => "full".into(),
        },
        tracker_misses,
        throttle_max_percent: run.throttle_max,
        brownout_reason: reason,
        digest: digest.to_string(),
        round_table: run.history.clone(),
        auto_decisions: run.shared.tuner.decisions(),
        session: crate::receiver::outcomes::session_to_string(run.session_id),
        resolved_by_query,
        audit_pages_checked: run.audit.checked,
        audit_misses: run.audit.misses,
        audit_ms: ms(run.audit.elapsed),
        tracker_fallback: run.tracker_fallback,
        post_audit,
        resumed: run.reconnects > run.setup_restarts,
        reconnects: run.reconnects,
        setup_restarts: run.setup_restarts,
        resent_pages: run.resent_pages,
    };
    run.emit(Event::Completed(Box::new(report.clone())));
    report
}

/// Hash every page of the paused source and compare it with what was sent; hand
/// stale pages (as gfns) to the VMM's hook.
fn post_switchover_audit(run: &mut PrecopyRun<'_>) -> Result<PostAudit, MigrationError> {
    let mem = run.migration.memory.clone();
    let t_audit = Instant::now();
    let stale = crate::proof::stale_pages(&mem, &run.shared.sent, 2)?;
    let audit = PostAudit {
        pages: mem.total_pages(),
        mismatches: stale.len() as u64,
        ms: ms(t_audit.elapsed()),
    };
    run.emit(Event::PostAudit(audit.clone()));
    if !stale.is_empty() {
        if let Some(hook) = run.migration.stale_pages_hook.as_mut() {
            let gfns = stale
                .iter()
                .map(|&p| mem.gfn_of(p))
                .collect::<Result<Vec<_>, _>>()?;
            hook(&gfns);
        }
    }
    Ok(audit)
}
