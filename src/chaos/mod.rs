//! The fault campaign (`livemig chaos`): many small migrations, each with one
//! or more random faults, each judged against the paused source.
//!
//! Why over 600 lines: one run's whole judgement (migrate, inject, judge against the
//! paused source, resolve a run in doubt, tally) reads as one sequence; the guest, the
//! plan, the injector and the ledger are already their own modules.
//!
//! One run ([`run_one`]) migrates a [`guest::Guest`] of a few MiB, written by a
//! dirtier thread while rounds run, from an in-process source (`Migration`) to
//! an in-process destination (`Receiver`) over loopback TCP, with every
//! deadline shortened ([`plan::Deadlines`]). The [`inject::Injector`] fires the
//! [`plan::Plan`]'s faults when the migration reaches them; the
//! [`ledger::Ledger`] records who runs the VM at every instant; then
//! [`check::judge`] classifies the run. A source in doubt is resolved the way
//! `livemig resolve` does: by asking the destination's outcome record over the
//! protocol, then acting on the answer (committed: the source stays stopped;
//! discarded: it resumes).
//!
//! [`campaign`] runs seeds `seed, seed + 1, …` and sums the verdicts into a
//! [`Summary`]; run `i`'s plan depends only on its seed, so `--runs 1 --seed S`
//! replays it.

pub mod check;
pub mod guest;
pub mod inject;
pub mod ledger;
pub mod plan;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::codec::CodecId;
use crate::device::{ParticipantError, RestoreState, SaveState, Veto};
use crate::dirty::ExplicitTracker;
use crate::engine::{
    ConvergencePolicy, Decision, Migration, MigrationConfig, MigrationError, Mode, VmControl,
};
use crate::memory::MemoryError;
use crate::receiver::{OutcomeLog, Receiver, ReceiverConfig};
use crate::transport::framed::FrameReader;
use crate::transport::tcp::{TcpAcceptor, TcpConnector};
use crate::transport::{Acceptor, TransportError};
use crate::wire::control::SessionOutcome;
use crate::wire::ControlMsg;
use check::{Observed, Outcome, SourceEnd, Verdict};
use guest::Guest;
use inject::{FaultReport, Injector};
use ledger::Ledger;
use plan::{Class, Deadlines, Plan};

/// Why a run could not be carried out (the harness, not the engine, failed).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The guest's memory.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The loopback listener.
    #[error("loopback listener: {0}")]
    Transport(#[from] TransportError),
    /// A thread could not be started.
    #[error("starting the {what} thread: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Campaign settings.
#[derive(Debug, Clone)]
pub struct CampaignConfig {
    /// The shortened deadlines of every run.
    pub deadlines: Deadlines,
    /// A side that has not returned after this long is reported as hung.
    pub hang_limit: Duration,
}

impl Default for CampaignConfig {
    fn default() -> Self {
        Self {
            deadlines: Deadlines::default(),
            hang_limit: Duration::from_secs(30),
        }
    }
}

/// One run: its plan, its faults, the verdict.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The plan (and its seed).
    pub plan: Plan,
    /// Each fault and whether it fired.
    pub faults: Vec<FaultReport>,
    /// The judge's verdict.
    pub verdict: Verdict,
    /// The source's error, if it failed.
    pub error: Option<String>,
    /// The source's report counts a setup started over (the connection broke
    /// before round 0).
    pub setup_restarted: bool,
    /// Wall time of the run.
    pub wall: Duration,
    /// Who ran the VM, faults fired, harness actions.
    pub timeline: Vec<String>,
}

impl RunReport {
    /// The classes of the faults that fired (each once).
    pub fn fired_classes(&self) -> Vec<Class> {
        let mut c: Vec<Class> = self
            .faults
            .iter()
            .filter(|f| f.fired)
            .map(|f| f.fault.kind.class())
            .collect();
        c.sort();
        c.dedup();
        c
    }
}

/// Pre-copy for exactly `rounds` rounds, then brownout (the campaign wants
/// every phase reached, whatever the dirty rate).
#[derive(Debug)]
struct FixedRounds(u32);

impl ConvergencePolicy for FixedRounds {
    fn decide(&mut self, snap: &crate::engine::policy::PolicySnapshot<'_>) -> Decision {
        if snap.rounds >= self.0 {
            Decision::Brownout(format!("{} rounds", self.0))
        } else {
            Decision::Continue
        }
    }
    fn hot_page_rounds(&self) -> u32 {
        0
    }
}

const DEVICE: &str = "chaos-dev";

/// The source's device: a few bytes of state.
#[derive(Debug)]
struct SourceDevice;

impl SaveState for SourceDevice {
    fn id(&self) -> &str {
        DEVICE
    }
    fn version(&self) -> u32 {
        1
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        out.extend_from_slice(b"chaos device state");
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {}
}

/// The destination's device: its restore is where the destination takes the VM
/// (the ledger marks it running), possibly slowly; a killed destination
/// restores nothing.
struct DestDevice {
    ledger: Arc<Ledger>,
    inj: Arc<Injector>,
}

impl RestoreState for DestDevice {
    fn id(&self) -> &str {
        DEVICE
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, _version: u32, _blob: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn restore(&mut self, _version: u32, _blob: &[u8]) -> Result<(), ParticipantError> {
        if let Some(delay) = self.inj.restore_delay() {
            let until = Instant::now() + delay;
            while Instant::now() < until && !self.inj.killed() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if self.inj.killed() {
            return Err(ParticipantError::Failed {
                participant: DEVICE.into(),
                message: "the destination was killed".into(),
            });
        }
        self.ledger.dest(true, "restored");
        Ok(())
    }
    fn discard(&mut self) {
        self.ledger.dest(false, "discarded");
    }
}

/// Answer outcome queries on `listener` (the destination after its migration
/// ended, or restarted after a kill; a dead one drops every connection) until
/// `done`.
fn serve_outcomes(
    listener: &TcpAcceptor,
    inj: &Injector,
    dest_log: &Arc<OutcomeLog>,
    dest_finished: &AtomicBool,
    restart_now: &AtomicBool,
    done: &AtomicBool,
) {
    while !done.load(Ordering::SeqCst) {
        let log = match inj.kill() {
            Some(k) => {
                let up = restart_now.load(Ordering::SeqCst)
                    || k.restart_after.is_some_and(|r| k.at.elapsed() >= r);
                up.then_some(k.record)
            }
            // The receiver owns the listener until it returns.
            None if !dest_finished.load(Ordering::SeqCst) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            None => Some(dest_log.clone()),
        };
        let Ok(s) = listener.accept(Duration::from_millis(20)) else {
            continue;
        };
        let Some(log) = log else {
            // Dead: the connection goes nowhere.
            s.shutdown();
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut c = FrameReader::new(s, "control");
        if let Ok((ControlMsg::QueryOutcome { session }, _)) = c.control() {
            log.answer(&mut c, session);
        }
    }
}

fn spawn<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(std::sync::mpsc::Receiver<T>, std::thread::JoinHandle<()>), ChaosError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(format!("chaos-{what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|source| ChaosError::Spawn { what, source })?;
    Ok((rx, h))
}

/// Carry out one run of `plan`.
pub fn run_one(plan: &Plan, cfg: &CampaignConfig) -> Result<RunReport, ChaosError> {
    let t0 = Instant::now();
    let d = &cfg.deadlines;
    let ledger = Arc::new(Ledger::new());
    let mut guest = Guest::start(
        plan.pages,
        plan.hot_pages,
        plan.dirty_pages_per_s,
        plan.seed,
    )?;
    let listener = Arc::new(TcpAcceptor::bind("127.0.0.1:0")?.peer_timeout(d.peer_timeout));
    let addr = listener
        .local_addr()
        .map_err(TransportError::Accept)?
        .to_string();
    let dest_log = Arc::new(OutcomeLog::default());
    let inj = Injector::new(&plan.faults, ledger.clone(), dest_log.clone());

    // The destination.
    let receiver = Receiver::new()
        .config(ReceiverConfig {
            huge_pages: false,
            prefault: false,
            accept_timeout: d.accept_timeout,
            hello_timeout: d.hello_timeout,
            setup_timeout: d.accept_timeout,
            idle_timeout: d.idle_timeout,
            resume_window: d.resume_window,
            outcome_linger: d.outcome_timeout,
            ..ReceiverConfig::default()
        })
        .participant(Box::new(DestDevice {
            ledger: ledger.clone(),
            inj: inj.clone(),
        }))
        .outcome_log(dest_log.clone());
    let dest_finished = Arc::new(AtomicBool::new(false));
    let acceptor = inj.acceptor(listener.clone());
    let finished = dest_finished.clone();
    let (dest_rx, dest_thread) = spawn("destination", move || {
        let r = receiver.run(&acceptor);
        finished.store(true, Ordering::SeqCst);
        r
    })?;
    let restart_now = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (_, outcomes_thread) = {
        let (listener, inj, log) = (listener.clone(), inj.clone(), dest_log.clone());
        let (finished, restart, done) = (dest_finished.clone(), restart_now.clone(), done.clone());
        spawn("outcomes", move || {
            serve_outcomes(&listener, &inj, &log, &finished, &restart, &done)
        })?
    };

    // The source.
    let (mode, codec) = if plan.compress {
        (Mode::Compress, CodecId::Lz4)
    } else {
        (Mode::Multichannel, CodecId::Raw)
    };
    let migration = Migration::new(guest.memory.clone())
        .tracker(Box::new(ExplicitTracker::new(guest.bitmap.clone())))
        .vm_control(Box::new(guest.control(ledger.clone())))
        .policy(Box::new(FixedRounds(plan.rounds)))
        .participant(Box::new(SourceDevice))
        .progress(inj.clone())
        .config(MigrationConfig {
            mode,
            streams: plan.streams,
            codec,
            reply_timeout: d.reply_timeout,
            bandwidth: Some(crate::transport::shaped::TokenBucket::new(
                plan.bandwidth_bps,
            )),
            brownout_timeout: d.brownout_timeout,
            heartbeat_interval: d.peer_timeout / 4,
            peer_timeout: d.peer_timeout,
            reconnect_timeout: d.reconnect_timeout,
            outcome_timeout: d.outcome_timeout,
            ..MigrationConfig::default()
        });
    let connector = inj.connector(TcpConnector::new(addr.clone()).peer_timeout(d.peer_timeout));
    let (source_rx, source_thread) = spawn("source", move || migration.run(&connector))?;

    let mut problems = Vec::new();
    let source = source_rx.recv_timeout(cfg.hang_limit).ok();
    if source.is_none() {
        problems.push(format!(
            "the source did not return within {:?} (hang)",
            cfg.hang_limit
        ));
    } else {
        let _ = source_thread.join();
    }
    let dest = dest_rx.recv_timeout(cfg.hang_limit).ok();
    if dest.is_none() {
        problems.push(format!(
            "the destination did not return within {:?} (hang)",
            cfg.hang_limit
        ));
    } else {
        let _ = dest_thread.join();
    }

    // Resolve a source in doubt as an operator would, and act on the answer.
    let source_end = match &source {
        Some(Ok(r)) => SourceEnd::Completed {
            verified: r.verified,
            resumed: r.resumed || r.reconnects > 0,
        },
        Some(Err(MigrationError::InDoubt { session, .. })) => {
            // The operator brings a dead destination back before asking.
            restart_now.store(true, Ordering::SeqCst);
            let asked = TcpConnector::new(addr.clone()).peer_timeout(d.peer_timeout);
            let answer = crate::engine::commit::resolve(
                &asked,
                *session,
                Duration::from_millis(500),
                Instant::now() + Duration::from_secs(5),
            );
            ledger.event(format!("operator resolved: {answer:?}"));
            if matches!(answer, Ok(SessionOutcome::Discarded)) {
                let _ = guest.control(ledger.clone()).resume();
            }
            SourceEnd::InDoubt {
                resolved: answer.ok(),
            }
        }
        Some(Err(e)) => SourceEnd::Failed {
            error: e.to_string(),
            claims_running: e.source_running(),
        },
        None => SourceEnd::Failed {
            error: "hung".into(),
            claims_running: false,
        },
    };
    done.store(true, Ordering::SeqCst);
    let _ = outcomes_thread.join();

    let record = inj.kill().map_or(dest_log.clone(), |k| k.record);
    let dest_committed = inj
        .session()
        .is_some_and(|s| record.get(s) == SessionOutcome::Committed);
    let source_running_after =
        ledger.source_running() && guest.makes_progress(Duration::from_millis(500));
    guest.control(ledger.clone()).freeze();
    guest.halt();
    let source_model_mismatches = guest.model_mismatches()?.len() as u64;
    let dest_pages_differing = match (&dest, dest_committed) {
        (Some(Ok(received)), true) => {
            Some(check::differing_pages(&guest.memory, &received.memory)?)
        }
        _ => None,
    };
    let observed = Observed {
        source: source_end,
        dest_committed,
        dest_pages_differing,
        source_model_mismatches,
        source_running_after,
        dest_running_after: ledger.dest_running(),
        both_running: !ledger.both_running().is_empty(),
    };
    let mut verdict = check::judge(&observed);
    if !problems.is_empty() {
        verdict.outcome = Outcome::Broken;
        verdict.problems.extend(problems);
    }
    let mut timeline = ledger.timeline();
    if let Some(Err(e)) = &dest {
        timeline.push(format!("destination: {e}"));
    }
    Ok(RunReport {
        plan: plan.clone(),
        faults: inj.report(),
        error: match &source {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        },
        setup_restarted: matches!(&source, Some(Ok(r)) if r.setup_restarts > 0),
        verdict,
        wall: t0.elapsed(),
        timeline,
    })
}

/// One row of the campaign's table.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ClassRow {
    /// Runs in which a fault of this class fired.
    pub runs: u64,
    /// … that completed.
    pub completed: u64,
    /// … that completed by resuming.
    pub resumed: u64,
    /// … that failed cleanly.
    pub failed_clean: u64,
    /// … that were in doubt and then resolved.
    pub in_doubt_resolved: u64,
    /// … that broke an invariant.
    pub problems: u64,
}

impl ClassRow {
    fn add(&mut self, v: &Verdict) {
        self.runs += 1;
        match v.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::FailedClean => self.failed_clean += 1,
            Outcome::InDoubtResolved => self.in_doubt_resolved += 1,
            Outcome::Broken => self.problems += 1,
        }
        self.resumed += u64::from(v.resumed);
    }
}

/// What a campaign found (the `--json` line).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Runs carried out.
    pub runs: u64,
    /// Completed and verified.
    pub completed: u64,
    /// Completed runs whose report says the migration reconnected after a
    /// broken connection: the rounds resumed, or the setup started over.
    pub resumed: u64,
    /// … of which started the setup over (the connection broke before round 0).
    pub setup_restarted: u64,
    /// Failed with the source running and its memory intact.
    pub failed_clean: u64,
    /// In doubt, then resolved consistently.
    pub in_doubt_resolved: u64,
    /// Runs that broke an invariant (they count in none of the three above).
    pub broken: u64,
    /// Destination pages differing from the source where the destination took
    /// the VM.
    pub pages_lost: u64,
    /// Runs whose source broke its shadow model or did not run when it should.
    pub source_damaged: u64,
    /// Runs in which both sides ran the VM at some instant.
    pub both_running: u64,
    /// Runs whose fired faults were all transient (reset, stream kill, short stall).
    pub transient_faults: u64,
    /// … of which completed by reconnecting (`resumed`, setup restarts
    /// included).
    pub transient_resumed: u64,
    /// … of which completed with a setup started over.
    pub transient_setup_restarted: u64,
    /// Runs in which no fault fired (the migration ended before the trigger).
    pub no_fault_fired: u64,
    /// The campaign's first seed (run `i` has seed `seed + i`).
    pub seed: u64,
    /// Seeds of the runs that broke an invariant.
    pub broken_seeds: Vec<u64>,
    /// Per fault class (a run counts in each class that fired in it).
    pub classes: BTreeMap<&'static str, ClassRow>,
    /// Wall time (ms).
    pub wall_ms: u64,
}

impl Summary {
    /// Count one run.
    pub fn add(&mut self, r: &RunReport) {
        let v = &r.verdict;
        self.runs += 1;
        match v.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::FailedClean => self.failed_clean += 1,
            Outcome::InDoubtResolved => self.in_doubt_resolved += 1,
            Outcome::Broken => {
                self.broken += 1;
                self.broken_seeds.push(r.plan.seed);
            }
        }
        self.resumed += u64::from(v.resumed);
        self.setup_restarted += u64::from(v.resumed && r.setup_restarted);
        self.pages_lost += v.pages_lost;
        self.source_damaged += u64::from(v.source_damaged);
        self.both_running += u64::from(v.both_running);
        let classes = r.fired_classes();
        if classes.is_empty() {
            self.no_fault_fired += 1;
        } else if classes.iter().all(|c| c.is_transient()) {
            self.transient_faults += 1;
            self.transient_resumed += u64::from(v.resumed);
            self.transient_setup_restarted += u64::from(v.resumed && r.setup_restarted);
        }
        for c in classes {
            self.classes.entry(c.name()).or_default().add(v);
        }
    }

    /// Whether every invariant held: nothing lost, no source damaged, never
    /// both running, and every run completed, failed cleanly or was resolved.
    pub fn holds(&self) -> bool {
        self.pages_lost == 0
            && self.source_damaged == 0
            && self.both_running == 0
            && self.completed + self.failed_clean + self.in_doubt_resolved == self.runs
    }
}

/// Run `runs` runs with seeds `seed, seed + 1, …`, `jobs` at a time (a run
/// spends most of its time waiting on deadlines, so runs overlap well), calling
/// `each` after every run, in completion order.
pub fn campaign(
    runs: u64,
    seed: u64,
    jobs: usize,
    cfg: &CampaignConfig,
    mut each: impl FnMut(&RunReport),
) -> Result<Summary, ChaosError> {
    let t0 = Instant::now();
    let mut s = Summary {
        seed,
        ..Summary::default()
    };
    let next = std::sync::atomic::AtomicU64::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, 64) {
            let (tx, next) = (tx.clone(), &next);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= runs {
                    return;
                }
                let plan = Plan::from_seed(seed.wrapping_add(i), &cfg.deadlines);
                let r = run_one(&plan, cfg);
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    // Stop handing out runs after a harness failure.
                    next.store(runs, Ordering::SeqCst);
                    return;
                }
            });
        }
        drop(tx);
        let mut failed = None;
        for r in rx {
            match r {
                Ok(r) => {
                    s.add(&r);
                    each(&r);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        failed
    });
    if let Some(e) = failed {
        return Err(e);
    }
    s.broken_seeds.sort_unstable();
    s.wall_ms = t0.elapsed().as_millis() as u64;
    Ok(s)
}
