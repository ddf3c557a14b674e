//! Deadlines on the source side: a panicked worker, cancel in every phase, the
//! brownout deadline, a failed pause, and heartbeats that keep a long pre-copy
//! alive while silence on either side is detected.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use livemig::codec::CodecId;
use livemig::device::{ParticipantError, RestoreState, SaveState, Veto};
use livemig::engine::{
    CancelToken, Migration, MigrationConfig, MigrationError, Mode, Verify, VmControl,
};
use livemig::receiver::{Awaited, ReceiveError, Receiver};
use livemig::stats::Event;
use livemig::transport::fault::{Fault, FaultyConnector};
use livemig::transport::framed::FrameReader;
use livemig::transport::shaped::TokenBucket;
use livemig::transport::{mem, Acceptor, Connector, Stream};
use livemig::wire::ControlMsg;

fn running_migration(src: &Source, log: &VmLog, cfg: MigrationConfig) -> Migration {
    Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(RecordingVm {
            inner: src.dirtier.control(),
            log: log.clone(),
        }))
        .policy(Box::new(test_policy()))
        .config(cfg)
}

/// The source VM runs (and really does: the guest keeps writing).
fn assert_source_runs(src: &Source, log: &VmLog) {
    log.assert_resumed_if_paused();
    assert!(!src.dirtier.control().is_paused(), "{:?}", log.calls());
    let w0 = src.dirtier.writes();
    let deadline = Instant::now() + Duration::from_secs(10);
    while src.dirtier.writes() == w0 {
        assert!(Instant::now() < deadline, "source guest is not running");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_panicking_worker_ends_the_migration_cleanly_and_the_source_runs() {
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let (c, a) = mem::pair();
    let cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    let out = migrate(
        running_migration(&src, &log, cfg),
        // The first page stream to carry 256 KiB (inside its first batch of round
        // 0: 256 pages, 1 MiB raw) panics there.
        FaultyConnector::any_page_stream(c, 2, Fault::PanicAfter(256 << 10)),
        Receiver::new().config(receiver_config()),
        a,
    );
    match &out.source {
        Err(MigrationError::WorkerPanicked { stream, message }) => {
            assert!(*stream < 2, "stream {stream}");
            assert!(
                message.as_str().contains("fault: stream panicked"),
                "{message}"
            );
        }
        other => panic!("expected a worker panic, got {other:?}"),
    }
    assert!(out.dest.is_err(), "the destination discards");
    assert_source_runs(&src, &log);
}

/// A cancel from another thread after `after`.
fn cancel_after(token: &CancelToken, after: Duration) -> Arc<std::sync::Mutex<Option<Instant>>> {
    let at = Arc::new(std::sync::Mutex::new(None));
    let (t, a2) = (token.clone(), at.clone());
    std::thread::spawn(move || {
        std::thread::sleep(after);
        *a2.lock().unwrap() = Some(Instant::now());
        t.cancel();
    });
    at
}

#[test]
fn cancel_during_rounds_returns_promptly_and_the_source_runs() {
    let src = Source::default_running(16 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let (c, a) = mem::pair();
    // 16 MiB at 8 Mbit/s: round 0 alone takes about 17 s.
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.bandwidth = Some(TokenBucket::new(8_000_000));
    let token = CancelToken::new();
    let at = cancel_after(&token, Duration::from_millis(300));
    let m = running_migration(&src, &log, cfg).cancel_token(token);
    let out = migrate(m, c, Receiver::new().config(receiver_config()), a);
    let done = Instant::now();
    assert!(
        matches!(out.source, Err(MigrationError::Cancelled)),
        "{:?}",
        out.source.err()
    );
    let took = done - at.lock().unwrap().expect("cancelled");
    assert!(
        took < Duration::from_secs(5),
        "cancel took {took:?} while the round had many seconds to go"
    );
    assert_eq!(log.count("pause"), 0);
    // Aborted, or the cut page streams noticed first: discarded either way.
    assert!(out.dest.is_err(), "the destination discards");
    assert_source_runs(&src, &log);
}

/// A destination device whose validation takes `delay` (the source then waits
/// for `Prepared` that long).
struct SlowValidate {
    delay: Duration,
}

impl RestoreState for SlowValidate {
    fn id(&self) -> &str {
        "dev0"
    }
    fn validate_setup(&mut self, _info: &[u8]) -> Result<(), Veto> {
        Ok(())
    }
    fn validate_state(&mut self, _version: u32, _blob: &[u8]) -> Result<(), Veto> {
        std::thread::sleep(self.delay);
        Ok(())
    }
    fn restore(&mut self, _version: u32, _blob: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn discard(&mut self) {}
}

struct Dev;

impl SaveState for Dev {
    fn id(&self) -> &str {
        "dev0"
    }
    fn version(&self) -> u32 {
        1
    }
    fn setup_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), ParticipantError> {
        out.push(1);
        Ok(())
    }
    fn release(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {}
}

#[test]
fn cancel_during_brownout_returns_promptly_and_resumes() {
    let src = Source::default_running(8 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let (c, a) = mem::pair();
    let cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    let token = CancelToken::new();
    let at = Arc::new(std::sync::Mutex::new(None));
    let failed_at = Arc::new(std::sync::Mutex::new(None));
    let (t2, at2, f2) = (token.clone(), at.clone(), failed_at.clone());
    let sink = move |e: &Event| match e {
        Event::Brownout { .. } => {
            // Cancel while the source waits for Prepared.
            let (t, at) = (t2.clone(), at2.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                *at.lock().unwrap() = Some(Instant::now());
                t.cancel();
            });
        }
        Event::Failed { .. } => *f2.lock().unwrap() = Some(Instant::now()),
        _ => {}
    };
    let m = running_migration(&src, &log, cfg)
        .participant(Box::new(Dev))
        .progress(Arc::new(sink))
        .cancel_token(token);
    let r = Receiver::new()
        .config(receiver_config())
        .participant(Box::new(SlowValidate {
            delay: Duration::from_secs(4),
        }));
    let out = migrate(m, c, r, a);
    assert!(
        matches!(out.source, Err(MigrationError::Cancelled)),
        "{:?}",
        out.source.err()
    );
    let source_done = failed_at.lock().unwrap().expect("failure reported");
    let took = source_done - at.lock().unwrap().expect("cancelled in brownout");
    assert!(
        took < Duration::from_secs(2),
        "cancel took {took:?}; the destination validates for 4 s"
    );
    assert_eq!(log.count("pause"), 1, "{:?}", log.calls());
    assert!(out.dest.is_err(), "the destination discards");
    assert_source_runs(&src, &log);
}

#[test]
fn the_brownout_deadline_resumes_the_source() {
    let src = Source::default_running(8 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let (c, a) = mem::pair();
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.brownout_timeout = Duration::from_millis(500);
    let m = running_migration(&src, &log, cfg).participant(Box::new(Dev));
    let r = Receiver::new()
        .config(receiver_config())
        .participant(Box::new(SlowValidate {
            delay: Duration::from_secs(2),
        }));
    let out = migrate(m, c, r, a);
    assert!(
        matches!(out.source, Err(MigrationError::BrownoutTimeout { .. })),
        "{:?}",
        out.source.err()
    );
    assert_eq!(log.count("pause"), 1, "{:?}", log.calls());
    assert!(out.dest.is_err(), "the destination discards");
    assert_source_runs(&src, &log);
}

/// Page streams whose writes hang once `stall` is set, until the stream is shut
/// down (a destination that stops reading, behind a transport whose own write
/// timeout is longer than the brownout deadline).
struct StallingConnector {
    inner: mem::MemConnector,
    opened: std::sync::atomic::AtomicUsize,
    stall: Arc<AtomicBool>,
}

impl Connector for StallingConnector {
    fn connect(&self) -> Result<Box<dyn Stream>, livemig::transport::TransportError> {
        let s = self.inner.connect()?;
        if self.opened.fetch_add(1, Ordering::SeqCst) == 0 {
            return Ok(s); // the control stream
        }
        Ok(Box::new(StallingStream {
            inner: s,
            stall: self.stall.clone(),
            cut: Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new())),
        }))
    }
    fn describe(&self) -> String {
        "stalling(mem)".into()
    }
}

#[derive(Debug)]
struct StallingStream {
    inner: Box<dyn Stream>,
    stall: Arc<AtomicBool>,
    cut: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl std::io::Read for StallingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for StallingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stall.load(Ordering::SeqCst) {
            let (lock, cv) = &*self.cut;
            let guard = lock.lock().unwrap();
            // The test's own guard: a stream nobody cuts fails the test below.
            let (guard, _) = cv
                .wait_timeout_while(guard, Duration::from_secs(60), |cut| !*cut)
                .unwrap();
            drop(guard);
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stalled stream cut",
            ));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn cut(c: &(std::sync::Mutex<bool>, std::sync::Condvar)) {
    *c.0.lock().unwrap() = true;
    c.1.notify_all();
}

impl Stream for StallingStream {
    livemig::forward_stream!(inner: set_read_timeout, set_write_timeout, deadlines);
    fn shutdown(&self) {
        cut(&self.cut);
        self.inner.shutdown();
    }
    fn shutdown_handle(&self) -> Box<dyn Fn() + Send + Sync> {
        let (c, inner) = (self.cut.clone(), self.inner.shutdown_handle());
        Box::new(move || {
            cut(&c);
            inner();
        })
    }
}

/// After the pause the page streams stop moving: the source cuts them at the
/// brownout deadline, ends its workers, fails, and runs its VM again.
#[test]
fn page_streams_stuck_after_the_pause_are_cut_at_the_brownout_deadline() {
    let src = Source::default_running(8 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let (c, a) = mem::pair();
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.brownout_timeout = Duration::from_millis(500);
    cfg.reconnect_timeout = Duration::ZERO;
    let cfg_brownout = cfg.brownout_timeout;
    let stall = Arc::new(AtomicBool::new(false));
    let paused_at = Arc::new(std::sync::Mutex::new(None));
    let failed_at = Arc::new(std::sync::Mutex::new(None));
    let (st, p2, f2) = (stall.clone(), paused_at.clone(), failed_at.clone());
    let sink = move |e: &Event| match e {
        Event::Brownout { .. } => {
            *p2.lock().unwrap() = Some(Instant::now());
            st.store(true, Ordering::SeqCst);
        }
        Event::Failed { .. } => *f2.lock().unwrap() = Some(Instant::now()),
        _ => {}
    };
    let m = running_migration(&src, &log, cfg).progress(Arc::new(sink));
    let connector = StallingConnector {
        inner: c,
        opened: Default::default(),
        stall,
    };
    let out = migrate(m, connector, Receiver::new().config(receiver_config()), a);
    assert!(out.source.is_err(), "stuck page streams cannot complete");
    let paused = paused_at.lock().unwrap().expect("paused");
    let failed = failed_at.lock().unwrap().expect("failure reported");
    // The deadline (0.5 s), then the workers end as soon as their streams are cut;
    // the bound leaves 3 s for a slow host, not the next deadline (the 20 s reply
    // timeout).
    assert!(
        failed - paused < cfg_brownout + Duration::from_secs(3),
        "failed {:?} after the pause: {:?}",
        failed - paused,
        out.source
    );
    assert_eq!(log.count("pause"), 1, "{:?}", log.calls());
    assert!(out.dest.is_err(), "the destination discards");
    assert_source_runs(&src, &log);
}

/// Pauses (part of) the VM, then reports failure.
struct FailingPause<V>(RecordingVm<V>);

impl<V: VmControl> VmControl for FailingPause<V> {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.pause()?;
        Err("vCPU 1 did not stop".into())
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.resume()
    }
    fn throttle(&mut self, percent: u8) -> Result<(), livemig::engine::VmControlError> {
        self.0.throttle(percent)
    }
}

#[test]
fn a_failed_pause_resumes_what_was_paused() {
    let src = Source::default_running(8 * MIB, TrackerKind::Explicit);
    let log = VmLog::default();
    let (c, a) = mem::pair();
    let m = Migration::new(src.mem.clone())
        .tracker(src.tracker())
        .vm_control(Box::new(FailingPause(RecordingVm {
            inner: src.dirtier.control(),
            log: log.clone(),
        })))
        .policy(Box::new(test_policy()))
        .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest));
    let out = migrate(m, c, Receiver::new().config(receiver_config()), a);
    match &out.source {
        Err(
            e @ MigrationError::PauseFailed {
                error,
                resume_error,
            },
        ) => {
            assert!(error.to_string().contains("vCPU 1"), "{error}");
            assert!(resume_error.is_none());
            assert!(e.source_running());
        }
        other => panic!("expected a pause failure, got {other:?}"),
    }
    assert_eq!(log.calls().iter().filter(|c| **c != "throttle").count(), 2);
    assert_eq!(log.count("pause"), 1);
    assert_eq!(log.count("resume"), 1);
    // Aborted, or the cut page streams noticed first: discarded either way.
    assert!(out.dest.is_err(), "the destination discards");
    assert_source_runs(&src, &log);
}

// ---- heartbeats -------------------------------------------------------------------

/// A stopped 16 MiB guest sent at 24 Mbit/s: one round of about 5.6 s, several
/// times the destination's 1 s idle timeout.
fn long_round(heartbeats: bool) -> (Outcome, Arc<livemig::GuestMemory>) {
    let mem = source_memory(16 * MIB, 5);
    let (c, a) = mem::pair();
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    cfg.bandwidth = Some(TokenBucket::new(24_000_000));
    if heartbeats {
        cfg.heartbeat_interval = Duration::from_millis(50);
        cfg.peer_timeout = Duration::from_secs(5);
    } else {
        cfg.heartbeat_interval = Duration::from_secs(3600);
        cfg.peer_timeout = Duration::from_secs(3600);
    }
    // No resumption: a silent control stream fails the session.
    let rcfg = {
        let mut settings = receiver_config();
        settings.idle_timeout = Duration::from_secs(1);
        settings.control_timeout = Duration::from_secs(1);
        settings.resume_window = Duration::ZERO;
        settings
    };
    let m = Migration::new(mem.clone()).config(cfg);
    (migrate(m, c, Receiver::new().config(rcfg), a), mem)
}

#[test]
fn heartbeats_keep_a_pre_copy_longer_than_the_idle_timeout_alive() {
    let (out, mem) = long_round(true);
    let report = out.source.expect("source");
    let received = out.dest.expect("destination");
    assert!(
        report.round_table[0].duration_ms > 3000.0,
        "the premise: round 0 lasts several idle timeouts ({} ms)",
        report.round_table[0].duration_ms
    );
    assert_eq!(
        mem.full_digest(2).unwrap(),
        received.memory.full_digest(2).unwrap()
    );
}

#[test]
fn a_silent_source_fails_the_destination_with_a_control_timeout() {
    let (out, _) = long_round(false);
    match out.dest {
        Err(ReceiveError::TimedOut { what, after, .. }) => {
            assert!(
                matches!(what, Awaited::Source(w) if w.contains("control stream")),
                "{what}"
            );
            assert_eq!(after, Duration::from_secs(1));
        }
        other => panic!("expected a control-stream timeout, got {:?}", other.err()),
    }
    assert!(out.source.is_err());
}

/// A destination that completes setup, drains every stream and never answers
/// another control message (a stalled peer), until `stop`.
fn silent_destination(
    a: mem::MemAcceptor,
    answer_setup: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(s) = a.accept(Duration::from_secs(10)) else {
            return;
        };
        let mut control = FrameReader::new(s, "control");
        let streams = match control.control() {
            Ok((ControlMsg::Hello { streams, .. }, _)) => streams,
            _ => return,
        };
        if answer_setup {
            let _ = control.send_control(
                &ControlMsg::Welcome {
                    major: livemig::wire::PROTOCOL_MAJOR,
                    minor: livemig::wire::PROTOCOL_MINOR,
                    capabilities: vec![],
                },
                &[],
            );
            let _ = control.control();
            let _ = control.send_control(&ControlMsg::SetupOk, &[]);
            for _ in 0..streams {
                if let Ok(s) = a.accept(Duration::from_secs(10)) {
                    std::thread::spawn(move || {
                        let mut s = s;
                        let mut buf = vec![0u8; 1 << 16];
                        while std::io::Read::read(&mut s, &mut buf).is_ok_and(|n| n > 0) {}
                    });
                }
            }
        }
        let _ = control
            .stream()
            .set_read_timeout(Some(Duration::from_millis(50)));
        while !stop.load(Ordering::Acquire) {
            let _ = control.control();
        }
    })
}

#[test]
fn a_destination_that_stops_answering_is_detected_within_the_peer_timeout() {
    let mem = source_memory(16 * MIB, 5);
    let (c, a) = mem::pair();
    let stop = Arc::new(AtomicBool::new(false));
    let dest = silent_destination(a, true, stop.clone());
    let mut cfg = config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest);
    // Round 0 would take about 17 s at 8 Mbit/s.
    cfg.bandwidth = Some(TokenBucket::new(8_000_000));
    cfg.peer_timeout = Duration::from_millis(400);
    let m = Migration::new(mem).config(cfg);
    let t = Instant::now();
    let r = with_timeout(GUARD, "migration", move || m.run(&c));
    let took = t.elapsed();
    stop.store(true, Ordering::Release);
    let _ = dest.join();
    match r {
        Err(MigrationError::TimedOut { what, after }) => {
            assert!(what.contains("control stream"), "{what}");
            assert_eq!(after, Duration::from_millis(400));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "detected after {took:?}");
}

#[test]
fn cancel_during_setup_returns_promptly() {
    let mem = source_memory(4 * MIB, 5);
    let (c, a) = mem::pair();
    let stop = Arc::new(AtomicBool::new(false));
    // The destination reads Hello and never answers.
    let dest = silent_destination(a, false, stop.clone());
    let cfg = {
        let mut settings = config(Mode::Multichannel, 1, CodecId::Raw, Verify::Digest);
        settings.reply_timeout = Duration::from_secs(30);
        settings
    };
    let token = CancelToken::new();
    let at = cancel_after(&token, Duration::from_millis(200));
    let m = Migration::new(mem).config(cfg).cancel_token(token);
    let r = with_timeout(GUARD, "migration", move || m.run(&c));
    let done = Instant::now();
    stop.store(true, Ordering::Release);
    let _ = dest.join();
    assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
    let took = done - at.lock().unwrap().expect("cancelled");
    assert!(
        took < Duration::from_secs(5),
        "cancel took {took:?}; the reply timeout is 30 s"
    );
}
