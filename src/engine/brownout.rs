//! Brownout: pause → final harvest → final pages → device state → digest → commit
//! (`Commit` → `Prepared` → participants' `release` → `Released` → `Committed`).
//! Any failure before the destination answers `Committed` resumes the source VM and
//! rolls back every participant that saved (re-creating what `release` tore down).

use std::time::{Duration, Instant};

use super::precopy::Run;
use super::{MigrationError, Verify};
use crate::device::envelope;
use crate::device::Veto;
use crate::memory::PageSet;
use crate::stats::{DowntimeBreakdown, Event, MigrationReport, PostAudit, RoundStats};
use crate::wire::ControlMsg;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Brown out and switch over. `set` holds the pages dirty at the last harvest.
pub(crate) fn run(
    run: &mut Run<'_>,
    mut set: PageSet,
    final_round: u32,
    predicted_s: f64,
    reason: String,
) -> Result<MigrationReport, MigrationError> {
    let mut bd = DowntimeBreakdown::default();
    let t_pause = Instant::now();
    run.m.vm.pause().map_err(MigrationError::Vm)?;
    bd.pause_ms = ms(t_pause.elapsed());
    let mut saved = 0usize;
    let r = paused(
        run,
        &mut set,
        final_round,
        predicted_s,
        reason,
        &mut bd,
        t_pause,
        &mut saved,
    );
    if r.is_err() {
        // The source VM must survive: undo device saves, resume.
        for p in run.m.participants.iter_mut().take(saved) {
            p.rolled_back();
        }
        if let Err(e) = run.m.vm.resume() {
            return Err(MigrationError::Vm(format!(
                "{e} (after a failed switchover: {})",
                r.expect_err("the switchover failed")
            )));
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn paused(
    run: &mut Run<'_>,
    set: &mut PageSet,
    final_round: u32,
    predicted_s: f64,
    reason: String,
    bd: &mut DowntimeBreakdown,
    t_pause: Instant,
    saved: &mut usize,
) -> Result<MigrationReport, MigrationError> {
    let mem = run.m.memory.clone();
    let t_harvest = Instant::now();
    if let Some(t) = run.m.tracker.as_mut() {
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
    if run.m.config.verify == Verify::Full {
        for p in crate::proof::stale_pages(&mem, &run.shared.sent, 2)? {
            if !set.contains(p) {
                tracker_misses += 1;
                set.insert(p);
            }
        }
    }
    bd.final_harvest_ms = ms(t_harvest.elapsed());
    let final_pages = set.count();
    run.emit(Event::Brownout {
        round: final_round,
        pages: final_pages,
        predicted_downtime_ms: predicted_s * 1e3,
        reason: reason.clone(),
    });
    let to_dest = |phase| move |source| MigrationError::Transport { phase, source };
    run.session
        .control
        .send_control(&ControlMsg::Brownout { final_round }, &[])
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
    run.stop_workers(false);
    run.check_workers()?;
    bd.final_pages_ms = ms(t_pages.elapsed());
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
        duration_ms: bd.final_pages_ms,
        bandwidth_bps: wire_final as f64 / t_pages.elapsed().as_secs_f64().max(1e-9),
        throttle_percent: run.throttle,
        ..Default::default()
    });

    // Device state, in participant order.
    let t_dev = Instant::now();
    let mut entries = Vec::with_capacity(run.m.participants.len());
    for p in run.m.participants.iter_mut() {
        let t = Instant::now();
        let mut blob = Vec::new();
        *saved += 1;
        p.save(&mut blob)?;
        bd.participants
            .push((p.id().to_string(), ms(t.elapsed()), blob.len() as u64));
        entries.push(envelope::Entry {
            id: p.id().to_string(),
            version: p.version(),
            blob,
        });
    }
    let env = envelope::encode(&entries);
    bd.device_state_bytes = env.len() as u64;
    run.session
        .control
        .send_control(&ControlMsg::DeviceState, &env)
        .map_err(to_dest("device state"))?;
    bd.device_state_ms = ms(t_dev.elapsed());
    run.emit(Event::DeviceState {
        participants: entries.len(),
        bytes: env.len() as u64,
    });

    // The running digest of everything sent (the workers have stopped), then commit.
    let t_digest = Instant::now();
    let digest = run.shared.sent.digest();
    bd.digest_ms = ms(t_digest.elapsed());
    let t_commit = Instant::now();
    let commit = ControlMsg::Commit {
        digest,
        pages: mem.total_pages(),
        rounds: final_round + 1,
    };
    run.session
        .control
        .send_control(&commit, &[])
        .map_err(to_dest("commit"))?;
    // Two-step commit (see `ControlMsg::Prepared`): the destination validates
    // everything and answers `Prepared`; only then do the source's devices let go
    // (switch-port step 5), and the destination restores after `Released`.
    let reply = run.session.control.control().map_err(to_dest("commit"))?.0;
    let reply = match reply {
        ControlMsg::Prepared { .. } => {
            let t_release = Instant::now();
            for p in run.m.participants.iter_mut() {
                if let Err(e) = p.release() {
                    let _ = run.session.control.send_control(
                        &ControlMsg::Abort {
                            reason: format!("source device release failed: {e}"),
                        },
                        &[],
                    );
                    return Err(e.into());
                }
            }
            bd.release_ms = ms(t_release.elapsed());
            run.session
                .control
                .send_control(&ControlMsg::Released, &[])
                .map_err(to_dest("commit"))?;
            run.session.control.control().map_err(to_dest("commit"))?.0
        }
        other => other,
    };
    match reply {
        ControlMsg::Committed {
            verify_us,
            restore_us,
            participants_us,
        } => {
            bd.commit_ms = ms(t_commit.elapsed());
            bd.dest_verify_ms = verify_us as f64 / 1e3;
            bd.dest_restore_ms = restore_us as f64 / 1e3;
            bd.dest_participants = participants_us
                .into_iter()
                .map(|(id, us)| (id, us as f64 / 1e3))
                .collect();
        }
        ControlMsg::Veto {
            participant,
            reason,
        } => {
            return Err(MigrationError::Vetoed(Veto {
                participant,
                reason,
            }))
        }
        ControlMsg::Error { message } => return Err(MigrationError::Remote(message)),
        other => {
            return Err(MigrationError::Protocol {
                phase: "commit",
                message: format!("unexpected {}", other.name()),
            })
        }
    }
    let downtime = t_pause.elapsed();
    // Committed: the VM now runs on the destination.
    for p in run.m.participants.iter_mut() {
        p.committed();
    }
    if let Some(t) = run.m.tracker.as_mut() {
        let _ = t.stop(&mem);
    }
    let total = run.started.elapsed();
    // The audit after switchover, outside the downtime: the paused source against
    // what was sent. The source VM stays paused until `run` returns. Without a
    // tracker the VM was stopped throughout: its memory cannot have changed.
    let (post_audit, audit_ok) = if run.m.config.post_audit && run.m.tracker.is_some() {
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
    let cfg = &run.m.config;
    let report = MigrationReport {
        memory_bytes: mem.total_bytes(),
        mode: cfg.mode.name().into(),
        streams: cfg.streams,
        tracker: run
            .m
            .tracker
            .as_ref()
            .map_or("none".into(), |t| t.name().into()),
        codec: cfg.codec.name().into(),
        spliced_streams: run.shared.spliced_streams,
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
        audit_pages_checked: run.audit.checked,
        audit_misses: run.audit.misses,
        audit_ms: ms(run.audit.elapsed),
        tracker_fallback: run.tracker_fallback,
        post_audit,
    };
    run.emit(Event::Completed(Box::new(report.clone())));
    Ok(report)
}

/// Hash every page of the paused source and compare it with what was sent; hand
/// stale pages (as gfns) to the VMM's hook.
fn post_switchover_audit(run: &mut Run<'_>) -> Result<PostAudit, MigrationError> {
    let mem = run.m.memory.clone();
    let t_audit = Instant::now();
    let stale = crate::proof::stale_pages(&mem, &run.shared.sent, 2)?;
    let audit = PostAudit {
        pages: mem.total_pages(),
        mismatches: stale.len() as u64,
        ms: ms(t_audit.elapsed()),
    };
    run.emit(Event::PostAudit(audit.clone()));
    if !stale.is_empty() {
        if let Some(hook) = run.m.stale_pages_hook.as_mut() {
            let gfns = stale
                .iter()
                .map(|&p| mem.gfn_of(p))
                .collect::<Result<Vec<_>, _>>()?;
            hook(&gfns);
        }
    }
    Ok(audit)
}
