//! Convergence, auto-converge, cancel and progress, end to end over loopback TCP
//! with a running dirtier (small guests; seconds). (Loopback TCP rather than the
//! in-memory transport: its read timeout fires after 50 ms of silence whatever the
//! configured timeout, which multi-round pre-copy easily exceeds.)

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig::dirty::ExplicitTracker;
use livemig::engine::{
    AbortReason, CancelToken, DowntimePolicy, HostSlots, Migration, MigrationError, OnLimit,
};
use livemig::memory::{DirtyBitmap, GuestMemory};
use livemig::receiver::{ReceiveError, Received, Receiver};
use livemig::stats::sink::Collect;
use livemig::stats::{Event, MigrationReport, ProgressSink};
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::workload::{self, Content, Dirtier, DirtierConfig, Skew};

/// Tests run in parallel in this binary, except the one that judges the host's
/// load: the others' dirtiers and page workers change the counts of runnable
/// threads it samples, so it runs alone.
static HOST: RwLock<()> = RwLock::new(());

/// A turn alongside the other tests.
fn shared_turn() -> RwLockReadGuard<'static, ()> {
    HOST.read().unwrap_or_else(|e| e.into_inner())
}

/// A turn with no other test of this binary running.
fn turn_alone() -> RwLockWriteGuard<'static, ()> {
    HOST.write().unwrap_or_else(|e| e.into_inner())
}

struct Guest {
    mem: Arc<GuestMemory>,
    bitmap: Arc<DirtyBitmap>,
    dirtier: Dirtier,
}

fn guest(mib: usize, rate_mb_s: u64, hot_mib: u64, skew: Skew) -> Guest {
    let mem = Arc::new(GuestMemory::anonymous(mib << 20, false).unwrap());
    workload::fill(&mem, Content::Mix, 7, 1).unwrap();
    let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
    let dirtier = Dirtier::start(
        mem.clone(),
        Some(bitmap.clone()),
        DirtierConfig {
            rate_bytes_per_s: rate_mb_s * 1_000_000,
            hot_set_bytes: hot_mib << 20,
            skew,
            ..Default::default()
        },
    );
    Guest {
        mem,
        bitmap,
        dirtier,
    }
}

fn loopback() -> (TcpConnector, TcpAcceptor) {
    let acc = TcpAcceptor::bind("127.0.0.1:0").unwrap();
    let addr = acc.local_addr().unwrap().to_string();
    (TcpConnector::new(addr), acc)
}

type RecvHandle = JoinHandle<Result<Received, ReceiveError>>;

fn migrate(
    g: &Guest,
    policy: DowntimePolicy,
    cancel: CancelToken,
    sink: Option<Arc<dyn ProgressSink>>,
) -> (Result<MigrationReport, MigrationError>, RecvHandle) {
    let (conn, acc) = loopback();
    let receiver = std::thread::spawn(move || Receiver::new().run(&acc));
    let mut m = Migration::new(g.mem.clone())
        .tracker(Box::new(ExplicitTracker::new(g.bitmap.clone())))
        .vm_control(Box::new(g.dirtier.control()))
        .policy(Box::new(policy))
        .cancel_token(cancel);
    if let Some(s) = sink {
        m = m.progress(s);
    }
    (m.run(&conn), receiver)
}

/// Destination memory equals the source's (the source is paused after success).
fn assert_same_memory(g: &Guest, received: &Received) {
    assert!(
        g.dirtier.control().is_paused(),
        "source paused after switchover"
    );
    assert_eq!(
        g.mem.full_digest(1).unwrap(),
        received.memory.full_digest(1).unwrap(),
        "destination memory differs from the source"
    );
}

/// The source keeps running: not paused, and its CPUs keep writing.
fn assert_source_runs(g: &Guest) {
    assert!(!g.dirtier.control().is_paused(), "source left paused");
    let before = g.dirtier.writes();
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.dirtier.writes() == before {
        assert!(Instant::now() < deadline, "source dirtier made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn breakdown_sum(r: &MigrationReport) -> f64 {
    let b = &r.downtime_breakdown;
    b.pause_ms
        + b.final_harvest_ms
        + b.final_pages_ms
        + b.device_state_ms
        + b.digest_ms
        + b.commit_ms
}

#[test]
fn hot_set_converges_and_verifies() {
    let _turn = shared_turn();
    let g = guest(32, 200, 4, Skew::Hot80_20);
    let (r, recv) = migrate(&g, DowntimePolicy::default(), CancelToken::new(), None);
    let report = r.expect("migration");
    let received = recv.join().unwrap().expect("receiver");
    assert!(report.verified);
    assert!(received.report.verified);
    assert_same_memory(&g, &received);
    assert!(report.predicted_downtime_ms > 0.0);
    // The breakdown accounts for the downtime: its parts run back to back.
    let sum = breakdown_sum(&report);
    assert!(
        (sum - report.downtime_ms).abs() < 1e-3,
        "breakdown {sum} ms vs downtime {} ms",
        report.downtime_ms
    );
    // One row per round, final round included.
    assert_eq!(report.round_table.len() as u32, report.rounds);
}

#[test]
fn unreachable_target_throttles_then_switches_at_local_minimum() {
    let _turn = shared_turn();
    let g = guest(32, 400, 16, Skew::Uniform);
    let mut policy = DowntimePolicy::with_target(Duration::from_micros(1));
    policy.max_rounds = 200;
    let sink = Arc::new(Collect::default());
    let (r, recv) = migrate(&g, policy, CancelToken::new(), Some(sink.clone()));
    let report = r.expect("migration must finish (force brownout)");
    let received = recv.join().unwrap().expect("receiver");
    assert!(!report.converged);
    assert!(
        report.brownout_reason.starts_with("local minimum"),
        "{}",
        report.brownout_reason
    );
    assert_eq!(
        report.throttle_max_percent, 95,
        "every throttle step was tried"
    );
    let steps: Vec<u8> = sink
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Throttled { percent } => Some(*percent),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![20, 40, 60, 80, 95]);
    assert_same_memory(&g, &received);
}

#[test]
fn no_auto_converge_with_cancel_on_limit_aborts_and_source_runs() {
    let _turn = shared_turn();
    let g = guest(32, 400, 16, Skew::Uniform);
    let mut policy = DowntimePolicy::with_target(Duration::from_micros(1));
    policy.auto_converge = false;
    policy.on_limit = OnLimit::Cancel;
    policy.max_rounds = 3;
    policy.max_time = Duration::from_secs(5);
    let sink = Arc::new(Collect::default());
    let (r, recv) = migrate(&g, policy, CancelToken::new(), Some(sink.clone()));
    match r {
        Err(MigrationError::PolicyAbort(why)) => {
            assert!(
                matches!(
                    why,
                    AbortReason::LimitReached { .. } | AbortReason::Stalled { .. }
                ),
                "{why:?}"
            );
            assert!(why.to_string().contains("converg"), "{why}")
        }
        other => panic!("expected a policy abort, got {other:?}"),
    }
    // The destination discarded what it received.
    let dest = recv.join().unwrap();
    assert!(dest.is_err(), "destination must discard: {dest:?}");
    let events = sink.events();
    assert!(events.iter().all(|e| !matches!(e, Event::Throttled { .. })));
    assert!(matches!(
        events.last(),
        Some(Event::Failed {
            source_running: true,
            ..
        })
    ));
    assert_source_runs(&g);
}

#[test]
fn cancel_mid_migration_keeps_the_source_running() {
    let _turn = shared_turn();
    let g = guest(32, 200, 16, Skew::Uniform);
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    // Cancel as soon as round 0 is done, from the event stream (no timing).
    let sink: Arc<dyn ProgressSink> = Arc::new(move |e: &Event| {
        if matches!(e, Event::RoundFinished(r) if r.round == 0) {
            c2.cancel();
        }
    });
    let mut policy = DowntimePolicy::with_target(Duration::from_micros(1));
    policy.max_rounds = 200;
    let (r, recv) = migrate(&g, policy, cancel, Some(sink));
    assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("cancelled"));
    assert!(recv.join().unwrap().is_err(), "destination must discard");
    assert_source_runs(&g);
}

#[test]
fn cancel_at_brownout_resumes_the_source() {
    let _turn = shared_turn();
    let g = guest(16, 800, 8, Skew::Uniform);
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let sink: Arc<dyn ProgressSink> = Arc::new(move |e: &Event| {
        if matches!(e, Event::Brownout { .. }) {
            c2.cancel();
        }
    });
    let (r, recv) = migrate(&g, DowntimePolicy::default(), cancel, Some(sink));
    // The final round checks the token before each batch; an empty final round
    // has nothing to interrupt and may commit.
    match r {
        Err(e) => {
            assert!(matches!(e, MigrationError::Cancelled), "{e}");
            assert!(recv.join().unwrap().is_err());
            assert_source_runs(&g);
        }
        Ok(report) => {
            assert_eq!(report.final_pages, 0);
            assert_same_memory(&g, &recv.join().unwrap().unwrap());
        }
    }
}

#[test]
fn progress_events_are_monotone() {
    let _turn = shared_turn();
    let g = guest(64, 300, 32, Skew::Hot80_20);
    let sink = Arc::new(Collect::default());
    let (r, recv) = migrate(
        &g,
        DowntimePolicy::default(),
        CancelToken::new(),
        Some(sink.clone()),
    );
    r.expect("migration");
    recv.join().unwrap().expect("receiver");
    let events = sink.events();
    let fractions: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress { fraction, .. } => Some(*fraction),
            _ => None,
        })
        .collect();
    assert!(fractions.len() >= 2, "progress events emitted");
    assert!(fractions.iter().all(|f| (0.0..1.0).contains(f)));
    assert!(
        fractions.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {fractions:?}"
    );
    assert!(matches!(events.first(), Some(Event::Started { .. })));
    assert!(matches!(events.last(), Some(Event::Completed(_))));
}

#[test]
fn concurrent_migrations_queue_for_host_slots() {
    let _turn = shared_turn();
    let slots = Arc::new(HostSlots::new(1));
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let slots = slots.clone();
            std::thread::spawn(move || {
                let g = guest(16, 50 * (i + 1), 4, Skew::Uniform);
                let (conn, acc) = loopback();
                let receiver = std::thread::spawn(move || Receiver::new().run(&acc));
                let report = Migration::new(g.mem.clone())
                    .tracker(Box::new(ExplicitTracker::new(g.bitmap.clone())))
                    .vm_control(Box::new(g.dirtier.control()))
                    .slots(slots)
                    .run(&conn)
                    .expect("migration");
                let received = receiver.join().unwrap().expect("receiver");
                assert_same_memory(&g, &received);
                report
            })
        })
        .collect();
    for r in runs {
        assert!(r.join().unwrap().verified);
    }
    assert_eq!(slots.running(), 0);
    assert_eq!(slots.waiting(), 0);
}

#[test]
fn the_destination_drains_what_is_in_flight_before_the_pause() {
    let _turn = shared_turn();
    let g = guest(32, 200, 4, Skew::Hot80_20);
    let sink = Arc::new(Collect::default());
    let s: Arc<dyn ProgressSink> = sink.clone();
    let (r, recv) = migrate(&g, DowntimePolicy::default(), CancelToken::new(), Some(s));
    let report = r.expect("migration");
    let received = recv.join().unwrap().expect("receiver");
    assert_same_memory(&g, &received);
    let events = sink.events();
    let brownout = events
        .iter()
        .position(|e| matches!(e, Event::Brownout { .. }))
        .expect("a brownout event");
    // The last thing before the pause is the destination's answer: every round
    // sent was applied, and nothing was sent after it.
    match &events[brownout - 1] {
        Event::Drained { round, applied, .. } => {
            assert!(
                *applied,
                "loopback destination caught up: {:?}",
                events[brownout - 1]
            );
            assert_eq!(
                *round + 1,
                report.rounds - 1,
                "drained the last round before the final one"
            );
        }
        other => panic!("expected Drained right before Brownout, got {other:?}"),
    }
    assert!(report
        .brownout_reason
        .contains("for the destination to apply round"));
}

/// With every CPU but one taken by another process, the ends find their host busy
/// after the drain, and the prediction budgets a stalled wake-up (the reason says
/// so). The receiver runs in this process, so both hosts are this one; which end
/// gets a clean look first under the test run's own load may vary.
#[test]
fn other_processes_on_every_cpu_add_a_stall_to_the_prediction() {
    let _turn = turn_alone();
    let cpus = livemig::stats::host_load::cpus();
    let spinners: Vec<std::process::Child> = (0..cpus.saturating_sub(1).max(1))
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("spawn a spinning shell")
        })
        .collect();
    struct Reap(Vec<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let _reap = Reap(spinners);
    std::thread::sleep(Duration::from_millis(50));
    let g = guest(32, 100, 4, Skew::Uniform);
    let (r, recv) = migrate(&g, DowntimePolicy::default(), CancelToken::new(), None);
    let report = r.expect("migration");
    let received = recv.join().unwrap().expect("receiver");
    assert_same_memory(&g, &received);
    assert!(
        report
            .brownout_reason
            .contains("CPUs busy: one stalled wake-up budgeted"),
        "{}",
        report.brownout_reason
    );
}
