//! Brownout: pause → final harvest → final pages → device state → digest → commit
//! (`Commit` → `Prepared` → participants' `release` → `Released` → `Committed`).
//! Any failure before the destination answers `Committed` resumes the source VM and
//! rolls back every participant that saved (re-creating what `release` tore down).

use std::time::{Duration, Instant};

use super::precopy::Run;
use super::{MigrationError, Verify};
use crate::device::envelope;
use crate::device::Veto;
use crate::memory::{digest_of_table, PageSet};
use crate::stats::{DowntimeBreakdown, Event, MigrationReport, RoundStats};
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
        t.harvest(&mem, set)?;
    }
    let mut tracker_misses = 0;
    if run.m.config.verify == Verify::Full {
        let now = mem.page_hash_table(2)?;
        let sent = run.shared.hash_table();
        for (i, (a, b)) in now.iter().zip(&sent).enumerate() {
            if a != b && !set.contains(i as u64) {
                tracker_misses += 1;
                set.insert(i as u64);
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

    // Digest of everything sent, then commit.
    let t_digest = Instant::now();
    let digest = digest_of_table(&run.shared.hash_table());
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
        verified: true,
        verify: match cfg.verify {
            Verify::Digest => "digest".into(),
            Verify::Full => "full".into(),
        },
        tracker_misses,
        throttle_max_percent: run.throttle_max,
        brownout_reason: reason,
        digest: format!("{digest:016x}"),
        round_table: run.history.clone(),
        auto_decisions: run.shared.tuner.decisions(),
    };
    run.emit(Event::Completed(Box::new(report.clone())));
    Ok(report)
}
