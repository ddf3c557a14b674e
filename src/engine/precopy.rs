//! The pre-copy round loop (mechanism only: *when* to stop is the policy's call).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::pipeline::{batches_of, worker, Shared, Work, QUEUE_DEPTH_PER_WORKER};
use super::policy::{Decision, PolicySnapshot};
use super::{brownout, setup, Migration, MigrationError};
use crate::memory::PageSet;
use crate::stats::estimator::Estimator;
use crate::stats::{Event, MigrationReport, RoundStats};
use crate::transport::Connector;
use crate::wire::{ControlMsg, MAX_BATCH_PAGES};

/// Everything the loop and brownout share.
pub(crate) struct Run<'a> {
    pub m: &'a mut Migration,
    pub session: setup::Session,
    pub shared: Arc<Shared>,
    pub tx: Option<Sender<Work>>,
    pub handles: Vec<JoinHandle<()>>,
    pub shutdowns: Vec<Box<dyn Fn() + Send + Sync>>,
    pub history: Vec<RoundStats>,
    pub est: Estimator,
    pub started: Instant,
    pub throttle: u8,
    pub throttle_max: u8,
}

impl Run<'_> {
    pub(crate) fn emit(&self, e: Event) {
        if let Some(p) = &self.m.progress {
            p.on_event(&e);
        }
    }

    /// Queue every page of `set` for round `round`, then gate the round.
    pub(crate) fn send_round(
        &mut self,
        set: &PageSet,
        round: u32,
        quiescent: bool,
    ) -> Result<(), MigrationError> {
        let total = set.count();
        let tx = self.tx.as_ref().expect("workers running");
        let mut sent = 0u64;
        let mut since_event = 0u64;
        let shared = &self.shared;
        let cancel = &self.m.cancel;
        let progress = &self.m.progress;
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
                if tx.send(Work::Batch(b)).is_err() {
                    return false;
                }
                sent += n;
                since_event += n;
                if since_event >= 16384 {
                    since_event = 0;
                    if let Some(p) = progress {
                        p.on_event(&Event::Progress { round, sent, total });
                    }
                }
                true
            },
        );
        for _ in 0..self.handles.len() {
            let _ = tx.send(Work::RoundEnd(round));
        }
        self.shared.barrier.wait();
        if let Some(e) = stop {
            return Err(e);
        }
        self.check_workers()
    }

    pub(crate) fn check_workers(&self) -> Result<(), MigrationError> {
        if self.shared.failed.load(Ordering::Acquire) {
            let msg = self
                .shared
                .error
                .lock()
                .expect("error lock")
                .clone()
                .unwrap_or_default();
            return Err(MigrationError::Send(msg));
        }
        Ok(())
    }

    /// Stop workers: ask them to finish, or on failure cut their streams.
    pub(crate) fn stop_workers(&mut self, abort: bool) {
        if abort {
            for s in &self.shutdowns {
                s();
            }
        }
        self.tx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Run a whole migration.
pub(crate) fn run(
    mut m: Migration,
    connector: &dyn Connector,
) -> Result<MigrationReport, MigrationError> {
    let started = Instant::now();
    let result = (|| {
        let session = setup::connect(&m, connector)?;
        let streams = session.pages.len();
        let shared = Arc::new(
            Shared::new(
                m.memory.clone(),
                streams,
                m.config.codec,
                m.config.zstd_level,
            )
            .with_delta(m.config.delta, m.config.delta_cache_bytes),
        );
        let (tx, rx) = crossbeam_channel::bounded(streams * QUEUE_DEPTH_PER_WORKER);
        let mut session = session;
        let shutdowns = session
            .pages
            .iter()
            .map(|w| w.stream().shutdown_handle())
            .collect();
        let handles = session
            .pages
            .drain(..)
            .map(|w| {
                let sh = shared.clone();
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name("livemig-send".into())
                    .spawn(move || worker(&sh, rx, w))
                    .expect("spawn sender thread")
            })
            .collect();
        // Floor for the fixed brownout cost: one control round trip plus the digest.
        let est = Estimator {
            fixed_cost_s: session.rtt.as_secs_f64() + m.memory.total_pages() as f64 * 8.0 / 10e9,
            ..Default::default()
        };
        let mut run = Run {
            m: &mut m,
            session,
            shared,
            tx: Some(tx),
            handles,
            shutdowns,
            history: Vec::new(),
            est,
            started,
            throttle: 0,
            throttle_max: 0,
        };
        let r = precopy(&mut run);
        if r.is_err() {
            let reason = match &r {
                Err(MigrationError::Cancelled) => "cancelled by the operator".to_string(),
                Err(e) => e.to_string(),
                Ok(_) => unreachable!(),
            };
            let _ = run
                .session
                .control
                .send_control(&ControlMsg::Abort { reason }, &[]);
            run.stop_workers(true);
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
                source_running: true,
            });
        }
    }
    result
}

fn precopy(run: &mut Run<'_>) -> Result<MigrationReport, MigrationError> {
    let mem = run.m.memory.clone();
    let pages = mem.total_pages();
    run.emit(Event::Started {
        pages,
        streams: run.handles.len() as u16,
    });
    if let Some(t) = run.m.tracker.as_mut() {
        t.start(&mem)?;
    }
    let mut set = PageSet::full(pages);
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
        let t0 = Instant::now();
        // Without a tracker the VM is stopped: its memory cannot change.
        let quiescent = run.m.tracker.is_none();
        run.send_round(&set, round, quiescent)?;
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
        set.clear();
        let harvest_start = Instant::now();
        if let Some(t) = run.m.tracker.as_mut() {
            t.harvest(&mem, &mut set)?;
        }
        let since_last = secs + harvest_start.elapsed().as_secs_f64();
        let dirty = set.count();
        if sent_pages > 0 && wire > 0 {
            run.est.bandwidth.add(wire as f64 / secs);
            run.est.bytes_per_page.add(wire as f64 / sent_pages as f64);
        }
        run.est.dirty_rate.add(dirty as f64 / since_last);
        let predicted = run.est.predict_downtime(dirty);
        let stats = RoundStats {
            round,
            pages: sent_pages,
            zero_pages: z1 - z0,
            wire_bytes: wire,
            duration_ms: secs * 1e3,
            bandwidth_bps: wire as f64 / secs,
            dirty_after: dirty,
            dirty_rate_pps: dirty as f64 / since_last,
            predicted_downtime_ms: predicted * 1e3,
            throttle_percent: run.throttle,
        };
        run.emit(Event::RoundFinished(stats.clone()));
        run.history.push(stats);
        let decision = if run.m.tracker.is_none() {
            Decision::Brownout("the VM is stopped: one pass is complete".into())
        } else {
            let snap = PolicySnapshot {
                rounds: round + 1,
                elapsed: precopy_start.elapsed(),
                remaining_pages: dirty,
                predicted_downtime: Duration::from_secs_f64(predicted),
                history: &run.history,
                throttle_percent: run.throttle,
            };
            run.m.policy.decide(&snap)
        };
        round += 1;
        match decision {
            Decision::Continue => {}
            Decision::Throttle(p) => {
                run.m.vm.throttle(p).map_err(MigrationError::Vm)?;
                run.throttle = p;
                run.throttle_max = run.throttle_max.max(p);
                run.emit(Event::Throttled { percent: p });
            }
            Decision::Brownout(reason) => {
                return brownout::run(run, set, round, predicted, reason);
            }
            Decision::Abort(reason) => return Err(MigrationError::PolicyAbort(reason)),
        }
    }
}
